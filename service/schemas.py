"""Request and response bodies of the HTTP API (pydantic v2), shared by the server and the client."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
MAX_TS = 4_102_444_800.0  # 2100-01-01: timestamps are unix seconds in (0, MAX_TS)


MAX_INT_ID = 2**53 - 1  # the largest integer every JSON parser reads exactly


def _int_to_str(value: Any) -> Any:
    """Accept JSON integers in [0, 2^53) as item ids: exactly what the schema below declares (booleans, negative
    and larger integers stay invalid: they reach the string check and fail it)."""
    if isinstance(value, float) and value.is_integer():  # JSON Schema counts 5.0 as an integer
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT_ID:
        return str(value)
    return value


Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
# The schema is written out: pydantic would document a plain string without its pattern (the before-validator
# hides the constraint), so "" looked valid and integers looked invalid, the opposite of what was accepted.
ItemId = Annotated[
    str,
    BeforeValidator(_int_to_str),
    StringConstraints(pattern=ID_PATTERN),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": ID_PATTERN},
                {"type": "integer", "minimum": 0, "maximum": MAX_INT_ID},
            ],
            "description": "Item id: [A-Za-z0-9_.:@-]{1,128}, or a non-negative integer (read as its decimal string).",
        }
    ),
]


def _no_bool(value: Any) -> Any:
    """A JSON true is not a timestamp (pydantic's lax mode would read it as 1.0)."""
    if isinstance(value, bool):
        raise ValueError("Input should be a valid number, not a boolean")
    return value


# Lax otherwise: stream entries (streams/wire.py) carry ts as text, validated by this same model.
Timestamp = Annotated[
    float, Field(gt=0, lt=MAX_TS, allow_inf_nan=False, description="Unix seconds."), BeforeValidator(_no_bool)
]


class Event(BaseModel):
    """One interaction of a user with an item."""

    model_config = ConfigDict(extra="forbid")

    user_id: Identifier
    item_id: ItemId
    ts: Timestamp
    event_type: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,32}$")] | None = Field(
        None, description="Accepted and validated; not used by the model yet."
    )
    event_id: Identifier | None = Field(None, description="Idempotency key, unique per user: applied once.")


class EventBatch(BaseModel):
    """A batch of events, validated as a whole (the size limit is the HYTREC_MAX_BATCH_EVENTS setting)."""

    model_config = ConfigDict(extra="forbid")

    events: list[Event] = Field(min_length=1)


class IngestResult(BaseModel):
    """What a batch did: events applied, skipped as duplicates, and among the applied the special cases."""

    applied: int
    duplicates: int
    unknown_items: int
    out_of_order: int
    users: int


class ScoredItem(BaseModel):
    item_id: str
    score: float


class Recommendations(BaseModel):
    """Top-k for a user; ``fallback`` is ``"popularity"`` when the user has no usable state."""

    user_id: str
    items: list[ScoredItem]
    model_version: str
    history_length: int
    fallback: Literal[False, "popularity"]
    request_time: float


class RecentEvent(BaseModel):
    item_id: str | None = Field(description="External id; null for an item the model does not know.")
    ts: float


class UserSummary(BaseModel):
    """What the store holds for a user under the served model version."""

    user_id: str
    model_version: str
    history_length: int
    last_ts: float | None
    recent: list[RecentEvent] = Field(description="The ring buffer (last K events), newest last.")
    state_bytes: int
    store_version: int
    updated_ms: int | None


class CatalogueItem(BaseModel):
    item_id: str
    popularity: int = Field(description="Training interactions of the item (what the cold-start fallback ranks by).")


class ItemPage(BaseModel):
    """One page of the served model's catalogue, in row order; ``next_offset`` is null on the last page."""

    items: list[CatalogueItem]
    total: int
    offset: int
    next_offset: int | None


class Deleted(BaseModel):
    user_id: str
    deleted: bool


class ModelInfo(BaseModel):
    version: str
    model_type: str
    n_items: int
    config: dict[str, Any]
    state_dtype: str
    strict_items: bool


class Health(BaseModel):
    status: str
    model_version: str | None = None
