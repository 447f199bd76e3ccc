"""Erasure tombstones: what ``DELETE /v1/users/{id}`` leaves behind so that no rebuild brings the user back.

A tombstone is one field of the hash ``<prefix>:tombstones``: ``<user id>`` = ``"<entry id> <deleted ms>"``.
The entry id is the last id generated in the user's stream partition when the user was erased, so every entry
of that user at or below it is an *earlier* event: the consumer acknowledges it without applying it, and the
archive, ``hytrec export`` and ``hytrec backfill --from-stream`` leave it out. The position is also kept in the
erasure hash of the user's slot ``<prefix>:erased:{<slot tag>}`` (field: the user id), which the state's
compare-and-set reads: a write that would move the
user's mark to an entry at or below it is refused, so a batch read before the erasure and committed after it
never brings the user back. Entries produced after the
erasure have higher ids: they are a new history of the same id. Retention of the raw events: docs/lifecycle.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as rex

from hytrec.state_store import entry_key
from hytrec.state_store.keys import tombstone_key
from hytrec.streams.partition import StreamLayout


def stream_layout(settings: Any) -> StreamLayout:
    """The stream layout the settings configure (key prefix, stream name, partitions)."""
    return StreamLayout(settings.key_prefix, settings.stream_name, settings.stream_partitions)


def tombstones_key(prefix: str) -> str:
    """The hash of every erased user's tombstone."""
    return f"{prefix}:tombstones"


@dataclass(frozen=True, slots=True)
class Tombstone:
    """The stream position (in the user's partition) at or below which the user's entries are erased."""

    entry_id: str
    deleted_ms: int

    def covers(self, entry_id: str) -> bool:
        """Whether an entry of the user is at or below the erasure position (so it must never be applied)."""
        return entry_key(entry_id) <= entry_key(self.entry_id)

    def encode(self) -> str:
        return f"{self.entry_id} {self.deleted_ms}"

    @classmethod
    def parse(cls, raw: str | bytes) -> Tombstone:
        text = raw.decode() if isinstance(raw, bytes) else raw
        entry, _, ms = text.partition(" ")
        entry_key(entry)
        return cls(entry, int(ms or 0))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _last_id(info: Mapping[Any, Any]) -> str:
    return _s(info.get("last-generated-id") or info.get(b"last-generated-id") or "0-0")


async def write_tombstone(client: Any, layout: StreamLayout, user_id: str) -> Tombstone:
    """Record the erasure of ``user_id`` at the current end of its partition (async client). Call before the
    state is deleted, so a consumer that checks the tombstone after the delete already sees it."""
    part = layout.of_user(user_id)
    try:
        last = _last_id(await client.xinfo_stream(part.stream))
    except rex.ResponseError:  # no such stream yet: nothing of the user was ever produced
        last = "0-0"
    stone = Tombstone(last, int(time.time() * 1000))
    # The user's own copy of the position, in the user's hash slot: the state's compare-and-set refuses a write
    # whose stream mark is at or below it (a consumer batch racing this erasure), state_store/scripts.py.
    await client.hset(tombstone_key(layout.prefix, user_id), user_id, last)
    await client.hset(tombstones_key(layout.prefix), user_id, stone.encode())
    return stone


async def read_tombstones(client: Any, prefix: str, users: Sequence[str]) -> dict[str, Tombstone]:
    """The tombstones of ``users`` that have one (async client; one HMGET)."""
    if not users:
        return {}
    raw = await client.hmget(tombstones_key(prefix), list(users))
    return {u: Tombstone.parse(r) for u, r in zip(users, raw, strict=True) if r is not None}


def load_tombstones(client: Any, prefix: str) -> dict[str, Tombstone]:
    """Every tombstone (sync client, HSCAN in pages): what the archive, export and backfill filter with."""
    return {_s(u): Tombstone.parse(v) for u, v in client.hscan_iter(tombstones_key(prefix), count=1000)}


def erased(tombstones: Mapping[str, Tombstone], user_id: str, entry_id: str) -> bool:
    """Whether the entry ``entry_id`` of ``user_id`` is covered by the user's tombstone."""
    stone = tombstones.get(user_id)
    return stone is not None and stone.covers(entry_id)


def split_erased(tombstones: Mapping[str, Tombstone], rows: Iterable[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Indices of ``(user id, entry id)`` rows to keep and to drop as erased."""
    keep, drop = [], []
    for i, (user, entry) in enumerate(rows):
        (drop if erased(tombstones, user, entry) else keep).append(i)
    return keep, drop


__all__ = [
    "Tombstone",
    "erased",
    "load_tombstones",
    "read_tombstones",
    "split_erased",
    "stream_layout",
    "tombstones_key",
    "write_tombstone",
]
