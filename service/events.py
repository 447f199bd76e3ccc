"""The event-ingest use case: validated posts in, every user's state advanced and written atomically.

A post's events are mapped to embedding rows (strict mode rejects the whole post if one item is unknown) and
grouped by user in order. Posts then queue in the events micro-batcher, which coalesces every post waiting
into one ``StateStore.update_many``: one round trip reads each user's blob and which of their event ids are
already applied; ``compute`` (in the torch thread) skips those, decodes the blobs, advances all users of all
posts together and encodes the new states; a per-user compare-and-set writes state and ring buffer together.

**Single flight.** Concurrent posts for one user inside a worker are merged, in arrival order, into that
user's one write of the batch, and batches run one after another, so a worker never races itself: the
compare-and-set only arbitrates between processes. Each post still gets its own counts and its own error.

**Resending.** A request's ``CommitWatch`` (``watch_commits``, opened by the route's deadline) turns ``sent``
once a batch holding its post went to the store. Until then a failed or timed-out post certainly applied
nothing (its queued entry is dropped); from then on it may have landed in full or in part (the batch goes on
after the deadline), and the 503 says so (``may_have_applied``), so a client knows when a resend relies on the
event-id de-duplication window. The events counter counts at commit, not at answer, so it matches the store
whether or not anybody still waited for the answer.

**Stream entries.** ``hytrec consume`` submits posts through the same batcher, each row carrying its stream
entry id: a row at or below the user's stored mark for its partition is a duplicate, and the write moves the
mark forward in the user's compare-and-set (docs/streams.md). The same compare-and-set refuses a write whose
mark is at or below the user's erasure tombstone (a batch racing a DELETE): its entries count as erased.

**The event log.** The served version's batcher (``log``: the stream layout, HYTREC_LOG_POSTED_EVENTS) hands each
user's write the posted events it applies, and the compare-and-set XADDs them to the user's stream partition
(``origin=rest``, ``version``: the served version) in the same script as the state: a duplicate, a refused or
a failed write logs nothing, so the log holds each applied event once. With the log on, a post is written to
the served version only; the consumer applies its entry to every other version it writes, with the entry as
the mark, and never to the served one (docs/lifecycle.md).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from hytrec.model.serving import ServingModel
from hytrec.model.vocab import UNKNOWN_ROW
from hytrec.service import metrics
from hytrec.service.errors import field_problem
from hytrec.service.microbatch import MicroBatcher
from hytrec.service.schemas import Event, IngestResult
from hytrec.service.states import decode_snapshot
from hytrec.service.tracing import span
from hytrec.state_store import ConflictError, CorruptStateError, Mark, Snapshot, StateStore, Write, entry_key
from hytrec.streams import wire
from hytrec.streams.partition import StreamLayout

# One event of a post, ready for the model: (item row, timestamp, event id or None).
Row = tuple[int, float, str | None]
# The fields of an event's entry in the event log (``streams.wire.logged``).
LogFields = tuple[tuple[str, str], ...]


@dataclass
class CommitWatch:
    """What one request knows of its post's writes: ``sent`` once a batch holding the post went to the store."""

    sent: bool = False


_WATCH: ContextVar[CommitWatch | None] = ContextVar("hytrec_commit_watch", default=None)


@contextmanager
def watch_commits() -> Iterator[CommitWatch]:
    """A fresh ``CommitWatch`` for the posts submitted inside (mirrors' tasks copy the context, so share it)."""
    watch = CommitWatch()
    token = _WATCH.set(watch)
    try:
        yield watch
    finally:
        _WATCH.reset(token)


@dataclass(frozen=True)
class StreamSource:
    """Where a consumer's post comes from: the partition's mark field, the lease epoch, each row's entry id."""

    mark_field: str
    epoch: int
    entries: dict[str, list[str]]  # per user, parallel to ``Post.users[user]``


@dataclass
class Post:
    """One POST's events grouped by user (in order), after in-post duplicates were dropped."""

    users: dict[str, list[Row]]
    in_post_duplicates: int = 0
    stream: StreamSource | None = None
    watch: CommitWatch | None = field(default_factory=_WATCH.get)  # the submitting request's
    log: dict[str, list[LogFields]] | None = None  # per user, parallel to ``users[user]``: what to log once applied


@dataclass
class _Counts:
    applied: int = 0
    duplicates: int = 0
    unknown: int = 0
    out_of_order: int = 0
    erased: int = 0


@dataclass
class _Merged:
    """One user's events of a batch across posts: (post index, row, (mark field, entry id, epoch) or None, log
    entry or None)."""

    events: list[tuple[int, Row, tuple[str, str, int] | None, LogFields | None]] = field(default_factory=list)
    fresh: list[Row] = field(default_factory=list)  # what the last compute applied (online evaluation)


class EventBatcher(MicroBatcher[Post, IngestResult]):
    """Coalesces queued posts into one read-compute-write; see the module docstring."""

    name = "events"
    counted = True  # False for a mirror's batcher: the metrics count each event once (set by its ingestor)
    # Called with the events each committed user had applied (online evaluation, service/online_eval.py).
    on_applied: Callable[[dict[str, list[Row]]], Awaitable[None]] | None = None

    def __init__(
        self,
        model: ServingModel,
        store: StateStore,
        max_size: int,
        max_wait_ms: float,
        max_queue: int,
        max_delay_ms: float = math.inf,
        *,
        log: StreamLayout | None = None,
        log_maxlen: int = 0,
    ) -> None:
        super().__init__(max_size, max_wait_ms, max_queue, max_delay_ms)
        self.model = model
        self.store = store
        # The event log of posted events (the served version's batcher only; docs/lifecycle.md): each applied
        # event of a post is XADDed to its user's stream partition by the user's compare-and-set.
        self.log = log
        self.log_maxlen = log_maxlen

    async def process(self, posts: Sequence[Post]) -> Sequence[IngestResult | BaseException]:
        for post in posts:  # no await before this: a post the batcher took is marked before its request can end
            if post.watch is not None:
                post.watch.sent = True
        results: list[IngestResult | BaseException | None] = [None] * len(posts)
        todo = list(range(len(posts)))
        while todo:
            counts: list[dict[str, _Counts]] = [{} for _ in todo]
            computed = [0]
            try:
                await self._apply([posts[i] for i in todo], counts, computed)
            except CorruptStateError as exc:
                if computed[0] > 1:  # a compare-and-set already ran: nothing may be applied twice, so stop here
                    for i in todo:
                        results[i] = exc
                    break
                failed = {i for i in todo if exc.user_id in posts[i].users}  # nothing written yet: retry the rest
                for i in failed:
                    results[i] = exc
                todo = [i for i in todo if i not in failed]
                continue
            except ConflictError as exc:  # every other user committed; the posts naming a loser fail
                lost = set(exc.user_ids)
                for n, i in enumerate(todo):
                    failed = bool(lost.intersection(posts[i].users))
                    committed = {u: c for u, c in counts[n].items() if u not in lost}
                    self._count_committed(committed, 0 if failed else posts[i].in_post_duplicates)
                    results[i] = exc if failed else _result(posts[i], counts[n])
                break
            for n, i in enumerate(todo):
                results[i] = _result(posts[i], counts[n])
                self._count_committed(counts[n], posts[i].in_post_duplicates)
            break
        return results  # type: ignore[return-value]

    def _count_committed(self, per_user: dict[str, _Counts], in_post_duplicates: int) -> None:
        """Count a post's committed users' events (at commit: a request that timed out meanwhile still counts)."""
        if not self.counted:
            return
        total = _Counts(duplicates=in_post_duplicates)
        for c in per_user.values():
            total.applied += c.applied
            total.duplicates += c.duplicates
            total.unknown += c.unknown
            total.out_of_order += c.out_of_order
        for name, n in (
            ("applied", total.applied),
            ("duplicate", total.duplicates),
            ("unknown_item", total.unknown),
            ("out_of_order", total.out_of_order),
        ):
            if n:
                metrics.EVENTS.labels(name).inc(n)

    async def _apply(self, posts: Sequence[Post], counts: list[dict[str, _Counts]], computed: list[int]) -> None:
        """One update_many for every user of ``posts``, filling ``counts`` (per post, per user)."""
        merged: dict[str, _Merged] = defaultdict(_Merged)
        marks: dict[str, list[str]] = {}
        for p, post in enumerate(posts):
            src = post.stream
            for user, rows in post.users.items():
                if src is None:
                    logs = (post.log or {}).get(user) if self.log is not None else None
                    if logs is None:
                        merged[user].events.extend((p, r, None, None) for r in rows)
                    else:
                        merged[user].events.extend((p, r, None, e) for r, e in zip(rows, logs, strict=True))
                    continue
                fields = marks.setdefault(user, [])
                if src.mark_field not in fields:
                    fields.append(src.mark_field)
                entries = src.entries[user]
                merged[user].events.extend(
                    (p, r, (src.mark_field, e, src.epoch), None) for r, e in zip(rows, entries, strict=True)
                )

        def compute(snaps: dict[str, Snapshot]) -> Mapping[str, Write]:
            computed[0] += 1
            with span("hytrec.batch", path=self.name, requests=len(posts), users=len(snaps)):
                return self._compute(snaps, merged, counts)

        asked = {u: ids for u, m in merged.items() if (ids := [r[2] for _, r, _, _ in m.events if r[2] is not None])}
        commits = await self.store.update_many(list(merged), compute, event_ids=asked, marks=marks)
        for c in commits.values():
            metrics.CAS_ATTEMPTS.observe(c.attempts)
            if c.erased:  # refused at or below the user's erasure tombstone: nothing of the user was applied
                for per_post in counts:
                    if c.user_id in per_post:
                        old = per_post[c.user_id]
                        per_post[c.user_id] = _Counts(duplicates=old.duplicates, erased=old.applied)
        if self.on_applied is not None:
            await self.on_applied({u: merged[u].fresh for u, c in commits.items() if not c.erased})

    def _compute(
        self, snaps: dict[str, Snapshot], merged: dict[str, _Merged], counts: list[dict[str, _Counts]]
    ) -> dict[str, Write]:
        """Runs in the torch thread: skip applied and repeated event ids, advance every user at once, encode."""
        users, states, todo = [], [], []
        writes: dict[str, Write] = {}
        new_marks: dict[str, dict[str, Mark]] = {}
        logs: dict[str, tuple[LogFields, ...]] = {}
        for u, snap in snaps.items():
            for per_post in counts:  # a recomputed user (it lost a race) is counted afresh
                per_post.pop(u, None)
            seen = set(snap.applied)
            fresh: list[Row] = []
            to_log: list[LogFields] = []
            state = decode_snapshot(self.model, snap)  # None for a new user; CorruptStateError if undecodable
            last = float(state.last_ts[0]) if state is not None and int(state.count[0]) > 0 else None
            moved: dict[str, Mark] = {}
            for p, (row, ts, eid), src, logged in merged[u].events:
                c = counts[p].setdefault(u, _Counts())
                if src is not None:
                    name, entry, epoch = src
                    mark = moved.get(name) or snap.marks.get(name)
                    if mark is not None and entry_key(entry) <= mark.key:
                        c.duplicates += 1  # at or below the mark: applied already, however long ago
                        continue
                    moved[name] = Mark(entry, epoch)  # an older epoch than the stored one is fenced
                if eid is not None and eid in seen:
                    c.duplicates += 1
                    continue
                if eid is not None:
                    seen.add(eid)
                if last is not None and ts < last:
                    c.out_of_order += 1
                last = ts if last is None else max(last, ts)
                c.unknown += row == UNKNOWN_ROW
                c.applied += 1
                fresh.append((row, ts, eid))
                if logged is not None:
                    to_log.append(logged)
            merged[u].fresh = fresh
            if fresh:
                users.append(u)
                states.append(state)
                todo.append(fresh)
                if moved:
                    new_marks[u] = moved
                if to_log:
                    logs[u] = tuple(to_log)
            elif moved and snap.blob is not None:  # only event-id duplicates: the mark still moves past them
                writes[u] = Write(snap.blob, (), 0, None, marks=moved)
        if not users:
            return writes
        advanced = self.model.advance(states, [[(r, t) for r, t, _ in ev] for ev in todo])
        for i, (u, ev) in enumerate(zip(users, todo, strict=True)):
            ids = tuple(eid for _, _, eid in ev if eid is not None)
            blob = self.model.encode(advanced.user(i))
            log = logs.get(u, ())
            writes[u] = Write(
                blob,
                ids,
                len(ev),
                max(t for _, t, _ in ev),
                marks=new_marks.get(u),
                log=log,
                log_key=self.log.of_user(u).stream if log and self.log is not None else None,
                log_maxlen=self.log_maxlen,
            )
        return writes


def _result(post: Post, per_user: dict[str, _Counts]) -> IngestResult:
    total = _Counts(duplicates=post.in_post_duplicates)
    for c in per_user.values():
        total.applied += c.applied
        total.duplicates += c.duplicates
        total.unknown += c.unknown
        total.out_of_order += c.out_of_order
        total.erased += c.erased
    result = IngestResult(
        applied=total.applied,
        duplicates=total.duplicates,
        unknown_items=total.unknown,
        out_of_order=total.out_of_order,
        users=len(post.users),
    )
    result._erased = total.erased  # noqa: SLF001 - stream entries refused by the erasure check (the consumer's)
    return result


class EventIngestor:
    """Validates and groups a post, then hands it to the events batcher; see the module docstring."""

    def __init__(
        self,
        model: ServingModel,
        batcher: EventBatcher,
        strict_items: bool = False,
        mirrors: Sequence[EventIngestor] = (),
        counted: bool = True,
        *,
        store: StateStore | None = None,
        never_again: frozenset[str] = frozenset(),
        count_only: frozenset[str] = frozenset(),
        never_max: int = 1000,
    ) -> None:
        self.model = model
        self.batcher = batcher
        self.strict_items = strict_items
        # Dual write (HYTREC_WRITE_VERSIONS): the ingestors of other model versions, each over its own model and
        # store, that get every post too; a post succeeds when every version committed it (docs/lifecycle.md).
        self.mirrors = list(mirrors)
        self.counted = counted  # False for a mirror: the metrics count each event once
        batcher.counted = counted  # the batcher counts the events, at commit
        self.store = store
        self.never_again = never_again if store is not None else frozenset()
        self.count_only = count_only
        self.never_max = never_max

    async def _with_mirrors(self, primary: Awaitable[IngestResult], others: list[Awaitable[IngestResult]]):
        """The primary's result once every version committed; the first failure otherwise."""
        if not others:
            return await primary
        results = await asyncio.gather(primary, *others, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results[0]

    def _check_items(self, events: Sequence[Event]) -> None:
        unknown = [(i, e.item_id) for i, e in enumerate(events) if not self.model.knows(e.item_id)]
        if unknown:
            errors = [
                {"field": f"events[{i}].item_id", "in": "body", "message": f"unknown item {item!r}", "type": "unknown"}
                for i, item in unknown[:100]
            ]
            detail = f"{len(unknown)} event(s) name items the model does not know (strict mode); nothing applied"
            metrics.EVENTS.labels("rejected").inc(len(events))
            raise field_problem(errors, detail)

    async def ingest_entries(
        self,
        events: Sequence[Event],
        entry_ids: Sequence[str],
        mark_field: str,
        epoch: int,
        deadline: float,
        written: Sequence[str | None] | None = None,
    ) -> IngestResult:
        """Apply validated stream entries (``hytrec consume``), each row carrying its entry id; see the module.

        ``written`` (parallel to ``events``): for an entry the service logged, the version whose state already
        holds it. This ingestor and each mirror leave out the entries written to their own version and apply
        the others like any entry, so a posted event reaches every other written version with its mark.

        No in-post de-duplication here: a repeated event id is counted as a duplicate by the batch itself, and
        its entry still moves the mark.

        Event types are handled as in ``ingest`` (the same settings): a count-only entry is counted and not
        applied (its entry does not move the mark; a redelivered one is again not applied), a never-again
        entry's item enters the user's never-again set.
        """
        start = time.perf_counter()
        users: dict[str, list[Row]] = {}
        entries: dict[str, list[str]] = {}
        applied: list[Event] = []
        applied_ids: list[str] = []
        applied_written: list[str | None] = []
        mine: list[Event] = []  # the entries not already in this version's states
        own = self.model.version
        for e, entry, where in zip(events, entry_ids, written or [None] * len(events), strict=True):
            if self._count_only(e):
                if where is None:  # counted here; a logged entry was counted by the service
                    mine.append(e)
                continue
            applied.append(e)
            applied_ids.append(entry)
            applied_written.append(where)
            if where == own:
                continue
            mine.append(e)
            users.setdefault(e.user_id, []).append((self.model.row(e.item_id), e.ts, e.event_id))
            entries.setdefault(e.user_id, []).append(entry)
        others = [
            m.ingest_entries(applied, applied_ids, mark_field, epoch, deadline, applied_written)
            for m in self.mirrors
            if applied
        ]
        empty = IngestResult(applied=0, duplicates=0, unknown_items=0, out_of_order=0, users=0)
        if users:
            result = await self._with_mirrors(
                self.batcher.submit(Post(users, 0, StreamSource(mark_field, epoch, entries)), deadline), others
            )
        elif others:
            await self._with_mirrors(asyncio.sleep(0, empty), others)
            result = empty
        else:
            result = empty
        result = await self._typed(mine, result)
        self._count(result, start)
        return result

    def _count_only(self, e: Event) -> bool:
        return e.event_type is not None and e.event_type in self.count_only

    async def _typed(self, events: Sequence[Event], result: IngestResult) -> IngestResult:
        """Shared by the REST and stream paths: write the never-again items, count the count-only events."""
        counted = sum(1 for e in events if self._count_only(e))
        never: dict[str, list[tuple[str, float]]] = {}
        for e in events:
            if e.event_type is not None and e.event_type in self.never_again:
                never.setdefault(e.user_id, []).append((e.item_id, e.ts))
        if never and self.store is not None:
            await self.store.add_never(never, self.never_max)
        if counted and self.counted:
            metrics.EVENTS.labels("counted_only").inc(counted)
        return result.model_copy(
            update={
                "counted_only": counted,
                "never_again": sum(len(v) for v in never.values()),
                "users": len({e.user_id for e in events}),
                "model_version": self.model.version,
            }
        )

    def group(self, events: Sequence[Event]) -> Post:
        """The post's events by user, in order; a repeated ``(user, event_id)`` inside the post is dropped.

        When the batcher logs posted events, each row carries its log entry's fields.
        """
        users: dict[str, list[Row]] = {}
        log: dict[str, list[LogFields]] | None = {} if self.batcher.log is not None else None
        seen: set[tuple[str, str]] = set()
        dups = 0
        for e in events:
            if e.event_id is not None:
                if (e.user_id, e.event_id) in seen:
                    dups += 1
                    continue
                seen.add((e.user_id, e.event_id))
            users.setdefault(e.user_id, []).append((self.model.row(e.item_id), e.ts, e.event_id))
            if log is not None:
                log.setdefault(e.user_id, []).append(wire.logged(e, self.model.version))
        return Post(users, dups, log=log)

    async def ingest(self, events: Sequence[Event], deadline: float) -> IngestResult:
        """Apply a post; returns its counts. Raises the store's errors (nothing of a failed user is written).

        Event types (settings): a count-only type is counted and not applied; a never-again type's item enters
        the user's never-again set once the post's states are written (the set's write is idempotent, so a
        retried post adds nothing twice); every other event, and one without a type, updates the state.
        """
        start = time.perf_counter()
        if self.strict_items:
            self._check_items(events)
        applied = [e for e in events if not self._count_only(e)]
        if applied:
            result = await self._with_mirrors(
                self.batcher.submit(self.group(applied), deadline), [m.ingest(applied, deadline) for m in self.mirrors]
            )
        else:
            result = IngestResult(applied=0, duplicates=0, unknown_items=0, out_of_order=0, users=0)
        result = await self._typed(events, result)
        self._count(result, start)
        return result

    def _count(self, result: IngestResult, start: float) -> None:
        """The post's time; its events were counted by the batcher when they were committed."""
        if self.counted:
            metrics.EVENT_BATCH_SECONDS.observe(time.perf_counter() - start)
