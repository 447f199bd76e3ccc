"""The wire format of a stream entry, and its validation into the service's ``Event``.

An entry holds either flat fields ``user_id``, ``item_id``, ``ts`` and optional ``event_id``, ``event_type``,
or one field ``json`` holding the same object. An entry that the service logged after applying a posted event also
has ``origin`` = ``rest`` (``logged``) and ``version``, the model version whose state the service wrote it to.
Validation is the REST path's own (``schemas.Event``), so an
entry is accepted exactly when the same event would be accepted by ``POST /v1/events``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from hytrec.service.schemas import Event

FIELDS = ("user_id", "item_id", "ts", "event_id", "event_type")
# An entry the service logged after applying it (``POST /v1/events``, docs/lifecycle.md): ``origin`` = ``rest``,
# and ``version`` = the version whose state already holds it. The consumer applies it to every other version it
# writes (with the entry as the mark) and never to that one; the archive, export and backfill read it as any entry.
ORIGIN = "origin"
REST = "rest"
VERSION = "version"


class BadEntry(ValueError):
    """An entry that can never be applied; the consumer dead-letters it with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(event: Event | Mapping[str, Any]) -> dict[str, str]:
    """The flat fields of an entry (what the producer XADDs)."""
    data = event.model_dump(exclude_none=True) if isinstance(event, Event) else dict(event)
    return {k: (repr(float(v)) if k == "ts" else str(v)) for k, v in data.items() if v is not None}


def logged(event: Event, version: str | None = None) -> tuple[tuple[str, str], ...]:
    """The fields of the log entry of an event the service applied to ``version`` (what the compare-and-set
    XADDs)."""
    out = [("user_id", event.user_id), ("item_id", event.item_id), ("ts", repr(float(event.ts)))]
    if event.event_id is not None:
        out.append(("event_id", event.event_id))
    if event.event_type is not None:
        out.append(("event_type", event.event_type))
    out.append((ORIGIN, REST))
    if version is not None:
        out.append((VERSION, version))
    return tuple(out)


def is_logged(fields: Mapping[Any, Any]) -> bool:
    """Whether an entry was logged by the service after applying it (so it must not be applied again)."""
    value = fields.get(ORIGIN, fields.get(ORIGIN.encode()))
    return value is not None and _text(value) == REST


def written_to(fields: Mapping[Any, Any]) -> str | None:
    """The version a logged entry was written to by the service; None for an entry logged without it (before
    the field existed: which versions hold it is unknown, so the consumer only acknowledges it)."""
    value = fields.get(VERSION, fields.get(VERSION.encode()))
    return _text(value) if value is not None and is_logged(fields) else None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode(fields: Mapping[Any, Any] | None) -> Event:
    """The event an entry holds; ``BadEntry`` with a reason if it fails validation."""
    if not fields:
        raise BadEntry("empty entry")
    try:
        raw = {_text(k): _text(v) for k, v in fields.items()}
    except UnicodeDecodeError as exc:
        raise BadEntry(f"not UTF-8: {exc}") from exc
    if raw.get(ORIGIN) == REST:  # a logged entry: the event's own fields besides
        del raw[ORIGIN]
        raw.pop(VERSION, None)
    try:
        if "json" in raw:
            if len(raw) != 1:
                raise BadEntry("a 'json' entry holds no other field")
            data = json.loads(raw["json"])
            if not isinstance(data, dict):
                raise BadEntry("the 'json' field is not an object")
            return Event.model_validate(data)
        unknown = set(raw) - set(FIELDS)
        if unknown:
            raise BadEntry(f"unknown field(s) {sorted(unknown)}")
        return Event.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ()))
        raise BadEntry(f"{where}: {err.get('msg')}" if where else str(err.get("msg"))) from exc
    except json.JSONDecodeError as exc:
        raise BadEntry(f"'json' field is not JSON: {exc}") from exc
