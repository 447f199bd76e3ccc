"""The stream consumer: partition leases, fenced reads, batched apply through the REST path's ingest code.

Per partition it holds, a consumer runs one loop: read a batch (the pending entries first, then new ones), apply
it with ``EventIngestor.ingest_entries`` (every row carries its entry id, so a user's mark moves in the same
compare-and-set as the state), dead-letter what fails validation, and only then ``XACK``. A failed batch is
retried with backoff and never acknowledged. Why this applies every entry once: docs/streams.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import socket
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as rex
from redis.backoff import FullJitterBackoff

from hytrec.service.events import EventIngestor
from hytrec.service.microbatch import loop_time
from hytrec.service.schemas import Event
from hytrec.service.settings import Settings
from hytrec.state_store import FencedError, StateStore, entry_key
from hytrec.streams import metrics, wire
from hytrec.streams.erasure import read_tombstones, split_erased
from hytrec.streams.partition import Partition, StreamLayout, partition_of

log = logging.getLogger("hytrec.streams")

# KEYS: lease, epoch, stream. ARGV: consumer id, ttl ms, group.
# Returns the epoch of the lease now held by this consumer, or 0 when another consumer holds it.
ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
local me = ARGV[1] .. ' '
if cur then
  if string.sub(cur, 1, #me) == me then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(cur, #me + 1))
  end
  return 0
end
local e = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], me .. e, 'PX', ARGV[2])
redis.pcall('XGROUP', 'CREATE', KEYS[3], ARGV[3], '0', 'MKSTREAM')
return e
"""
# KEYS: lease. ARGV: token ("<consumer> <epoch>"), ttl ms. 1: renewed, 0: not ours any more.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
# KEYS: lease. ARGV: token. 1: released, 0: not ours any more.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
# The fenced read: only the lease holder gets entries, atomically with the lease check, so a consumer that lost
# its lease can never read (and apply) entries its successor reads too. Pending entries, oldest first, before
# any new one. ARGV[5] is where the pending ones not yet in this consumer's hands start: '-' (all of them), or
# '(<id>' past the last entry it already holds, so it can read the next batch while the current one applies.
# KEYS: lease, stream. ARGV: token, group, consumer, count, pending start.
# Returns {-1} (lease not held) | {1, pending ids, claimed entries} | {0, {}, new entries} |
#         {0, {}, {}, id of the newest entry or '0-0'} when there is nothing to read.
FETCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {-1} end
local n = tonumber(ARGV[4])
local pend = redis.call('XPENDING', KEYS[2], ARGV[2], ARGV[5], '+', n)
if #pend > 0 then
  local ids = {}
  for i, p in ipairs(pend) do ids[i] = p[1] end
  return {1, ids, redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, unpack(ids))}
end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', n, 'STREAMS', KEYS[2], '>')
if r then return {0, {}, r[1][2]} end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 then return {0, {}, {}, last[1][1]} end
return {0, {}, {}, '0-0'}
"""
# The group's dead consumers: every consumer of the partition's group other than the lease holder that has no
# pending entry and has been idle longer than a bound is deleted (XGROUP DELCONSUMER), so the group does not grow
# by one consumer per process ever started. Only the lease holder runs it, atomically with the lease check: no
# other consumer can gain a pending entry of this partition meanwhile (FETCH delivers to the holder only), and
# one with pending entries is never deleted (that would drop them from the group's pending list).
# KEYS: lease, stream. ARGV: token, group, min idle ms. Returns the names deleted.
PRUNE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {} end
local me = string.match(ARGV[1], '^(.*) [0-9]+$')
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[2], ARGV[2])
if not ok then return {} end
local gone = {}
for _, c in ipairs(consumers) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= me and tonumber(f['pending']) == 0 and tonumber(f['idle']) > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[2], ARGV[2], f['name'])
    gone[#gone + 1] = f['name']
  end
end
return gone
"""
_SCRIPTS = {
    name: (text, hashlib.sha1(text.encode()).hexdigest())
    for name, text in (
        ("acquire", ACQUIRE),
        ("renew", RENEW),
        ("release", RELEASE),
        ("fetch", FETCH),
        ("prune", PRUNE),
    )
}
MAX_FETCH = 4000  # Lua's unpack() limit is about 8000 values


class LeaseLost(Exception):
    """The partition's lease expired, was taken over or fenced a write: drop the batch, do not acknowledge."""


def default_consumer_id() -> str:
    """``<host>-<pid>-<random>``: unique per process, readable in XINFO CONSUMERS."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _Lease:
    part: Partition
    epoch: int
    token: str
    valid_until: float  # time.monotonic(); the lease's TTL counted from when the renewal was sent
    lost: bool = False
    release: bool = False  # give it back after the batch in hand (rebalance)
    last: str = "0-0"  # newest entry id seen when there was nothing to read (where XREAD waits from)

    def alive(self) -> bool:
        return not self.lost and time.monotonic() < self.valid_until


@dataclass
class Totals:
    """What this consumer did (printed by ``hytrec consume`` at exit; the benchmark reads it)."""

    applied: int = 0
    duplicates: int = 0
    dead_letter: int = 0
    trimmed: int = 0
    logged: int = 0  # entries POST /v1/events logged: in their served version already, applied to the others
    batches: int = 0
    first_batch: float | None = None  # time.monotonic() when the read of the first non-empty batch began
    last_ack: float | None = None
    first_batch_unix: float | None = None  # the same two as Unix times (comparable across consumers)
    last_ack_unix: float | None = None
    partitions: set[int] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        span = (self.last_ack - self.first_batch) if self.first_batch and self.last_ack else 0.0
        return {
            "applied": self.applied,
            "duplicates": self.duplicates,
            "dead_letter": self.dead_letter,
            "trimmed": self.trimmed,
            "logged": self.logged,
            "batches": self.batches,
            "busy_seconds": round(span, 3),
            "events_per_s": round((self.applied + self.duplicates) / span, 1) if span > 0 else None,
            "partitions": sorted(self.partitions),
            "first_batch_unix": self.first_batch_unix,
            "last_ack_unix": self.last_ack_unix,
        }


@dataclass(frozen=True)
class PartitionStatus:
    """Where a partition's group stands against its stream (the lag and retention metrics)."""

    lag_s: float  # newest entry's time minus the newest delivered entry's time
    lag_entries: int | None  # entries not yet delivered (Redis >= 7)
    pending: int
    retention_s: float | None  # newest minus oldest entry held: how far back the stream still reaches
    margin_s: float | None  # newest delivered minus oldest entry held (< 0: unread entries may be trimmed)
    behind: bool | None  # an entry newer than the last delivered one was trimmed (Redis >= 7 knows; else None)


async def partition_status(client: Any, stream: str, group: str) -> PartitionStatus | None:
    """The status of ``group`` on ``stream``; None when the stream or the group does not exist."""
    try:
        groups = await client.xinfo_groups(stream)
        info = await client.xinfo_stream(stream)
    except rex.ResponseError:
        return None
    g = next((x for x in groups if _s(x.get("name")) == group), None)
    if g is None:
        return None
    delivered = entry_key(_s(g.get("last-delivered-id", "0-0")))
    newest = entry_key(_s(info.get("last-generated-id", "0-0")))
    first, last = info.get("first-entry"), info.get("last-entry")
    retention = margin = None
    if first and last:
        oldest = entry_key(_s(first[0]))[0]
        retention = (entry_key(_s(last[0]))[0] - oldest) / 1000
        if delivered != (0, 0):
            margin = (delivered[0] - oldest) / 1000
    deleted = info.get("max-deleted-entry-id")
    lag = g.get("lag")
    return PartitionStatus(
        lag_s=max(0.0, (newest[0] - delivered[0]) / 1000),
        lag_entries=None if lag is None else int(lag),
        pending=int(g.get("pending", 0)),
        retention_s=retention,
        margin_s=margin,
        behind=None if deleted is None else entry_key(_s(deleted)) > delivered,
    )


class Consumer:
    """One ``hytrec consume`` process: shares the partitions with the other live consumers, one owner each."""

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        ingestor: EventIngestor,
        consumer_id: str | None = None,
        *,
        until_idle: bool = False,
    ) -> None:
        self.s = settings
        self.store = store
        self.client = store.client
        self.ingestor = ingestor
        self.layout = StreamLayout(settings.key_prefix, settings.stream_name, settings.stream_partitions)
        self.id = consumer_id or default_consumer_id()
        self.until_idle = until_idle
        self.leases: dict[int, _Lease] = {}
        self.workers: dict[int, asyncio.Task] = {}
        self.idle: set[int] = set()
        self.stopping = asyncio.Event()
        self.totals = Totals()
        self._ttl = settings.stream_lease_ms
        self._block = max(1, min(settings.stream_block_ms, int(settings.socket_timeout_s * 800)))
        self._backoff = FullJitterBackoff(cap=settings.stream_retry_cap_ms / 1000, base=0.05)

    # ------------------------------------------------------------ redis plumbing
    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        text, sha = _SCRIPTS[name]
        try:
            return await self.client.evalsha(sha, len(keys), *keys, *args)
        except rex.NoScriptError:
            return await self.client.eval(text, len(keys), *keys, *args)

    # ------------------------------------------------------------ leases
    async def _heartbeat(self) -> list[str]:
        """Register as live, drop expired consumers, return the live ones (sorted ids)."""
        now = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False) if not self.store.cluster else self.client.pipeline()
        pipe.zadd(self.layout.consumers, {self.id: now + self._ttl})
        pipe.zremrangebyscore(self.layout.consumers, "-inf", now)
        pipe.zrange(self.layout.consumers, 0, -1)
        *_, live = await pipe.execute()
        ids = sorted(_s(x) for x in live)
        return ids if self.id in ids else sorted([*ids, self.id])

    def _quota(self, live: list[str]) -> int:
        """Partitions this consumer should hold: N split as evenly as possible over the live consumers."""
        n, k = self.layout.n, len(live)
        return n // k + (1 if live.index(self.id) < n % k else 0)

    async def _acquire(self, part: Partition) -> _Lease | None:
        sent = time.monotonic()
        epoch = int(
            await self._script(
                "acquire", [part.lease, part.epoch, part.stream], [self.id, self._ttl, self.s.stream_group]
            )
        )
        if not epoch:
            return None
        metrics.LEASE_EVENTS.labels("acquired").inc()
        log.info("consumer %s acquired partition %d (epoch %d)", self.id, part.index, epoch)
        return _Lease(part, epoch, f"{self.id} {epoch}", sent + self._ttl / 1000)

    async def _lease_round(self) -> None:
        """Renew the leases held, give back those over quota, take free partitions up to quota."""
        live = await self._heartbeat()
        for lease in list(self.leases.values()):
            if lease.lost:
                continue
            sent = time.monotonic()
            if int(await self._script("renew", [lease.part.lease], [lease.token, self._ttl])):
                lease.valid_until = sent + self._ttl / 1000
            else:
                lease.lost = True
                metrics.LEASE_EVENTS.labels("lost").inc()
                log.warning("consumer %s lost partition %d", self.id, lease.part.index)
        if self.stopping.is_set():
            return
        quota = self._quota(live)
        kept = [p for p, lease in sorted(self.leases.items()) if not lease.release and not lease.lost]
        for p in kept[quota:]:
            self.leases[p].release = True
        if len(kept) >= quota:
            return
        free = [part for part in self.layout.partitions if part.index not in self.leases]
        start = zlib.crc32(self.id.encode()) % self.layout.n
        free.sort(key=lambda part: (part.index - start) % self.layout.n)
        pipe = self.client.pipeline(transaction=False) if not self.store.cluster else self.client.pipeline()
        for part in free:
            pipe.exists(part.lease)
        held = await pipe.execute() if free else []
        for part, taken in zip(free, held, strict=True):
            if len(kept) >= quota:
                break
            if taken:
                continue
            lease = await self._acquire(part)
            if lease is not None:
                kept.append(part.index)
                self.leases[part.index] = lease
                self.idle.discard(part.index)
                self.totals.partitions.add(part.index)
                self.workers[part.index] = asyncio.create_task(self._work(lease), name=f"partition-{part.index}")
        metrics.LEASES_HELD.set(len(self.leases))

    async def _leases_loop(self) -> None:
        period = self._ttl / 3000
        while not self.stopping.is_set():
            try:
                await self._lease_round()
            except (rex.RedisError, OSError) as exc:
                log.warning("lease round failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), period)

    # ------------------------------------------------------------ one partition
    async def _work(self, lease: _Lease) -> None:
        """Read, apply, acknowledge, in stream order; the next batch is read while the current one applies.

        Reading ahead is safe because batches still apply one after another: the next one only once the current
        one is committed and acknowledged (a failed batch is retried first, and a lost lease drops both). Its
        entries were delivered to this consumer, so on a stop they stay pending for the next owner to claim.
        """
        part = lease.part
        after = "-"  # pending entries past this id are not in hand yet (see FETCH)
        ahead: asyncio.Task | None = None
        try:
            while not self.stopping.is_set() and not lease.release:
                if not lease.alive():
                    raise LeaseLost
                began = time.monotonic()
                if ahead is None:
                    claimed, entries = await self._fetch(lease, after)
                else:
                    claimed, entries = await ahead
                    ahead = None
                if not claimed and not entries:
                    self.idle.add(part.index)
                    if self.until_idle and self.idle >= set(self.leases):
                        self.stopping.set()
                        break
                    await self._wait_new(part, lease.last)
                    continue
                self.idle.discard(part.index)
                if self.totals.first_batch is None:
                    self.totals.first_batch = began
                    self.totals.first_batch_unix = time.time() - (time.monotonic() - began)
                after = "(" + max([*claimed[-1:], *(e for e, _ in entries[-1:])], key=entry_key)
                if self.s.stream_read_ahead:
                    ahead = asyncio.create_task(self._fetch(lease, after))
                await self._handle(lease, claimed, entries)
        except LeaseLost:
            if not lease.lost:
                lease.lost = True
                metrics.LEASE_EVENTS.labels("lost").inc()
            log.warning("consumer %s: lease of partition %d lost; batch in hand not acknowledged", self.id, part.index)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the lease loop re-acquires the partition later
            log.exception("partition %d worker failed", part.index)
        finally:
            if ahead is not None:  # what it read stays pending: the next owner (or this one again) claims it
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
            self.leases.pop(part.index, None)
            self.workers.pop(part.index, None)
            metrics.LEASES_HELD.set(len(self.leases))
            for gauge in (
                metrics.LAG_SECONDS,
                metrics.LAG_ENTRIES,
                metrics.PENDING,
                metrics.RETENTION_SECONDS,
                metrics.RETENTION_MARGIN,
                metrics.BEHIND_RETENTION,
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(str(part.index))
            if not lease.lost:
                try:
                    if int(await self._script("release", [part.lease], [lease.token])):
                        metrics.LEASE_EVENTS.labels("released").inc()
                except (rex.RedisError, OSError) as exc:  # it expires by itself
                    log.warning("release of partition %d failed: %s", part.index, exc)

    async def _fetch(self, lease: _Lease, after: str = "-") -> tuple[list[str], list[tuple[str, dict]]]:
        """The fenced read: (pending ids claimed, entries); ``LeaseLost`` when the lease is not ours."""
        part = lease.part
        n = min(self.s.stream_batch_size, MAX_FETCH)
        args = [lease.token, self.s.stream_group, self.id, n, after]
        while True:
            try:
                res = await self._script("fetch", [part.lease, part.stream], args)
                break
            except rex.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                try:  # the stream key was deleted: recreate it with the group
                    await self.client.xgroup_create(part.stream, self.s.stream_group, id="0", mkstream=True)
                except rex.ResponseError as again:
                    if "BUSYGROUP" not in str(again):
                        raise
            except (rex.RedisError, OSError) as exc:
                metrics.BATCH_FAILURES.labels(type(exc).__name__).inc()
                await asyncio.sleep(self._backoff.compute(0))
                if not lease.alive():
                    raise LeaseLost from exc
        if int(res[0]) == -1:
            raise LeaseLost
        claimed = [_s(i) for i in res[1]] if int(res[0]) == 1 else []
        entries = []
        for item in res[2]:
            if not item:  # an entry trimmed off the stream while pending (Redis < 7 returns a nil)
                continue
            eid, flat = _s(item[0]), item[1] or []
            entries.append((eid, {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}))
        if len(res) > 3:
            lease.last = _s(res[3])
        return claimed, entries

    async def _wait_new(self, part: Partition, after: str) -> None:
        """Block until an entry newer than ``after`` exists (plain XREAD: it reads nothing for the group)."""
        try:
            await self.client.xread({part.stream: after}, count=1, block=self._block)
        except (rex.RedisError, OSError) as exc:
            log.warning("waiting on partition %d failed: %s", part.index, exc)
            await asyncio.sleep(self._backoff.compute(0))

    def _validate(self, part: Partition, entries: list[tuple[str, dict]]):
        """Split a batch: events to apply (with, per event, the version a logged one is already written to),
        dead letters, and the logged entries (every ``origin=rest`` one, applied or not)."""
        good: list[Event] = []
        ids: list[str] = []
        written: list[str | None] = []
        dead: list[tuple[str, dict, str]] = []
        logged: list[str] = []
        for eid, fields in entries:
            where = None
            if wire.is_logged(fields):
                logged.append(eid)
                where = wire.written_to(fields)
                if where is None:  # logged without its version: which ones hold it is unknown, acknowledged only
                    continue
            try:
                event = wire.decode(fields)
                if partition_of(event.user_id, self.layout.n) != part.index:
                    raise wire.BadEntry(
                        f"user {event.user_id!r} belongs to partition {partition_of(event.user_id, self.layout.n)}"
                    )
                # A logged event was accepted by the service already; another version maps an item it lacks to
                # the unknown row, as the non-strict path does.
                if where is None and self.ingestor.strict_items and not self.ingestor.model.knows(event.item_id):
                    raise wire.BadEntry(f"unknown item {event.item_id!r} (strict mode)")
            except wire.BadEntry as exc:
                dead.append((eid, fields, exc.reason))
                continue
            good.append(event)
            ids.append(eid)
            written.append(where)
        return good, ids, written, dead, logged

    async def _drop_erased(
        self, good: list[Event], ids: list[str], written: list[str | None]
    ) -> tuple[list[Event], list[str], list[str | None], list[str]]:
        """Leave out the entries at or below their user's erasure tombstone (acknowledged, never applied)."""
        if not good:
            return good, ids, written, []
        stones = await read_tombstones(self.client, self.layout.prefix, sorted({e.user_id for e in good}))
        if not stones:
            return good, ids, written, []
        keep, drop = split_erased(stones, ((e.user_id, eid) for e, eid in zip(good, ids, strict=True)))
        return [good[i] for i in keep], [ids[i] for i in keep], [written[i] for i in keep], [ids[i] for i in drop]

    async def _handle(self, lease: _Lease, claimed: list[str], entries: list[tuple[str, dict]]) -> None:
        """Apply one batch, dead-letter its bad entries, then acknowledge; retried until done or the lease goes."""
        part = lease.part
        start = time.monotonic()
        metrics.BATCH_SIZE.observe(len(entries))
        good, ids, written, dead, logged = self._validate(part, entries)
        good, ids, written, gone = await self._drop_erased(good, ids, written)
        present = {eid for eid, _ in entries}
        trimmed = [i for i in claimed if i not in present]
        ack = list(dict.fromkeys([*ids, *gone, *logged, *(d[0] for d in dead), *trimmed]))
        # One outcome per entry: a logged entry erased or dead-lettered counts as that, not as logged.
        n_logged = len(set(logged) - set(gone) - {d[0] for d in dead})
        attempt = 0
        while True:
            if not lease.alive():
                raise LeaseLost
            try:
                applied = dups = refused = 0
                if good:
                    result = await self.ingestor.ingest_entries(
                        good, ids, part.mark_field, lease.epoch, loop_time() + 3600, written
                    )
                    applied, dups = result.applied, result.duplicates
                    refused = result._erased  # noqa: SLF001 - erased inside the compare-and-set (a DELETE raced it)
                if dead:
                    pipe = self.client.pipeline(transaction=False) if not self.store.cluster else self.client.pipeline()
                    for eid, fields, reason in dead:
                        record = {
                            **{_s(k): v for k, v in fields.items()},
                            "_reason": reason,
                            "_entry": eid,
                            "_partition": str(part.index),
                        }
                        pipe.xadd(self.layout.dead, record, maxlen=self.s.stream_dead_maxlen or None, approximate=True)
                    await pipe.execute()
                await self.client.xack(part.stream, self.s.stream_group, *ack)
                break
            except FencedError as exc:
                raise LeaseLost from exc
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis errors, conflicts, corrupt states: retry, never ack
                metrics.BATCH_FAILURES.labels(type(exc).__name__).inc()
                delay = self._backoff.compute(attempt)
                attempt += 1
                log.warning(
                    "partition %d batch failed (%s: %s); retry %d in %.2fs",
                    part.index,
                    type(exc).__name__,
                    exc,
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
        t = self.totals
        t.applied += applied
        t.duplicates += dups
        t.dead_letter += len(dead)
        t.trimmed += len(trimmed)
        t.batches += 1
        t.last_ack, t.last_ack_unix = time.monotonic(), time.time()
        t.logged += n_logged
        for outcome, n in (
            ("erased", len(gone) + refused),
            ("logged", n_logged),
            ("applied", applied),
            ("duplicate", dups),
            ("dead_letter", len(dead)),
            ("trimmed", len(trimmed)),
        ):
            if n:
                metrics.ENTRIES.labels(outcome).inc(n)
        metrics.APPLY_SECONDS.observe(t.last_ack - start)

    # ------------------------------------------------------------ lag
    async def _lag_round(self) -> None:
        for p, lease in list(self.leases.items()):
            try:
                st = await partition_status(self.client, lease.part.stream, self.s.stream_group)
                if lease.alive():
                    keys = [lease.part.lease, lease.part.stream]
                    gone = await self._script("prune", keys, [lease.token, self.s.stream_group, self._ttl * 2])
                    if gone:
                        metrics.CONSUMERS_DELETED.inc(len(gone))
                        log.info("partition %d: deleted idle consumers %s", p, [_s(g) for g in gone])
            except (rex.RedisError, OSError):
                continue
            if st is None:
                continue
            label = str(p)
            metrics.LAG_SECONDS.labels(label).set(st.lag_s)
            metrics.LAG_ENTRIES.labels(label).set(-1 if st.lag_entries is None else st.lag_entries)
            metrics.PENDING.labels(label).set(st.pending)
            if st.retention_s is not None:
                metrics.RETENTION_SECONDS.labels(label).set(st.retention_s)
            if st.margin_s is not None:
                metrics.RETENTION_MARGIN.labels(label).set(st.margin_s)
            metrics.BEHIND_RETENTION.labels(label).set(-1 if st.behind is None else int(st.behind))

    async def _lag_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await self._lag_round()
            except Exception:  # noqa: BLE001 - metrics only
                log.exception("lag round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 2.0)

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> Totals:
        """Consume until ``stopping`` is set (SIGTERM), then finish the batches in hand and release the leases."""
        tasks = [asyncio.create_task(self._leases_loop()), asyncio.create_task(self._lag_loop())]
        try:
            await self.stopping.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            workers = list(self.workers.values())
            if workers:
                await asyncio.gather(*workers, return_exceptions=True)
            with contextlib.suppress(rex.RedisError, OSError):
                await self.client.zrem(self.layout.consumers, self.id)
        return self.totals

    def stop(self) -> None:
        self.stopping.set()


__all__ = ["Consumer", "LeaseLost", "PartitionStatus", "Totals", "default_consumer_id", "partition_status"]
