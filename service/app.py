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


def openapi_with_limits(app: FastAPI, s: Settings) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` that writes the configured limits into the document (they are settings, not constants),
    and every error answer with the security the settings configure (``openapi.describe_errors``)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            get = schema["paths"]["/v1/users/{user_id}/recommendations"]["get"]
            for param in get["parameters"]:
                if param["name"] == "k":
                    param["schema"]["maximum"] = s.max_k
            events = schema["components"]["schemas"]["EventBatch"]["properties"]["events"]
            events["maxItems"] = s.max_batch_events
            app.openapi_schema = describe_errors(schema, s, s.access_control())
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
