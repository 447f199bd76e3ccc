"""Backfill: every user's state of one model version built from a whole history, in batched parallel passes.

Users are grouped by history length and each group goes through ``ServingModel.advance`` from empty states,
the chunked parallel form (``HyTRec.extend_state``) for histories of a chunk or more: a user's history costs
one pass, whatever its length.

**From the stream** (``hytrec backfill --from-stream``), the history is the event log (``streams/archive.py``:
archive, then the stream) up to the partitions' newest entries when the backfill starts, without erased
users' entries. Each state is written with, as its mark, the last entry of its user it was built from, so
the dual write (HYTREC_WRITE_VERSIONS) then applies to this version only the entries above it. A backfill
write never goes below a stored mark: for a user the dual write already carried past the backfill's mark
(it created or moved the state while the backfill ran) the user is rebuilt from the log up to the stored mark
(the catch-up rounds), so neither side double-applies or drops an event. See docs/lifecycle.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hytrec.model.serving import ServingModel
from hytrec.state_store import Mark, Snapshot, StateStore, Write, entry_key
from hytrec.streams.archive import Archive, LogEntry, iter_log, stream_entries, stream_heads
from hytrec.streams.erasure import Tombstone, erased
from hytrec.streams.partition import StreamLayout

MAX_TOKENS = 32_768  # padded events per parallel pass
MAX_USERS = 256  # users per pass (and per pipelined compare-and-set)
CATCH_UP_ROUNDS = 20


@dataclass
class History:
    """One user's events in order (item ids, timestamps) and, from the stream, their entry ids."""

    items: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)
    partition: int | None = None

    def add(self, e: LogEntry) -> None:
        self.items.append(e.item_id)
        self.ts.append(e.ts)
        self.entries.append(e.entry_id)
        self.partition = e.partition

    def upto(self, entry_id: str) -> History:
        """The prefix at or below ``entry_id``."""
        key = entry_key(entry_id)
        n = sum(1 for e in self.entries if entry_key(e) <= key)
        return History(self.items[:n], self.ts[:n], self.entries[:n], self.partition)


@dataclass
class Report:
    users: int = 0
    events: int = 0
    caught_up: int = 0
    pending: int = 0  # still behind a racing writer after the catch-up rounds (not written)
    seconds: float = 0.0
    through: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        rate = round(self.users / self.seconds, 1) if self.seconds else None
        return {**self.__dict__, "seconds": round(self.seconds, 3), "users_per_s": rate}


def groups(histories: Mapping[str, History]) -> list[list[str]]:
    """Users in passes of similar length (shortest first), each within MAX_TOKENS padded events."""
    order = sorted(histories, key=lambda u: len(histories[u].items))
    out: list[list[str]] = []
    cur: list[str] = []
    for u in order:
        n = max(1, len(histories[u].items))
        if cur and ((len(cur) + 1) * n > MAX_TOKENS or len(cur) >= MAX_USERS):
            out.append(cur)
            cur = []
        cur.append(u)
    if cur:
        out.append(cur)
    return out


def build_blobs(model: ServingModel, users: Sequence[str], histories: Mapping[str, History]) -> dict[str, bytes]:
    """Encoded states of ``users`` built from empty in one batched pass (synchronous torch work)."""
    events = [[(model.row(i), t) for i, t in zip(histories[u].items, histories[u].ts, strict=True)] for u in users]
    states = model.advance([None] * len(users), events)
    return {u: model.encode(states.user(k)) for k, u in enumerate(users)}


def read_log(
    client: Any,
    layout: StreamLayout,
    archive: Archive | None,
    tombstones: Mapping[str, Tombstone],
    upto: Mapping[int, str],
    only: set[str] | None = None,
) -> dict[str, History]:
    """Every user's history from the log up to ``upto`` (per partition)."""
    out: dict[str, History] = {}
    for e in iter_log(client, layout, archive, tombstones, upto):
        if only is None or e.user_id in only:
            out.setdefault(e.user_id, History()).add(e)
    return out


class Backfill:
    """Writes built states into one version's store; see the module docstring."""

    def __init__(self, model: ServingModel, store: StateStore, run: Any) -> None:
        self.model = model
        self.store = store
        self.run = run  # the runner of torch work (the store's own, or a thread)
        self.base: dict[str, tuple[bytes, int]] = {}  # users to catch up: the state built, of how many events

    async def overwrite(self, histories: Mapping[str, History]) -> Report:
        """``--history FILE``: replace every user's state, count and latest timestamp (no marks)."""
        report, start = Report(), time.perf_counter()
        for users in groups(histories):
            blobs = await self.run(lambda users=users: build_blobs(self.model, users, histories))
            for u in users:
                h = histories[u]
                await self.store.put(u, blobs[u], n_events=len(h.items), last_ts=max(h.ts))
            report.users += len(users)
            report.events += sum(len(histories[u].items) for u in users)
        report.seconds = time.perf_counter() - start
        return report

    async def from_stream(
        self,
        client: Any,
        layout: StreamLayout,
        archive: Archive | None,
        tombstones: Mapping[str, Tombstone],
    ) -> Report:
        """Build every user of the log up to the newest entries now, marks included; catch up users the dual
        write carried past them. ``client`` is a synchronous Redis client (the log reads)."""
        start = time.perf_counter()
        report = Report()
        through = stream_heads(client, layout)
        report.through = {str(p): e for p, e in through.items()}
        histories = read_log(client, layout, archive, tombstones, through)
        behind: dict[str, str] = {}  # user -> the stored mark the dual write already reached
        for users in groups(histories):
            blobs = await self.run(lambda users=users: build_blobs(self.model, users, histories))
            lost = await self._write(users, histories, blobs, layout, report)
            behind.update(lost)
            self.base.update({u: (blobs[u], len(histories[u].items)) for u in lost})
        # Catch-up: the users whose stored mark is past what the backfill read are rebuilt from the log up to
        # their stored mark, read from the stream after ``through``. The compare-and-set's version check makes a
        # race with a further dual write retry the user (update_many recomputes it).
        pos = dict(through)
        for _ in range(CATCH_UP_ROUNDS):
            if not behind:
                break
            heads = stream_heads(client, layout)
            for part in layout.partitions:
                for e in stream_entries(client, part, pos[part.index], heads[part.index]):
                    if e.user_id in behind and not erased(tombstones, e.user_id, e.entry_id):
                        histories.setdefault(e.user_id, History()).add(e)
            pos = heads
            behind = await self._catch_up(list(behind), histories, layout, pos, report, client, tombstones)
        report.pending = len(behind)
        report.seconds = time.perf_counter() - start
        return report

    def _extend_base(self, users: list[str], histories: Mapping[str, History]) -> dict[str, bytes]:
        """Encoded states of ``users``: the state the main pass built for the user advanced by the rest of
        ``histories[u]`` (a catch-up costs the new events only, so it keeps up with a busy dual write)."""
        states, events = [], []
        for u in users:
            blob, n = self.base.get(u, (None, 0))
            h = histories[u]
            states.append(self.model.decode(blob) if blob is not None else None)
            events.append([(self.model.row(i), t) for i, t in zip(h.items[n:], h.ts[n:], strict=True)])
        if not any(events):
            return {u: self.model.encode(s) for u, s in zip(users, states, strict=True)}
        out = self.model.advance(states, events)
        return {u: self.model.encode(out.user(k)) for k, u in enumerate(users)}

    async def _write(
        self,
        users: Iterable[str],
        histories: Mapping[str, History],
        blobs: Mapping[str, bytes],
        layout: StreamLayout,
        report: Report,
    ) -> dict[str, str]:
        """Write the states whose mark is not behind the stored one; return the users that are (stored mark)."""
        fields = {u: layout.partitions[histories[u].partition or 0].mark_field for u in users}
        behind: dict[str, str] = {}

        def compute(snaps: dict[str, Snapshot]) -> dict[str, Write]:
            writes = {}
            for u, snap in snaps.items():
                h, name = histories[u], fields[u]
                stored = snap.marks.get(name)
                mine = Mark(h.entries[-1], stored.epoch if stored else 0)
                if stored is not None and stored.key > mine.key:
                    behind[u] = stored.entry_id
                    continue
                behind.pop(u, None)
                writes[u] = Write(blobs[u], (), len(h.items), max(h.ts), replace_count=True, marks={name: mine})
            return writes

        commits = await self.store.update_many(list(fields), compute, marks={u: [f] for u, f in fields.items()})
        commits = {u: c for u, c in commits.items() if not c.erased}  # erased while the backfill ran: not written
        report.users += len(commits)
        report.events += sum(len(histories[u].items) for u in commits)
        return behind

    async def _catch_up(
        self,
        users: list[str],
        histories: dict[str, History],
        layout: StreamLayout,
        pos: dict[int, str],
        report: Report,
        client: Any = None,
        tombstones: Mapping[str, Tombstone] | None = None,
    ) -> dict[str, str]:
        """Rebuild ``users`` from the log up to their stored mark; a mark past what was read (``pos``) is read up
        to first, inside the compute (so a writer moving on between two rounds cannot starve a user)."""
        fields = {u: layout.partitions[histories[u].partition or 0].mark_field for u in users}
        parts = {u: histories[u].partition or 0 for u in users}
        wanted = set(users)
        behind: dict[str, str] = {}

        def read_to(p: int, entry_id: str) -> None:
            for e in stream_entries(client, layout.partitions[p], pos[p], entry_id):
                if e.user_id in wanted and not erased(tombstones or {}, e.user_id, e.entry_id):
                    histories.setdefault(e.user_id, History()).add(e)
            pos[p] = entry_id

        def compute(snaps: dict[str, Snapshot]) -> dict[str, Write]:
            writes, todo = {}, {}
            for u, snap in snaps.items():
                stored = snap.marks.get(fields[u])
                if stored is None:  # erased meanwhile, or never written: nothing to catch up
                    behind.pop(u, None)
                    continue
                if stored.key > entry_key(pos[parts[u]]):
                    if client is None:  # the writer is ahead of what was read: next round
                        behind[u] = stored.entry_id
                        continue
                    read_to(parts[u], stored.entry_id)
                behind.pop(u, None)
                todo[u] = (histories[u].upto(stored.entry_id), stored)
            if todo:
                built = self._extend_base(list(todo), {u: h for u, (h, _) in todo.items()})
                for u, (h, stored) in todo.items():
                    writes[u] = Write(
                        built[u], (), len(h.items), max(h.ts), replace_count=True, marks={fields[u]: stored}
                    )
            return writes

        commits = await self.store.update_many(users, compute, marks={u: [f] for u, f in fields.items()})
        commits = {u: c for u, c in commits.items() if not c.erased}
        report.caught_up += len(commits)
        report.users += len(commits)
        return behind


__all__ = ["Backfill", "History", "Report", "build_blobs", "groups", "read_log"]
