"""The stream consumer's takeover with Redis itself SIGKILLed and restarted in the middle of it (AOF everysec).

tests/test_streams.py proves a takeover after a consumer's SIGKILL; here the Redis server also dies while the
successor claims and applies the dead consumer's pending entries, and comes back from its AOF on the same port.
Every event must still be applied exactly once: exact per-user counts, and states equal to an uninterrupted
run's. Users get more than 128 events per batch (more than the de-duplication window holds).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from hytrec.streams import StreamLayout, StreamProducer
from tests.redis_servers import RedisServer, wait_until
from tests.service_fixtures import Checkpoint
from tests.test_streams import (
    ConsumerProcess,
    _assert_same_states,
    _consumer_env,
    _counts,
    _drained,
    _events,
    _reference,
    _settings,
)


def test_takeover_with_redis_restarted_during_it_applies_every_event_once(
    service_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    server = RedisServer(workdir=tmp_path, extra=("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""))
    server.start()
    url = server.url
    version = service_checkpoint.version
    users = {"whale": 700, "orca": 450, **{f"u{i}": 2 + i % 11 for i in range(60)}}
    events = _events(users, seed=7)
    try:
        ref = _reference(service_checkpoint, url, events, users, 1)
        prefix = f"t{uuid.uuid4().hex[:8]}"
        # 400 entries a batch: the whale has ~200 events in one batch, past the 128 ids the dedup set keeps
        env = _consumer_env(service_checkpoint, url, prefix, stream_batch_size=400, stream_retry_cap_ms=500)
        s = _settings(service_checkpoint, url, prefix)
        layout = StreamLayout(prefix, s.stream_name, 1)
        stream = layout.partitions[0].stream

        def applied() -> int:
            return sum(_counts(url, prefix, version, users).values())

        with StreamProducer.from_settings(s) as producer:
            producer.add(events)
            client = producer.client
            first = ConsumerProcess(env, tmp_path, "first")
            wait_until(
                lambda: client.xpending(stream, s.stream_group)["pending"] > 0 and applied() > 0,
                timeout=60,
                what="the first consumer mid-batch",
            )
            first.kill()
            at_first_kill = applied()
            assert 0 < at_first_kill < len(events)
            second = ConsumerProcess(env, tmp_path, "second")
            # Redis dies once the successor is at work on the dead one's partition (its lease taken over).
            wait_until(lambda: applied() > at_first_kill, timeout=60, what="the takeover under way")
            at_redis_kill = applied()
            server.kill()
            time.sleep(1.5)
            server.start()  # same port and directory: the AOF is replayed
            restored = applied()
            assert second.proc.poll() is None, second.err.read_text()[-2000:]  # it rode out the outage
            wait_until(lambda: _drained(client, layout, s.stream_group), timeout=90, what="the takeover to drain")
            totals = second.stop()
        assert _counts(url, prefix, version, users) == users  # every event exactly once
        assert totals["applied"] == len(events) - at_first_kill  # nothing committed before is applied again
        _assert_same_states(service_checkpoint, url, prefix, ref, users)
        print(
            f"\n{len(events)} events; first consumer SIGKILLed at {at_first_kill} applied, Redis SIGKILLed at "
            f"{at_redis_kill}, {restored} held after its restart (AOF everysec); successor applied {totals['applied']}"
            f", duplicates skipped {totals.get('duplicates')}; counts exact, states equal to the uninterrupted run"
        )
    finally:
        server.stop()
