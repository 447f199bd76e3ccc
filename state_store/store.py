"""The per-user state store: opaque state blobs in Redis with optimistic, batched compare-and-set."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from base64 import b64encode
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis import exceptions as rex
from redis.backoff import FullJitterBackoff

from hytrec.state_store import metrics
from hytrec.state_store.embedded import EmbeddedRedis
from hytrec.state_store.errors import (
    UNAVAILABLE,
    ConflictError,
    CorruptStateError,
    FencedError,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
)
from hytrec.state_store.keys import KeySpace
from hytrec.state_store.scripts import (
    CAS,
    CAS_SHA,
    COMMITTED,
    CONFLICT,
    DUPLICATE,
    ERASED,
    FENCED,
    MALFORMED,
    MARK_BEHIND,
    READ,
    READ_SHA,
    REPLAYED,
    UNLOCK,
)
from hytrec.state_store.settings import StoreSettings

T = TypeVar("T")
# Runs a synchronous callable somewhere off the event loop (the service: its one torch thread).
Runner = Callable[[Callable[[], T]], Awaitable[T]]

_FIELDS = ("blob", "ver", "n", "lts", "ts")
_CAS_FIELDS = ("blob", "ver")
# Round trips that are one command or pipeline each, so one out far longer than usual means the server is not
# answering; writes apart, since a server can hold writes and serve reads (CLIENT PAUSE WRITE, a replica).
# Not ``scan`` (its guard spans the caller's loop body) nor ``open`` (start-up).
_READ_OPS = frozenset({"read", "hidden", "never", "ping"})
_WRITE_OPS = frozenset({"cas", "log", "lock", "delete"})


async def _to_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def entry_key(entry_id: str | bytes) -> tuple[int, int]:
    """A Redis stream entry id ``ms-seq`` as a tuple that sorts like the stream does."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Mark:
    """The last stream entry applied to a user from one partition, and the lease epoch of its writer.

    Stored in the user's state hash (one field per partition) by the same compare-and-set as the state, so
    an entry at or below it is known to be applied whatever the distance (docs/streams.md).
    """

    entry_id: str
    epoch: int

    @property
    def key(self) -> tuple[int, int]:
        return entry_key(self.entry_id)

    @classmethod
    def parse(cls, raw: str | bytes) -> Mark:
        text = raw.decode() if isinstance(raw, bytes) else raw
        entry, _, epoch = text.partition(" ")
        entry_key(entry)
        return cls(entry, int(epoch))


@dataclass(slots=True)
class Snapshot:
    """What the store holds for one user at one version (``version == 0`` and ``blob is None``: no state).

    ``applied`` is the subset of the event ids asked about that this user has already applied.
    ``event_count``, ``last_ts`` and ``updated_ms`` are read by ``get_many`` (None in the snapshots
    ``update_many`` hands to ``compute``, which reads only the blob and version).
    ``corrupt`` says why the stored hash is malformed (it is counted, and ``checked_blob`` raises): the store
    checks its own metadata; what the blob means is the caller's business.
    """

    user_id: str
    version: int
    blob: bytes | None
    applied: frozenset[str] = frozenset()
    event_count: int | None = None
    last_ts: float | None = None
    updated_ms: int | None = None
    model_version: str = ""
    corrupt: str | None = None
    marks: dict[str, Mark] = field(default_factory=dict)  # the stream marks asked about that the user holds

    @property
    def exists(self) -> bool:
        """Whether the user has a stored state."""
        return self.version > 0

    def checked_blob(self) -> bytes | None:
        """The blob (None for a user without state); ``CorruptStateError`` if the stored hash is malformed."""
        if self.corrupt is not None:
            raise CorruptStateError(self.user_id, self.model_version, self.corrupt)
        return self.blob


@dataclass(frozen=True, slots=True)
class Write:
    """A new state for one user: the blob, the event ids it applied and how many events that was."""

    blob: bytes
    event_ids: tuple[str, ...] = ()
    n_events: int | None = None  # None: len(event_ids)
    last_ts: float | None = None
    replace_count: bool = False  # True: n_events and last_ts replace the stored ones (backfill) instead of adding
    marks: Mapping[str, Mark] | None = None  # stream marks to move forward in the same compare-and-set
    # The event log: entries (field/value pairs) XADDed to ``log_key`` in the same script as the state (on a
    # cluster, whose script cannot reach the stream's slot, in one pipeline right after the commit).
    log: tuple[tuple[tuple[str, str], ...], ...] = ()
    log_key: str | None = None
    log_maxlen: int = 0  # approximate MAXLEN of the log stream (0: no trimming)


@dataclass(frozen=True, slots=True)
class Commit:
    """A write that landed: the version it created and the attempts it took."""

    user_id: str
    version: int
    event_ids: tuple[str, ...]
    attempts: int
    logged: tuple[str, ...] = ()  # the entry ids of the events this write logged (``Write.log``)
    erased: bool = False  # refused: the write's stream mark is at or below the user's erasure tombstone


Compute = Callable[[dict[str, Snapshot]], Mapping[str, Write]]


class StateStore:
    """Async access to the state of many users of one model version. Build it with ``open_store``."""

    def __init__(
        self,
        client: Any,
        settings: StoreSettings,
        model_version: str,
        *,
        cluster: bool = False,
        runner: Runner | None = None,
        embedded: EmbeddedRedis | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.keys = KeySpace(settings.key_prefix, model_version)
        self.model_version = model_version
        self.cluster = cluster
        self.embedded = embedded
        self._runner: Runner = runner or _to_thread
        self._ttl_ms = (settings.user_ttl_s or 0) * 1000
        self._cas_backoff = FullJitterBackoff(
            cap=settings.cas_backoff_cap_ms / 1000, base=settings.cas_backoff_ms / 1000
        )
        # round trips in flight, reads and writes: token -> start (insertion order = start order)
        self._out: tuple[dict[int, float], dict[int, float]] = ({}, {})
        self._token = 0

    def stalled_for(self, writes: bool = False, at: float | None = None) -> float:
        """Seconds the oldest read round trip (``writes``: write round trip) now in flight has been waiting for
        Redis at ``at`` (``time.monotonic()``; default now); 0.0 when none is.

        A paused or sleeping server shows here long before a socket timeout fires, so a caller can stop sending
        it work (the service sheds at admission, docs/reliability.md) instead of letting every request wait
        out its own deadline. Retries of a round trip (redis-py's, on timeouts) count as one: the time grows.
        """
        for start in self._out[writes].values():  # the first is the oldest
            return max((time.monotonic() if at is None else at) - start, 0.0)
        return 0.0

    # ---------------------------------------------------------------- plumbing
    @contextmanager
    def _guard(self, op: str, users: int = 0, *, write: bool = False):
        """Time one round trip and turn Redis failures into the store's errors (``write``: it writes, though its
        op's name is shared with reads)."""
        start = time.perf_counter()
        token = self._token = self._token + 1
        out = self._out[write or op in _WRITE_OPS] if op in _READ_OPS or op in _WRITE_OPS else None
        if out is not None:
            out[token] = time.monotonic()
        try:
            yield
        except StoreError:
            raise
        except rex.AuthenticationError as exc:  # a ConnectionError to redis-py, but no retry will mend it
            metrics.REDIS_ERRORS.labels(op, type(exc).__name__).inc()
            raise StoreAuthError(f"redis refused the credentials during {op}: {exc}") from exc
        except UNAVAILABLE as exc:
            metrics.REDIS_ERRORS.labels(op, type(exc).__name__).inc()
            raise StoreUnavailable(f"redis unavailable during {op}: {exc}") from exc
        except rex.RedisError as exc:
            metrics.REDIS_ERRORS.labels(op, type(exc).__name__).inc()
            raise StoreError(f"redis error during {op}: {exc}") from exc
        finally:
            if out is not None:
                del out[token]
            metrics.OP_SECONDS.labels(op).observe(time.perf_counter() - start)
            if users:
                metrics.BATCH_USERS.labels(op).observe(users)

    # Scripts run as raw EVALSHA in the pipeline, and on NOSCRIPT the scripts are reloaded and only the failed
    # commands resent. redis-py's Script objects preload themselves only into the standalone asyncio Pipeline
    # (Script.__call__ checks isinstance(client, redis.asyncio.client.Pipeline)); the async ClusterPipeline gets
    # no such load, so a server that lost its script cache would fail the whole batch. One path serves both.
    def _pipeline(self) -> Any:
        return self.client.pipeline() if self.cluster else self.client.pipeline(transaction=False)

    @staticmethod
    def _check(results: list[Any]) -> None:
        for res in results:
            if isinstance(res, Exception) and not isinstance(res, rex.NoScriptError):
                raise res

    def _snapshot(self, user_id: str, row: list[Any], scores: list[Any] | None, asked: Sequence[str]) -> Snapshot:
        blob, ver = row[0], row[1]
        applied = frozenset(e for e, s in zip(asked, scores, strict=True) if s is not None) if scores else frozenset()
        snap = Snapshot(user_id, 0, None, applied, model_version=self.model_version)
        if ver is None and blob is None:
            return snap
        try:
            snap.version = int(ver)
            if len(row) > 2:
                n, lts, ts = row[2:]
                snap.event_count = int(n or 0)
                snap.last_ts = None if lts is None else float(lts)
                snap.updated_ms = None if ts is None else int(ts)
            if blob is None or snap.version < 1:
                raise ValueError("missing blob" if blob is None else f"version {snap.version}")
            snap.blob = bytes(blob)
        except (TypeError, ValueError) as exc:
            metrics.CORRUPT_VALUES.inc()
            snap.corrupt = f"malformed state hash: {exc}"
        return snap

    # ---------------------------------------------------------------- reads
    async def _read(
        self,
        user_ids: Sequence[str],
        event_ids: Mapping[str, Sequence[str]] | None,
        fields: tuple = _FIELDS,
        marks: Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, Snapshot]:
        """One pipelined command per user: HMGET, or the READ script when event ids are asked about.

        ``marks``: per user, the stream mark fields to read along (``Snapshot.marks``).
        """
        asked = {u: list(dict.fromkeys((event_ids or {}).get(u, ()))) for u in user_ids}
        wanted = {u: tuple((marks or {}).get(u, ())) for u in user_ids}
        # A read through the READ script counts as a write for stall purposes: Redis holds scripts with the
        # writes (CLIENT PAUSE WRITE), while plain HMGETs go on.
        with self._guard("read", len(user_ids), write=any(asked.values())):
            for _ in range(2):  # the second pass only runs after the server lost its script cache
                pipe = self._pipeline()
                for u in user_ids:
                    f = (*fields, *wanted[u])
                    if asked[u]:
                        pipe.execute_command("EVALSHA", READ_SHA, 2, *self.keys.keys(u), len(f), *f, *asked[u])
                    else:
                        pipe.hmget(self.keys.state(u), f)
                results = await pipe.execute(raise_on_error=False)
                self._check(results)
                if not any(isinstance(r, rex.NoScriptError) for r in results):
                    break
                await self._load_scripts()
            else:
                raise StoreError("redis keeps losing the read script")
        out: dict[str, Snapshot] = {}
        for u, res in zip(user_ids, results, strict=True):
            row, scores = (res[0], [1 if f else None for f in res[1]]) if asked[u] else (res, None)
            row = list(row)
            extra = row[len(fields) :]
            out[u] = snap = self._snapshot(u, row[: len(fields)], scores, asked[u])
            for name, raw in zip(wanted[u], extra, strict=True):
                if raw is None:
                    continue
                try:
                    snap.marks[name] = Mark.parse(raw)
                except ValueError as exc:
                    metrics.CORRUPT_VALUES.inc()
                    snap.corrupt = f"malformed stream mark {name}: {exc}"
        return out

    async def get_many(
        self, user_ids: Iterable[str], *, event_ids: Mapping[str, Sequence[str]] | None = None
    ) -> dict[str, Snapshot | None]:
        """Snapshots of many users in one round trip (None for a user without state).

        ``event_ids`` per user: which of them are already applied is read in the same round trip
        (``Snapshot.applied``).
        """
        users = list(dict.fromkeys(user_ids))
        snaps = await self._read(users, event_ids)
        return {u: (s if s.exists or s.corrupt else None) for u, s in snaps.items()}

    async def get(self, user_id: str) -> Snapshot | None:
        """Snapshot of one user."""
        return (await self.get_many([user_id]))[user_id]

    # ---------------------------------------------------------------- writes
    async def _cas(self, writes: dict[str, tuple[int, Write, str]]) -> dict[str, tuple[int, int, tuple[str, ...]]]:
        """Send one compare-and-set per user, pipelined; return {user: (status, version, logged entry ids)}."""
        now_ms = str(int(time.time() * 1000))
        users = list(writes)
        with self._guard("cas", len(users)):
            pending = users
            out: dict[str, tuple[int, int, tuple[str, ...]]] = {}
            for _ in range(2):  # the second pass only runs after the server lost its script cache
                pipe = self._pipeline()
                for u in pending:
                    expected, w, token = writes[u]
                    n = len(w.event_ids) if w.n_events is None else w.n_events
                    logged = w.log if (w.log_key and not self.cluster) else ()
                    pipe.execute_command(
                        "EVALSHA",
                        CAS_SHA,
                        6 if logged else 5,
                        *self.keys.keys(u),
                        self.keys.versions(u),
                        self.keys.tombstone(u),
                        self.keys.lock(u),
                        *([w.log_key] if logged else []),
                        expected,
                        w.blob,
                        now_ms,
                        self._ttl_ms,
                        self.settings.dedup_window,
                        f"={n}" if w.replace_count else n,
                        "" if w.last_ts is None else repr(float(w.last_ts)),
                        token,
                        self.model_version,
                        len(w.marks or ()),
                        len(logged),
                        w.log_maxlen,
                        *[a for name, m in (w.marks or {}).items() for a in (name, m.entry_id, m.epoch)],
                        *[a for entry in logged for a in (len(entry), *(x for pair in entry for x in pair))],
                        *w.event_ids,
                    )
                results = await pipe.execute(raise_on_error=False)
                self._check(results)
                missing = [u for u, r in zip(pending, results, strict=True) if isinstance(r, rex.NoScriptError)]
                for u, r in zip(pending, results, strict=True):
                    if not isinstance(r, rex.NoScriptError):
                        out[u] = (int(r[0]), int(r[1]), tuple(_str(x) for x in r[2:]))
                if not missing:
                    return out
                await self._load_scripts()
                pending = missing
            raise StoreError("redis keeps losing the compare-and-set script")

    async def _log_after(
        self, users: list[str], writes: dict[str, tuple[int, Write, str]], commits: dict[str, Commit]
    ) -> None:
        """Cluster only: XADD the logged events of committed writes in one pipeline (the stream's slot is not the
        user's, so the script cannot). A crash between the commit and this pipeline loses those log entries."""
        with self._guard("log", len(users)):
            pipe = self._pipeline()
            for u in users:
                w = writes[u][1]
                for entry in w.log:
                    pipe.xadd(w.log_key, dict(entry), maxlen=w.log_maxlen or None, approximate=True)
            ids = iter(await pipe.execute())
        for u in users:
            c = commits[u]
            logged = tuple(_str(next(ids)) for _ in writes[u][1].log)
            commits[u] = Commit(c.user_id, c.version, c.event_ids, c.attempts, logged)

    async def _load_scripts(self) -> None:
        for script in (CAS, READ):
            if self.cluster:
                await self.client.execute_command("SCRIPT LOAD", script, target_nodes=self.client.PRIMARIES)
            else:
                await self.client.script_load(script)

    async def update_many(
        self,
        user_ids: Iterable[str],
        compute: Compute,
        *,
        event_ids: Mapping[str, Sequence[str]] | None = None,
        marks: Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, Commit]:
        """Optimistic read-compute-write of many users, pipelined.

        ``compute(snapshots)`` gets a ``Snapshot`` for every user still to write (``blob`` None for a new
        user; ``applied`` says which of that user's ``event_ids`` are already applied, so they can be
        skipped) and returns a ``Write`` for each user that changes; it runs through the store's runner (given
        to ``open_store``; default ``asyncio.to_thread``) and may be called again for the users whose
        compare-and-set lost a race.
        Each user's state, metadata and event ids are written by one Lua script or not at all. Returns the
        commits; raises ``ConflictError`` for users still conflicting after ``cas_max_retries`` retries.

        ``marks`` names, per user, stream mark fields to read (``Snapshot.marks``); a ``Write.marks`` moves
        them forward in the same script, which refuses (``FencedError``) a write whose lease epoch is older
        than the stored one's: a consumer that lost its partition cannot overwrite its successor's work, and
        refuses one whose mark is at or below the user's erasure tombstone: that user's commit comes back with
        ``erased`` set and nothing written. ``Write.log`` events are appended to the event log by the same script.
        """
        return await self._update(user_ids, compute, event_ids, self._runner, marks)

    async def _update(
        self,
        user_ids: Iterable[str],
        compute: Compute,
        event_ids: Mapping[str, Sequence[str]] | None,
        run: Runner,
        marks: Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, Commit]:
        todo = list(dict.fromkeys(user_ids))
        asked: dict[str, list[str]] = {u: list((event_ids or {}).get(u, ())) for u in todo}
        commits: dict[str, Commit] = {}
        attempts = self.settings.cas_max_retries + 1
        for attempt in range(attempts):
            prefix = b64encode(os.urandom(12)).decode()  # write tokens: unique per attempt and user
            locked: list[str] = []
            if attempt:
                await asyncio.sleep(self._cas_backoff.compute(attempt - 1))
                locked = await self._lock(todo, prefix)  # users lost before: this retry goes next where it can
            try:
                done = await self._attempt(todo, asked, compute, run, marks, prefix, attempt, commits)
            finally:
                if locked:  # a commit deleted its lock already; this frees the others (an erased or replayed write)
                    await self._unlock(locked, prefix)
            if done is None:
                return commits
            todo = done
            if attempt + 1 < attempts:
                metrics.CAS_RETRIES.inc(len(todo))
        metrics.CAS_CONFLICTS_EXHAUSTED.inc(len(todo))
        raise ConflictError(todo, attempts, commits)

    async def _lock(self, user_ids: Sequence[str], prefix: str) -> list[str]:
        """Take the contention lock of each user that is free; the users whose lock this attempt holds."""
        pipe = self._pipeline()
        for u in user_ids:
            pipe.set(self.keys.lock(u), prefix, nx=True, px=self.settings.cas_lock_ms)
        with self._guard("lock", len(user_ids)):
            got = await pipe.execute()
        metrics.CAS_LOCKS.inc(sum(1 for g in got if g))
        return [u for u, g in zip(user_ids, got, strict=True) if g]

    async def _unlock(self, user_ids: Sequence[str], prefix: str) -> None:
        """Release the locks this attempt still holds (only where the lock still holds its prefix); best effort:
        a lock left behind expires after ``cas_lock_ms``."""
        if not user_ids:
            return
        with contextlib.suppress(rex.RedisError, StoreError, OSError):
            pipe = self._pipeline()
            for u in user_ids:
                pipe.eval(UNLOCK, 1, self.keys.lock(u), prefix)
            await pipe.execute()

    async def _attempt(
        self,
        todo: list[str],
        asked: dict[str, list[str]],
        compute: Compute,
        run: Runner,
        marks: Mapping[str, Sequence[str]] | None,
        prefix: str,
        attempt: int,
        commits: dict[str, Commit],
    ) -> list[str] | None:
        """One read-compute-write of ``todo``, filling ``commits``; the users that lost (None: nothing left)."""
        snaps = await self._read(todo, asked, _CAS_FIELDS, marks)
        for s in snaps.values():
            if s.corrupt is not None:
                raise CorruptStateError(s.user_id, self.model_version, s.corrupt)
        result = await run(lambda snaps=snaps: compute(snaps))
        writes: dict[str, tuple[int, Write, str]] = {}
        for u, w in (result or {}).items():
            if u not in snaps:
                raise ValueError(f"compute returned a write for user {u!r} it was not asked about")
            if len(set(w.event_ids)) != len(w.event_ids):
                raise ValueError(f"write for user {u!r} repeats an event id")
            again = snaps[u].applied.intersection(w.event_ids)
            if again:
                raise ValueError(f"write for user {u!r} re-applies event ids {sorted(again)}")
            writes[u] = (snaps[u].version, w, f"{prefix}{len(writes)}")
        if not writes:
            return None
        lost: list[str] = []
        late_log: list[str] = []  # cluster: committed writes whose events are logged after the script
        for u, (status, version, logged) in (await self._cas(writes)).items():
            if status in (COMMITTED, REPLAYED):
                if status == REPLAYED:
                    metrics.CAS_REPLAYED.inc()
                commits[u] = Commit(u, version, writes[u][1].event_ids, attempt + 1, logged)
                if self.cluster and writes[u][1].log and writes[u][1].log_key:
                    late_log.append(u)
            elif status == ERASED:
                metrics.CAS_ERASED.inc()
                commits[u] = Commit(u, 0, (), attempt + 1, erased=True)
            elif status == MALFORMED:
                metrics.CORRUPT_VALUES.inc()
                raise CorruptStateError(u, self.model_version, "stored version is not an integer")
            elif status == FENCED:
                raise FencedError(u, ",".join(writes[u][1].marks or ()))
            elif status == MARK_BEHIND:
                raise StoreError(f"write for user {u!r} does not move its stream mark forward")
            else:
                if status == DUPLICATE:
                    metrics.CAS_DUPLICATES.inc()
                    asked[u] = list(dict.fromkeys([*asked[u], *writes[u][1].event_ids]))
                elif status != CONFLICT:
                    raise StoreError(f"unexpected compare-and-set status {status}")
                lost.append(u)
        if late_log:
            await self._log_after(late_log, writes, commits)
        return lost or None

    async def put(self, user_id: str, blob: bytes, *, n_events: int = 0, last_ts: float | None = None) -> Commit:
        """Overwrite one user's state, event count and latest timestamp whatever its version (backfill)."""
        write = Write(blob, (), n_events, last_ts, replace_count=True)
        commits = await self._update([user_id], lambda snaps: {user_id: write}, None, _direct)
        return commits[user_id]

    # ---------------------------------------------------------------- lifecycle
    async def delete_user(self, user_id: str) -> bool:
        """Erase everything held for the user under every model version; True if this version had a state.

        The versions come from the user's version set, which every write adds to; all the user's keys share
        one hash slot, so one DEL removes them on a standalone server and a cluster alike.
        """
        registry = self.keys.versions(user_id)
        with self._guard("delete", 1):
            versions = {v.decode() if isinstance(v, bytes) else v for v in await self.client.smembers(registry)}
            versions.add(self.model_version)
            spaces = [self.keys.of_version(v) for v in sorted(versions)]
            keys = [k for ks in spaces for k in (*ks.keys(user_id), ks.lock(user_id))]
            pipe = self._pipeline()
            pipe.exists(self.keys.state(user_id))
            pipe.delete(*keys, registry, self.keys.never(user_id))
            had_state, _ = await pipe.execute()
        return bool(had_state)

    # ---------------------------------------------------------------- catalogue flags and never-again sets
    async def hidden_version(self) -> int:
        """The hidden set's change counter (0 before any change): cheap enough to poll."""
        with self._guard("hidden"):
            raw = await self.client.get(self.keys.hidden_version)
        return int(raw or 0)

    async def hidden_items(self) -> tuple[int, set[str]]:
        """The counter and the hidden item ids, read together in one transaction."""
        with self._guard("hidden"):
            pipe = self.client.pipeline(transaction=True)
            pipe.get(self.keys.hidden_version)
            pipe.smembers(self.keys.hidden)
            raw, members = await pipe.execute()
        return int(raw or 0), {m.decode() if isinstance(m, bytes) else m for m in members}

    async def set_hidden(self, item_ids: Sequence[str], hidden: bool) -> int:
        """Hide (or show) items and bump the counter atomically; returns the new counter."""
        with self._guard("hidden", write=True):
            pipe = self.client.pipeline(transaction=True)
            if item_ids:
                (pipe.sadd if hidden else pipe.srem)(self.keys.hidden, *item_ids)
            pipe.incr(self.keys.hidden_version)
            *_, version = await pipe.execute()
        return int(version)

    async def never_many(self, user_ids: Sequence[str]) -> dict[str, list[str]]:
        """Each user's "never again" item ids, in one pipelined round trip."""
        with self._guard("never", len(user_ids)):
            pipe = self._pipeline()
            for u in user_ids:
                pipe.zrange(self.keys.never(u), 0, -1)
            rows = await pipe.execute()
        return {u: [m.decode() if isinstance(m, bytes) else m for m in r] for u, r in zip(user_ids, rows, strict=True)}

    async def add_never(self, items: Mapping[str, Sequence[tuple[str, float]]], limit: int) -> None:
        """Add (item id, ts) pairs to each user's never-again set, keeping its ``limit`` newest (idempotent)."""
        if not items:
            return
        with self._guard("never", len(items), write=True):
            pipe = self._pipeline()
            for u, pairs in items.items():
                key = self.keys.never(u)
                pipe.zadd(key, {item: ts for item, ts in pairs})
                pipe.zremrangebyrank(key, 0, -limit - 1)
                if self._ttl_ms:
                    pipe.pexpire(key, self._ttl_ms)
            self._check(await pipe.execute(raise_on_error=False))

    async def scan_users(self, count: int = 1000) -> AsyncIterator[str]:
        """Yield the users with a state for this model version (every primary on a cluster).

        Like SCAN, a user may be yielded more than once while keys change during the scan.
        """
        with self._guard("scan"):
            async for key in self.client.scan_iter(match=self.keys.state_pattern, count=count):
                user = self.keys.user_of(key)
                if user is not None:
                    yield user

    async def ping(self) -> bool:
        """True when Redis answers; raises ``StoreUnavailable`` otherwise."""
        with self._guard("ping"):
            if self.cluster:
                await self.client.ping(target_nodes=self.client.PRIMARIES)
            else:
                await self.client.ping()
        return True

    async def close(self) -> None:
        """Close the connections and stop the embedded server if this store started one."""
        try:
            await self.client.aclose()
            if not self.cluster:  # a pool handed to the client is not closed with it
                await self.client.connection_pool.disconnect()
        finally:
            if self.embedded is not None:
                await asyncio.to_thread(self.embedded.stop)
                self.embedded = None

    async def __aenter__(self) -> StateStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _direct(fn: Callable[[], T]) -> T:
    return fn()
