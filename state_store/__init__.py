"""Per-user state in Redis: opaque state blobs, atomic optimistic updates, batched, cluster-ready.

The store knows bytes, keys, versions and concurrency; what a blob means (the model's state codec) is the
caller's business: it decodes the blobs it reads and encodes the ones it writes. See docs/state_store.md for
the key layout and the update protocol.
"""

from hytrec.state_store.connect import open_store
from hytrec.state_store.errors import (
    ConflictError,
    CorruptStateError,
    FencedError,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
)
from hytrec.state_store.keys import KeySpace, check_user_id
from hytrec.state_store.settings import StoreSettings
from hytrec.state_store.store import Commit, Compute, Mark, Runner, Snapshot, StateStore, Write, entry_key

__all__ = [
    "Commit",
    "Compute",
    "ConflictError",
    "CorruptStateError",
    "FencedError",
    "KeySpace",
    "Mark",
    "Runner",
    "Snapshot",
    "StateStore",
    "StoreAuthError",
    "StoreError",
    "StoreSettings",
    "StoreUnavailable",
    "Write",
    "check_user_id",
    "entry_key",
    "open_store",
]
