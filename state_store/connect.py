"""Connecting to Redis: the embedded server, a standalone URL or a cluster, with redis-py's own retry/backoff."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from hytrec.state_store.embedded import EmbeddedRedis
from hytrec.state_store.errors import UNAVAILABLE, StoreAuthError, StoreUnavailable
from hytrec.state_store.settings import StoreSettings
from hytrec.state_store.store import Runner, StateStore


def _cluster_url(url: str) -> tuple[str, bool]:
    for scheme, plain in (("redis+cluster://", "redis://"), ("rediss+cluster://", "rediss://")):
        if url.startswith(scheme):
            return plain + url[len(scheme) :], True
    return url, False


def _auth_and_tls(s: StoreSettings, url: str) -> dict[str, Any]:
    """AUTH (ACL user and password) and TLS options for a URL; what the URL itself carries wins (redis-py)."""
    options: dict[str, Any] = {}
    if s.redis_username is not None:
        options["username"] = s.redis_username
    if s.redis_password is not None:
        options["password"] = s.redis_password.get_secret_value()
    if url.startswith("rediss://"):
        for key, path in (
            ("ssl_ca_certs", s.redis_tls_ca_file),
            ("ssl_certfile", s.redis_tls_cert_file),
            ("ssl_keyfile", s.redis_tls_key_file),
        ):
            if path is not None:
                options[key] = str(path)
    return options


async def open_store(
    settings: StoreSettings | None = None,
    model_version: str = "v0",
    *,
    runner: Runner | None = None,
) -> StateStore:
    """Connect to the configured Redis (embedded, standalone or cluster) and return a store.

    ``runner`` runs every ``compute`` of ``update_many`` (default ``asyncio.to_thread``).
    """
    s = settings or StoreSettings()
    retry = Retry(
        ExponentialWithJitterBackoff(cap=s.redis_retry_backoff_cap_ms / 1000, base=s.redis_retry_backoff_ms / 1000),
        s.redis_retries,
    )
    common: dict[str, Any] = {
        "socket_timeout": s.socket_timeout_s,
        "socket_connect_timeout": s.connect_timeout_s,
        "retry": retry,
        "retry_on_error": [rex.ConnectionError, rex.TimeoutError],
    }
    embedded: EmbeddedRedis | None = None
    cluster = False
    try:
        if s.redis_url is None:
            common.update(_auth_and_tls(s, "unix://"))  # the embedded server requires the password too
            embedded = EmbeddedRedis(s.data_dir, common.get("username"), common.get("password"))
            socket_path = await asyncio.to_thread(embedded.start)
            pool = aioredis.BlockingConnectionPool(
                connection_class=aioredis.UnixDomainSocketConnection,
                path=socket_path,
                max_connections=s.pool_size,
                timeout=s.connect_timeout_s,
                **common,
            )
            client: Any = aioredis.Redis(connection_pool=pool)
        else:
            url, cluster = _cluster_url(s.redis_url)
            cluster = cluster or s.redis_cluster
            common.update(_auth_and_tls(s, url))
            if cluster:
                client = aioredis.RedisCluster.from_url(url, max_connections=s.pool_size, **common)
                await client.initialize()
            else:
                pool = aioredis.BlockingConnectionPool.from_url(
                    url, max_connections=s.pool_size, timeout=s.connect_timeout_s, **common
                )
                client = aioredis.Redis(connection_pool=pool)
        store = StateStore(
            client,
            s,
            model_version,
            cluster=cluster,
            runner=runner,
            embedded=embedded,
        )
        with store._guard("open"):
            await store._load_scripts()
        return store
    except StoreAuthError as exc:
        if embedded is not None:
            embedded.stop()
        raise StoreAuthError(f"cannot open the state store: {exc}") from exc
    except rex.AuthenticationError as exc:  # before UNAVAILABLE: redis-py makes it a ConnectionError
        if embedded is not None:
            embedded.stop()
        raise StoreAuthError(f"cannot open the state store: redis refused the credentials: {exc}") from exc
    except UNAVAILABLE as exc:
        if embedded is not None:
            embedded.stop()
        raise StoreUnavailable(f"cannot open the state store: {exc}") from exc
    except BaseException:
        if embedded is not None:
            embedded.stop()
        raise
