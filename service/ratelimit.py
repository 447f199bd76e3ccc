"""Per-key rate limits shared by every worker and replica: one GCRA bucket per API key, kept in Redis.

GCRA (the generic cell rate algorithm) is a token bucket stored as a single number, the *theoretical arrival
time* (TAT) of the next request at the configured rate. A request at ``now`` is allowed while
``TAT - burst * T <= now`` (``T = 1 / rate``) and pushes the TAT one interval further; refused, it learns
exactly when the next token comes. The script reads the clock of the Redis server (``TIME``), so the clocks of
the replicas play no part, and runs atomically, so concurrent workers never both take the last token. One
``EVALSHA`` per request; the key expires when its bucket is full again, so idle keys vanish.

When Redis does not answer within the limiter's timeout the request is **let through** (fail open), counted in
``hytrec_rate_limit_errors_total``, and so is every request of the next second unchecked (one timeout per second
per worker, not one per request): a limit protects capacity, it is not an access control, and the routes
that need Redis answer 503 on their own while it is down, whereas failing closed would also take down the
routes that do not need it (the catalogue, the model). Access is still decided by the keys, without Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from redis import exceptions as rex

from hytrec.service import metrics

log = logging.getLogger("hytrec.service")

# KEYS: the bucket's key. ARGV: emission interval T (µs), burst (requests allowed at once).
# Returns {1, 0} allowed or {0, µs until the next request would be allowed}.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local allow_at = tat + interval - tolerance
if allow_at > now then return {0, allow_at - now} end
redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil((tat + interval - now) / 1000))
return {1, 0}
"""
GCRA_SHA = hashlib.sha1(GCRA.encode()).hexdigest()
SKIP_AFTER_ERROR_S = 1.0


class RateLimiter:
    """Decides whether a key may make one more request now; ``client()`` is the store's Redis client (or None)."""

    def __init__(
        self, client: Callable[[], Any | None], prefix: str, per_s: float, burst: int, timeout_ms: float
    ) -> None:
        self._client = client
        self._prefix = prefix
        self.per_s, self.burst = per_s, burst
        self._interval_us = max(1, round(1_000_000 / per_s))
        self._timeout = timeout_ms / 1000.0
        self._skip_until = 0.0  # after a failed check, let requests through unchecked until then

    def key(self, key_id: str) -> str:
        return f"{self._prefix}:rl:{key_id}"

    async def retry_after(self, key_id: str) -> int | None:
        """Whole seconds until ``key_id`` may retry (>= 1) when it is over its limit, else None (counted)."""
        client = self._client()
        if client is None:  # the store is not open yet: the routes answer 503 not-ready anyway
            return None
        now = time.monotonic()
        if now < self._skip_until:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                allowed, wait_us = await self._eval(client, self.key(key_id))
        except (rex.RedisError, OSError, TimeoutError) as exc:
            # one failed check per second per worker: an outage must not add the timeout to every request
            self._skip_until = now + SKIP_AFTER_ERROR_S
            metrics.RATE_LIMIT_ERRORS.labels(type(exc).__name__).inc()
            log.warning("rate limit not checked for %gs (let through): %s", SKIP_AFTER_ERROR_S, type(exc).__name__)
            return None
        if allowed:
            return None
        metrics.RATE_LIMITED.labels(key_id).inc()
        return max(1, math.ceil(int(wait_us) / 1_000_000))

    async def _eval(self, client: Any, key: str) -> tuple[int, int]:
        args = (self._interval_us, self.burst)
        try:
            res = await client.evalsha(GCRA_SHA, 1, key, *args)
        except rex.NoScriptError:  # a restarted or flushed server: load it once, then EVALSHA again
            res = await client.eval(GCRA, 1, key, *args)
        return int(res[0]), int(res[1])
