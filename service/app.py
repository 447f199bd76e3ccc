"""The FastAPI application, assembled: lifecycle, middleware, error handlers, routers, OpenAPI limits.

Run with ``hytrec serve`` or ``uvicorn hytrec.service.app:app_factory --factory``. What the routes do lives in
``routes.py`` over the use cases (``events.py``, ``recommend.py``); start-up and shutdown in ``runtime.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from hytrec import __version__
from hytrec.service import admin, product_routes, routes, tracing
from hytrec.service.errors import install
from hytrec.service.guard import Guard
from hytrec.service.logs import request_id_middleware
from hytrec.service.openapi import describe_errors
from hytrec.service.ratelimit import RateLimiter
from hytrec.service.runtime import Lifecycle
from hytrec.service.settings import Settings
from hytrec.service.swap import WorkerHeader

# Request bodies whose fields get the configured limits. Not BatchEntry: a batch checks each entry's limits
# on its own and answers a bad entry inside the 200 (the other entries are served).
REQUEST_BODIES = ("BatchRequest", "FilterBody", "HideBulk", "RankRequest", "SessionRequest")


def openapi_with_limits(app: FastAPI, s: Settings) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` that writes the configured limits into the document (they are settings, not constants),
    the served catalogue's categories, and every error answer with the security the settings configure
    (``openapi.describe_errors``). The admin routes are left out while no admin key is set: they answer 404,
    as routes that do not exist."""
    generate = app.openapi
    lists = {
        "exclude": s.max_filter_items,
        "categories": s.max_filter_items,
        "candidates": s.max_candidates,
        "requests": s.max_batch_users,
        "item_ids": s.max_hide_items,
    }

    def limit(name: str, schema: dict[str, Any], categories: list[str] | None) -> None:
        if name in ("k", "offset"):
            schema["maximum"] = s.max_k
        elif name in lists and schema.get("type") == "array":
            schema["maxItems"] = lists[name]
            if name == "categories" and categories is not None:
                if categories:
                    schema["items"] = {**schema.get("items", {}), "enum": categories}
                else:  # a catalogue without metadata: no category exists, so none may be asked for
                    schema["maxItems"] = 0

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            rt = app.state.lifecycle.runtime
            categories = sorted(rt.catalogue.categories) if rt is not None else None
            schema = generate()
            for path, item in schema["paths"].items():
                for op in item.values():
                    for param in op.get("parameters", []) if path != "/v1/items" else []:  # its offset is a row
                        limit(param["name"], param["schema"], categories)
            for name in REQUEST_BODIES:
                for prop_name, prop in schema["components"]["schemas"].get(name, {}).get("properties", {}).items():
                    limit(prop_name, prop, categories)
            schema["components"]["schemas"]["EventBatch"]["properties"]["events"]["maxItems"] = s.max_batch_events
            session = schema["components"]["schemas"].get("SessionRequest")
            if session is not None:
                session["properties"]["events"]["maxItems"] = s.max_session_events
            access = s.access_control()
            if not access.admin_enabled:
                schema["paths"] = {p: v for p, v in schema["paths"].items() if not p.startswith("/v1/admin")}
            doc = describe_errors(schema, s, access)
            if rt is None:  # the catalogue is not loaded yet: do not keep a document without its categories
                return doc
            app.openapi_schema = doc
        return app.openapi_schema

    return openapi


def rate_limiter(lifecycle: Lifecycle, s: Settings) -> RateLimiter | None:
    """The per-key limiter on the store's Redis client (None when no limit is configured: zero cost)."""
    if s.rate_limit_per_s is None:
        return None

    def client() -> Any | None:
        rt = lifecycle.runtime
        return None if rt is None else rt.store.client

    return RateLimiter(client, s.key_prefix, s.rate_limit_per_s, s.rate_limit_burst, s.rate_limit_timeout_ms)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service app for ``settings`` (default: read from the environment)."""
    s = settings or Settings()
    lifecycle = Lifecycle(s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(lifecycle.start(), name="hytrec-startup")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # shutting down anyway
                await task
            await lifecycle.close()

    app = FastAPI(
        title="HyTRec inference service",
        version=__version__,
        summary="Incremental per-event state updates and top-K recommendations for long behaviour histories.",
        lifespan=lifespan,
    )
    app.state.lifecycle = lifecycle
    install(app, s.retry_after_s)
    app.add_middleware(
        Guard,
        access=s.access_control(),
        max_body=s.max_body_bytes,
        max_in_flight=s.max_in_flight,
        retry_after=s.retry_after_s,
        shed=lifecycle.shed,
        limiter=rate_limiter(lifecycle, s),
    )
    app.add_middleware(WorkerHeader)  # X-HyTRec-Worker: which worker (and so which version swap) answered
    app.add_middleware(request_id_middleware)  # outermost: the id is set before the guard may answer
    routers = (routes.events, routes.users, routes.items, routes.model, routes.operations, admin.router)
    for router in (*routers, *product_routes.ROUTERS):
        app.include_router(router)
    app.openapi = openapi_with_limits(app, s)  # type: ignore[method-assign]
    tracing.setup(app, s)  # nothing at all unless an OTLP endpoint is configured
    return app


def _exit_with_supervisor() -> None:
    """In a worker of uvicorn's ``--workers`` supervisor, get SIGTERM (a graceful stop) when the supervisor dies,
    even by SIGKILL (Linux): otherwise the worker would keep serving, and keep the embedded Redis up, as an orphan."""
    import ctypes
    import multiprocessing
    import os
    import signal
    import sys

    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent.pid:  # the supervisor died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def app_factory() -> FastAPI:
    """Uvicorn factory: the app configured from the environment."""
    _exit_with_supervisor()
    from hytrec.service import logs

    s = Settings()
    logs.configure(s)
    return create_app(s)
