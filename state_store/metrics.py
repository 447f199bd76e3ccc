"""Prometheus metrics of the state store (default registry, names prefixed ``hytrec_store_``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

OP_SECONDS = Histogram(
    "hytrec_store_redis_op_seconds",
    "Latency of one state-store round trip to Redis (a whole pipelined batch).",
    ["op"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_USERS = Histogram(
    "hytrec_store_batch_users",
    "Users per pipelined state-store round trip.",
    ["op"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
REDIS_ERRORS = Counter("hytrec_store_redis_errors_total", "Redis errors seen by the state store.", ["op", "kind"])
CAS_LOCKS = Counter(
    "hytrec_store_cas_locks_total",
    "Per-user contention locks taken by a compare-and-set retry (the retry then goes before the other writers).",
)
CAS_RETRIES = Counter(
    "hytrec_store_cas_retries_total", "Per-user compare-and-set attempts that lost a race and were retried."
)
CAS_CONFLICTS_EXHAUSTED = Counter(
    "hytrec_store_cas_conflicts_exhausted_total", "Users whose compare-and-set still failed after all retries."
)
CAS_DUPLICATES = Counter(
    "hytrec_store_cas_duplicates_total",
    "Writes refused by the compare-and-set script because an event id was already applied.",
)
CAS_REPLAYED = Counter(
    "hytrec_store_cas_replayed_total",
    "Writes found already committed when a connection retry re-sent them (counted once, applied once).",
)
CAS_ERASED = Counter(
    "hytrec_store_cas_erased_total",
    "Writes refused by the compare-and-set script because their stream mark is at or below the user's erasure "
    "tombstone (a write racing a DELETE: nothing written).",
)
CORRUPT_VALUES = Counter("hytrec_store_corrupt_values_total", "Stored values that failed to decode or were malformed.")

# The error counter exists from the start (at 0) for each round trip and the usual failure kinds, so an alert on
# its rate has a series before the first error.
for _op in ("read", "cas", "delete", "scan", "ping"):
    for _kind in ("ConnectionError", "TimeoutError"):
        REDIS_ERRORS.labels(_op, _kind)
