"""Per-key rate limits against a real Redis: one budget shared by two app instances, Retry-After, the metric,
separate keys, expiry of idle buckets, off by default, fail open while Redis is down."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import redis

from hytrec.service import metrics
from hytrec.service.auth import key_id
from hytrec.service.ratelimit import RateLimiter
from hytrec.service.settings import Settings
from tests.redis_servers import RedisServer
from tests.service_fixtures import Checkpoint
from tests.test_app import run, running, settings_for


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _limited(key: str) -> float:
    return metrics.RATE_LIMITED.labels(key_id(key))._value.get()


def test_two_apps_on_one_redis_share_one_budget_per_key(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    """Burst 6 at 1 request/s: of 24 requests alternating between two instances, 6 pass (+1 per second that
    passed), the rest are 429 with Retry-After 1; another key has its own budget."""
    prefix = f"rl{uuid.uuid4().hex[:8]}"
    s = settings_for(
        service_checkpoint, redis_standalone_url, api_keys="ka,kb", rate_limit_per_s=1.0, rate_limit_burst=6
    )
    s = s.model_copy(update={"key_prefix": prefix})
    before = _limited("ka")

    async def body() -> None:
        async with running(s) as (a, _), running(s) as (b, _):
            start = time.monotonic()
            answers = [
                await (a if i % 2 == 0 else b).get("/v1/items", params={"limit": 1}, headers=_bearer("ka"))
                for i in range(24)
            ]
            elapsed = time.monotonic() - start
            codes = [r.status_code for r in answers]
            passed = codes.count(200)
            print(f"\nshared budget: {passed} of 24 passed over 2 instances in {elapsed:.2f} s, {24 - passed} x 429")
            assert set(codes) == {200, 429}
            assert 6 <= passed <= 6 + math.ceil(elapsed * 1.0), (codes, elapsed)
            assert codes[:6] == [200] * 6  # the burst, whichever instance served it
            refused = [r for r in answers if r.status_code == 429]
            assert {r.headers["retry-after"] for r in refused} == {"1"}
            doc = refused[0].json()
            assert refused[0].headers["content-type"].startswith("application/problem+json")
            assert doc["type"].endswith("/rate-limited") and doc["status"] == 429
            assert _limited("ka") - before == len(refused)
            # the other key is untouched by ka's spending
            assert (await b.get("/v1/items", params={"limit": 1}, headers=_bearer("kb"))).status_code == 200
            # the bucket is one key under the prefix, named by the key's hash, and expires
            r = redis.Redis.from_url(redis_standalone_url)
            keys = sorted(k.decode() for k in r.scan_iter(match=f"{prefix}:rl:*"))
            assert keys == [f"{prefix}:rl:{key_id('ka')}", f"{prefix}:rl:{key_id('kb')}"]
            assert 0 < r.pttl(keys[0]) <= 7000  # at most burst x interval: gone once the bucket is full again
            r.close()

    run(body)


def test_retry_after_is_the_wait_for_the_next_token_rounded_up(redis_standalone_url: str) -> None:
    """At 0.25 requests/s and burst 1 the second request waits about 4 s: Retry-After 4 (ceil), not 1."""
    client = redis.asyncio.Redis.from_url(redis_standalone_url)
    limiter = RateLimiter(lambda: client, f"rl{uuid.uuid4().hex[:8]}", 0.25, 1, 1000)

    async def body() -> None:
        try:
            assert await limiter.retry_after("k") is None
            assert await limiter.retry_after("k") == 4
            assert await limiter.retry_after("other") is None
            await client.script_flush()  # a server that lost its scripts: reloaded, still one budget
            assert await limiter.retry_after("k") == 4
        finally:
            await client.aclose()

    run(body)


def test_concurrent_requests_never_overspend_the_bucket(redis_standalone_url: str) -> None:
    """200 checks at once on one key, burst 50, 0.5/s: exactly 50 pass (the script is atomic)."""

    async def body() -> None:
        clients = [redis.asyncio.Redis.from_url(redis_standalone_url) for _ in range(4)]
        prefix = f"rl{uuid.uuid4().hex[:8]}"
        limiters = [RateLimiter(lambda c=c: c, prefix, 0.5, 50, 5000) for c in clients]
        try:
            got = await asyncio.gather(*(limiters[i % 4].retry_after("hot") for i in range(200)))
            print(f"\nconcurrent: {got.count(None)} of 200 passed (burst 50)")
            assert got.count(None) == 50 and all(w is not None and w >= 1 for w in got if w is not None)
        finally:
            for c in clients:
                await c.aclose()

    run(body)


def test_off_by_default_no_redis_key_no_429(service_checkpoint: Checkpoint, redis_standalone_url: str) -> None:
    assert Settings().rate_limit_per_s is None
    s = settings_for(service_checkpoint, redis_standalone_url)

    async def body() -> None:
        async with running(s) as (client, app):
            codes = {(await client.get("/v1/items", params={"limit": 1})).status_code for _ in range(60)}
            assert codes == {200}
            guard = app.middleware_stack  # the Guard holds no limiter at all: no round trip
            while guard is not None and type(guard).__name__ != "Guard":
                guard = getattr(guard, "app", None)
            assert guard is not None and guard.limiter is None
        r = redis.Redis.from_url(redis_standalone_url)
        assert list(r.scan_iter(match=f"{s.key_prefix}:rl:*")) == []
        r.close()

    run(body)


def test_redis_down_fails_open_within_the_timeout(service_checkpoint: Checkpoint) -> None:
    """With Redis killed, a limited key still reads the model info (no Redis needed): the first check is bounded
    by HYTREC_RATE_LIMIT_TIMEOUT_MS and counted, the next second's are skipped; once Redis is back the limit
    holds again."""
    server = RedisServer().start()
    try:
        s = settings_for(
            service_checkpoint, server.url, rate_limit_per_s=0.5, rate_limit_burst=2, rate_limit_timeout_ms=100
        )
        before = sum(m.value for m in metrics.RATE_LIMIT_ERRORS.collect()[0].samples if m.name.endswith("_total"))

        async def body() -> None:
            async with running(s) as (client, _):
                assert [(await client.get("/v1/model")).status_code for _ in range(3)] == [200, 200, 429]
                server.kill()
                start = time.monotonic()
                codes = [(await client.get("/v1/model")).status_code for _ in range(5)]
                per_request = (time.monotonic() - start) / 5
                print(f"\nfail open with Redis killed: 5 x 200, {per_request * 1000:.0f} ms per request")
                assert codes == [200] * 5
                # one check waits out the 100 ms budget (not the store's retries), the next ones skip it
                assert per_request < 0.1, per_request
                after = sum(
                    m.value for m in metrics.RATE_LIMIT_ERRORS.collect()[0].samples if m.name.endswith("_total")
                )
                assert after - before == 1
                server.restart()
                for _ in range(100):  # the client reconnects by itself
                    if (await client.get("/v1/model")).status_code == 429:
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("the limit never came back after Redis restarted")

        run(body)
    finally:
        server.stop()
