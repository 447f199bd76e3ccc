"""The FastAPI application: thin routes over the model, the state store and the micro-batcher.

``create_app(settings)`` builds the app; its lifespan starts :class:`Resources`, which loads the checkpoint in
the torch thread and then opens the store, in the background, so ``/healthz`` answers at once and ``/readyz``
says 503 until both are up. Every torch call runs in one dedicated thread, never on the event loop.
Run with ``hytrec serve`` or ``uvicorn hytrec.service.app:app_factory --factory``.
"""

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response
from fastapi.security import HTTPBearer
from pydantic import Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hytrec import __version__
from hytrec.model.serving import Recommendation, ServingModel
from hytrec.model.state import StateCodecError
from hytrec.service import metrics
from hytrec.service.auth import ApiKeyAuth
from hytrec.service.batcher import RecommendBatcher
from hytrec.service.errors import Problem, install, problem_response, unavailable
from hytrec.service.events import EventIngestor
from hytrec.service.schemas import (
    ID_PATTERN,
    MAX_TS,
    Deleted,
    Event,
    EventBatch,
    Health,
    IngestResult,
    ModelInfo,
    RecentEvent,
    Recommendations,
    ScoredItem,
    UserSummary,
)
from hytrec.service.settings import Settings
from hytrec.state_store import CorruptStateError, StateStore, StoreUnavailable, open_store

T = TypeVar("T")
log = logging.getLogger("hytrec.service")


class Resources:
    """The shared resources of one worker: torch thread, model, store, batcher, ingestor."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hytrec-torch")
        self.model: ServingModel | None = None
        self.store: StateStore | None = None
        self.batcher: RecommendBatcher | None = None
        self.ingestor: EventIngestor | None = None
        self.popular: Recommendation | None = None
        self.error: str | None = None
        self.phase = "starting"

    async def run(self, fn: Any) -> Any:
        """Run a synchronous (torch) callable in the torch thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    @property
    def ready(self) -> bool:
        return self.ingestor is not None

    async def start(self) -> None:
        """Load the model, then open the store (retrying while Redis is down)."""
        s = self.settings
        try:
            import torch

            await self.run(lambda: torch.set_num_threads(s.torch_threads))
            if s.startup_delay_s:
                await asyncio.sleep(s.startup_delay_s)
            self.phase = "loading model"
            model = await self.run(lambda: ServingModel.load(s.model, s.state_dtype))
            self.popular = await self.run(lambda: model.popular(s.max_k))
        except Exception as exc:  # noqa: BLE001 - reported by /healthz and /readyz
            self.error = f"cannot load the model from {s.model}: {exc}"
            self.phase = "failed"
            log.error("%s", self.error)
            return
        self.model = model
        metrics.MODEL_INFO.labels(model.version, model.model_type, str(model.n_items)).set(1)
        log.info("model %s loaded (%d items) from %s", model.version, model.n_items, s.model)
        self.phase = "connecting to redis"
        backoff = 0.1
        while True:
            try:
                self.store = await open_store(
                    s, model.version, decode=model.decode, decode_errors=(StateCodecError,), runner=self.run
                )
                break
            except StoreUnavailable as exc:
                log.warning("state store not available yet (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        self.batcher = RecommendBatcher(model, self.run, s.microbatch_max_size, s.microbatch_max_wait_ms)
        self.batcher.start()
        self.ingestor = EventIngestor(model, self.store, self.run, s.strict_items)
        self.phase = "ready"

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.store is not None:
            await self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


class Guard:
    """Pure-ASGI middleware: API keys on /v1, the body size limit, and request latency metrics."""

    def __init__(self, app: ASGIApp, auth: ApiKeyAuth, max_body: int) -> None:
        self.app, self.auth, self.max_body = app, auth, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "<unmatched>"
            metrics.REQUEST_SECONDS.labels(path, scope["method"], str(status["code"])).observe(
                time.perf_counter() - start
            )

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"].startswith("/v1/") and not self.auth.check(headers.get("authorization")):
            p = Problem(
                401,
                "unauthorized",
                "Unauthorized",
                "a valid API key is required: Authorization: Bearer <key>",
                headers={"WWW-Authenticate": 'Bearer realm="hytrec"'},
            )
            await problem_response(None, p)(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await problem_response(None, _too_large(self.max_body))(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(413, f"request body larger than {self.max_body} bytes")
            return message

        await self.app(scope, counting_receive, send)


class BodyTooLarge(StarletteHTTPException):
    """A streamed body went over the limit (answered 413 by the HTTP error handler)."""


def _too_large(limit: int) -> Problem:
    return Problem(413, "too-large", "Content too large", f"request body larger than {limit} bytes")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service app for ``settings`` (default: read from the environment)."""
    s = settings or Settings()
    resources = Resources(s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(resources.start(), name="hytrec-startup")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # shutting down anyway
                await task
            await resources.close()

    app = FastAPI(
        title="HyTRec inference service",
        version=__version__,
        summary="Incremental per-event state updates and top-K recommendations for long behaviour histories.",
        lifespan=lifespan,
    )
    app.state.resources = resources
    install(app, s.retry_after_s)
    app.add_middleware(Guard, auth=ApiKeyAuth(s.api_key_list), max_body=s.max_body_bytes)

    def ready() -> Resources:
        if not resources.ready:
            detail = resources.error or f"service not ready ({resources.phase})"
            raise unavailable(detail, s.retry_after_s, "not-ready")
        return resources

    Ready = Annotated[Resources, Depends(ready)]
    UserId = Annotated[str, Path(pattern=ID_PATTERN, description="User id: [A-Za-z0-9_.:@-]{1,128}.")]
    Batch = create_model(
        "EventBatch",
        __base__=EventBatch,
        events=(list[Event], Field(min_length=1, max_length=s.max_batch_events)),
    )
    bearer = HTTPBearer(auto_error=False, description="Needed when HYTREC_API_KEYS is set.")
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer)])

    @v1.post("/events", response_model=IngestResult, summary="Apply a batch of events")
    async def post_events(batch: Batch, res: Ready) -> IngestResult:  # type: ignore[valid-type]
        """Validated as a whole: a bad event rejects the batch (422 naming it) and nothing is applied."""
        return await res.ingestor.ingest(batch.events)  # type: ignore[union-attr, attr-defined]

    @v1.get("/users/{user_id}/recommendations", response_model=Recommendations, summary="Top-K for a user")
    async def recommendations(
        user_id: UserId,
        res: Ready,
        k: Annotated[int, Query(ge=1, le=s.max_k)] = 10,
        exclude_seen: Annotated[bool, Query(description="Drop the items of the last K events.")] = True,
        at: Annotated[float | None, Query(gt=0, lt=MAX_TS, description="Request time (default: now).")] = None,
    ) -> Recommendations:
        now = time.time() if at is None else at
        model, store, batcher = res.model, res.store, res.batcher
        assert model is not None and store is not None and batcher is not None
        snap = await store.get(user_id)
        fallback: str | bool = False
        history = 0
        if snap is not None:
            try:
                scored = await batcher.submit(snap, now, k, exclude_seen)
                rec, history = scored.recommendation, scored.history_length
                metrics.RECOMMENDATIONS.labels("model").inc()
            except CorruptStateError as exc:
                log.error("%s; answering with the popularity fallback", exc)
                snap = None
                metrics.RECOMMENDATIONS.labels("corrupt_state").inc()
        else:
            metrics.RECOMMENDATIONS.labels("no_state").inc()
        if snap is None:
            assert res.popular is not None
            rec = Recommendation(res.popular.item_ids[:k], res.popular.scores[:k])
            fallback = "popularity"
        items = [ScoredItem(item_id=i, score=v) for i, v in zip(rec.item_ids, rec.scores, strict=True)]
        return Recommendations(
            user_id=user_id,
            items=items,
            model_version=model.version,
            history_length=history,
            fallback=fallback,  # type: ignore[arg-type]
            request_time=now,
        )

    @v1.get(
        "/users/{user_id}",
        response_model=UserSummary,
        summary="What is held for a user",
        responses={404: {"description": "No state for this user"}},
    )
    async def get_user(user_id: UserId, res: Ready) -> UserSummary:
        assert res.store is not None and res.model is not None
        snap = await res.store.get(user_id)
        if snap is None:
            raise Problem(404, "not-found", "Not found", f"no state for user {user_id!r}")
        model = res.model
        state = await res.run(lambda: snap.state)
        items, stamps = state.ring_items[0].tolist(), state.ring_ts[0].tolist()
        recent = [RecentEvent(item_id=model.item_id(r), ts=t) for r, t in zip(items, stamps, strict=True) if r != 0]
        return UserSummary(
            user_id=user_id,
            model_version=model.version,
            history_length=int(state.count[0]),
            last_ts=float(state.last_ts[0]) if int(state.count[0]) else None,
            recent=recent,
            state_bytes=len(snap.blob or b""),
            store_version=snap.version,
            updated_ms=snap.updated_ms,
        )

    @v1.delete("/users/{user_id}", response_model=Deleted, summary="Erase a user")
    async def delete_user(user_id: UserId, res: Ready) -> Deleted:
        """Removes every key held for the user under the served model version."""
        assert res.store is not None
        return Deleted(user_id=user_id, deleted=await res.store.delete_user(user_id))

    @v1.get("/model", response_model=ModelInfo, summary="The served model")
    async def model_info(res: Ready) -> ModelInfo:
        m = res.model
        assert m is not None
        return ModelInfo(
            version=m.version,
            model_type=m.model_type,
            n_items=m.n_items,
            config=m.cfg.to_dict(),
            state_dtype=m.state_dtype,
            strict_items=s.strict_items,
        )

    app.include_router(v1)

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> Any:
        if resources.error is not None:
            return problem_response(None, Problem(503, "failed", "Model failed to load", resources.error))
        return Health(status="ok", model_version=resources.model.version if resources.model else None)

    @app.get("/readyz", response_model=Health, summary="Readiness: model loaded and Redis answering")
    async def readyz(request: Request) -> Any:
        res = ready()
        assert res.store is not None and res.model is not None
        try:
            await asyncio.wait_for(res.store.ping(), timeout=s.socket_timeout_s)
        except (StoreUnavailable, TimeoutError) as exc:
            raise unavailable(f"redis is not answering: {exc}", s.retry_after_s, "not-ready") from exc
        return Health(status="ready", model_version=res.model.version)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


def app_factory() -> FastAPI:
    """Uvicorn factory: the app configured from the environment."""
    logging.basicConfig(level=Settings().log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return create_app()
