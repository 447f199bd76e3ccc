"""Shared pytest fixtures. The Redis server machinery lives in tests/redis_servers.py."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest

from hytrec.model.checkpoint import save_checkpoint
from tests.helpers_model import make_model
from tests.redis_servers import RedisClusterServers, RedisServer, env_redis_url
from tests.service_fixtures import N_ITEMS, Checkpoint


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


@pytest.fixture(scope="session")
def service_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """A random-init small HyTRec (items "1".."300") saved as a checkpoint."""
    path = tmp_path_factory.mktemp("service-ckpt")
    item_ids = [str(i) for i in range(1, N_ITEMS + 1)]
    rng = random.Random(0)
    version = save_checkpoint(path, make_model(n_items=N_ITEMS), item_ids, [rng.randint(0, 100) for _ in item_ids])
    return Checkpoint(path, version, item_ids)
