"""Pure-ASGI middleware in front of every route: API keys and scopes on /v1, per-key rate limits, admission, the
body limit, latency.

Pure ASGI rather than a Starlette ``BaseHTTPMiddleware``: it runs for every request, so it must not copy
bodies or spawn tasks; it counts the bytes of a streamed body as they arrive and stops at the limit.
Admission is the cheapest shedding there is: past ``max_in_flight`` concurrent /v1 requests, or while the
batcher a request would join is full or standing (``MicroBatcher.pressure``), it is answered 503 overloaded
before its body is read or parsed, so the excess costs microseconds instead of queueing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hytrec.service import metrics
from hytrec.service.auth import AccessControl, Denied
from hytrec.service.errors import Problem, problem_response, unavailable
from hytrec.service.microbatch import Overloaded
from hytrec.service.ratelimit import RateLimiter

Shedder = Callable[[str, str], Overloaded | None]  # (method, path) -> why it is shed now, or None


class BodyTooLarge(StarletteHTTPException):
    """A streamed body went over the limit (answered 413 by the HTTP error handler)."""


def _too_large(limit: int) -> Problem:
    return Problem(413, "too-large", "Content too large", f"request body larger than {limit} bytes")


def _rate_limited(key_id: str, retry_after: int, limiter: RateLimiter) -> Problem:
    detail = f"this API key is over its limit of {limiter.per_s:g} requests/s (burst {limiter.burst}); retry after"
    detail += f" {retry_after} s"
    return Problem(429, "rate-limited", "Too many requests", detail, headers={"Retry-After": str(retry_after)})


def _denied(d: Denied) -> Problem:
    if d.status == 404:
        return Problem(404, "not-found", "Not found", d.detail)
    if d.status == 403:
        return Problem(403, "forbidden", "Forbidden", d.detail)
    return Problem(401, "unauthorized", "Unauthorized", d.detail, headers={"WWW-Authenticate": 'Bearer realm="hytrec"'})


async def _answer(scope: Scope, receive: Receive, send: Send, problem: Problem) -> None:
    await problem_response(Request(scope), problem)(scope, receive, send)


class Guard:
    """Checks the API key and the body size before a route runs, and times every request."""

    def __init__(
        self,
        app: ASGIApp,
        access: AccessControl,
        max_body: int,
        max_in_flight: int,
        retry_after: int,
        shed: Shedder | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.app, self.access, self.max_body = app, access, max_body
        self.max_in_flight, self.retry_after, self.shed = max_in_flight, retry_after, shed
        self.limiter = limiter  # None: no rate limit, no Redis round trip
        self.in_flight = 0

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
        decision = self.access.decide(scope["method"], scope["path"], headers.get("authorization"))
        if isinstance(decision, Denied):
            await _answer(scope, receive, send, _denied(decision))
            return
        if decision is not None:  # the caller, for the routes (logs): ``request.state.principal``
            scope.setdefault("state", {})["principal"] = decision
            if self.limiter is not None:  # one Redis round trip, shared by every worker and replica
                wait = await self.limiter.retry_after(decision.key_id)
                if wait is not None:
                    problem = _rate_limited(decision.key_id, wait, self.limiter)
                    await _answer(scope, receive, send, problem)
                    return
        if scope["path"].startswith("/v1/"):
            if self.in_flight >= self.max_in_flight:
                metrics.SHED.labels("admission", "in_flight").inc()
                detail = (
                    f"the service is over capacity ({self.max_in_flight} requests in flight); retry after the delay"
                )
                await _answer(scope, receive, send, unavailable(detail, self.retry_after, "overloaded"))
                return
            shed = self.shed(scope["method"], scope["path"]) if self.shed is not None else None
            if shed is not None:
                await _answer(scope, receive, send, unavailable(shed.detail(), self.retry_after, shed.kind))
                return
            self.in_flight += 1
            try:
                await self._admitted(scope, receive, send, headers)
            finally:
                self.in_flight -= 1
            return
        await self._admitted(scope, receive, send, headers)

    async def _admitted(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _answer(scope, receive, send, _too_large(self.max_body))
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
