"""The HTTP routes: module-level routers that map parameters in and answers out, over the use-case objects.

Routes reach the worker's resources through ``Ready`` (503 ``not-ready`` until the model and Redis are up).
The configured limits (``max_k``, ``max_batch_events``) are checked here, answered as 422 naming the field,
and written into the OpenAPI document by ``app.py`` (``openapi_with_limits``), so clients see them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, StringConstraints

from hytrec.service import metrics
from hytrec.service.catalogue import Filters
from hytrec.service.errors import Problem, field_problem, note_write, problem_response, unavailable
from hytrec.service.events import watch_commits
from hytrec.service.microbatch import Overloaded, loop_time
from hytrec.service.runtime import Lifecycle, Runtime
from hytrec.service.schemas import (
    ID_PATTERN,
    MAX_TS,
    Deleted,
    EventBatch,
    Health,
    IngestResult,
    ItemPage,
    ModelInfo,
    Recommendations,
    UserSummary,
)
from hytrec.service.swap import recommend_routed
from hytrec.state_store import ConflictError, StoreUnavailable
from hytrec.streams.erasure import stream_layout, write_tombstone


# Dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a
# thread hand-off per request that cost a fifth of the event loop's time under overload (py-spy).
async def lifecycle(request: Request) -> Lifecycle:
    return request.app.state.lifecycle


async def ready(lc: Annotated[Lifecycle, Depends(lifecycle)]) -> Runtime:
    """The worker's runtime, or 503 ``not-ready`` with Retry-After while it starts (or after it failed)."""
    if lc.runtime is None:
        detail = lc.error or f"service not ready ({lc.phase})"
        raise unavailable(detail, lc.settings.retry_after_s, "not-ready")
    return lc.runtime


def too_large(field: str, where: str, message: str, kind: str) -> Problem:
    return field_problem([{"field": field, "in": where, "message": message, "type": kind}])


@asynccontextmanager
async def deadline(rt: Runtime, path: str, events: int = 0) -> AsyncIterator[float]:
    """The request's deadline (loop time): everything inside, Redis retries included, ends by then or is
    cancelled and answered 503 overloaded, so a stalled Redis or a long queue never holds a client.

    ``events``: how many events the request carries; each adds HYTREC_EVENTS_TIMEOUT_PER_EVENT_MS."""
    s = rt.settings
    timeout_ms = s.deadline_ms(events)
    budget = f"HYTREC_REQUEST_TIMEOUT_MS = {s.request_timeout_ms:g} ms"
    if events:
        budget += f" + {events} events x HYTREC_EVENTS_TIMEOUT_PER_EVENT_MS = {s.events_timeout_per_event_ms:g} ms"
    when = loop_time() + timeout_ms / 1000.0
    scope = asyncio.timeout_at(when)
    with watch_commits() as watch:  # a post's 503 says whether its write may have landed (service/events.py)
        try:
            async with scope:
                yield when
        except TimeoutError:
            if not scope.expired():
                raise
            metrics.SHED.labels(path, "deadline").inc()
            late = Overloaded(path, f"no answer within {budget}")
            raise note_write(late, watch.sent) if path == "events" else late from None
        except (Overloaded, StoreUnavailable, ConflictError) as exc:
            if path == "events":
                note_write(exc, watch.sent)
            raise


def serialized(answer: BaseModel) -> Response:
    """The answer as JSON straight from its own pydantic-core serializer, for the hot routes: returned as a model,
    FastAPI would validate it against ``response_model`` again and then dump it, a second pass over every item.
    ``response_model`` still documents the answer; tests check that the answers validate against it."""
    return Response(answer.__pydantic_serializer__.to_json(answer), media_type="application/json")


Ready = Annotated[Runtime, Depends(ready)]
UserId = Annotated[str, Path(pattern=ID_PATTERN, description="User id: [A-Za-z0-9_.:@-]{1,128}.")]

# Declares the bearer scheme in the OpenAPI document; the key itself is checked by the Guard middleware.
_bearer = HTTPBearer(auto_error=False, description="Needed when HYTREC_API_KEYS is set.")

events = APIRouter(prefix="/v1", tags=["events"], dependencies=[Depends(_bearer)])
users = APIRouter(prefix="/v1/users", tags=["users"], dependencies=[Depends(_bearer)])
model = APIRouter(prefix="/v1", tags=["model"], dependencies=[Depends(_bearer)])
items = APIRouter(prefix="/v1", tags=["items"], dependencies=[Depends(_bearer)])
operations = APIRouter(tags=["operations"])


@events.post("/events", response_model=IngestResult, operation_id="post_events", summary="Apply a batch of events")
async def post_events(batch: EventBatch, rt: Ready) -> IngestResult:
    """Validated as a whole: a bad event rejects the batch (422 naming it) and nothing is applied.

    At most ``HYTREC_MAX_BATCH_EVENTS`` events (the OpenAPI document carries the configured limit).
    """
    limit = rt.settings.max_batch_events
    if len(batch.events) > limit:
        raise too_large("events", "body", f"List should have at most {limit} items", "too_long")
    async with deadline(rt, "events", len(batch.events)) as when:
        return serialized(await rt.ingestor.ingest(batch.events, when))  # type: ignore[return-value]


@users.get(
    "/{user_id}/recommendations",
    response_model=Recommendations,
    operation_id="get_recommendations",
    summary="Top-K for a user",
)
async def get_recommendations(
    user_id: UserId,
    rt: Ready,
    k: Annotated[int, Query(ge=1, description="How many items (at most HYTREC_MAX_K).")] = 10,
    exclude_seen: Annotated[
        bool, Query(description="Drop the items of the last K events and of the never-again set.")
    ] = True,
    at: Annotated[float | None, Query(gt=0, lt=MAX_TS, description="Request time (default: now).")] = None,
    exclude: Annotated[
        list[Annotated[str, StringConstraints(pattern=ID_PATTERN)]],
        Query(description="Item ids never to return (repeat the parameter; at most HYTREC_MAX_FILTER_ITEMS)."),
    ] = [],  # noqa: B006 - FastAPI copies defaults
    categories: Annotated[
        list[str], Query(description="Only items of any of these categories (at most HYTREC_MAX_FILTER_ITEMS).")
    ] = [],  # noqa: B006
    offset: Annotated[int, Query(ge=0, description="Skip this many of the best survivors (at most HYTREC_MAX_K).")] = 0,
) -> Recommendations:
    filters = check_filters(rt, k, offset, exclude, categories, exclude_seen, "query")
    now = time.time() if at is None else at
    async with deadline(rt, "recommend") as when:
        answer = await recommend_routed(rt, user_id, k, exclude_seen, now, when, filters)  # canary, shadow: swap.py
    return serialized(answer)  # type: ignore[return-value]


def check_filters(
    rt: Runtime, k: int, offset: int, exclude: list[str], categories: list[str], exclude_seen: bool, where: str
) -> Filters | None:
    """The configured limits on k, offset and the filter lists (422 naming the field); None when the request
    filters nothing beyond ``exclude_seen`` (the unfiltered fast path)."""
    s = rt.settings
    for name, value, most in (("k", k, s.max_k), ("offset", offset, s.max_k)):
        if value > most:
            raise too_large(name, where, f"Input should be less than or equal to {most}", "less_than_equal")
    for name, values in (("exclude", exclude), ("categories", categories)):
        if len(values) > s.max_filter_items:
            raise too_large(name, where, f"List should have at most {s.max_filter_items} items", "too_long")
    if not exclude and not categories and not offset:
        return None
    return Filters(tuple(exclude), tuple(categories), exclude_seen, offset)


@users.get(
    "/{user_id}",
    response_model=UserSummary,
    operation_id="get_user",
    summary="What is held for a user",
    responses={404: {"description": "No state for this user"}},
)
async def get_user(user_id: UserId, rt: Ready) -> UserSummary:
    async with deadline(rt, "users"):
        summary = await rt.recommender.summary(user_id)
    if summary is None:
        raise Problem(404, "not-found", "Not found", f"no state for user {user_id!r}")
    return summary


@users.delete("/{user_id}", response_model=Deleted, operation_id="delete_user", summary="Erase a user")
async def delete_user(user_id: UserId, rt: Ready) -> Deleted:
    """Removes every key held for the user, under every model version, after writing the user's erasure tombstone
    (the stream consumer, archive, export and backfill skip the user's earlier events: docs/lifecycle.md)."""
    async with deadline(rt, "users"):
        await write_tombstone(rt.store.client, stream_layout(rt.settings), user_id)
        deleted = await rt.store.delete_user(user_id)
        await rt.impressions.erase(user_id)  # the online-evaluation log too (docs/online_eval.md)
        return Deleted(user_id=user_id, deleted=deleted)


@model.get("/model", response_model=ModelInfo, operation_id="get_model", summary="The served model")
async def get_model(rt: Ready) -> ModelInfo:
    m = rt.model
    return ModelInfo(
        version=m.version,
        model_type=m.model_type,
        n_items=m.n_items,
        config=m.cfg.to_dict(),
        state_dtype=m.state_dtype,
        strict_items=rt.settings.strict_items,
    )


@items.get("/items", response_model=ItemPage, operation_id="list_items", summary="The catalogue, paged")
async def list_items(
    rt: Ready,
    offset: Annotated[int, Query(ge=0, description="First item of the page (row order).")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Items per page.")] = 1000,
) -> ItemPage:
    """Item ids the model knows, with their training popularity, metadata (items file) and hidden flag."""
    return rt.catalogue.page(offset, limit)


@operations.get("/healthz", response_model=Health, operation_id="healthz", summary="Liveness")
async def healthz(lc: Annotated[Lifecycle, Depends(lifecycle)]) -> Any:
    if lc.error is not None:
        return problem_response(None, Problem(503, "failed", "Model failed to load", lc.error))
    return Health(status="ok", model_version=lc.model_version)


@operations.get(
    "/readyz", response_model=Health, operation_id="readyz", summary="Readiness: model loaded and Redis answering"
)
async def readyz(rt: Ready, lc: Annotated[Lifecycle, Depends(lifecycle)]) -> Health:
    s = rt.settings
    waited = lc.store_wait(rt)[0]
    if waited >= s.store_stall_ms:  # stalled: say so at once, so a balancer routes away without waiting too
        detail = f"redis is not answering: a round trip has waited {waited:.0f} ms (HYTREC_STORE_STALL_MS)"
        raise unavailable(detail, s.retry_after_s, "not-ready")
    try:
        await asyncio.wait_for(rt.store.ping(), timeout=s.socket_timeout_s)
    except (StoreUnavailable, TimeoutError) as exc:
        raise unavailable(f"redis is not answering: {exc}", s.retry_after_s, "not-ready") from exc
    return Health(status="ready", model_version=rt.model.version)


@operations.get("/metrics", include_in_schema=False)
async def get_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
