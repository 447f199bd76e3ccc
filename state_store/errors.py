"""Errors raised by the state store."""

from __future__ import annotations

from redis import exceptions as rex

# Redis failures that mean "not reachable or not serving right now": answered 503 + Retry-After, never 500.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    rex.ConnectionError,
    rex.TimeoutError,
    rex.BusyLoadingError,
    rex.ClusterDownError,
    rex.ClusterError,
    rex.MasterDownError,
    rex.TryAgainError,
    rex.ReadOnlyError,
    rex.SlotNotCoveredError,
    OSError,
)


class StoreError(Exception):
    """Base class of the state store's errors."""


class StoreUnavailable(StoreError):
    """Redis cannot be reached or is not serving (the service answers 503)."""


class StoreAuthError(StoreUnavailable):
    """Redis refused the credentials (wrong or missing password, unknown ACL user): a configuration error that
    retrying cannot mend, so a worker starting up reports it and stops trying (still 503 on a request)."""


class CorruptStateError(StoreError):
    """A stored value cannot be decoded; it is counted and never served."""

    def __init__(self, user_id: str, model_version: str, reason: str) -> None:
        super().__init__(f"corrupt state for user {user_id!r} (model {model_version}): {reason}")
        self.user_id = user_id
        self.model_version = model_version
        self.reason = reason


class ConflictError(StoreError):
    """Compare-and-set kept failing for some users after the configured retries.

    ``committed`` holds the users of the same call whose writes did land.
    """

    def __init__(self, user_ids: list[str], attempts: int, committed: dict | None = None) -> None:
        super().__init__(f"compare-and-set still conflicting after {attempts} attempts for users {user_ids}")
        self.user_ids = user_ids
        self.attempts = attempts
        self.committed = committed or {}


class FencedError(StoreError):
    """A stream consumer's write lost to one holding a newer lease of the partition (docs/streams.md)."""

    def __init__(self, user_id: str, mark_field: str) -> None:
        super().__init__(f"write of user {user_id!r} fenced: a newer owner of {mark_field} already wrote it")
        self.user_id = user_id
        self.mark_field = mark_field
