"""Turning a stored blob into a model state, in the torch thread, with one error for a blob that does not decode.

The store hands back bytes; what they mean is the model's codec. A blob that fails to decode (truncated, bit
flips, another layout) is counted and raised as the store's ``CorruptStateError``, so the ingest and the
recommendation paths treat it alike: never served, never overwritten by accident.
"""

from __future__ import annotations

from hytrec.model.serving import ServingModel
from hytrec.model.state import StateBatch, StateCodecError
from hytrec.state_store import CorruptStateError, Snapshot
from hytrec.state_store import metrics as store_metrics


def decode_snapshot(model: ServingModel, snap: Snapshot) -> StateBatch | None:
    """The user's state (None for a user without one); ``CorruptStateError`` for a malformed hash or blob."""
    blob = snap.checked_blob()
    if blob is None:
        return None
    try:
        return model.decode(blob)
    except StateCodecError as exc:
        store_metrics.CORRUPT_VALUES.inc()
        raise CorruptStateError(snap.user_id, snap.model_version, f"{type(exc).__name__}: {exc}") from exc
