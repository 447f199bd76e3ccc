"""Online evaluation: what sampled users were served (impressions) and whether their next events hit it.

**Sampling.** A user is sampled when a keyed 64-bit BLAKE2b hash of the user id falls below
``HYTREC_IMPRESSION_SAMPLE`` of the hash range: every worker and process decides the same for a user, so a
sampled user's answers and events are all seen (and the stream partitioning, crc32, is not correlated with it).

**Impressions** (``ImpressionLog``). ``record`` runs on the request path and only appends the answer to an
in-process queue; a background writer drains the queue every ``HYTREC_IMPRESSION_FLUSH_MS`` in one pipeline
per write of at most ``HYTREC_IMPRESSION_FLUSH_MAX`` impressions: per impression one
``SET <prefix>:{u:<user>}:i ... PX window`` (the user's latest impression, in the user's hash slot), and per
write one ``XADD`` of all of them as one entry of the export stream ``<prefix>:impressions`` (exact
``MAXLEN``) and one ``PFADD`` + ``EXPIRE`` per (model version, source, hour) into the coverage HyperLogLogs.
So a sampled request costs one pipelined command and no round trip of its own; an unsampled one, the hash.

**Attribution** (``Attribution``). After an events batch committed (REST posts and stream entries alike),
the events it applied for sampled users are compared with each user's latest impression: the one this
worker's writer still holds (so a worker sees its own answers at once), else the stored one, read in one
pipelined ``GET`` per batch by a task of its own (the events batch does not wait for it). An event at most
``HYTREC_ATTRIBUTION_WINDOW_S`` after the impression's request time is attributed, and a hit at rank r when
its item is the r-th id served. Duplicates (event ids or stream marks already applied) are not applied, so
never counted twice.

**Canary and shadow** (service/swap.py). An answer the candidate served to its canary share is recorded with
source ``canary``; in shadow mode the candidate's answer to the same request, not served, is recorded with
source ``shadow`` under a key of its own (``<prefix>:{u:<user>}:is``), so it never replaces the served one. An
event is attributed to the served impression as above and, when the user's shadow impression is of the same
request (the same request time), to the shadow one too: the two arms are scored on the very same events.

The one rule both paths (and ``hytrec impressions compare``, offline) apply is :func:`attribute`.
See docs/online_eval.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as rex

from hytrec.service import metrics
from hytrec.service.schemas import Recommendations
from hytrec.state_store import check_user_id

log = logging.getLogger("hytrec.service")

# One applied event of a user, as the events batcher hands it over: (item row, timestamp, event id or None).
AppliedRow = tuple[int, float, str | None]

SOURCES = ("model", "popularity", "canary", "shadow")  # canary, shadow: the candidate's (service/swap.py)
HOUR = 3600
_PERSON = b"hytrec-imp"  # the hash's personalisation: sampling is independent of other uses of the user id
_SPAN = 1 << 64
COVERAGE_REFRESH_S = 15.0


def sampled(user_id: str, rate: float) -> bool:
    """Whether the user is in the sample of ``rate`` (0..1), the same answer in every process."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(user_id.encode(), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "big") < rate * _SPAN


@dataclass(frozen=True, slots=True)
class Impression:
    """One answer as served: to whom, at which request time, by which model version and source, the ids."""

    user_id: str
    ts: float
    model_version: str
    source: str
    items: tuple[str, ...]

    def encode(self) -> bytes:
        """``ts version source id...`` separated by spaces (ids, versions and sources never hold one)."""
        return " ".join((repr(self.ts), self.model_version, self.source, *self.items)).encode()

    @classmethod
    def decode(cls, user_id: str, raw: bytes | str) -> Impression:
        text = raw.decode() if isinstance(raw, bytes) else raw
        ts, version, source, *items = text.split(" ")
        return cls(user_id, float(ts), version, source, tuple(i for i in items if i))

    def line(self) -> str:
        """The impression as a line of the export stream: the user id, then :meth:`encode`'s fields."""
        return f"{self.user_id} {self.encode().decode()}"

    @classmethod
    def parse_line(cls, line: str) -> Impression:
        user, _, rest = line.partition(" ")
        return cls.decode(user, rest)

    def to_json(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "ts": self.ts,
            "model_version": self.model_version,
            "source": self.source,
            "items": list(self.items),
        }


# A user's latest served impression and latest shadow impression (either may be missing).
Pair = tuple[Impression | None, Impression | None]


def attribute(impression: Impression | None, item_id: str | None, ts: float, window_s: float) -> int | None:
    """How an event counts: None (no preceding impression within the window), 0 (a miss) or its rank (1-based).

    An event at the impression's request time counts as following it (the request came first).
    """
    if impression is None or not 0.0 <= ts - impression.ts <= window_s:
        return None
    try:
        return impression.items.index(item_id) + 1 if item_id is not None else 0
    except ValueError:
        return 0


def latest_key(prefix: str, user_id: str, shadow: bool = False) -> str:
    """The user's latest-impression key (``shadow``: of the candidate's answer not served), in the user's hash
    slot (beside its state keys): both are read, and erased, on the same node of a Redis Cluster."""
    return f"{prefix}:{{u:{check_user_id(user_id)}}}:{'is' if shadow else 'i'}"


def log_key(prefix: str) -> str:
    """The export stream of every impression (one entry per background write)."""
    return f"{prefix}:impressions"


def coverage_key(prefix: str, version: str, source: str, hour: int) -> str:
    """The HyperLogLog of the items served by ``version`` from ``source`` in hour ``hour`` (unix hours)."""
    return f"{prefix}:impressions:cov:{version}:{source}:{hour}"


def init_metrics(version: str) -> None:
    """Create every series of ``version`` at 0, so dashboard and alert queries have series before traffic."""
    for source in SOURCES:
        for outcome in ("written", "dropped", "failed"):
            metrics.IMPRESSIONS.labels(version, source, outcome)
        metrics.ONLINE_ATTRIBUTED.labels(version, source)
        metrics.ONLINE_RECIPROCAL_RANK.labels(version, source)
        for k in metrics.HIT_KS:
            metrics.ONLINE_HITS.labels(version, source, str(k))
        for hour in ("current", "previous"):
            metrics.ONLINE_COVERAGE.labels(version, source, hour)
    for outcome in ("attributed", "no_impression"):
        metrics.ONLINE_EVENTS.labels(outcome)


def beside(shadow: Impression | None, served: Impression | None) -> Impression | None:
    """The shadow impression if it was scored for the same request as the served one (else None: a shadow of
    an earlier request does not describe what the user was answered last)."""
    return shadow if shadow is not None and served is not None and shadow.ts == served.ts else None


def count(impression: Impression | None, rank: int | None, served: bool = True) -> None:
    """Count one event's attribution (:func:`attribute`) into the online metrics (``served=False``: a shadow
    impression's, which is not an event outcome of its own)."""
    if impression is None or rank is None:
        if served:
            metrics.ONLINE_EVENTS.labels("no_impression").inc()
        return
    if served:
        metrics.ONLINE_EVENTS.labels("attributed").inc()
    v, s = impression.model_version, impression.source
    metrics.ONLINE_ATTRIBUTED.labels(v, s).inc()
    if rank:
        for k in metrics.HIT_KS:
            if rank <= k:
                metrics.ONLINE_HITS.labels(v, s, str(k)).inc()
        if rank <= 10:
            metrics.ONLINE_RECIPROCAL_RANK.labels(v, s).inc(1.0 / rank)


class ImpressionLog:
    """The sampled answers: queued on the request path, written by one background task; see the module."""

    def __init__(
        self,
        client: Any,
        prefix: str,
        *,
        sample: float,
        max_k: int,
        window_s: float,
        log_max: int,
        flush_max: int,
        buffer: int,
        flush_ms: float = 0.0,
        cluster: bool = False,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.sample = sample
        self.max_k = max_k
        self.window_s = window_s
        self.ttl_ms = max(1, math.ceil(window_s * 1000))
        self.flush_max = flush_max
        self.flush_s = flush_ms / 1000
        self.buffer = buffer
        # Exact MAXLEN in entries: an entry holds at most flush_max impressions, so at most log_max are kept.
        self.log_entries = log_max // flush_max if log_max else 0
        self.cluster = cluster
        self._queue: deque[Impression] = deque()
        self._pending: dict[str, Impression] = {}  # per user, the newest impression queued or being written
        self._pending_shadow: dict[str, Impression] = {}  # the same, of shadow answers
        self._shadow_until = 0.0  # monotonic time until which this worker's shadow impressions may be held
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._newest_hour: dict[tuple[str, str], int] = {}
        self._next_refresh = 0.0

    # ------------------------------------------------------------------------------------ request path
    def record(self, answer: Recommendations, source: str | None = None) -> Impression | None:
        """Queue the answer if its user is sampled (no I/O); returns the impression, None if not recorded.

        ``source``: None for the live version's answer, ``"canary"`` for the candidate's served to its share
        (a served fallback answer is ``"popularity"`` either way), ``"shadow"`` for the candidate's answer not
        served (kept apart: it never replaces the user's served impression)."""
        if not sampled(answer.user_id, self.sample):
            return None
        src = "shadow" if source == "shadow" else "popularity" if answer.fallback else source or "model"
        if len(self._queue) >= self.buffer:
            metrics.IMPRESSIONS.labels(answer.model_version, src, "dropped").inc()
            return None
        imp = Impression(
            answer.user_id,
            float(answer.request_time),
            answer.model_version,
            src,
            tuple(i.item_id for i in answer.items[: self.max_k]),
        )
        self._queue.append(imp)
        if src == "shadow":
            self._pending_shadow[imp.user_id] = imp
            self._shadow_until = time.monotonic() + self.window_s
        else:
            self._pending[imp.user_id] = imp
        self._idle.clear()
        self._wake.set()
        return imp

    # ---------------------------------------------------------------------------------------- writer
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hytrec-impressions")

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                # not wait_for: it can swallow a cancel (3.11); no timer while there is no coverage to refresh
                async with asyncio.timeout(COVERAGE_REFRESH_S if self._newest_hour else None):
                    await self._wake.wait()
            self._wake.clear()
            if self.flush_s and len(self._queue) < self.flush_max:
                await asyncio.sleep(self.flush_s)  # let answers gather: one pipeline carries them all
            try:
                while self._queue:
                    await self._write(self._take())
                if time.monotonic() >= self._next_refresh:
                    self._next_refresh = time.monotonic() + COVERAGE_REFRESH_S
                    await self.refresh_coverage()
            except Exception:  # noqa: BLE001 - the writer outlives any one bad write
                log.exception("impression writer")
            finally:
                self._idle.set()

    def _take(self) -> list[Impression]:
        return [self._queue.popleft() for _ in range(min(self.flush_max, len(self._queue)))]

    def _pipeline(self) -> Any:
        return self.client.pipeline() if self.cluster else self.client.pipeline(transaction=False)

    async def _write(self, batch: Sequence[Impression]) -> None:
        """One pipeline: each user's latest impression, one export entry, the coverage HyperLogLogs."""
        pipe = self._pipeline()
        served: dict[tuple[str, str, int], set[str]] = {}
        for imp in batch:
            pipe.set(latest_key(self.prefix, imp.user_id, imp.source == "shadow"), imp.encode(), px=self.ttl_ms)
            served.setdefault((imp.model_version, imp.source, int(imp.ts // HOUR)), set()).update(imp.items)
        if self.log_entries:
            lines = "\n".join(imp.line() for imp in batch)
            pipe.xadd(log_key(self.prefix), {"i": lines}, maxlen=self.log_entries, approximate=False)
        for (version, source, hour), items in served.items():
            key = coverage_key(self.prefix, version, source, hour)
            if items:
                pipe.pfadd(key, *items)
            pipe.expire(key, 3 * HOUR)  # the current and the previous hour are read; a margin for late answers
        outcome = "written"
        try:
            await pipe.execute()
        except (rex.RedisError, OSError) as exc:
            outcome = "failed"
            log.warning("could not write %d impressions: %s", len(batch), exc)
        for imp in batch:
            metrics.IMPRESSIONS.labels(imp.model_version, imp.source, outcome).inc()
            pending = self._pending_shadow if imp.source == "shadow" else self._pending
            if pending.get(imp.user_id) is imp:
                del pending[imp.user_id]
        for version, source, hour in served:
            self._newest_hour[version, source] = max(hour, self._newest_hour.get((version, source), hour))

    async def refresh_coverage(self) -> None:
        """Set the coverage gauges from PFCOUNT of the newest hour this worker served and the one before."""
        groups = list(self._newest_hour.items())
        if not groups:
            return
        pipe = self._pipeline()
        for (version, source), hour in groups:
            pipe.pfcount(coverage_key(self.prefix, version, source, hour))
            pipe.pfcount(coverage_key(self.prefix, version, source, hour - 1))
        try:
            counts = await pipe.execute()
        except (rex.RedisError, OSError) as exc:
            log.warning("could not read the coverage counts: %s", exc)
            return
        for n, ((version, source), _) in enumerate(groups):
            metrics.ONLINE_COVERAGE.labels(version, source, "current").set(counts[2 * n])
            metrics.ONLINE_COVERAGE.labels(version, source, "previous").set(counts[2 * n + 1])

    async def flush(self) -> None:
        """Wait until every impression queued so far is written (tests; shutdown)."""
        while self._queue or not self._idle.is_set():
            if self._task is None or self._task.done():  # no writer: write here
                while self._queue:
                    await self._write(self._take())
                self._idle.set()
                return
            if self._idle.is_set():  # queued after the writer's last pass: it is woken already
                await asyncio.sleep(0.001)
            else:
                await self._idle.wait()

    async def erase(self, user_id: str, chunk: int = 500) -> int:
        """Erasure: drop the user's queued impressions, delete the latest-impression key, and rewrite every export
        entry holding a line of the user (deleted; the other users' lines of it are re-added at the stream's end,
        so an export ``--since`` an earlier entry lists those again). Returns the lines removed."""
        self._queue = deque(i for i in self._queue if i.user_id != user_id)
        self._pending.pop(user_id, None)
        self._pending_shadow.pop(user_id, None)
        with contextlib.suppress(TimeoutError):  # a batch already taken from the queue is written first
            await asyncio.wait_for(self._idle.wait(), 2.0)
        await self.client.delete(latest_key(self.prefix, user_id), latest_key(self.prefix, user_id, True))
        removed, start, key = 0, "-", log_key(self.prefix)
        while True:
            entries = await self.client.xrange(key, min=start, max="+", count=chunk)
            for entry_id, fields in entries:
                raw = fields.get(b"i", fields.get("i", b""))
                lines = (raw.decode() if isinstance(raw, bytes) else raw).split("\n")
                keep = [ln for ln in lines if ln and Impression.parse_line(ln).user_id != user_id]
                if len(keep) < len([ln for ln in lines if ln]):
                    removed += len(lines) - len(keep)
                    await self.client.xdel(key, entry_id)
                    if keep:
                        await self.client.xadd(key, {"i": "\n".join(keep)})
            if len(entries) < chunk:
                return removed
            last = entries[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else last)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.flush(), 2.0)
        except TimeoutError:
            log.warning("%d impressions not written at shutdown", len(self._queue))
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=2.0)

    # ------------------------------------------------------------------------------------------ reads
    def pending(self, user_id: str) -> Pair | None:
        """The user's newest (served, shadow) impressions queued or being written by this worker, when that is
        all there is to know (None: ask Redis). While this worker scores shadows, a served impression without a
        queued shadow one is not enough: the shadow one may be stored already."""
        served = self._pending.get(user_id)
        if served is None:
            return None
        shadow = self._pending_shadow.get(user_id)
        if shadow is None and time.monotonic() < self._shadow_until:
            return None
        return served, shadow

    async def latest(self, user_ids: Sequence[str]) -> dict[str, Pair]:
        """Each user's latest (served, shadow) impressions: this worker's queued ones, else the stored ones
        (one pipeline, one ``MGET`` of the user's two keys each; two ``GET`` on a Redis Cluster). The queued
        ones are taken before the read: one written meanwhile is in Redis, one queued meanwhile answered a later
        request."""
        held = {u: (self._pending.get(u), self._pending_shadow.get(u)) for u in user_ids}
        pipe = self._pipeline()
        for u in user_ids:
            keys = latest_key(self.prefix, u), latest_key(self.prefix, u, True)
            if self.cluster:  # redis-py's cluster pipeline refuses MGET (even within one slot)
                pipe.get(keys[0])
                pipe.get(keys[1])
            else:
                pipe.mget(*keys)
        replies = await pipe.execute() if user_ids else []
        if self.cluster:
            replies = list(zip(replies[::2], replies[1::2], strict=True))
        out: dict[str, Pair] = {}
        for u, raws in zip(user_ids, replies, strict=True):
            stored = tuple(None if raw is None else Impression.decode(u, raw) for raw in raws)
            out[u] = held[u][0] or stored[0], held[u][1] or stored[1]
        return out


class Attribution:
    """Counts the applied events of sampled users against their latest impression; see the module."""

    def __init__(self, impressions: ImpressionLog, item_id: Callable[[int], str | None]) -> None:
        self.impressions = impressions
        self.item_id = item_id
        self._tasks: set[asyncio.Task[None]] = set()

    async def observe(self, applied: Mapping[str, Iterable[AppliedRow]]) -> None:
        """Attribute the events an events batch applied (per user, in order), without holding the batch: the
        impressions this worker holds are taken now; the stored ones are read by a task of its own. Never
        raises: states are already committed, and a lost count is only a lost count (logged)."""
        rows = {u: list(r) for u, r in applied.items() if sampled(u, self.impressions.sample)}
        rows = {u: r for u, r in rows.items() if r}
        if not rows:
            return
        known = {u: pair for u in rows if (pair := self.impressions.pending(u)) is not None}
        for u, pair in known.items():
            self._count(pair, rows.pop(u))
        if rows:
            task = asyncio.get_running_loop().create_task(self._read_and_count(rows))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read_and_count(self, rows: dict[str, list[AppliedRow]]) -> None:
        try:
            latest = await self.impressions.latest(list(rows))
        except (rex.RedisError, OSError, ValueError) as exc:
            log.warning("could not read the impressions of %d users: %s", len(rows), exc)
            return
        for u, r in rows.items():
            self._count(latest[u], r)

    def _count(self, pair: Pair, rows: list[AppliedRow]) -> None:
        served, shadow = pair[0], beside(pair[1], pair[0])
        window = self.impressions.window_s
        for row, ts, _ in rows:
            item = self.item_id(row)
            count(served, attribute(served, item, ts, window))
            if shadow is not None:
                count(shadow, attribute(shadow, item, ts, window), served=False)

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for the reads in flight (tests; shutdown, with a ``timeout``)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)


def attach(settings: Any, store: Any, events: Any, item_id: Callable[[int], str | None]) -> Attribution:
    """Build the impression log and the attribution of one process from its settings and store, count the
    model's series from 0, and hook the attribution into the events batcher (``hytrec serve`` and ``hytrec
    consume`` alike; only the server records impressions, through ``Recommender.impressions``)."""
    impressions = ImpressionLog(
        store.client,
        settings.key_prefix,
        sample=settings.impression_sample,
        max_k=settings.impression_k,
        window_s=settings.attribution_window_s,
        log_max=settings.impression_log_max,
        flush_max=settings.impression_flush_max,
        buffer=settings.impression_buffer,
        flush_ms=settings.impression_flush_ms,
        cluster=store.cluster,
    )
    init_metrics(store.model_version)
    attribution = Attribution(impressions, item_id)
    events.on_applied = attribution.observe
    return attribution
