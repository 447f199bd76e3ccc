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
    "rejected (in a batch refused as a whole).",
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
MICROBATCH_COMPUTE = Histogram(
    "hytrec_microbatch_compute_seconds",
    "Time to serve one batch (Redis round trips and torch), by path.",
    ["path"],
    buckets=MS_BUCKETS,
)
SHED = Counter(
    "hytrec_shed_total",
    "Requests answered 503 overloaded without being served, by path and reason: queue_full (the batcher's bounded "
    "queue), deadline (HYTREC_REQUEST_TIMEOUT_MS passed while queued or running), in_flight (over "
    "HYTREC_MAX_IN_FLIGHT requests at once).",
    ["path", "reason"],
)
RECOMMENDATIONS = Counter(
    "hytrec_recommendations_total",
    "Recommendation answers, by source: model, or popularity for users without state (no_state) or corrupt state.",
    ["source"],
)
MODEL_INFO = Gauge(
    "hytrec_model_info",
    "The served model (value 1; labels carry the version).",
    ["version", "model_type", "n_items"],
    multiprocess_mode="max",
)


def render() -> tuple[bytes, str]:
    """The exposition text of every metric (aggregated over workers in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return _generate(registry), CONTENT_TYPE_LATEST
    return _generate(REGISTRY), CONTENT_TYPE_LATEST
