"""OpenTelemetry tracing, optional: off unless an OTLP endpoint is configured, and then FastAPI, Redis and each
torch batch are traced and exported over OTLP/HTTP.

Configured by ``HYTREC_OTLP_ENDPOINT`` (the collector's base URL, e.g. ``http://collector:4318``), or by the
SDK's own ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_SDK_DISABLED=true``
turns it off whatever is set. The SDK, the exporter and the instrumentations come with the ``otel`` extra
(``pip install 'hytrec[otel]'``) and are imported only when tracing is on: with it off, ``span`` hands back one
shared no-op context manager, so the batchers' ``with span(...)`` costs a function call and nothing else.

A micro-batch serves many requests, so its span (``hytrec.batch``) is a root span of its own, not a child of one
request's span; its attributes say which path and how many requests or users it carried.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

    from hytrec.service.settings import Settings

_NOOP = contextlib.nullcontext()
_tracer: Any = None  # the batch spans' tracer while tracing is on
_redis_instrumented = False
EXCLUDED_URLS = "healthz,readyz,metrics"  # probes and scrapes: frequent, and nothing to trace


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A span around a block while tracing is on; the shared no-op context manager otherwise."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=attributes)


def endpoint(settings: Settings) -> str | None:
    """Where spans go (None: tracing off)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if settings.otlp_endpoint:
        return settings.otlp_endpoint
    return os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")


def provider_for(settings: Settings) -> TracerProvider:
    """A tracer provider exporting in batches to the configured OTLP/HTTP endpoint."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from hytrec import __version__

    resource = Resource.create(
        {SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", "hytrec"), SERVICE_VERSION: __version__}
    )
    provider = TracerProvider(resource=resource)
    if settings.otlp_endpoint:  # a base URL, like OTEL_EXPORTER_OTLP_ENDPOINT; the SDK reads its own variables
        url = settings.otlp_endpoint.rstrip("/")
        exporter = OTLPSpanExporter(endpoint=url if url.endswith("/v1/traces") else url + "/v1/traces")
    else:
        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def instrument(app: FastAPI, provider: TracerProvider) -> None:
    """Trace ``app``'s requests, every Redis command of this process, and the batch spans, with ``provider``."""
    global _tracer, _redis_instrumented
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls=EXCLUDED_URLS)
    if not _redis_instrumented:  # it patches the redis client classes, once per process
        RedisInstrumentor().instrument(tracer_provider=provider)
        _redis_instrumented = True
    _tracer = provider.get_tracer("hytrec.service")


def uninstrument() -> None:
    """Undo ``instrument`` for this process (tests); the app instrumented stays so."""
    global _tracer, _redis_instrumented
    if _redis_instrumented:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        RedisInstrumentor().uninstrument()
        _redis_instrumented = False
    _tracer = None


def setup(app: FastAPI, settings: Settings) -> bool:
    """Turn tracing on for ``app`` when an endpoint is configured; returns whether it did."""
    if endpoint(settings) is None:
        return False
    try:
        provider = provider_for(settings)
    except ImportError as exc:
        raise RuntimeError(f"an OTLP endpoint is configured but the otel extra is not installed ({exc})") from exc
    instrument(app, provider)
    return True
