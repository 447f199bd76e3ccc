"""Shared pytest fixtures. The Redis server machinery lives in tests/redis_servers.py."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.redis_servers import RedisClusterServers, RedisServer, env_redis_url


@pytest.fixture(scope="session")
def redis_standalone_url() -> Iterator[str]:
    """URL of a standalone Redis: $REDIS_URL when set, else a server started for the session."""
    url = env_redis_url()
    if url:
        yield url
        return
    server = RedisServer().start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """URL of a 3-master Redis Cluster: $REDIS_CLUSTER_URL when set, else one created for the session."""
    url = os.environ.get("REDIS_CLUSTER_URL")
    if url:
        yield url
        return
    cluster = RedisClusterServers().start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


@pytest.fixture(params=["standalone", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """Each test that uses it runs once on a standalone server and once on a cluster."""
    return request.getfixturevalue(f"redis_{request.param}_url")
