"""The producer helper: XADD events to the partition of their user, with approximate MAXLEN trimming.

    from hytrec.streams import StreamProducer
    with StreamProducer.from_settings() as producer:        # HYTREC_REDIS_URL, HYTREC_STREAM_* settings
        producer.add([{"user_id": "u1", "item_id": "42", "ts": 1700000000.0, "event_id": "e-1"}])

Events of one call are sent in one pipeline, in order; each partition receives them in the order given, so a
user's events keep their order (they all go to one partition).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import redis

from hytrec.service.schemas import Event
from hytrec.streams import wire
from hytrec.streams.partition import StreamLayout


class StreamProducer:
    """Appends events to a partitioned stream (synchronous redis-py client, standalone or cluster)."""

    def __init__(self, client: Any, layout: StreamLayout, maxlen: int = 0, *, embedded: Any = None) -> None:
        self.client = client
        self.layout = layout
        self.maxlen = maxlen
        self._embedded = embedded

    @classmethod
    def from_settings(cls, settings: Any = None) -> StreamProducer:
        """Connect as the service and consumer do (``HYTREC_REDIS_URL``; none: the embedded Redis)."""
        from hytrec.service.settings import Settings

        s = settings or Settings()
        embedded = None
        url = s.redis_url
        if url is None:
            from hytrec.state_store.embedded import EmbeddedRedis

            embedded = EmbeddedRedis(s.data_dir)
            client: Any = redis.Redis(unix_socket_path=embedded.start())
        elif url.startswith(("redis+cluster://", "rediss+cluster://")) or s.redis_cluster:
            plain = url.replace("+cluster://", "://", 1)
            client = redis.RedisCluster.from_url(plain)
        else:
            client = redis.Redis.from_url(url)
        layout = StreamLayout(s.key_prefix, s.stream_name, s.stream_partitions)
        return cls(client, layout, s.stream_maxlen, embedded=embedded)

    def add(self, events: Iterable[Event | Mapping[str, Any]]) -> list[str]:
        """XADD each event to its user's partition (``MAXLEN ~`` when set); returns the entry ids, in order.

        Events are not validated here: the consumer validates, and dead-letters what fails.
        """
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for event in events:
            fields = wire.encode(event)
            part = self.layout.of_user(str(fields.get("user_id", "")))
            if self.maxlen:
                pipe.xadd(part.stream, fields, maxlen=self.maxlen, approximate=True)
            else:
                pipe.xadd(part.stream, fields)
            n += 1
        if not n:
            return []
        return [r.decode() if isinstance(r, bytes) else r for r in pipe.execute()]

    def add_raw(self, partition: int, fields: Mapping[str, Any]) -> str:
        """XADD arbitrary fields to one partition (tests and tools: a malformed entry, say)."""
        res = self.client.xadd(self.layout.partitions[partition].stream, dict(fields))
        return res.decode() if isinstance(res, bytes) else res

    def close(self) -> None:
        self.client.close()
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def __enter__(self) -> StreamProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
