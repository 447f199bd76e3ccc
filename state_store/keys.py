"""Redis key layout: one Cluster hash tag per user, namespaced by key prefix and model version.

``<prefix>:<model_version>:{u:<user_id>}:s``  hash  blob, ver, n, lts, ts (the user's state and metadata)
``<prefix>:<model_version>:{u:<user_id>}:d``  zset  recent event ids and write tokens (score = version)
``<prefix>:{u:<user_id>}:v``                  set   model versions that hold state for the user (erasure)
``<prefix>:{u:<user_id>}:n``                  zset  the user's "never again" items (score = event ts), bounded
``<prefix>:erased:{<slot tag>}``             hash  user id -> entry id of the user's erasure, for the users of one
                                              slot (the tag hashes to that slot; no key names the user)
``<prefix>:{catalogue}:hidden``               set   item ids hidden from every answer (any model version)
``<prefix>:{catalogue}:hidden:ver``           int   bumped by every change of the hidden set (workers poll it)

The hash tag ``{u:<user_id>}`` puts every key of a user in one slot, so the per-user compare-and-set
script may touch them all on a Redis Cluster. See docs/state_store.md.
"""

from __future__ import annotations

import binascii
import re
from functools import lru_cache

_USER_FORBIDDEN = re.compile(r"[{}\s]")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_USER_ID_LEN = 512


def check_user_id(user_id: str) -> str:
    """Return ``user_id`` if it can be embedded in a key, else raise ``ValueError``."""
    if not isinstance(user_id, str) or not user_id:
        raise ValueError(f"user id must be a non-empty string, got {user_id!r}")
    if len(user_id) > MAX_USER_ID_LEN or _USER_FORBIDDEN.search(user_id):
        raise ValueError(f"user id {user_id!r} is too long or holds '{{', '}}' or whitespace")
    return user_id


def check_name(name: str, what: str) -> str:
    """Validate a model version or key prefix (``[A-Za-z0-9_.-]+``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} must match [A-Za-z0-9_.-]+, got {name!r}")
    return name


@lru_cache(maxsize=1)
def _slot_tags() -> tuple[str, ...]:
    """For each of the 16384 Cluster slots, a short tag hashing to it (built once, ~0.1 s)."""
    tags: dict[int, str] = {}
    k = 0
    while len(tags) < 16384:
        tag = f"t{k}"
        tags.setdefault(binascii.crc_hqx(tag.encode(), 0) % 16384, tag)
        k += 1
    return tuple(tags[s] for s in range(16384))


def tombstone_key(prefix: str, user_id: str) -> str:
    """The hash holding the user's erasure position (field: the user id), in the user's hash slot so the
    compare-and-set can read it on a cluster too; its name carries a slot tag, not the user id, so an erasure
    leaves no key named after the user."""
    slot = binascii.crc_hqx(f"u:{check_user_id(user_id)}".encode(), 0) % 16384
    return f"{check_name(prefix, 'key prefix')}:erased:{{{_slot_tags()[slot]}}}"


class KeySpace:
    """Builds and parses the keys of one (prefix, model version) namespace."""

    def __init__(self, prefix: str, model_version: str) -> None:
        self.prefix = check_name(prefix, "key prefix")
        self.model_version = check_name(model_version, "model version")
        self._head = f"{self.prefix}:{self.model_version}:{{u:"

    def state(self, user_id: str) -> str:
        """Key of the user's state hash."""
        return f"{self._head}{check_user_id(user_id)}}}:s"

    def dedup(self, user_id: str) -> str:
        """Key of the user's bounded set of applied event ids."""
        return f"{self._head}{check_user_id(user_id)}}}:d"

    def versions(self, user_id: str) -> str:
        """Key of the user's set of model versions holding state (shared by every version's namespace)."""
        return f"{self.prefix}:{{u:{check_user_id(user_id)}}}:v"

    def tombstone(self, user_id: str) -> str:
        """Key of the user's erasure position, read inside the compare-and-set (streams/erasure.py)."""
        return tombstone_key(self.prefix, user_id)

    def lock(self, user_id: str) -> str:
        """Key of the user's contention lock (a writer that lost a compare-and-set race goes next; short-lived)."""
        return f"{self._head}{check_user_id(user_id)}}}:l"

    def never(self, user_id: str) -> str:
        """Key of the user's bounded "never again" item set (item ids: shared by every model version)."""
        return f"{self.prefix}:{{u:{check_user_id(user_id)}}}:n"

    @property
    def hidden(self) -> str:
        """Key of the set of hidden item ids (one hash tag with its version counter)."""
        return f"{self.prefix}:{{catalogue}}:hidden"

    @property
    def hidden_version(self) -> str:
        return f"{self.prefix}:{{catalogue}}:hidden:ver"

    def keys(self, user_id: str) -> tuple[str, str]:
        """The keys held for the user under this model version."""
        return self.state(user_id), self.dedup(user_id)

    def of_version(self, model_version: str) -> KeySpace:
        """The same prefix, another model version."""
        return KeySpace(self.prefix, model_version)

    @property
    def state_pattern(self) -> str:
        """SCAN pattern matching every state hash of this namespace."""
        return f"{self._head}*}}:s"

    def user_of(self, key: str | bytes) -> str | None:
        """User id of a state key of this namespace, else None."""
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        if key.startswith(self._head) and key.endswith("}:s"):
            user = key[len(self._head) : -3]
            if user and not _USER_FORBIDDEN.search(user):
                return user
        return None
