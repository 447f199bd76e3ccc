"""Per-user state in Redis: opaque state blobs, atomic optimistic updates, batched, cluster-ready.

The store knows bytes, keys, versions and concurrency; the state codec (``hytrec.model.state``) is handed in
by the caller. See docs/state_store.md for the key layout and the update protocol.
"""

from hytrec.state_store.errors import ConflictError, CorruptStateError, StoreError, StoreUnavailable
from hytrec.state_store.keys import KeySpace, check_user_id
from hytrec.state_store.settings import StoreSettings
from hytrec.state_store.store import Commit, Compute, Snapshot, StateStore, Write, open_store

__all__ = [
    "Commit",
    "Compute",
    "ConflictError",
    "CorruptStateError",
    "KeySpace",
    "Snapshot",
    "StateStore",
    "StoreError",
    "StoreSettings",
    "StoreUnavailable",
    "Write",
    "check_user_id",
    "open_store",
]
