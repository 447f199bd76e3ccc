"""Errors as RFC 9457 problem details (``application/problem+json``).

A client's mistake is a 4xx naming the offending field (``events[3].ts``); an unreachable store or a model
still loading is a 503 with Retry-After; anything else is a 500 that leaks no internals.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from hytrec.service.logs import HEADER, request_id
from hytrec.service.microbatch import Overloaded
from hytrec.state_store import ConflictError, CorruptStateError, StoreError, StoreUnavailable

log = logging.getLogger("hytrec.service")

PROBLEM_JSON = "application/problem+json"
_WRITE = "may_have_applied"  # the problem member of a failed post (``note_write``)
E = TypeVar("E", bound=BaseException)
TYPE_BASE = "https://hytrec.dev/problems/"


class Problem(Exception):
    """An error answered as a problem document."""

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.kind, self.title, self.detail = status, kind, title, detail
        self.headers = headers or {}
        self.extra = extra


def field_problem(errors: list[dict[str, Any]], detail: str | None = None) -> Problem:
    """A 422 listing invalid fields (each ``{"field", "message", "type"}``)."""
    detail = detail or "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    return Problem(422, "validation", "Request validation failed", detail, errors=errors)


def unavailable(detail: str, retry_after: int, kind: str = "unavailable") -> Problem:
    return Problem(503, kind, "Service unavailable", detail, headers={"Retry-After": str(retry_after)})


def note_write(exc: E, may_have_applied: bool) -> E:
    """Mark an error of ``POST /v1/events`` with whether the post's write may have landed (the 503 says so).

    False only when no batch holding the post reached the store: nothing of it was applied and a resend is
    safe at any time; True when it may have landed in full or in part (a resend is safe only while its event
    ids are within the user's de-duplication window, docs/reliability.md).
    """
    exc.__dict__[_WRITE] = may_have_applied
    return exc


def _write_outcome(exc: BaseException) -> dict[str, bool]:
    value = exc.__dict__.get(_WRITE)
    return {} if value is None else {_WRITE: value}


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "events", 3, "ts")`` -> ``events[3].ts``; the location part (body/query/path) is dropped."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or (str(loc[0]) if loc else "body")


def problem_response(request: Request | None, p: Problem) -> JSONResponse:
    body: dict[str, Any] = {"type": TYPE_BASE + p.kind, "title": p.title, "status": p.status, "detail": p.detail}
    if request is not None:
        body["instance"] = request.url.path
    body.update(p.extra)
    if (rid := request_id()) is not None:
        body["request_id"] = rid  # the X-Request-ID of the answer, the request_id of its log lines
    return JSONResponse(body, status_code=p.status, headers=p.headers, media_type=PROBLEM_JSON)


def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    malformed = None
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            malformed = err
            continue
        if loc == ("body",) and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            err = {**err, "msg": "the body must be a JSON object, sent with Content-Type: application/json"}
        errors.append(
            {
                "field": field_path(loc),
                "in": loc[0] if loc else "body",
                "message": err.get("msg", "invalid"),
                "type": err.get("type", "invalid"),
            }
        )
    if malformed is not None:
        ctx = malformed.get("ctx") or {}
        where = malformed.get("loc", ("body", 0))
        reason = str(ctx.get("error", "parse error")).removesuffix(" at")
        detail = f"request body is not valid JSON ({reason} at position {where[-1]})"
        return problem_response(request, Problem(400, "malformed-json", "Malformed JSON", detail))
    if not errors:
        errors = [{"field": "body", "in": "body", "message": "invalid request", "type": "invalid"}]
    return problem_response(request, field_problem(errors))


def _undecodable(exc: Exception) -> str:
    """Why a body that is not a JSON parse error could not be read as JSON (the cause FastAPI chained)."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        byte = cause.object[cause.start]
        return f"request body is not valid JSON (not UTF-8: byte {byte:#04x} at position {cause.start})"
    if isinstance(cause, RecursionError):
        return "request body is not valid JSON (nested too deeply for the parser)"
    return f"request body is not valid JSON ({type(cause).__name__})"


def _allowed(request: Request) -> set[str]:
    """Every method some route serves at this path (asked of each route, included routers too)."""
    routes = request.app.router.routes
    return {
        m
        for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
        if any(r.matches({**request.scope, "method": m})[0] is Match.FULL for r in routes)
    }


def install(app: FastAPI, retry_after: int) -> None:
    """Register the problem-details handlers on ``app``."""

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(request, exc)

    app.add_exception_handler(RequestValidationError, _validation)  # type: ignore[arg-type]

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not decode the JSON body
            return problem_response(request, Problem(400, "malformed-json", "Malformed JSON", _undecodable(exc)))
        titles = {404: "Not found", 405: "Method not allowed", 413: "Content too large"}
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # Starlette names only the first route of the path: name them all
            headers["Allow"] = ", ".join(sorted(_allowed(request)))
        p = Problem(
            exc.status_code,
            {404: "not-found", 405: "method-not-allowed", 413: "too-large"}.get(exc.status_code, "http"),
            titles.get(exc.status_code, "HTTP error"),
            str(exc.detail),
            headers=headers,
        )
        return problem_response(request, p)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("state store unavailable: %s", exc)
        p = unavailable("the state store is unavailable; retry later", retry_after)
        p.extra.update(_write_outcome(exc))
        return problem_response(request, p)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        detail = f"the service is over capacity ({exc.reason}); retry after the delay"
        p = unavailable(detail, retry_after, "overloaded")
        p.extra.update(_write_outcome(exc))
        return problem_response(request, p)

    @app.exception_handler(ConflictError)
    async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
        detail = (
            f"concurrent updates kept conflicting for {len(exc.user_ids)} user(s); other users of the batch were "
            "applied. Retry the batch (events with event_id are applied once)."
        )
        p = unavailable(detail, retry_after, "conflict")
        p.extra.update(_write_outcome(exc))
        return problem_response(request, p)

    @app.exception_handler(CorruptStateError)
    async def _corrupt(request: Request, exc: CorruptStateError) -> JSONResponse:
        log.error("%s", exc)
        detail = f"the stored state of user {exc.user_id!r} is corrupt; DELETE the user or run a backfill"
        return problem_response(request, Problem(500, "corrupt-state", "Corrupt state", detail))

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
        log.error("state store error: %s", exc)
        return problem_response(request, Problem(500, "store-error", "State store error", "state store error"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        # answered by Starlette's outermost middleware, past the one that adds X-Request-ID: add it here
        headers = {HEADER: rid} if (rid := request_id()) is not None else None
        p = Problem(500, "internal", "Internal server error", "internal error", headers=headers)
        return problem_response(request, p)
