"""A small typed client of the HyTRec service, sync (:class:`HyTRecClient`) and async (:class:`AsyncHyTRecClient`).

Both retry 503 and 429 answers (honouring Retry-After, capped) and connection failures with exponential backoff
and jitter. A POST is retried too: give events an ``event_id`` and a retried batch is applied once. Other
errors raise :class:`HyTRecError` carrying the problem document. Depends on httpx and pydantic only.

    with HyTRecClient("http://127.0.0.1:8000", api_key="...") as client:
        client.post_events([{"user_id": "u1", "item_id": "42", "ts": 1700000000}])
        top = client.recommendations("u1", k=10)
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from hytrec.service.schemas import (
    BatchAnswer,
    CatalogueItem,
    Deleted,
    Event,
    HideResult,
    IngestResult,
    ItemPage,
    ModelInfo,
    Ranked,
    Recommendations,
    SessionRecommendations,
    SimilarItems,
    UserSummary,
)

RETRY_STATUS = (429, 503)
EventLike = Event | Mapping[str, Any]


class HyTRecError(Exception):
    """A non-retryable error answer (or retries exhausted): ``status`` and the problem document."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {problem.get('detail') or problem.get('title') or problem}")
        self.status = status
        self.problem = problem


def _payload(events: Iterable[EventLike]) -> dict[str, Any]:
    out = []
    for e in events:
        out.append(e.model_dump(exclude_none=True) if isinstance(e, Event) else dict(e))
    return {"events": out}


def _problem(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
        return body if isinstance(body, dict) else {"detail": body}
    except ValueError:
        return {"detail": resp.text[:500]}


class _Base:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retries: int = 4,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = httpx.Timeout(timeout)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _delay(self, attempt: int, resp: httpx.Response | None) -> float:
        if resp is not None:
            after = resp.headers.get("retry-after", "")
            if after.replace(".", "", 1).isdigit():
                return min(float(after), self.max_backoff)
        return random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))

    def _retry(self, attempt: int, resp: httpx.Response | None) -> bool:
        return attempt < self.retries and (resp is None or resp.status_code in RETRY_STATUS)

    @staticmethod
    def _params(
        k: int,
        exclude_seen: bool,
        at: float | None,
        exclude: Iterable[str] = (),
        categories: Iterable[str] = (),
        offset: int = 0,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"k": k, "exclude_seen": "true" if exclude_seen else "false"}
        if at is not None:
            params["at"] = repr(float(at))
        if exclude := list(exclude):
            params["exclude"] = exclude
        if categories := list(categories):
            params["categories"] = categories
        if offset:
            params["offset"] = offset
        return params

    @staticmethod
    def _similar_params(k: int, exclude: Iterable[str], categories: Iterable[str], offset: int) -> dict[str, Any]:
        params: dict[str, Any] = {"k": k, "offset": offset}
        if exclude := list(exclude):
            params["exclude"] = exclude
        if categories := list(categories):
            params["categories"] = categories
        return params

    @staticmethod
    def _filters(
        k: int, exclude: Iterable[str], categories: Iterable[str], exclude_seen: bool, offset: int, at: float | None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "k": k,
            "exclude": list(exclude),
            "categories": list(categories),
            "exclude_seen": exclude_seen,
            "offset": offset,
        }
        if at is not None:
            body["at"] = float(at)
        return body


class HyTRecClient(_Base):
    """Synchronous client (thread-safe like httpx.Client)."""

    def __init__(self, base_url: str, *, transport: httpx.BaseTransport | None = None, **kwargs: Any) -> None:
        super().__init__(base_url, **kwargs)
        self._http = httpx.Client(
            base_url=self.base_url, headers=self.headers, timeout=self.timeout, transport=transport
        )

    def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            resp: httpx.Response | None = None
            try:
                resp = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                if not self._retry(attempt, None):
                    raise
            if resp is not None and (resp.status_code in ok or not self._retry(attempt, resp)):
                if resp.status_code not in ok:
                    raise HyTRecError(resp.status_code, _problem(resp))
                return resp
            time.sleep(self._delay(attempt, resp))
            attempt += 1

    def post_events(self, events: Iterable[EventLike]) -> IngestResult:
        """Apply a batch of events (validated as a whole by the server)."""
        return IngestResult.model_validate(self._request("POST", "/v1/events", json=_payload(events)).json())

    def recommendations(
        self,
        user_id: str,
        k: int = 10,
        *,
        exclude_seen: bool = True,
        at: float | None = None,
        exclude: Iterable[str] = (),
        categories: Iterable[str] = (),
        offset: int = 0,
    ) -> Recommendations:
        params = self._params(k, exclude_seen, at, exclude, categories, offset)
        resp = self._request("GET", f"/v1/users/{user_id}/recommendations", params=params)
        return Recommendations.model_validate(resp.json())

    def rank(
        self,
        user_id: str,
        candidates: Iterable[str],
        *,
        exclude_seen: bool = False,
        exclude: Iterable[str] = (),
        categories: Iterable[str] = (),
        at: float | None = None,
    ) -> Ranked:
        """Order the caller's candidates by the user's scores (unknown, hidden, filtered listed apart)."""
        body: dict[str, Any] = {
            "candidates": list(candidates),
            "exclude_seen": exclude_seen,
            "exclude": list(exclude),
            "categories": list(categories),
        }
        if at is not None:
            body["at"] = float(at)
        return Ranked.model_validate(self._request("POST", f"/v1/users/{user_id}/rank", json=body).json())

    def session(
        self,
        events: Iterable[Mapping[str, Any]],
        k: int = 10,
        *,
        exclude_seen: bool = True,
        exclude: Iterable[str] = (),
        categories: Iterable[str] = (),
        offset: int = 0,
        at: float | None = None,
    ) -> SessionRecommendations:
        """Top-k from a visit's events (``{"item_id", "ts", "event_type"?}``); nothing stored."""
        body = {"events": [dict(e) for e in events], **self._filters(k, exclude, categories, exclude_seen, offset, at)}
        resp = self._request("POST", "/v1/sessions/recommendations", json=body)
        return SessionRecommendations.model_validate(resp.json())

    def batch(self, requests: Iterable[Mapping[str, Any]]) -> BatchAnswer:
        """Many users at once (each ``{"user_id", "k"?, "exclude"?, ...}``); per-user errors in the answer."""
        resp = self._request("POST", "/v1/recommendations:batch", json={"requests": [dict(r) for r in requests]})
        return BatchAnswer.model_validate(resp.json())

    def items(self, offset: int = 0, limit: int = 1000) -> ItemPage:
        return ItemPage.model_validate(
            self._request("GET", "/v1/items", params={"offset": offset, "limit": limit}).json()
        )

    def item(self, item_id: str) -> CatalogueItem | None:
        """The item's metadata and flag, or None for an id the model does not know."""
        resp = self._request("GET", f"/v1/items/{item_id}", ok=(200, 404))
        return None if resp.status_code == 404 else CatalogueItem.model_validate(resp.json())

    def similar(
        self, item_id: str, k: int = 10, *, exclude: Iterable[str] = (), categories: Iterable[str] = (), offset: int = 0
    ) -> SimilarItems:
        params = self._similar_params(k, exclude, categories, offset)
        return SimilarItems.model_validate(self._request("GET", f"/v1/items/{item_id}/similar", params=params).json())

    def set_hidden(self, item_id: str, hidden: bool = True) -> CatalogueItem:
        """Hide (or show) one item; needs an admin key."""
        resp = self._request("PUT", f"/v1/admin/items/{item_id}", json={"hidden": hidden})
        return CatalogueItem.model_validate(resp.json())

    def set_hidden_many(self, item_ids: Iterable[str], hidden: bool = True) -> HideResult:
        resp = self._request("PUT", "/v1/admin/items", json={"item_ids": list(item_ids), "hidden": hidden})
        return HideResult.model_validate(resp.json())

    def user(self, user_id: str) -> UserSummary | None:
        """The user's state summary, or None for a user without state."""
        resp = self._request("GET", f"/v1/users/{user_id}", ok=(200, 404))
        return None if resp.status_code == 404 else UserSummary.model_validate(resp.json())

    def delete_user(self, user_id: str) -> bool:
        return Deleted.model_validate(self._request("DELETE", f"/v1/users/{user_id}").json()).deleted

    def model(self) -> ModelInfo:
        return ModelInfo.model_validate(self._request("GET", "/v1/model").json())

    def ready(self) -> bool:
        """Whether /readyz answers 200 (no retries)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout}s")
            time.sleep(interval)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HyTRecClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncHyTRecClient(_Base):
    """Asynchronous client; share one instance between tasks (it pools connections)."""

    def __init__(
        self,
        base_url: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(base_url, **kwargs)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self.headers,
            timeout=self.timeout,
            transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def _request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,), **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            resp: httpx.Response | None = None
            try:
                resp = await self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.RemoteProtocolError):
                if not self._retry(attempt, None):
                    raise
            if resp is not None and (resp.status_code in ok or not self._retry(attempt, resp)):
                if resp.status_code not in ok:
                    raise HyTRecError(resp.status_code, _problem(resp))
                return resp
            await asyncio.sleep(self._delay(attempt, resp))
            attempt += 1

    async def post_events(self, events: Iterable[EventLike]) -> IngestResult:
        resp = await self._request("POST", "/v1/events", json=_payload(events))
        return IngestResult.model_validate(resp.json())

    async def recommendations(
        self,
        user_id: str,
        k: int = 10,
        *,
        exclude_seen: bool = True,
        at: float | None = None,
        exclude: Iterable[str] = (),
        categories: Iterable[str] = (),
        offset: int = 0,
    ) -> Recommendations:
        params = self._params(k, exclude_seen, at, exclude, categories, offset)
        resp = await self._request("GET", f"/v1/users/{user_id}/recommendations", params=params)
        return Recommendations.model_validate(resp.json())

    async def rank(
        self,
        user_id: str,
        candidates: Iterable[str],
        *,
        exclude_seen: bool = False,
        exclude: Iterable[str] = (),
        categories: Iterable[str] = (),
        at: float | None = None,
    ) -> Ranked:
        body: dict[str, Any] = {
            "candidates": list(candidates),
            "exclude_seen": exclude_seen,
            "exclude": list(exclude),
            "categories": list(categories),
        }
        if at is not None:
            body["at"] = float(at)
        return Ranked.model_validate((await self._request("POST", f"/v1/users/{user_id}/rank", json=body)).json())

    async def session(
        self,
        events: Iterable[Mapping[str, Any]],
        k: int = 10,
        *,
        exclude_seen: bool = True,
        exclude: Iterable[str] = (),
        categories: Iterable[str] = (),
        offset: int = 0,
        at: float | None = None,
    ) -> SessionRecommendations:
        body = {"events": [dict(e) for e in events], **self._filters(k, exclude, categories, exclude_seen, offset, at)}
        resp = await self._request("POST", "/v1/sessions/recommendations", json=body)
        return SessionRecommendations.model_validate(resp.json())

    async def batch(self, requests: Iterable[Mapping[str, Any]]) -> BatchAnswer:
        body = {"requests": [dict(r) for r in requests]}
        return BatchAnswer.model_validate((await self._request("POST", "/v1/recommendations:batch", json=body)).json())

    async def items(self, offset: int = 0, limit: int = 1000) -> ItemPage:
        resp = await self._request("GET", "/v1/items", params={"offset": offset, "limit": limit})
        return ItemPage.model_validate(resp.json())

    async def item(self, item_id: str) -> CatalogueItem | None:
        resp = await self._request("GET", f"/v1/items/{item_id}", ok=(200, 404))
        return None if resp.status_code == 404 else CatalogueItem.model_validate(resp.json())

    async def similar(
        self, item_id: str, k: int = 10, *, exclude: Iterable[str] = (), categories: Iterable[str] = (), offset: int = 0
    ) -> SimilarItems:
        params = self._similar_params(k, exclude, categories, offset)
        resp = await self._request("GET", f"/v1/items/{item_id}/similar", params=params)
        return SimilarItems.model_validate(resp.json())

    async def set_hidden(self, item_id: str, hidden: bool = True) -> CatalogueItem:
        resp = await self._request("PUT", f"/v1/admin/items/{item_id}", json={"hidden": hidden})
        return CatalogueItem.model_validate(resp.json())

    async def set_hidden_many(self, item_ids: Iterable[str], hidden: bool = True) -> HideResult:
        resp = await self._request("PUT", "/v1/admin/items", json={"item_ids": list(item_ids), "hidden": hidden})
        return HideResult.model_validate(resp.json())

    async def user(self, user_id: str) -> UserSummary | None:
        resp = await self._request("GET", f"/v1/users/{user_id}", ok=(200, 404))
        return None if resp.status_code == 404 else UserSummary.model_validate(resp.json())

    async def delete_user(self, user_id: str) -> bool:
        return Deleted.model_validate((await self._request("DELETE", f"/v1/users/{user_id}")).json()).deleted

    async def model(self) -> ModelInfo:
        return ModelInfo.model_validate((await self._request("GET", "/v1/model")).json())

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncHyTRecClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
