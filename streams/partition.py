"""Partitions of an event stream: which partition a user's events go to, and the Redis keys of each partition.

A user's partition is ``crc32(utf-8 user id) mod N``: any producer, in any language, computes the same one.
Every key of a partition (its stream, lease and lease epoch) shares one Cluster hash tag, chosen so the N
partitions' slots are spread evenly over the 16384 slots, hence over the shards of a cluster (which split the
slots into equal ranges by default). The tag includes N: changing N starts new streams (docs/streams.md).

``<prefix>:stream:<name>:{<tag>}:e``      stream  the partition's entries
``<prefix>:stream:<name>:{<tag>}:lease``  string  "<consumer id> <epoch>" of the owner, with a TTL
``<prefix>:stream:<name>:{<tag>}:epoch``  string  lease counter, +1 at every acquisition (the fencing token)
``<prefix>:stream:<name>:dead``           stream  dead-lettered entries, with their reason
``<prefix>:stream:<name>:consumers``      zset    live consumers, score = expiry of their heartbeat (ms)
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from hytrec.state_store.keys import check_name


def partition_of(user_id: str, partitions: int) -> int:
    """The partition of a user's events: ``crc32(utf-8 user id) mod partitions``."""
    return zlib.crc32(user_id.encode()) % partitions


@lru_cache(maxsize=4096)
def _tag(name: str, partitions: int, p: int) -> str:
    """The first ``<name>.<N>.<p>.<k>`` whose slot falls in the p-th of N equal slot ranges."""
    lo = p * REDIS_CLUSTER_HASH_SLOTS // partitions
    hi = max(lo + 1, (p + 1) * REDIS_CLUSTER_HASH_SLOTS // partitions)
    for k in range(1_000_000):
        tag = f"{name}.{partitions}.{p}.{k}"
        if lo <= key_slot(tag.encode()) < hi:
            return tag
    raise RuntimeError(f"no hash tag for partition {p} of {partitions}")  # pragma: no cover - ~N tries expected


@dataclass(frozen=True)
class Partition:
    """The keys of one partition, and the state-hash field holding each user's mark for it."""

    index: int
    stream: str
    lease: str
    epoch: str
    mark_field: str


class StreamLayout:
    """Key names of one event stream of N partitions under a key prefix."""

    def __init__(self, prefix: str, name: str, partitions: int) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        self.prefix = check_name(prefix, "key prefix")
        self.name = check_name(name, "stream name")
        self.n = partitions
        base = f"{self.prefix}:stream:{self.name}"
        self.dead = f"{base}:dead"
        self.consumers = f"{base}:consumers"
        self.partitions = [
            Partition(p, f"{base}:{{{t}}}:e", f"{base}:{{{t}}}:lease", f"{base}:{{{t}}}:epoch", f"m:{t}")
            for p, t in ((p, _tag(self.name, partitions, p)) for p in range(partitions))
        ]

    def of_user(self, user_id: str) -> Partition:
        """The partition the user's events go to."""
        return self.partitions[partition_of(user_id, self.n)]
