"""The product routes: one item, similar items, hiding items (admin), candidate ranking, sessions, batch.

Thin like ``routes.py``: parameters in (limits from the settings, 422 naming the field), the use case
(``Recommender``, ``Catalogue``), the answer out. Access is decided by the Guard from method and path
(service/auth.py): ``/v1/admin/...`` needs an admin key; the POST routes here only read, so they need read.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.security import HTTPBearer
from pydantic import StringConstraints

from hytrec.service import metrics
from hytrec.service.catalogue import Filters
from hytrec.service.errors import Problem
from hytrec.service.microbatch import Overloaded
from hytrec.service.routes import Ready, check_filters, deadline, too_large
from hytrec.service.schemas import (
    ID_PATTERN,
    BatchAnswer,
    BatchEntry,
    BatchRequest,
    BatchResult,
    CatalogueItem,
    EntryError,
    FilterBody,
    HiddenFlag,
    HideBulk,
    HideResult,
    Ranked,
    RankRequest,
    Recommendations,
    SessionRecommendations,
    SessionRequest,
    SimilarItems,
)
from hytrec.state_store import StoreError, StoreUnavailable

ItemPathId = Annotated[str, Path(pattern=ID_PATTERN, description="Item id: [A-Za-z0-9_.:@-]{1,128}.")]
UserPathId = Annotated[str, Path(pattern=ID_PATTERN, description="User id: [A-Za-z0-9_.:@-]{1,128}.")]
_bearer = HTTPBearer(auto_error=False, description="Needed when HYTREC_API_KEYS is set.")

catalogue = APIRouter(prefix="/v1", tags=["items"], dependencies=[Depends(_bearer)])
admin = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(_bearer)])
product = APIRouter(prefix="/v1", tags=["recommendations"], dependencies=[Depends(_bearer)])
ROUTERS = (catalogue, admin, product)
_ID = re.compile(ID_PATTERN)


def _not_found(item_id: str) -> Problem:
    return Problem(404, "not-found", "Not found", f"the served model does not know item {item_id!r}")


def _body_filters(rt: Ready, body: FilterBody) -> Filters:
    f = check_filters(rt, body.k, body.offset, body.exclude, body.categories, body.exclude_seen, "body")
    return f or Filters(exclude_seen=body.exclude_seen)


@catalogue.get("/items/{item_id}", response_model=CatalogueItem, operation_id="get_item", summary="One item")
async def get_item(item_id: ItemPathId, rt: Ready) -> CatalogueItem:
    """The item's popularity, metadata (items file) and hidden flag; 404 for an id the model does not know."""
    index = rt.catalogue.index(item_id)
    if index is None:
        raise _not_found(item_id)
    return rt.catalogue.item(index)


@catalogue.get(
    "/items/{item_id}/similar",
    response_model=SimilarItems,
    operation_id="similar_items",
    summary="Items like this one",
)
async def similar_items(
    item_id: ItemPathId,
    rt: Ready,
    k: Annotated[int, Query(ge=1, description="How many items (at most HYTREC_MAX_K).")] = 10,
    exclude: Annotated[
        list[Annotated[str, StringConstraints(pattern=ID_PATTERN)]],
        Query(description="Item ids never to return (at most HYTREC_MAX_FILTER_ITEMS)."),
    ] = [],  # noqa: B006 - FastAPI copies defaults
    categories: Annotated[list[str], Query(description="Only items of any of these categories.")] = [],  # noqa: B006
    offset: Annotated[int, Query(ge=0, description="Skip this many of the nearest (at most HYTREC_MAX_K).")] = 0,
) -> SimilarItems:
    """Exact cosine over the model's item embeddings (normalised once at load); hidden items never appear."""
    f = check_filters(rt, k, offset, exclude, categories, False, "query") or Filters(exclude_seen=False)
    async with deadline(rt, "similar"):
        answer = await rt.recommender.similar(item_id, k, f)
    if answer is None:
        raise _not_found(item_id)
    return answer


@admin.put("/items/{item_id}", response_model=CatalogueItem, operation_id="flag_item", summary="Hide or show an item")
async def flag_item(item_id: ItemPathId, flag: HiddenFlag, rt: Ready) -> CatalogueItem:
    """The flag is kept in Redis: every worker and replica applies it within HYTREC_CATALOGUE_POLL_MS."""
    index = rt.catalogue.index(item_id)
    if index is None:
        raise _not_found(item_id)
    async with deadline(rt, "admin"):
        await rt.store.set_hidden([item_id], flag.hidden)
        await rt.catalogue.refresh(rt.store)  # this worker at once; the others at their next poll
    metrics.PRODUCT_REQUESTS.labels("hide", "ok").inc()
    return rt.catalogue.item(index)


@admin.put("/items", response_model=HideResult, operation_id="flag_items", summary="Hide or show many items")
async def flag_items(body: HideBulk, rt: Ready) -> HideResult:
    """Known ids get the flag in one transaction; unknown ids are listed and left alone."""
    most = rt.settings.max_hide_items
    if len(body.item_ids) > most:
        raise too_large("item_ids", "body", f"List should have at most {most} items", "too_long")
    ids = list(dict.fromkeys(body.item_ids))
    known = [i for i in ids if rt.catalogue.index(i) is not None]
    unknown = [i for i in ids if rt.catalogue.index(i) is None]
    async with deadline(rt, "admin"):
        version = await rt.store.set_hidden(known, body.hidden)
        await rt.catalogue.refresh(rt.store)
    metrics.PRODUCT_REQUESTS.labels("hide", "ok").inc()
    return HideResult(changed=known, unknown=unknown, hidden_version=version)


@product.post(
    "/users/{user_id}/rank", response_model=Ranked, operation_id="rank_candidates", summary="Rank candidate items"
)
async def rank_candidates(user_id: UserPathId, body: RankRequest, rt: Ready) -> Ranked:
    """The candidates by the user's score (the catalogue product restricted to them, computed from their rows
    only); ``exclude_seen`` is off by default here. Unknown, hidden and filtered candidates are listed apart."""
    most = rt.settings.max_candidates
    if len(body.candidates) > most:
        raise too_large("candidates", "body", f"List should have at most {most} items", "too_long")
    f = check_filters(rt, 1, 0, body.exclude, body.categories, body.exclude_seen, "body")
    f = f or Filters(exclude_seen=body.exclude_seen)
    now = time.time() if body.at is None else body.at
    async with deadline(rt, "rank") as when:
        return await rt.recommender.rank(user_id, body.candidates, f, now, when)


@product.post(
    "/sessions/recommendations",
    response_model=SessionRecommendations,
    operation_id="session_recommendations",
    summary="Top-K from a visit's events",
)
async def session_recommendations(body: SessionRequest, rt: Ready) -> SessionRecommendations:
    """No state is read or written: the answer a fresh user would get after posting these events."""
    most = rt.settings.max_session_events
    if len(body.events) > most:
        raise too_large("events", "body", f"List should have at most {most} items", "too_long")
    f = _body_filters(rt, body)
    now = time.time() if body.at is None else body.at
    async with deadline(rt, "session"):
        return await rt.recommender.session(body.events, body.k, f, now)


def _entry_error(exc: BaseException) -> EntryError:
    if isinstance(exc, Problem):
        return EntryError(status=exc.status, type=exc.kind, detail=exc.detail)
    if isinstance(exc, Overloaded):
        return EntryError(status=503, type="overloaded", detail=str(exc))
    if isinstance(exc, StoreUnavailable):
        return EntryError(status=503, type="unavailable", detail=str(exc))
    if isinstance(exc, StoreError):
        return EntryError(status=500, type="store-error", detail=str(exc))
    raise exc


@product.post(
    "/recommendations:batch",
    response_model=BatchAnswer,
    operation_id="batch_recommendations",
    summary="Top-K for many users",
)
async def batch_recommendations(body: BatchRequest, rt: Ready) -> BatchAnswer:
    """Each entry with its own k and filters, all through the one micro-batcher; an entry that fails (a bad
    user id, an unknown category, a limit) carries its error and the others are answered (200)."""
    most = rt.settings.max_batch_users
    if len(body.requests) > most:
        raise too_large("requests", "body", f"List should have at most {most} items", "too_long")

    async def one(e: BatchEntry, when: float) -> Recommendations:
        if not _ID.fullmatch(e.user_id):
            detail = f"user_id {e.user_id[:140]!r} does not match {ID_PATTERN}"
            raise Problem(422, "validation", "Request validation failed", detail)
        f = check_filters(rt, e.k, e.offset, e.exclude, e.categories, e.exclude_seen, "body")
        now = time.time() if e.at is None else e.at
        return await rt.recommender.recommend(e.user_id, e.k, e.exclude_seen, now, when, f)

    async with deadline(rt, "batch") as when:
        answers = await asyncio.gather(*(one(e, when) for e in body.requests), return_exceptions=True)
    results = []
    for e, a in zip(body.requests, answers, strict=True):
        if isinstance(a, BaseException):
            err = _entry_error(a)
            metrics.PRODUCT_REQUESTS.labels("batch", err.type).inc()
            results.append(BatchResult(user_id=e.user_id, error=err))
        else:
            metrics.PRODUCT_REQUESTS.labels("batch", "ok").inc()
            results.append(BatchResult(user_id=e.user_id, recommendations=a))
    return BatchAnswer(model_version=rt.model.version, results=results)
