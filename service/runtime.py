"""The lifecycle of one worker: load the model, open the store, then hand the routes one frozen ``Runtime``.

``Lifecycle.start`` runs in the background from the app's lifespan, so ``/healthz`` answers at once and
``/readyz`` says 503 until the model is loaded and Redis answers. Every torch call runs in one dedicated
thread (``Lifecycle.run``), never on the event loop; the store gets that runner once, at opening.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from hytrec.model.serving import ServingModel
from hytrec.service import metrics
from hytrec.service.batcher import RecommendBatcher
from hytrec.service.catalogue import Catalogue
from hytrec.service.events import EventBatcher, EventIngestor
from hytrec.service.looplag import LoopLag
from hytrec.service.microbatch import MicroBatcher, Overloaded, StoreStalled
from hytrec.service.online_eval import Attribution, ImpressionLog, attach
from hytrec.service.recommend import Recommender
from hytrec.service.settings import Settings
from hytrec.service.swap import VersionWatcher, probe, set_model_info
from hytrec.service.versions import Mirror, load_version, open_mirror, rest_mirror_versions
from hytrec.state_store import StateStore, StoreAuthError, StoreUnavailable, open_store
from hytrec.streams.erasure import stream_layout

T = TypeVar("T")
log = logging.getLogger("hytrec.service")


def settle_heap() -> None:
    """Freeze what is alive now (the model, the catalogue, the modules) out of the cyclic collector's reach, and
    collect less often: every request allocates many short-lived objects, and with the default thresholds the
    collector ran every few requests and scanned the model's objects each time (py-spy: about a tenth of the
    event loop's samples under load). Reference counting still frees everything that is not a cycle at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)


@dataclass(frozen=True)
class Runtime:
    """Everything a request needs once the worker is ready; built once, never partially.

    A version swap (service/swap.py) installs another ``Runtime``; requests in flight keep the one they hold.
    ``candidate``: the runtime of the canary / shadow version, with the share of users it serves.
    """

    settings: Settings
    model: ServingModel
    store: StateStore
    batcher: RecommendBatcher
    events_batcher: EventBatcher
    ingestor: EventIngestor
    recommender: Recommender
    catalogue: Catalogue
    impressions: ImpressionLog
    attribution: Attribution
    mirrors: tuple[Mirror, ...] = ()
    candidate: Runtime | None = None
    canary: float = 0.0
    shadow: bool = False

    async def close(self) -> None:
        """Stop this version's batchers, flush its impression log and close its connections (and its mirrors')."""
        await self.catalogue.stop()
        await self.batcher.stop()
        await self.events_batcher.stop()
        await self.attribution.drain(timeout=2.0)
        await self.impressions.close()
        for m in self.mirrors:
            await m.close()
        await self.store.close()


def _needs_store(path: str) -> bool:
    """Routes that wait on Redis, shed while it is stalled (the catalogue, the model, similar items and sessions
    are answered from memory and go on being served)."""
    return path.startswith(("/v1/events", "/v1/users/", "/v1/recommendations:batch", "/v1/admin/"))


def _recommender_post(path: str) -> bool:
    """POST routes answered by the recommendation micro-batcher: shed on its pressure before the body is read."""
    return path in ("/v1/sessions/recommendations", "/v1/recommendations:batch") or (
        path.startswith("/v1/users/") and path.endswith("/rank")
    )


class Lifecycle:
    """Starts and stops the worker's resources; ``runtime`` is None until every one of them is up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hytrec-torch")
        self.runtime: Runtime | None = None
        self.model_version: str | None = None
        self.error: str | None = None
        self.phase = "starting"
        self.started_version: str | None = None
        self.watcher: VersionWatcher | None = None
        self._watch: asyncio.Task | None = None
        # sampled always (the metric; the stall breaker's "loop on time" is within 50 ms), shedding only when set
        lag_ms = settings.max_loop_lag_ms
        self.loop_lag = LoopLag(lag_ms or 50.0, settings.queue_standing_ms, shed=lag_ms is not None)

    def shed(self, method: str, path: str) -> Overloaded | None:
        """Why a request for ``path`` would be shed by its batcher right now (counted), or None to admit it.

        Asked by the guard before the request is parsed, so under overload the excess costs microseconds.
        """
        rt = self.runtime
        if rt is None:
            return None
        if _needs_store(path):
            stalled = self.stalled(rt, writes=method != "GET" and not _recommender_post(path))
            if stalled is not None:
                return stalled
        batcher: MicroBatcher | None = None
        if method == "POST" and path == "/v1/events":
            batcher = rt.events_batcher
        elif (method == "GET" and path.endswith("/recommendations") and path.startswith("/v1/users/")) or (
            method == "POST" and _recommender_post(path)
        ):
            batcher = rt.batcher  # the product POSTs (rank, session, batch) go through the same micro-batcher
        if batcher is None and not _needs_store(path):
            return None
        lag = self.loop_lag.pressure()  # the loop itself is behind: shed before the body is read and parsed
        if lag is not None or batcher is None:
            return lag
        reason = batcher.pressure()
        return None if reason is None else batcher.shed(reason)

    def stalled(self, rt: Runtime, writes: bool) -> StoreStalled | None:
        """Why the state store counts as stalled now (counted), or None: a read round trip of ``rt``'s store (for
        a request that writes, a read or a write one) has been waiting for Redis past HYTREC_STORE_STALL_MS.
        Requests sent to it would only wait out their deadlines (and pile up behind the stalled batch), so until
        it answers they are answered 503 at once. Reads go on while only writes stall (CLIENT PAUSE WRITE)."""
        reads, written = self.store_wait(rt)
        waited = max(reads, written if writes else 0.0)
        limit = self.settings.store_stall_ms
        if waited < limit:
            return None
        metrics.SHED.labels("store", "stalled").inc()
        what = "write" if writes and written >= limit else "read"
        return StoreStalled(
            "store", f"a Redis {what} has waited {waited:.0f} ms, over HYTREC_STORE_STALL_MS = {limit:g} ms"
        )

    def store_wait(self, rt: Runtime) -> tuple[float, float]:
        """Milliseconds the oldest read and the oldest write round trip of ``rt``'s store had waited for Redis when
        the event loop was last on time: a reply that came while the loop was behind (a busy CPU) is not held
        against Redis, only one the loop was free to read and did not get."""
        at = self.loop_lag.on_time_at
        return rt.store.stalled_for(at=at) * 1000.0, rt.store.stalled_for(writes=True, at=at) * 1000.0

    async def run(self, fn: Callable[[], T]) -> T:
        """Run a synchronous (torch) callable in the torch thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def start(self) -> None:
        """Load the model, then open the store (retrying while Redis is down), then build the runtime."""
        s = self.settings
        self.loop_lag.start()
        try:
            import torch

            await self.run(lambda: torch.set_num_threads(s.torch_threads))
            self.phase = "loading model"
            model = await self.run(lambda: ServingModel.load(s.model, s.state_dtype))
        except Exception as exc:  # noqa: BLE001 - reported by /healthz and /readyz
            self.error = f"cannot load the model from {s.model}: {exc}"
            self.phase = "failed"
            log.error("%s", self.error)
            return
        log.info("model %s loaded (%d items) from %s", model.version, model.n_items, s.model)
        settle_heap()
        self.started_version = model.version
        self.phase = "connecting to redis"
        try:
            self.install(await self.build_runtime(model.version, tuple(s.write_version_list()), model))
        except StoreAuthError as exc:  # wrong credentials: say so at once instead of retrying forever
            self.error = str(exc)
            self.phase = "failed"
            log.error("%s", self.error)
            return
        self.phase = "ready"
        self.watcher = VersionWatcher(self, self.build_runtime)
        self._watch = asyncio.create_task(self.watcher.run(), name="hytrec-versions")

    def install(self, rt: Runtime) -> None:
        """Make ``rt`` the runtime of every request from now on (one assignment: requests see old or new)."""
        old = self.model_version
        self.runtime = rt
        self.model_version = rt.model.version
        set_model_info(old, rt.model)

    async def build_runtime(self, version: str, write: tuple[str, ...], model: ServingModel | None = None) -> Runtime:
        """A started runtime of ``version`` (loaded from HYTREC_MODEL_ROOT unless given), probed before use, with
        the dual-write mirrors of the other versions in ``write`` (none while posted events are logged: the
        consumer writes those from the log, ``rest_mirror_versions``)."""
        s = self.settings
        # A swap loads and probes in a thread of its own: the torch thread keeps serving the current version.
        side = self.run if self.runtime is None else asyncio.to_thread
        if model is None:
            if version == self.started_version:  # back to the checkpoint the worker started with
                model = await side(lambda: ServingModel.load(s.model, s.state_dtype))
            else:
                model = await side(lambda: load_version(s, version))
        popular = await side(lambda: model.popular(s.max_k))
        catalogue = await side(lambda: Catalogue.load(model.vocab, s.catalogue_file()))
        store = await self._open_store(model.version)
        blobs: list[bytes] = []
        if self.runtime is not None:  # a swap: probe stored states of a few users too
            async for user in store.scan_users(count=100):
                snap = await store.get(user)
                if snap is not None and snap.blob is not None:
                    blobs.append(snap.blob)
                if len(blobs) >= 5:
                    break
        try:
            await side(lambda: probe(model, blobs))
        except Exception:
            await store.close()
            raise
        mirrors = []
        try:
            for v in rest_mirror_versions(s, model.version, write):  # none while posts are logged
                mirrors.append(await open_mirror(s, v, self.run))
        except BaseException:
            for m in mirrors:
                await m.close()
            await store.close()
            raise
        limits = s.max_queue, s.max_queue_delay_ms
        await catalogue.watch(store, s.catalogue_poll_ms / 1000.0)  # hidden flags read before the first answer
        batcher = RecommendBatcher(
            model,
            store,
            self.run,
            s.microbatch_max_size,
            s.microbatch_max_wait_ms,
            *limits,
            catalogue,
            bool(s.never_again),
        )
        events = EventBatcher(
            model,
            store,
            s.events_batch_max_size,
            s.events_batch_max_wait_ms,
            *limits,
            log=stream_layout(s) if s.log_posted_events else None,  # the served version logs; mirrors do not
            log_maxlen=s.stream_maxlen,
        )
        batcher.standing = events.standing = s.queue_standing_ms / 1000.0
        batcher.memory = events.memory = s.queue_memory_intervals
        attribution = attach(s, store, events, model.item_id)
        impressions = attribution.impressions
        recommender = Recommender(model, store, batcher, popular, self.run, catalogue, s.never_again, s.count_only)
        recommender.impressions = impressions
        batcher.start()
        events.start()
        impressions.start()
        return Runtime(
            settings=s,
            model=model,
            store=store,
            batcher=batcher,
            events_batcher=events,
            ingestor=EventIngestor(
                model,
                events,
                s.strict_items,
                [m.ingestor for m in mirrors],
                store=store,
                never_again=s.never_again,
                count_only=s.count_only,
                never_max=s.never_again_max,
            ),
            recommender=recommender,
            catalogue=catalogue,
            impressions=impressions,
            attribution=attribution,
            mirrors=tuple(mirrors),
        )

    async def _open_store(self, model_version: str) -> StateStore:
        backoff = 0.1
        while True:
            try:
                return await open_store(self.settings, model_version, runner=self.run)
            except StoreAuthError:
                raise
            except StoreUnavailable as exc:
                log.warning("state store not available yet (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # bounded: shutdown must not wait on it
                await asyncio.wait_for(self._watch, 2.0)
        if self.watcher is not None:
            await self.watcher.close()
        rt = self.runtime
        if rt is not None:
            if rt.candidate is not None:
                await rt.candidate.close()
            await rt.close()
        await self.loop_lag.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
