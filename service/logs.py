"""Structured logs: one JSON object per line (or plain text), each line of a request carrying its request id.

The request id comes from asgi-correlation-id's pure-ASGI middleware (``X-Request-ID``: a client's id is kept
when it is 1-128 characters of ``[A-Za-z0-9._:-]``, otherwise one is generated) and lives in its context
variable for the rest of the request: the middleware echoes it in the response header, problem documents
carry it as ``request_id`` (errors.py), and the formatter below adds it to every log line written meanwhile,
uvicorn's access log included.

The service logs through the standard library (``logging.getLogger``); structlog's ``ProcessorFormatter``
renders every record, ours and uvicorn's and redis-py's alike, so there is one format and one handler.
Configured secrets (API keys, the Redis URL's password) are replaced by ``[redacted]`` wherever they would
appear in a line, and fields named like a secret are redacted whatever their value.
"""

from __future__ import annotations

import logging
import logging.config
import random
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from asgi_correlation_id import CorrelationIdMiddleware, correlation_id

from hytrec.service.auth import parse_keys

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from hytrec.service.settings import Settings

HEADER = "X-Request-ID"
REDACTED = "[redacted]"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SECRET_FIELD = re.compile(r"authorization|api_?keys?|password|secret|token", re.IGNORECASE)


def valid_request_id(value: str) -> bool:
    """A client's id is kept only when short and of a charset that cannot forge log lines or headers."""
    return _REQUEST_ID.fullmatch(value) is not None


def request_id() -> str | None:
    """The id of the request being served in this context (None outside a request)."""
    return correlation_id.get()


def request_id_middleware(app: ASGIApp) -> CorrelationIdMiddleware:
    """asgi-correlation-id configured for ``X-Request-ID`` with the validation above (pure ASGI)."""
    return CorrelationIdMiddleware(app, header_name=HEADER, validator=valid_request_id)


def secrets_of(settings: Settings) -> list[str]:
    """Values never to be written to a log: the API and admin keys and the Redis URL's password."""
    found = [key for key, _ in parse_keys(settings.api_keys.get_secret_value())]
    found += [k.strip() for k in settings.admin_keys.get_secret_value().split(",") if k.strip()]
    if settings.redis_password is not None:
        found.append(settings.redis_password.get_secret_value())
    if settings.redis_url:
        password = urlsplit(settings.redis_url).password
        if password:
            found.append(password)
    return found


# ------------------------------------------------------------------------------------------ processors
def add_request_id(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    rid = correlation_id.get()
    if rid is not None:
        event.setdefault("request_id", rid)
    return event


def add_logger_name(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    record = event.get("_record")
    if record is not None:
        event.setdefault("logger", record.name)
    return event


def access_fields(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """uvicorn's access line as fields (its record's arguments: client, method, path, HTTP version, status)."""
    args = event.pop("positional_args", ())
    record = event.get("_record")
    if record is not None and record.name == "uvicorn.access" and len(args) == 5:
        client, method, path, http_version, status = args
        event.update(event="request", client=client, method=method, path=path, http=http_version, status=status)
    return event


class Redact:
    """Replaces configured secrets wherever they occur in a line's fields, and fields named like a secret."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self.secrets:
                if secret in value:
                    value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, dict):
            return {k: REDACTED if _SECRET_FIELD.search(str(k)) else self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self._clean(v) for v in value)
        return value

    def __call__(self, _: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        for key, value in event.items():
            if key.startswith("_"):
                continue
            if _SECRET_FIELD.search(key):
                event[key] = REDACTED
            elif self.secrets or isinstance(value, dict | list | tuple):
                event[key] = self._clean(value)
        return event


def shared_chain(secrets: Sequence[str]) -> list[Any]:
    """Processors every record goes through, before the renderer."""
    return [
        structlog.stdlib.add_log_level,
        add_logger_name,
        add_request_id,
        access_fields,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        Redact(secrets),
    ]


def formatter(fmt: str = "json", secrets: Sequence[str] = ()) -> structlog.stdlib.ProcessorFormatter:
    """The one formatter of every handler (a ``()`` factory for ``logging.config.dictConfig``)."""
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared_chain(secrets),
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        pass_foreign_args=True,
    )


class Sample(logging.Filter):
    """Keeps a fraction of the records (the access log's sampling); errors pass always."""

    def __init__(self, rate: float = 1.0) -> None:
        super().__init__()
        self.rate = rate

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rate >= 1.0 or record.levelno >= logging.WARNING or random.random() < self.rate


def log_config(settings: Settings) -> dict[str, Any]:
    """The ``logging.config.dictConfig`` of the service, also handed to uvicorn as its ``log_config``."""
    level = settings.log_level.upper()
    handler = {"class": "logging.StreamHandler", "formatter": "hytrec", "stream": "ext://sys.stderr"}
    access = ["access"] if settings.access_log else []
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "hytrec": {"()": f"{__name__}.formatter", "fmt": settings.log_format, "secrets": secrets_of(settings)}
        },
        "filters": {"access_sample": {"()": f"{__name__}.Sample", "rate": settings.access_log_sample}},
        "handlers": {
            "default": handler,
            "access": {**handler, "filters": ["access_sample"]},
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            # No handler while the access log is off: uvicorn decides per connection from ``hasHandlers()``, and
            # the worker's own ``configure`` would otherwise turn the line back on (about 0.2 ms per request).
            "uvicorn.access": {"handlers": access, "level": level, "propagate": False},
        },
        "root": {"handlers": ["default"], "level": level},
    }


def configure(settings: Settings) -> None:
    """Install the configuration in this process (idempotent: dictConfig replaces the handlers)."""
    logging.config.dictConfig(log_config(settings))
