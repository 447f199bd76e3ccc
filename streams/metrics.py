"""Prometheus metrics of ``hytrec consume`` (names ``hytrec_stream_*``), served on its own /metrics port.

The consumer is one process with its own registry (the default one); ``HYTREC_CONSUME_METRICS_PORT`` says
where it listens. The store's ``hytrec_store_*`` and the ingest path's ``hytrec_events_*`` metrics are on the
same page, since the consumer applies events through that code.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ENTRIES = Counter(
    "hytrec_stream_entries",
    "Stream entries handled, by outcome: applied, duplicate (at or below the user's mark, or a repeated "
    "event id), dead_letter, trimmed (pending, but trimmed off the stream before it could be read), erased (at or "
    "below the user's erasure tombstone).",
    ["outcome"],
)
BATCH_SIZE = Histogram(
    "hytrec_stream_batch_entries",
    "Entries per batch read from one partition.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
)
APPLY_SECONDS = Histogram(
    "hytrec_stream_apply_seconds",
    "From a batch read to its acknowledgement (validation, ingest, dead-lettering, XACK).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
BATCH_FAILURES = Counter(
    "hytrec_stream_batch_failures",
    "Batches that failed to commit and were retried with backoff (not acknowledged), by error type.",
    ["error"],
)
LEASES_HELD = Gauge("hytrec_stream_leases_held", "Partition leases this consumer holds.")
LEASE_EVENTS = Counter(
    "hytrec_stream_lease_events",
    "Lease changes: acquired, released (rebalance or shutdown), lost (expired or fenced while held).",
    ["event"],
)
LAG_SECONDS = Gauge(
    "hytrec_stream_lag_seconds",
    "Per owned partition: age of the newest entry minus age of the newest entry delivered (0: caught up).",
    ["partition"],
)
LAG_ENTRIES = Gauge(
    "hytrec_stream_lag_entries",
    "Per owned partition: entries not yet delivered to the group (Redis >= 7 reports it; -1 when unknown).",
    ["partition"],
)
PENDING = Gauge(
    "hytrec_stream_pending", "Per owned partition: entries delivered and not yet acknowledged.", ["partition"]
)
RETENTION_SECONDS = Gauge(
    "hytrec_stream_retention_seconds",
    "Per owned partition: time span the stream still holds (newest minus oldest entry); lag beyond it is lost.",
    ["partition"],
)
BEHIND_RETENTION = Gauge(
    "hytrec_stream_behind_retention",
    "Per owned partition: 1 when the oldest entry still held is newer than the last one delivered, so entries "
    "may have been trimmed before the group read them.",
    ["partition"],
)
