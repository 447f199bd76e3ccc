"""Request ids and structured logs: the id is taken from X-Request-ID when it is safe (else generated), echoed in
the response header and in problem documents, and written in every JSON log line of its request, uvicorn's access
line included; configured secrets never reach a line.

In process (httpx's ASGI transport) for the headers and problem documents; a real `hytrec serve` for the log
lines, since uvicorn writes the access log and the log configuration is what the serve command hands it.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hytrec.service import logs
from hytrec.service.settings import Settings
from tests.redis_servers import RedisServer
from tests.service_fixtures import Checkpoint, ServiceProcess, service_env
from tests.test_app import run, running, settings_for

KEY = "k3y-" + uuid.uuid4().hex  # a configured API key: must never be logged
GENERATED = re.compile(r"^[0-9a-f]{32}$")


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("abc-123", True),
        ("0af7651916cd43dd8448eb211c80319c", True),
        ("trace.span:01_x", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("", False),
        ("has space", False),
        ("line\nbreak", False),
        ('quote"d', False),
        ("ünï", False),
    ],
)
def test_request_id_validation(value: str, kept: bool) -> None:
    assert logs.valid_request_id(value) is kept


def test_ids_are_echoed_in_headers_and_problem_documents(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    s = settings_for(service_checkpoint, redis_standalone_url, api_keys=KEY)
    auth = {"Authorization": f"Bearer {KEY}"}

    async def body() -> None:
        async with running(s) as (client, _):
            # a client's id is kept, echoed once, and named in the problem document (404 from a route)
            res = await client.get("/v1/users/nobody", headers={**auth, "X-Request-ID": "client-id.1"})
            assert res.status_code == 404
            assert res.headers.get_list("x-request-id") == ["client-id.1"]
            assert res.json()["request_id"] == "client-id.1"
            # answered by the guard before any route: 401
            res = await client.get("/v1/users/nobody", headers={"X-Request-ID": "no-key"})
            assert res.status_code == 401 and res.json()["request_id"] == "no-key"
            assert res.headers["x-request-id"] == "no-key"
            # a validation error (422) with an unsafe id: a fresh one replaces it everywhere
            bad = "x" * 500
            res = await client.post("/v1/events", json={"events": [{}]}, headers={**auth, "X-Request-ID": bad})
            assert res.status_code == 422
            rid = res.headers["x-request-id"]
            assert GENERATED.match(rid) and res.json()["request_id"] == rid
            # no id at all: generated, different per request
            one = (await client.get("/healthz")).headers["x-request-id"]
            two = (await client.get("/healthz")).headers["x-request-id"]
            assert GENERATED.match(one) and GENERATED.match(two) and one != two

    run(body)


def _lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed as JSON (a line that is not JSON fails the test)."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"not a JSON log line: {line!r}") from None
    return out


def test_the_formatter_redacts_secrets_in_messages_and_fields() -> None:
    s = Settings(api_keys=f"other-key-abc,{KEY}", redis_url="redis://user:pw-Secret-9@redis:6379/0", log_format="json")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("json", logs.secrets_of(s)))
    log = logging.getLogger("hytrec.test.redact")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("connecting with Bearer %s to %s", KEY, s.redis_url)
        log.warning("settings", extra={"api_keys": "anything", "nested": {"password": "x", "ok": KEY}})
        try:
            raise ValueError(f"bad key {KEY}")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert KEY not in text and "pw-Secret-9" not in text
    first, _, third = _lines(text)
    assert first["event"] == f"connecting with Bearer {logs.REDACTED} to redis://user:{logs.REDACTED}@redis:6379/0"
    assert first["level"] == "warning" and first["logger"] == "hytrec.test.redact" and "timestamp" in first
    assert "ValueError: bad key [redacted]" in third["exception"]


def test_text_format_is_one_line_per_record() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("text", [KEY]))
    log = logging.getLogger("hytrec.test.text")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("hello %s", KEY)
    finally:
        log.removeHandler(handler)
    line = stream.getvalue()
    assert "hello [redacted]" in line and "warning" in line and KEY not in line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_sampling_keeps_a_fraction_and_every_warning() -> None:
    sample = logs.Sample(0.25)
    info = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, "x", (), None)
    warn = logging.LogRecord("uvicorn.access", logging.WARNING, __file__, 1, "x", (), None)
    kept = sum(sample.filter(info) for _ in range(4000))
    assert 800 < kept < 1200
    assert all(sample.filter(warn) for _ in range(100))
    assert all(logs.Sample(1.0).filter(info) for _ in range(100))


# --------------------------------------------------------------------------------------- real process
@pytest.fixture(scope="module")
def served(service_checkpoint: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    """One worker with the access log on at info level, API keys on, over its own Redis (the test stops it)."""
    redis = RedisServer().start()
    env = service_env(service_checkpoint, redis.url, api_keys=f"other-key,{KEY}", access_log="true")
    env["HYTREC_LOG_LEVEL"] = "info"
    proc = ServiceProcess(env, tmp_path_factory.mktemp("logs"))
    try:
        proc.start()
        yield proc, redis
    finally:
        proc.stop()
        redis.stop()


def _log_of(proc: ServiceProcess) -> str:
    return (proc.workdir / f"serve-{proc.port}.log").read_text(errors="replace")


def test_every_line_of_a_request_carries_its_id_and_no_secret(served: tuple[ServiceProcess, RedisServer]) -> None:
    proc, redis = served
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=proc.url, timeout=10) as client:
        ok = client.get("/v1/users/u1/recommendations", headers={**auth, "X-Request-ID": "rid-ok"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "rid-ok"
        wrong = client.get("/v1/users/u1", headers={"Authorization": f"Bearer {KEY}x", "X-Request-ID": "rid-401"})
        assert wrong.status_code == 401 and wrong.json()["request_id"] == "rid-401"
        redis.kill()  # the store's warning is logged inside the request, so it carries the request's id
        down = client.get("/v1/users/u1/recommendations", headers={**auth, "X-Request-ID": "rid-down"})
        assert down.status_code == 503 and down.json()["request_id"] == "rid-down"

    def lines_for(rid: str) -> list[dict[str, Any]]:
        return [line for line in _lines(_log_of(proc)) if line.get("request_id") == rid]

    down_lines: list[dict[str, Any]] = []
    for _ in range(50):  # the access line of the last request may still be in flight
        down_lines = lines_for("rid-down")
        if any(line.get("logger") == "uvicorn.access" for line in down_lines):
            break
        time.sleep(0.1)
    access = {
        rid: next(line for line in lines_for(rid) if line["logger"] == "uvicorn.access")
        for rid in ("rid-ok", "rid-401")
    }
    assert access["rid-ok"]["status"] == 200 and access["rid-ok"]["method"] == "GET"
    assert access["rid-ok"]["path"] == "/v1/users/u1/recommendations" and access["rid-ok"]["event"] == "request"
    assert access["rid-401"]["status"] == 401
    loggers = {line["logger"] for line in down_lines}
    assert {"uvicorn.access", "hytrec.service"} <= loggers, down_lines  # the store warning, then the access line
    assert any("state store unavailable" in line["event"] for line in down_lines)
    text = _log_of(proc)
    assert KEY not in text
    # every line is JSON (_lines fails otherwise), start-up lines included; outside a request there is no id
    startup = [line for line in _lines(text) if "Application startup complete" in line["event"]]
    assert startup and "request_id" not in startup[0]


def test_logs_are_configured_from_the_settings(tmp_path: Path) -> None:
    cfg = logs.log_config(Settings(log_format="text", log_level="warning", access_log_sample=0.1, api_keys=KEY))
    assert cfg["formatters"]["hytrec"]["fmt"] == "text" and cfg["formatters"]["hytrec"]["secrets"] == [KEY]
    assert cfg["filters"]["access_sample"]["rate"] == 0.1
    assert cfg["loggers"]["uvicorn.access"]["level"] == "WARNING" and cfg["root"]["level"] == "WARNING"


@pytest.mark.parametrize("on", [False, True])
def test_the_access_log_is_on_only_when_asked_for(on: bool) -> None:
    """uvicorn writes an access line on a connection whose logger has handlers; the worker configures logging again
    after uvicorn (``app_factory``), so the handler must follow the setting there too, not only in uvicorn's config."""
    access = logging.getLogger("uvicorn.access")
    saved = access.handlers[:], access.propagate
    try:
        logs.configure(Settings(access_log=on))
        assert access.hasHandlers() is on
    finally:
        access.handlers[:], access.propagate = saved
