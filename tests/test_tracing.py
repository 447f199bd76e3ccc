"""OpenTelemetry tracing: with a provider, a request produces its server span, Redis spans and the torch batch
span (the SDK's in-memory exporter, the app in process over a real Redis); without an endpoint nothing of the
trace SDK, the exporter or the instrumentations is imported or installed (a fresh interpreter)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from hytrec.service import tracing
from hytrec.service.app import create_app
from hytrec.service.settings import Settings
from tests.service_fixtures import REPO, Checkpoint
from tests.test_app import events, run, settings_for

try:  # the otel extra: a developer without it skips this module; CI installs it
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("the otel extra is not installed (pip install -e '.[otel]')", allow_module_level=True)


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A provider whose spans land in memory; the process's Redis instrumentation is undone afterwards."""
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    try:
        yield provider, memory
    finally:
        tracing.uninstrument()
        provider.shutdown()


def test_a_request_is_traced_with_redis_and_batch_spans(
    traced: tuple[TracerProvider, InMemorySpanExporter], service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    provider, exporter = traced
    app = create_app(settings_for(service_checkpoint, redis_standalone_url))
    tracing.instrument(app, provider)  # what setup() does with an OTLP endpoint, with an in-memory exporter

    async def body() -> None:
        async with app.router.lifespan_context(app):
            lifecycle = app.state.lifecycle
            for _ in range(1000):
                if lifecycle.runtime is not None or lifecycle.error is not None:
                    break
                await asyncio.sleep(0.01)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                assert (await client.post("/v1/events", json={"events": events("tr", 5)})).status_code == 200
                rec = await client.get("/v1/users/tr/recommendations", headers={"X-Request-ID": "trace-me"})
                assert rec.status_code == 200
                assert (await client.get("/v1/users/tr")).status_code == 200
                assert (await client.get("/readyz")).status_code == 200  # excluded: no span

    run(body)
    spans = exporter.get_finished_spans()
    servers = [sp for sp in spans if sp.kind == SpanKind.SERVER]
    routes = {sp.attributes.get("http.route") for sp in servers}
    assert {"/v1/events", "/v1/users/{user_id}/recommendations"} <= routes, routes
    assert "/readyz" not in routes
    redis = [sp for sp in spans if sp.attributes.get("db.system") == "redis" or sp.name.startswith("EVAL")]
    assert redis, [sp.name for sp in spans]
    batches = {sp.attributes["path"]: sp for sp in spans if sp.name == "hytrec.batch"}
    assert set(batches) == {"events", "recommend"}, [sp.name for sp in spans]
    assert batches["events"].attributes["users"] == 1 and batches["recommend"].attributes["requests"] == 1
    # the user summary reads Redis inside its request: one trace, the Redis span a descendant of the server span
    shown = [(sp.name, format(sp.context.trace_id, "x")[-6:], dict(sp.attributes)) for sp in spans]
    (summary,) = (sp for sp in servers if sp.attributes.get("http.route") == "/v1/users/{user_id}")
    assert [sp for sp in redis if sp.context.trace_id == summary.context.trace_id], shown


def test_the_endpoint_comes_from_the_setting_or_the_sdk_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    assert tracing.endpoint(Settings()) is None
    assert tracing.endpoint(Settings(otlp_endpoint="http://c:4318")) == "http://c:4318"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318")
    assert tracing.endpoint(Settings()) == "http://env:4318"
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.endpoint(Settings(otlp_endpoint="http://c:4318")) is None


def test_a_configured_endpoint_installs_the_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = tracing.provider_for(Settings(otlp_endpoint="http://127.0.0.1:4318/"))
    try:
        (processor,) = provider._active_span_processor._span_processors
        assert processor._batch_processor._exporter._endpoint == "http://127.0.0.1:4318/v1/traces"
    finally:
        provider.shutdown()


OFF = """
import json, sys
import redis.asyncio
from hytrec.service import tracing
from hytrec.service.app import create_app
from hytrec.service.settings import Settings
app = create_app(Settings())
with tracing.span("hytrec.batch", path="x"):
    pass
# redis-py 8 imports opentelemetry.sdk.metrics by itself when the SDK is installed (its own metrics, off unless
# configured); what tracing would bring is the trace SDK, the exporter and the instrumentations
ours = ("opentelemetry.sdk.trace", "opentelemetry.instrumentation", "opentelemetry.exporter")
loaded = sorted(m for m in sys.modules if m.startswith(ours))
print(json.dumps({
    "loaded": loaded,
    "middleware": [m.cls.__name__ for m in app.user_middleware],
    "noop": tracing.span("x") is tracing._NOOP,
    "redis_patched": type(redis.asyncio.Redis.execute_command).__name__ != "function",
}))
"""


def test_off_imports_and_installs_nothing() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "HYTREC_OTLP"))}
    env["PYTHONPATH"] = str(REPO)
    res = subprocess.run([sys.executable, "-c", OFF], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {
        "loaded": [],
        "middleware": ["request_id_middleware", "WorkerHeader", "Guard"],
        "noop": True,
        "redis_patched": False,
    }
