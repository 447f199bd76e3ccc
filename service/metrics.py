"""Prometheus metrics of the service (names ``hytrec_*``; the store adds ``hytrec_store_*``).

Multiprocess-safe: when ``PROMETHEUS_MULTIPROC_DIR`` is set before the workers start (``hytrec serve
--workers N`` does it), every worker writes its values there and ``/metrics`` aggregates them.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate

MS_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

REQUEST_SECONDS = Histogram(
    "hytrec_http_request_seconds",
    "Latency of HTTP requests, by route template, method and status.",
    ["route", "method", "status"],
    buckets=MS_BUCKETS,
)
EVENTS = Counter(
    "hytrec_events_total",
    "Events received, by outcome: applied, duplicate (skipped), unknown_item and out_of_order (both also applied), "
    "rejected (in a batch refused as a whole), counted_only (a type configured in HYTREC_COUNT_ONLY_TYPES).",
    ["outcome"],
)
EVENT_BATCH_SECONDS = Histogram(
    "hytrec_event_batch_seconds", "Time to apply one POST /v1/events batch.", buckets=MS_BUCKETS
)
CAS_ATTEMPTS = Histogram(
    "hytrec_cas_attempts",
    "Compare-and-set attempts per user write (1 = no retry).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16),
)
MICROBATCH_SIZE = Histogram(
    "hytrec_microbatch_size",
    "Requests served by one batch, by path: recommend (one Redis read, one catalogue product) or events (one "
    "read-compute-write of every user of the coalesced posts).",
    ["path"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
MICROBATCH_WAIT = Histogram(
    "hytrec_microbatch_queue_wait_seconds",
    "Time a request waited in its batcher's queue.",
    ["path"],
    buckets=MS_BUCKETS,
)
LOOP_LAG = Histogram(
    "hytrec_event_loop_lag_seconds",
    "How late the event loop ran a callback that was due (sampled every 10 ms): the wait of work queued for it.",
    buckets=MS_BUCKETS,
)
MICROBATCH_COMPUTE = Histogram(
    "hytrec_microbatch_compute_seconds",
    "Time to serve one batch (Redis round trips and torch), by path.",
    ["path"],
    buckets=MS_BUCKETS,
)
SHED = Counter(
    "hytrec_shed_total",
    "Requests answered 503 overloaded without being served, by path and reason: queue_full (the batcher's bounded "
    "queue), queue_delay (requests waited over HYTREC_MAX_QUEUE_DELAY_MS for HYTREC_QUEUE_STANDING_MS), deadline "
    "(HYTREC_REQUEST_TIMEOUT_MS passed while queued or running), in_flight (over HYTREC_MAX_IN_FLIGHT requests at "
    "once), loop_lag (the event loop over HYTREC_MAX_LOOP_LAG_MS behind), stalled (path store: a Redis round "
    "trip waited past HYTREC_STORE_STALL_MS, answered 503 unavailable).",
    ["path", "reason"],
)
RECOMMENDATIONS = Counter(
    "hytrec_recommendations_total",
    "Recommendation answers, by source: model, or popularity for users without state (no_state) or corrupt state.",
    ["source"],
)
PRODUCT_REQUESTS = Counter(
    "hytrec_product_requests_total",
    "Answers of the product routes, by use case (rank, similar, session, batch, hide) and outcome (ok, or the "
    "problem type of a per-user error inside a batch).",
    ["use_case", "outcome"],
)
FILTERED_OUT = Histogram(
    "hytrec_filtered_out_items",
    "Catalogue items a request's mask removed (seen, never-again, exclude, categories, hidden) before the top-k.",
    buckets=(0, 1, 10, 100, 1000, 10_000, 100_000),
)
HIDDEN_ITEMS = Gauge(
    "hytrec_hidden_items",
    "Items of the served catalogue hidden right now (this worker's view).",
    multiprocess_mode="max",
)
WRITE_VERSIONS_UNCONSUMED = Gauge(
    "hytrec_write_versions_unconsumed",
    "Write versions besides the served one that no consumer reported writing within 10 poll periods (this "
    "worker's view). While posted events are logged, only a consumer writes them: above 0, they miss events.",
    multiprocess_mode="max",
)
MODEL_INFO = Gauge(
    "hytrec_model_info",
    "The served model (value 1; labels carry the version).",
    ["version", "model_type", "n_items"],
    multiprocess_mode="max",
)

RATE_LIMITED = Counter(
    "hytrec_rate_limited_total",
    "Requests answered 429 rate-limited, by key_id (a hash of the API key, never the key; anonymous while the "
    "routes are open).",
    ["key_id"],
)
RATE_LIMIT_ERRORS = Counter(
    "hytrec_rate_limit_errors_total",
    "Rate-limit checks that Redis did not answer in time, by error; the request was let through (fail open).",
    ["error"],
)
# Online evaluation (service/online_eval.py): sampled answers and what their users did next.
IMPRESSIONS = Counter(
    "hytrec_online_impressions_total",
    "Impressions of sampled users, by model version, source and outcome: written (latest-impression key and "
    "export log), dropped (writer queue full) or failed (Redis error).",
    ["version", "source", "outcome"],
)
ONLINE_EVENTS = Counter(
    "hytrec_online_events_total",
    "Applied events of sampled users, by outcome: attributed (within the window after the user's latest "
    "impression) or no_impression (none held, or the event is outside its window).",
    ["outcome"],
)
ONLINE_ATTRIBUTED = Counter(
    "hytrec_online_attributed_total",
    "Attributed events, by the impression's model version and source (the denominator of online HR and MRR).",
    ["version", "source"],
)
ONLINE_HITS = Counter(
    "hytrec_online_hits_total",
    "Attributed events whose item was in the impression's top k (k = 1, 5, 10): online HR@k = hits / attributed.",
    ["version", "source", "k"],
)
ONLINE_RECIPROCAL_RANK = Counter(
    "hytrec_online_reciprocal_rank_total",
    "Sum of 1/rank of attributed events whose item was in the top 10: online MRR@10 = this / attributed.",
    ["version", "source"],
)
ONLINE_COVERAGE = Gauge(
    "hytrec_online_coverage_items",
    "Distinct items served to sampled users per hour of request time (Redis HyperLogLog, ~0.8 % standard "
    "error), for the newest hour this worker served (current) and the one before (previous).",
    ["version", "source", "hour"],
    multiprocess_mode="max",
)
HIT_KS = (1, 5, 10)

# Every label set a dashboard or alert query names exists from the start (at 0), so error and shed rates are
# series before the first error (deploy/ is generated by hytrec/ops.py; tests/test_prometheus.py checks it).
for _outcome in ("applied", "duplicate", "unknown_item", "out_of_order", "rejected", "counted_only"):
    EVENTS.labels(_outcome)
for _path, _reason in (
    ("admission", "in_flight"),
    ("admission", "loop_lag"),
    ("recommend", "queue_full"),
    ("recommend", "queue_delay"),
    ("recommend", "deadline"),
    ("events", "queue_full"),
    ("events", "queue_delay"),
    ("events", "deadline"),
    ("users", "deadline"),
    ("store", "stalled"),
):
    SHED.labels(_path, _reason)
for _use in ("rank", "similar", "session", "batch", "hide"):
    PRODUCT_REQUESTS.labels(_use, "ok")
for _source in ("model", "no_state", "corrupt_state"):
    RECOMMENDATIONS.labels(_source)


def render() -> tuple[bytes, str]:
    """The exposition text of every metric (aggregated over workers in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return _generate(registry), CONTENT_TYPE_LATEST
    return _generate(REGISTRY), CONTENT_TYPE_LATEST
