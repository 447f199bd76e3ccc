"""Request and response bodies of the HTTP API (pydantic v2), shared by the server and the client."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StringConstraints,
    WithJsonSchema,
)

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
        None,
        description="Optional. Configurable per type: updates the state (default), enters the never-again set "
        "(HYTREC_NEVER_AGAIN_TYPES), or only counted (HYTREC_COUNT_ONLY_TYPES).",
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
    counted_only: int = Field(0, description="Events of a count-only type: counted, not applied to the state.")
    never_again: int = Field(0, description="Events whose item entered the user's never-again set.")
    model_version: str | None = Field(
        None,
        description="The model version whose states this answer's writes went to: the served one for a post "
        "(other write versions get the events through the event log, or mirrors when the log is off).",
    )
    # Stream entries refused because they are at or below the user's erasure tombstone (the consumer counts
    # them; a post never has any). Private: not part of the API.
    _erased: int = PrivateAttr(0)


class ScoredItem(BaseModel):
    item_id: str
    score: float


class Served(BaseModel):
    """What served an answer: the model version, whether the user had state, and the mask's effect."""

    model_version: str
    had_state: bool = Field(description="Whether a stored (or session) state answered; false: popularity fallback.")
    filtered_out: int = Field(
        description="Catalogue items the mask removed before the top-k (seen, never-again, exclude, categories, "
        "hidden)."
    )
    offset: int = 0
    exhausted: bool = Field(description="Fewer than k items survived the filters after the offset (no padding).")


class Recommendations(Served):
    """Top-k for a user; ``fallback`` is ``"popularity"`` when the user has no usable state."""

    user_id: str
    items: list[ScoredItem]
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
    title: str | None = Field(None, description="From the items file; null without one.")
    categories: list[str] = Field(default_factory=list, description="From the items file (e.g. genres).")
    hidden: bool = Field(False, description="Hidden at run time: never recommended (PUT /v1/admin/items/{id}).")


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


def _not_a_bool(value: object) -> object:
    if isinstance(value, bool):  # JSON true/false is no integer; 3.0 is (JSON Schema's integer admits it)
        raise ValueError("Input should be a valid integer, not a boolean")
    return value


Count = Annotated[int, BeforeValidator(_not_a_bool)]


class FilterBody(BaseModel):
    """Filters of a recommendation request (body form; the GET route takes the same as query parameters)."""

    model_config = ConfigDict(extra="forbid")

    k: Count = Field(10, ge=1, description="How many items (at most HYTREC_MAX_K).")
    offset: Count = Field(
        0, ge=0, description="Skip this many of the best survivors (next page; at most HYTREC_MAX_K)."
    )
    exclude: list[ItemId] = Field(default_factory=list, description="Item ids never to return (e.g. on the page).")
    categories: list[str] = Field(default_factory=list, description="Only items of any of these categories.")
    exclude_seen: StrictBool = Field(True, description="Drop the items of the last K events and the never-again set.")
    at: Timestamp | None = Field(None, description="Request time (default: now).")


class BatchEntry(FilterBody):
    user_id: str = Field(max_length=512, description="Checked per entry: a bad id fails only its own entry.")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[BatchEntry] = Field(min_length=1, description="At most HYTREC_MAX_BATCH_USERS entries.")


class EntryError(BaseModel):
    status: int
    type: str
    detail: str


class BatchResult(BaseModel):
    user_id: str
    recommendations: Recommendations | None = None
    error: EntryError | None = None


class BatchAnswer(BaseModel):
    model_version: str
    results: list[BatchResult] = Field(description="One per request entry, in order.")


class RankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    candidates: list[ItemId] = Field(min_length=1, description="Items to order (at most HYTREC_MAX_CANDIDATES).")
    exclude: list[ItemId] = Field(default_factory=list)
    categories: list[str] = Field(default_factory=list)
    exclude_seen: StrictBool = Field(False, description="Off by default here: the caller chose the candidates.")
    at: Timestamp | None = None


class Ranked(BaseModel):
    """The known, visible candidates by score; the others listed apart."""

    user_id: str
    items: list[ScoredItem]
    unknown: list[str] = Field(description="Candidates the model does not know.")
    hidden: list[str] = Field(description="Candidates hidden in the catalogue.")
    filtered: list[str] = Field(description="Candidates removed by exclude, categories or exclude_seen.")
    model_version: str
    had_state: bool
    fallback: Literal[False, "popularity"]
    request_time: float


class SessionEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: ItemId
    ts: Timestamp
    event_type: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,32}$")] | None = None


class SessionRequest(FilterBody):
    events: list[SessionEvent] = Field(description="The visit's events in order (at most HYTREC_MAX_SESSION_EVENTS).")


class SessionRecommendations(Served):
    items: list[ScoredItem]
    history_length: int = Field(description="Events of the visit that updated the session state.")
    fallback: Literal[False, "popularity"]
    request_time: float


class SimilarItems(Served):
    item_id: str
    items: list[ScoredItem] = Field(description="Nearest items by cosine of the item embeddings, the item excluded.")


class HiddenFlag(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: bool


class HideBulk(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_ids: list[ItemId] = Field(min_length=1, description="At most HYTREC_MAX_HIDE_ITEMS ids.")
    hidden: bool


class HideResult(BaseModel):
    changed: list[str] = Field(description="Known items now carrying the flag asked for.")
    unknown: list[str] = Field(description="Ids the served model does not know (not flagged).")
    hidden_version: int = Field(description="The hidden set's change counter after the write.")
