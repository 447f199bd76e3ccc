"""Faults: a server killed mid-update, reconnection after a restart, the embedded store across restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hytrec.state_store import StoreSettings, StoreUnavailable, Write, open_store
from hytrec.state_store import metrics as m
from tests.redis_servers import RedisServer
from tests.test_state_store import encode, payload


@pytest.fixture
def persistent_server():
    """A standalone server of its own, with an fsync-always AOF so a SIGKILL loses nothing acknowledged."""
    server = RedisServer(persistent=True).start()
    try:
        yield server
    finally:
        server.stop()


def fast_fail(url: str) -> StoreSettings:
    return StoreSettings(
        redis_url=url, redis_retries=2, redis_retry_backoff_ms=5, socket_timeout_s=1, connect_timeout_s=0.5
    )


def test_kill_between_read_and_write_leaves_old_state(persistent_server: RedisServer) -> None:
    server = persistent_server

    async def main() -> None:
        store = await open_store(fast_fail(server.url), "m1")
        try:
            await store.update_many(["u", "v"], lambda s: {u: Write(encode(b"old"), (f"{u}0",)) for u in s})

            def compute(snaps):
                server.kill()  # after the read, before the write
                return {u: Write(encode(b"new"), (f"{u}1",)) for u in snaps}

            errors = sum(c._value.get() for c in m.REDIS_ERRORS._metrics.values())
            with pytest.raises(StoreUnavailable):
                await store.update_many(["u", "v"], compute, event_ids={"u": ["u1"], "v": ["v1"]})
            assert sum(c._value.get() for c in m.REDIS_ERRORS._metrics.values()) > errors
            with pytest.raises(StoreUnavailable):
                await store.ping()

            server.start()  # same port, same directory: the AOF is replayed
            # the same store object reconnects by itself
            snaps = await store.get_many(["u", "v"], event_ids={"u": ["u0", "u1"], "v": ["v1"]})
            for u in ("u", "v"):
                assert payload(snaps[u]) == b"old" and snaps[u].version == 1 and snaps[u].event_count == 1
            assert snaps["u"].applied == {"u0"} and snaps["v"].applied == frozenset()
            commits = await store.update_many(["u"], lambda s: {"u": Write(encode(b"new"), ("u1",))})
            assert commits["u"].version == 2 and payload(await store.get("u")) == b"new"
        finally:
            await store.close()

    asyncio.run(main())


def test_store_reconnects_after_restart(persistent_server: RedisServer) -> None:
    server = persistent_server

    async def main() -> None:
        store = await open_store(fast_fail(server.url), "m1")
        try:
            await store.put("u", encode(b"1"))
            server.restart()  # every pooled connection is now dead
            assert await store.ping()
            assert payload(await store.get("u")) == b"1"
        finally:
            await store.close()

    asyncio.run(main())


def test_embedded_store_keeps_users_across_restart(tmp_path: Path) -> None:
    settings = StoreSettings(redis_url=None, data_dir=tmp_path / "var")

    async def first() -> int:
        store = await open_store(settings, "m1")
        try:
            await store.update_many(["u"], lambda s: {"u": Write(encode(b"kept"), ("e1",), last_ts=5.0)})
            return store.embedded._server.pid
        finally:
            await store.close()

    async def second() -> tuple:
        store = await open_store(settings, "m1")
        try:
            snap = (await store.get_many(["u"], event_ids={"u": ["e1"]}))["u"]
            return store.embedded._server.pid, snap, [u async for u in store.scan_users()]
        finally:
            await store.close()

    pid1 = asyncio.run(first())
    pid2, snap, users = asyncio.run(second())
    assert pid1 != pid2  # a new server process, reading the persisted data
    assert payload(snap) == b"kept" and snap.version == 1 and snap.applied == {"e1"} and snap.last_ts == 5.0
    assert users == ["u"]
    assert (tmp_path / "var" / "redis").is_dir()
