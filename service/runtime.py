"""The lifecycle of one worker: load the model, open the store, then hand the routes one frozen ``Runtime``.

``Lifecycle.start`` runs in the background from the app's lifespan, so ``/healthz`` answers at once and
``/readyz`` says 503 until the model is loaded and Redis answers. Every torch call runs in one dedicated
thread (``Lifecycle.run``), never on the event loop; the store gets that runner once, at opening.
"""

from __future__ import annotations

import asyncio
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
from hytrec.service.microbatch import MicroBatcher, Overloaded
from hytrec.service.recommend import Recommender
from hytrec.service.settings import Settings
from hytrec.state_store import StateStore, StoreUnavailable, open_store

T = TypeVar("T")
log = logging.getLogger("hytrec.service")


@dataclass(frozen=True)
class Runtime:
    """Everything a request needs once the worker is ready; built once, never partially."""

    settings: Settings
    model: ServingModel
    store: StateStore
    batcher: RecommendBatcher
    events_batcher: EventBatcher
    ingestor: EventIngestor
    recommender: Recommender
    catalogue: Catalogue


class Lifecycle:
    """Starts and stops the worker's resources; ``runtime`` is None until every one of them is up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hytrec-torch")
        self.runtime: Runtime | None = None
        self.model_version: str | None = None
        self.error: str | None = None
        self.phase = "starting"

    def shed(self, method: str, path: str) -> Overloaded | None:
        """Why a request for ``path`` would be shed by its batcher right now (counted), or None to admit it.

        Asked by the guard before the request is parsed, so under overload the excess costs microseconds.
        """
        rt = self.runtime
        if rt is None:
            return None
        if method == "POST" and path == "/v1/events":
            batcher: MicroBatcher = rt.events_batcher
        elif method == "GET" and path.endswith("/recommendations") and path.startswith("/v1/users/"):
            batcher = rt.batcher
        else:
            return None
        reason = batcher.pressure()
        return None if reason is None else batcher.shed(reason)

    async def run(self, fn: Callable[[], T]) -> T:
        """Run a synchronous (torch) callable in the torch thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    async def start(self) -> None:
        """Load the model, then open the store (retrying while Redis is down), then build the runtime."""
        s = self.settings
        try:
            import torch

            await self.run(lambda: torch.set_num_threads(s.torch_threads))
            self.phase = "loading model"
            model = await self.run(lambda: ServingModel.load(s.model, s.state_dtype))
            popular = await self.run(lambda: model.popular(s.max_k))
            catalogue = await self.run(lambda: Catalogue.load(model.vocab, s.catalogue_file()))
        except Exception as exc:  # noqa: BLE001 - reported by /healthz and /readyz
            self.error = f"cannot load the model from {s.model}: {exc}"
            self.phase = "failed"
            log.error("%s", self.error)
            return
        self.model_version = model.version
        metrics.MODEL_INFO.labels(model.version, model.model_type, str(model.n_items)).set(1)
        log.info("model %s loaded (%d items) from %s", model.version, model.n_items, s.model)
        self.phase = "connecting to redis"
        store = await self._open_store(model.version)
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
        events = EventBatcher(model, store, s.events_batch_max_size, s.events_batch_max_wait_ms, *limits)
        batcher.start()
        events.start()
        self.runtime = Runtime(
            settings=s,
            model=model,
            store=store,
            batcher=batcher,
            events_batcher=events,
            ingestor=EventIngestor(
                model,
                events,
                s.strict_items,
                store=store,
                never_again=s.never_again,
                count_only=s.count_only,
                never_max=s.never_again_max,
            ),
            recommender=Recommender(model, store, batcher, popular, self.run, catalogue, s.never_again, s.count_only),
            catalogue=catalogue,
        )
        self.phase = "ready"

    async def _open_store(self, model_version: str) -> StateStore:
        backoff = 0.1
        while True:
            try:
                return await open_store(self.settings, model_version, runner=self.run)
            except StoreUnavailable as exc:
                log.warning("state store not available yet (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        if self.runtime is not None:
            await self.runtime.catalogue.stop()
            await self.runtime.batcher.stop()
            await self.runtime.events_batcher.stop()
            await self.runtime.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
