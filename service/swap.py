"""Serving versions without a restart: the desired versions in Redis, and every worker following them.

The desired versions are one hash, ``<prefix>:versions:desired`` (``live``, ``candidate``, ``canary`` share,
``shadow``, ``write``: versions dual-written, ``rev``), changed by ``hytrec versions set`` or
``PUT /v1/admin/model`` and announced on the channel ``<prefix>:versions:announce``. Each worker's
``VersionWatcher`` listens (and re-reads every ``HYTREC_VERSIONS_POLL_S``, so a missed message only delays it).
On a change it builds the runtimes it lacks in the background (checkpoint from ``HYTREC_MODEL_ROOT/<version>``,
its store, batchers, dual-write mirrors), checks each new model with a parity probe, and then installs the
new ``Runtime`` with one assignment. A request holds the runtime it started with, so requests in flight finish
on the old version; the old runtime's batchers stop only after the longest deadline more (the
longest any request may take). A probe that fails leaves the worker on what it serves, with the error in
``GET /v1/model`` (``swap_error``).

**Canary and shadow.** With a candidate and ``canary`` = s, a user whose ``crc32(user id) / 2^32 < s`` is
served by the candidate (sticky: the same users for a given share, and a larger share keeps them). With
``shadow``, the live version serves and the candidate scores the same request in the background; both answers
are logged (logger ``hytrec.shadow``, one JSON line) for offline comparison. For online evaluation the live
runtime's impression log records the canary's answers with source ``canary`` and the shadow's with source
``shadow`` (service/online_eval.py), so the metrics carry both versions side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from hytrec.model.serving import ServingModel
from hytrec.service import metrics
from hytrec.service.schemas import Recommendations
from hytrec.service.settings import Settings
from hytrec.service.versions import rest_mirror_versions
from hytrec.state_store.keys import check_name

if TYPE_CHECKING:
    from hytrec.service.catalogue import Filters
    from hytrec.service.runtime import Lifecycle, Runtime

log = logging.getLogger("hytrec.service")
shadow_log = logging.getLogger("hytrec.shadow")


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def desired_key(prefix: str) -> str:
    return f"{prefix}:versions:desired"


def announce_channel(prefix: str) -> str:
    return f"{prefix}:versions:announce"


def writers_key(prefix: str) -> str:
    """Hash: process id -> ``"<served version> <written versions,...> <ms>"``, refreshed by every watcher."""
    return f"{prefix}:versions:writers"


@dataclass(frozen=True)
class Desired:
    """What every worker should serve and write (``live`` None: what each worker started with)."""

    live: str | None = None
    candidate: str | None = None
    canary: float = 0.0
    shadow: bool = False
    write: tuple[str, ...] = ()
    rev: int = 0

    @classmethod
    def parse(cls, raw: dict[Any, Any]) -> Desired:
        d = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        return cls(
            live=d.get("live") or None,
            candidate=d.get("candidate") or None,
            canary=float(d.get("canary") or 0.0),
            shadow=d.get("shadow") == "1",
            write=tuple(x for x in (d.get("write") or "").split(",") if x),
            rev=int(d.get("rev") or 0),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "live": self.live,
            "candidate": self.candidate,
            "canary": self.canary,
            "shadow": self.shadow,
            "write": list(self.write),
            "rev": self.rev,
        }


async def read_desired(client: Any, prefix: str) -> Desired:
    return Desired.parse(await client.hgetall(desired_key(prefix)))


async def set_desired(client: Any, prefix: str, **changes: Any) -> Desired:
    """Change some fields of the desired versions (None for candidate clears it), bump ``rev``, announce it."""
    fields: dict[str, str] = {}
    drop: list[str] = []
    for name, value in changes.items():
        if name in ("live", "candidate"):
            if value:
                check_name(value, f"{name} version")
                fields[name] = value
            else:
                drop.append(name)
        elif name == "canary":
            if not 0.0 <= float(value) <= 1.0 or math.isnan(float(value)):
                raise ValueError("canary share must be within [0, 1]")
            fields[name] = repr(float(value))
        elif name == "shadow":
            fields[name] = "1" if value else "0"
        elif name == "write":
            for v in value:
                check_name(v, "write version")
            fields[name] = ",".join(dict.fromkeys(value))
        else:
            raise ValueError(f"unknown desired-version field {name!r}")
    key = desired_key(prefix)
    pipe = client.pipeline(transaction=True)
    if fields:
        pipe.hset(key, mapping=fields)
    if drop:
        pipe.hdel(key, *drop)
    pipe.hincrby(key, "rev", 1)
    pipe.hgetall(key)
    *_, raw = await pipe.execute()
    desired = Desired.parse(raw)
    await client.publish(announce_channel(prefix), str(desired.rev))
    return desired


def canary_bucket(user_id: str) -> float:
    """The user's place in [0, 1): ``crc32(user id) / 2^32`` (stable across processes and languages)."""
    return zlib.crc32(user_id.encode()) / 2**32


def served_by(rt: Runtime, user_id: str) -> Runtime:
    """The runtime that answers ``user_id``: the candidate for the canary share of users, else the live one."""
    cand = rt.candidate
    if cand is not None and rt.canary > 0 and canary_bucket(user_id) < rt.canary:
        return cand
    return rt


async def recommend_routed(
    rt: Runtime,
    user_id: str,
    k: int,
    exclude_seen: bool,
    now: float,
    deadline: float,
    filters: Filters | None = None,
) -> Recommendations:
    """Answer from the runtime the user is routed to; in shadow mode also score the candidate and log both.

    Impressions go to the live runtime's log (the one its attribution reads first), a canary's with source
    ``canary``."""
    serving = served_by(rt, user_id)
    canary = serving is not rt
    recommend = serving.recommender.recommend
    answer = await recommend(user_id, k, exclude_seen, now, deadline, filters, impression=not canary)
    if canary:
        rt.impressions.record(answer, source="canary")
    elif rt.shadow and rt.candidate is not None:
        task = asyncio.create_task(_shadow(rt, answer, user_id, k, exclude_seen, now, deadline, filters))
        _SHADOWS.add(task)
        task.add_done_callback(_SHADOWS.discard)
    return answer


_SHADOWS: set[asyncio.Task] = set()


async def _shadow(
    rt: Runtime,
    live: Recommendations,
    user_id: str,
    k: int,
    exclude_seen: bool,
    now: float,
    deadline: float,
    filters: Filters | None,
) -> None:
    cand = rt.candidate
    assert cand is not None
    try:  # not served: recorded as a shadow impression, which never replaces the served one
        other = await cand.recommender.recommend(user_id, k, exclude_seen, now, deadline, filters, impression=False)
        rt.impressions.record(other, source="shadow")
    except Exception as exc:  # noqa: BLE001 - a shadow never affects serving
        shadow_log.warning(json.dumps({"user_id": user_id, "candidate": cand.model.version, "error": str(exc)}))
        return
    shadow_log.info(
        json.dumps(
            {
                "user_id": user_id,
                "request_time": now,
                "live": {"version": live.model_version, "items": [i.item_id for i in live.items]},
                "candidate": {"version": other.model_version, "items": [i.item_id for i in other.items]},
                "overlap": len({i.item_id for i in live.items} & {i.item_id for i in other.items}),
            }
        )
    )


# ------------------------------------------------------------------------------------------- parity probe
def probe(model: ServingModel, blobs: list[bytes], seed: int = 0) -> None:
    """Check a freshly loaded model before it serves (synchronous torch work); ``ProbeFailed`` says why.

    1. The chunked parallel form and event-by-event stepping give the same state on a random history
       (the two paths the service mixes must agree for these weights).
    2. Stored states of a few users decode and score to finite top-10 answers.
    """
    gen = torch.Generator().manual_seed(seed)
    n = 2 * model.cfg.chunk_size + 3
    rows = torch.randint(1, model.n_items + 1, (n,), generator=gen).tolist()
    stamps = (1.7e9 + torch.arange(n, dtype=torch.float64) * 30.0).tolist()
    events = [list(zip(rows, stamps, strict=True))]
    parallel = model.advance([None], events)
    stepped = model._steps(model.empty_state(), events)  # noqa: SLF001 - the other path, on purpose
    for name in ("tadn", "summary", "hidden"):
        a, b = getattr(parallel, name), getattr(stepped, name)
        if a.numel() and not torch.allclose(a, b, rtol=1e-3, atol=1e-3):
            raise ProbeFailed(f"parallel and stepped {name} differ by {float((a - b).abs().max()):.3g}")
    states = [parallel, *(model.decode(b) for b in blobs)]
    for st in states:
        rec = model.recommend(st, [stamps[-1] + 60.0], 10, [True])[0]
        if not rec.item_ids or not all(math.isfinite(v) for v in rec.scores):
            raise ProbeFailed("a probe user scored no finite top-10")


class ProbeFailed(RuntimeError):
    """A loaded checkpoint did not pass the parity probe: the worker keeps serving what it serves."""


# ------------------------------------------------------------------------------------------- the watcher
class VersionWatcher:
    """Follows the desired versions in one worker; see the module docstring."""

    def __init__(self, lc: Lifecycle, build: Callable[..., Awaitable[Runtime]]) -> None:
        self.lc = lc
        self.s: Settings = lc.settings
        self.build = build  # (version, written versions, loaded model or None) -> a started, probed Runtime
        self.applied_rev = -1
        self.error: str | None = None
        self.swaps = 0
        self.unconsumed: list[str] = []  # write versions no consumer writes (while posts are logged)
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Until cancelled: apply the desired versions at start, on every announcement, and every poll period.

        The channel is read without blocking every 50 ms, so a cancel (shutdown) always lands in a sleep and
        never inside a read of the subscription (which redis-py does not always give up cleanly).
        """
        rt = self.lc.runtime
        if rt is None:
            return
        pubsub = None
        with contextlib.suppress(Exception):  # a cluster client has no pub/sub here: polling alone
            pubsub = rt.store.client.pubsub()
            await pubsub.subscribe(announce_channel(self.s.key_prefix))
        loop = asyncio.get_running_loop()
        due = 0.0
        while True:
            announced = False
            if pubsub is not None:
                try:
                    announced = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.0) is not None
                except Exception:  # noqa: BLE001 - the poll still follows the desired versions
                    pubsub = None
            if announced or loop.time() >= due:
                with contextlib.suppress(Exception):
                    await self.check()
                due = loop.time() + self.s.versions_poll_s
            await asyncio.sleep(0.05)

    async def check(self) -> None:
        rt = self.lc.runtime
        if rt is None:
            return
        desired = await read_desired(rt.store.client, self.s.key_prefix)
        await self._report(rt)
        await self._watch_consumers(rt, desired)
        if desired.rev == self.applied_rev:
            return
        async with self._lock:
            try:
                await self.apply(desired)
                self.error = None
            except Exception as exc:  # noqa: BLE001 - keep serving; reported by GET /v1/model and the log
                self.error = f"{type(exc).__name__}: {exc}"
                log.error("cannot apply desired versions rev %d: %s", desired.rev, self.error)
            self.applied_rev = desired.rev

    async def _report(self, rt: Runtime) -> None:
        import time

        written = ",".join([rt.model.version, *(m.model.version for m in rt.mirrors)])
        await rt.store.client.hset(
            writers_key(self.s.key_prefix),
            f"worker-{os.getpid()}",
            f"{rt.model.version} {written} {int(time.time() * 1000)}",
        )

    async def _watch_consumers(self, rt: Runtime, desired: Desired) -> None:
        """While posts are logged, the write versions besides the served one get them from a consumer only:
        count those no consumer writes (``hytrec_write_versions_unconsumed``), and warn when that set changes."""
        import time

        from hytrec.service.versions import unconsumed_versions

        missing: list[str] = []
        if self.s.log_posted_events:
            wanted = [v for v in self.write_set(desired) if v != rt.model.version]
            if wanted:
                writers = await rt.store.client.hgetall(writers_key(self.s.key_prefix))
                fresh_ms = 10 * self.s.versions_poll_s * 1000
                missing = unconsumed_versions(writers, wanted, time.time() * 1000, fresh_ms)
        metrics.WRITE_VERSIONS_UNCONSUMED.set(len(missing))
        if missing != self.unconsumed:
            if missing:
                log.warning(
                    "write versions %s get no posted events: no consumer writes them (start `hytrec consume`)",
                    ",".join(missing),
                )
            self.unconsumed = missing

    def write_set(self, desired: Desired) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.s.write_version_list(), *desired.write]))

    async def apply(self, desired: Desired) -> None:
        """Build what is missing, probe it, install the new runtime in one assignment, retire the old ones."""
        old = self.lc.runtime
        assert old is not None
        live_v = desired.live or self.lc.started_version
        cand_v = desired.candidate if desired.candidate and (desired.canary > 0 or desired.shadow) else None
        write = self.write_set(desired)
        have = {r.model.version: r for r in (old, old.candidate) if r is not None}
        keep: set[int] = set()

        async def get(version: str) -> Runtime:
            r = have.get(version)
            if r is not None and tuple(sorted(m.model.version for m in r.mirrors)) == tuple(
                sorted(rest_mirror_versions(self.s, version, write))
            ):
                keep.add(id(r))
                return r
            return await self.build(version, write, r.model if r is not None else None)

        live = await get(live_v)
        cand = await get(cand_v) if cand_v and cand_v != live_v else None
        new = replace(
            live, candidate=cand, canary=desired.canary if cand else 0.0, shadow=desired.shadow and bool(cand)
        )
        changed = new.model.version != old.model.version
        self.lc.install(new)
        if changed:
            self.swaps += 1
            log.info("worker %s now serves %s (was %s)", os.getpid(), new.model.version, old.model.version)
        for r in {id(x): x for x in (old, old.candidate) if x is not None}.values():
            if id(r) not in keep:
                task = asyncio.create_task(self._retire(r))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    async def _retire(self, rt: Runtime) -> None:
        """Close a runtime no longer installed once every request that could hold it has ended."""
        await asyncio.sleep(self.s.deadline_ms(self.s.max_batch_events) / 1000 + 0.5)  # the longest deadline
        await rt.close()

    async def close(self) -> None:
        for t in list(self._retiring):
            t.cancel()
        rt = self.lc.runtime
        if rt is not None:  # this worker no longer serves or writes anything
            with contextlib.suppress(Exception):
                await asyncio.wait_for(rt.store.client.hdel(writers_key(self.s.key_prefix), f"worker-{os.getpid()}"), 2)


def set_model_info(old: str | None, new: ServingModel) -> None:
    if old is not None and old != new.version:
        for labels in list(metrics.MODEL_INFO._metrics):  # noqa: SLF001 - prometheus_client has no label lookup
            if labels[0] == old:
                metrics.MODEL_INFO.labels(*labels).set(0)
    metrics.MODEL_INFO.labels(new.version, new.model_type, str(new.n_items)).set(1)


class WorkerHeader:
    """ASGI middleware: ``X-HyTRec-Worker`` names the process that answered and ``X-HyTRec-Seq`` the request's
    arrival order in it, so a client can follow each worker's version swap."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.value = str(os.getpid()).encode()
        self.seq = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.seq += 1
        seq = str(self.seq).encode()  # arrival order in this worker (``X-HyTRec-Seq``)

        async def tagged(message: dict) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-hytrec-worker", self.value), (b"x-hytrec-seq", seq)]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, tagged)
