"""Settings of the inference service: one pydantic-settings class, environment variables prefixed ``HYTREC_``.

It extends the state store's settings (Redis URL, key prefix, pool, retries...), so one environment configures
both. The tables in docs/service.md and docs/state_store.md are generated from these classes (``hytrec docs``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from hytrec.service.auth import AccessControl, parse_keys
from hytrec.state_store.keys import check_name
from hytrec.state_store.settings import StoreSettings


def demo_model() -> Path:
    """The demo checkpoint shipped inside the package, so `hytrec serve` starts from any directory."""
    return Path(str(files("hytrec.demo")))


class Settings(StoreSettings):
    """Everything ``hytrec serve`` reads from the environment (see docs/service.md for the table)."""

    # Errors never echo their input: it can be a key.
    model_config = SettingsConfigDict(
        env_prefix="HYTREC_", extra="ignore", protected_namespaces=(), hide_input_in_errors=True
    )

    model: Path = Field(
        default_factory=demo_model,
        description="Checkpoint directory served (a directory written by `hytrec train`).",
        json_schema_extra={"shown_default": "the bundled demo checkpoint"},
    )
    model_root: Path | None = Field(
        None,
        description="Directory of the checkpoints a running service may switch to or dual-write (version V is "
        "loaded from `<root>/V`; `hytrec versions add` copies a checkpoint there; docs/lifecycle.md), and the only "
        "tree a model is ever loaded from at run time (a path resolving outside it, symlinks and '..' followed, is "
        "refused); unset: no version switch and no loading by path.",
        json_schema_extra={"shown_default": "none (no version switch)"},
    )
    host: str = Field("127.0.0.1", description="Interface `hytrec serve` binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port `hytrec serve` binds.")
    workers: int = Field(1, ge=1, description="Uvicorn worker processes of `hytrec serve`.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Uvicorn and service log level."
    )
    api_keys: SecretStr = Field(
        SecretStr(""),
        description="Comma-separated API keys of the read and write routes, each `key` (read and write) or "
        "`key:read`, `key:write`, `key:read+write`; when set, every /v1 route needs a bearer key with its scope.",
        json_schema_extra={"shown_default": "empty (routes open)"},
    )
    admin_keys: SecretStr = Field(
        SecretStr(""),
        description="Comma-separated admin keys (every scope); the /v1/admin routes answer 404 while none is set.",
        json_schema_extra={"shown_default": "empty (admin routes off)"},
    )
    rate_limit_per_s: float | None = Field(
        None,
        gt=0,
        description="Requests per second each API key may make to the /v1 routes, shared by every worker and "
        "replica (in Redis); past it 429 rate-limited with Retry-After. Requests without a key, while the routes "
        "are open, share one budget.",
        json_schema_extra={"shown_default": "none (no limit)"},
    )
    rate_limit_burst: int = Field(
        20,
        ge=1,
        description="Requests a key may make at once before HYTREC_RATE_LIMIT_PER_S paces it (the bucket's size).",
    )
    rate_limit_timeout_ms: float = Field(
        50.0,
        gt=0,
        description="How long a request waits for its rate-limit check; past it, or with Redis down, the request "
        "is let through (fail open, counted in hytrec_rate_limit_errors_total) and the worker skips the checks of "
        "the next second.",
    )
    strict_items: bool = Field(False, description="Reject a batch holding an item id the model does not know.")
    max_batch_events: int = Field(1000, ge=1, le=100_000, description="Most events in one POST /v1/events.")
    max_body_bytes: int = Field(2_097_152, ge=1024, description="Largest request body accepted (413 beyond).")
    max_k: int = Field(1000, ge=1, description="Largest k a recommendation request may ask for.")
    microbatch_max_size: int = Field(64, ge=1, description="Most recommendation requests scored in one product.")
    microbatch_max_wait_ms: float = Field(
        0.0, ge=0, description="How long a recommendation batch waits for company (0: take what is queued)."
    )
    events_batch_max_size: int = Field(
        64, ge=1, description="Most event posts coalesced into one read-compute-write of their users."
    )
    events_batch_max_wait_ms: float = Field(
        0.0, ge=0, description="How long an events batch waits for company (0: take what is queued)."
    )
    max_queue: int = Field(
        512, ge=1, description="Requests each batcher may hold queued; past it a request is answered 503 overloaded."
    )
    max_queue_delay_ms: float = Field(
        25.0,
        gt=0,
        description="The queueing-delay target: shed a request (503 overloaded) once requests have waited longer "
        "than this for HYTREC_QUEUE_STANDING_MS (the queue is standing, not draining), so answered requests wait "
        "about this much past capacity.",
    )
    queue_standing_ms: float = Field(
        100.0,
        gt=0,
        description="How long the queue must stay over HYTREC_MAX_QUEUE_DELAY_MS before requests are shed (CoDel's "
        "interval): a burst that drains within it (one long batch, a collector pause) sheds nothing.",
    )
    queue_memory_intervals: int = Field(
        10,
        ge=0,
        description="For this many HYTREC_QUEUE_STANDING_MS intervals after a request was shed for queueing "
        "delay, a queue over HYTREC_MAX_QUEUE_DELAY_MS is shed at once, without a new interval (CoDel's memory): "
        "under sustained overload each drained queue would otherwise admit a whole interval's arrivals, which "
        "then wait several intervals. 0 grants every episode its interval.",
    )
    max_loop_lag_ms: float | None = Field(
        None,
        gt=0,
        description="Shed new /v1 requests that do work (503 overloaded, before their body is read) once the event "
        "loop has run more than this behind for HYTREC_QUEUE_STANDING_MS. Off by default: at 50 ms it shed the first "
        "requests of a cold worker and did not lower the 503 latency under overload (docs/reliability.md).",
        json_schema_extra={"shown_default": "none (off)"},
    )
    max_in_flight: int = Field(
        512, ge=1, description="Requests a worker serves at once; past it a request is answered 503 overloaded at once."
    )
    request_timeout_ms: float = Field(
        500.0,
        gt=0,
        description="Deadline of a /v1 request, covering its queueing, Redis round trips (retries included) and "
        "torch work; past it the request is answered 503 overloaded. A POST /v1/events gets "
        "HYTREC_EVENTS_TIMEOUT_PER_EVENT_MS more per event it carries.",
    )
    events_timeout_per_event_ms: float = Field(
        0.5,
        ge=0,
        description="What each event of a POST /v1/events adds to its deadline (HYTREC_REQUEST_TIMEOUT_MS): a "
        "post's work grows with its events, so the largest valid batch (1,000 events: 1 s by default) is not "
        "turned into a 503 by a deadline sized for a recommendation.",
    )
    store_stall_ms: float = Field(
        250.0,
        gt=0,
        description="Once a Redis round trip has been waiting this long, the store counts as stalled: requests "
        "that need it are answered 503 unavailable with Retry-After at admission (and /readyz 503) until it "
        "answers, instead of each waiting out its deadline.",
    )
    shutdown_timeout_s: float = Field(
        10.0,
        gt=0,
        description="On SIGTERM: stop accepting at once, then give requests in flight this long to finish before "
        "the worker exits (each is also bounded by HYTREC_REQUEST_TIMEOUT_MS).",
    )
    access_log: bool = Field(False, description="Uvicorn's access log line per request (off: the metrics count them).")
    access_log_sample: float = Field(
        1.0, gt=0, le=1, description="Fraction of access-log lines kept when the access log is on (warnings: all)."
    )
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector base URL (e.g. http://collector:4318): traces FastAPI, Redis and each torch "
        "batch (needs the otel extra). Unset: tracing off, unless OTEL_EXPORTER_OTLP_ENDPOINT is set.",
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="Log lines as JSON objects (with the request id) or as plain text (development)."
    )
    torch_threads: int = Field(1, ge=1, description="Intra-op threads of the single torch worker thread.")
    state_dtype: Literal["float32", "float16", "bfloat16"] | None = Field(
        None, description="Storage dtype of new states (default: the checkpoint's)."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of 503 answers.")
    slo_p99_ms: float = Field(
        50,
        gt=0,
        description="Objective for the p99 latency of each /v1 route; `hytrec ops render` writes it into the alert "
        "rules of deploy/ (the service itself does not read it).",
    )
    stream_name: str = Field(
        "events", pattern=r"^[A-Za-z0-9_.-]+$", description="Event stream name (`hytrec consume`, docs/streams.md)."
    )
    stream_partitions: int = Field(
        1,
        ge=1,
        le=4096,
        description="Partitions of the event stream (crc32(user id) mod N); producer and consumer agree.",
    )
    stream_group: str = Field("hytrec", description="Consumer group of `hytrec consume`.")
    stream_batch_size: int = Field(1000, ge=1, description="Most entries a consumer reads from a partition at once.")
    stream_block_ms: int = Field(1000, ge=1, description="How long a consumer waits for new entries before polling.")
    stream_lease_ms: int = Field(
        10_000, ge=100, description="Partition lease; a dead consumer's partitions are taken over after it."
    )
    stream_maxlen: int = Field(
        1_000_000, ge=0, description="Producer's approximate MAXLEN per partition (0: no trimming): the retention."
    )
    stream_dead_maxlen: int = Field(100_000, ge=0, description="Approximate MAXLEN of the dead-letter stream.")
    stream_read_ahead: bool = Field(
        True, description="Read a partition's next batch while the current one applies (`hytrec consume`)."
    )
    stream_retry_cap_ms: float = Field(
        5000.0, gt=0, description="Cap of the backoff before a consumer retries a batch that failed (not acknowledged)."
    )
    consume_metrics_port: int = Field(
        9464, ge=0, le=65535, description="Port of `hytrec consume`'s own /metrics (0: not exposed)."
    )
    write_versions: str = Field(
        "",
        description="Comma-separated model versions written besides the one served or consumed with (dual write "
        "while a new version is prepared), each loaded from HYTREC_MODEL_ROOT: by `hytrec consume`, and by "
        "`POST /v1/events` only while HYTREC_LOG_POSTED_EVENTS is off (else the consumer writes them from the log).",
    )
    log_posted_events: bool = Field(
        True,
        description="Append every event that `POST /v1/events` applies to its user's stream partition (marked "
        "`origin=rest` and the served version) in the same compare-and-set as the state, so the event log (archive, "
        "export, backfill) holds it; a post then writes the served version only, and `hytrec consume` applies the "
        "entry to every other version it writes, with the entry as the mark (exact under a racing backfill).",
    )
    versions_poll_s: float = Field(
        2.0, gt=0, description="How often a worker re-reads the desired versions, besides their pub/sub announcement."
    )

    def deadline_ms(self, events: int = 0) -> float:
        """The deadline of a request carrying ``events`` events (0: every route but POST /v1/events)."""
        return self.request_timeout_ms + events * self.events_timeout_per_event_ms

    @field_validator("write_versions")
    @classmethod
    def _versions_named(cls, v: str) -> str:
        for name in (x.strip() for x in v.split(",")):
            if name:
                check_name(name, "write version")
        return v

    def write_version_list(self) -> list[str]:
        """HYTREC_WRITE_VERSIONS as a list, in order, without repeats."""
        return list(dict.fromkeys(x.strip() for x in self.write_versions.split(",") if x.strip()))

    # Online evaluation (service/online_eval.py, docs/online_eval.md).
    impression_sample: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Share of users whose answers are logged as impressions and whose next events are attributed "
        "(by a hash of the user id, so a user is in or out consistently; 0 turns online evaluation off).",
    )
    impression_k: int = Field(10, ge=1, le=100, description="Most top-K ids recorded per impression.")
    attribution_window_s: float = Field(
        1800.0,
        gt=0,
        description="An event counts for the user's latest impression if it happened at most this long after it "
        "(event time minus request time); also the TTL of the latest-impression key.",
    )
    impression_log_max: int = Field(
        100_000,
        ge=0,
        description="Most impressions the export stream holds (trimmed by whole writes; 0: no export log).",
    )
    impression_flush_max: int = Field(
        256, ge=1, description="Most impressions one background write carries (one export-stream entry)."
    )
    impression_flush_ms: float = Field(
        100.0,
        ge=0,
        description="How long the impression writer lets answers gather before one pipeline writes them (0: at once); "
        "another worker sees an impression this much later at most.",
    )
    impression_buffer: int = Field(
        10_000, ge=1, description="Impressions queued for the background writer at most; past it they are dropped."
    )
    online_alert_hr10_drop: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="HyTRecOnlineHitRateDrop fires when online HR@10 is this fraction below the same hour "
        "yesterday; `hytrec ops render` writes it into the rules (the service does not read it).",
    )
    online_alert_min_events: int = Field(
        200,
        ge=1,
        description="Attributed events an hour, today and yesterday, before HyTRecOnlineHitRateDrop may fire "
        "(rendered into the rules).",
    )

    items_file: Path | None = Field(
        None,
        description="Item metadata read at start-up (TSV `item_id, title, genres` with `|` between genres, or "
        "MovieLens `movies.dat` lines `id::title::genres`); ids go through the model's vocabulary.",
        json_schema_extra={"shown_default": "`catalogue.tsv` in the checkpoint directory if present, else none"},
    )
    catalogue_poll_ms: float = Field(
        200.0, gt=0, le=10_000, description="How often a worker polls the hidden-items counter in Redis."
    )
    max_filter_items: int = Field(
        1000, ge=1, description="Most ids in an `exclude` list and most names in a `categories` list."
    )
    max_candidates: int = Field(1000, ge=1, description="Most candidate items in one POST /v1/users/{id}/rank.")
    max_session_events: int = Field(
        500, ge=1, description="Most events of a visit in one POST /v1/sessions/recommendations."
    )
    max_batch_users: int = Field(100, ge=1, description="Most users in one POST /v1/recommendations:batch.")
    max_hide_items: int = Field(10_000, ge=1, description="Most item ids in one PUT /v1/admin/items.")
    never_again_types: str = Field(
        "",
        description="Comma-separated event types whose items enter the user's never-again set (never recommended "
        "to them again while `exclude_seen` is on), e.g. `purchase`.",
        json_schema_extra={"shown_default": "empty (no never-again set)"},
    )
    never_again_max: int = Field(1000, ge=1, description="Most items kept in a user's never-again set (newest kept).")
    count_only_types: str = Field(
        "",
        description="Comma-separated event types that are only counted: they do not update the model state "
        "(every other type does, an event without a type too).",
        json_schema_extra={"shown_default": "empty (every type updates the state)"},
    )

    @property
    def never_again(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.never_again_types.split(",") if t.strip())

    @property
    def count_only(self) -> frozenset[str]:
        return frozenset(t.strip() for t in self.count_only_types.split(",") if t.strip())

    def catalogue_file(self) -> Path | None:
        """The items file to read: the setting, else ``catalogue.tsv`` beside the checkpoint when present."""
        if self.items_file is not None:
            return self.items_file
        beside = self.model / "catalogue.tsv"
        return beside if beside.is_file() else None

    @field_validator("api_keys")
    @classmethod
    def _scopes_parse(cls, v: SecretStr) -> SecretStr:
        parse_keys(v.get_secret_value())  # a typo in a scope fails at start-up, not as a 403 in production
        return v

    def access_control(self) -> AccessControl:
        """The access model these settings configure (see service/auth.py)."""
        return AccessControl.from_specs(self.api_keys.get_secret_value(), self.admin_keys.get_secret_value())
