"""State store suite, run on a standalone Redis and on a 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import struct
import uuid
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.cluster import key_slot

from hytrec.state_store import (
    ConflictError,
    CorruptStateError,
    KeySpace,
    Snapshot,
    StoreError,
    StoreSettings,
    StoreUnavailable,
    Write,
    check_user_id,
    open_store,
)
from hytrec.state_store import metrics as m
from hytrec.state_store.scripts import COMMITTED, DUPLICATE, REPLAYED
from tests.redis_servers import free_port

MAGIC = b"TSTS"


def encode(payload: bytes) -> bytes:
    """A tiny codec shaped like the model's: magic, payload, CRC32."""
    body = MAGIC + payload
    return body + struct.pack("<I", zlib.crc32(body))


def decode(blob: bytes) -> bytes:
    body, crc = blob[:-4], blob[-4:]
    if not body.startswith(MAGIC) or struct.pack("<I", zlib.crc32(body)) != crc:
        raise ValueError("bad magic or CRC")
    return body[len(MAGIC) :]


def payload(snap: Snapshot | None) -> bytes | None:
    """What the test codec wrote; the store itself hands back the blob's bytes untouched."""
    blob = None if snap is None else snap.checked_blob()
    return None if blob is None else decode(blob)


def metric(counter: Any) -> float:
    return counter._value.get()


def run(redis_url: str, body: Callable[..., Awaitable[Any]], mv: str | None = None, **settings: Any) -> Any:
    """Open a store on a fresh model-version namespace, run ``body(store)``, then clean the namespace."""
    mv = mv or f"t{uuid.uuid4().hex[:10]}"

    async def main() -> Any:
        store = await open_store(StoreSettings(redis_url=redis_url, **settings), mv)
        try:
            return await body(store)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    finally:
        asyncio.run(_drop_namespace(redis_url, mv))


async def _drop_namespace(redis_url: str, mv: str) -> None:
    store = await open_store(StoreSettings(redis_url=redis_url), mv)
    try:
        async for key in store.client.scan_iter(match=f"hytrec:{mv}:*"):
            await store.client.delete(key)
    finally:
        await store.close()


def append(tag: bytes) -> Callable[[dict], dict[str, Write]]:
    """compute(): append ``tag`` to each user's payload, applying that user's unapplied event ids."""

    def compute(snaps: dict) -> dict[str, Write]:
        out = {}
        for u, s in snaps.items():
            old = payload(s) or b""
            out[u] = Write(encode(old + tag), (f"{u}-{tag.decode()}",), last_ts=float(len(old)))
        return out

    return compute


# ------------------------------------------------------------------ keys (no server)
def test_keys_share_one_slot_and_are_namespaced() -> None:
    ks = KeySpace("hytrec", "m1")
    state, dedup = ks.keys("alice@x.org")
    assert state == "hytrec:m1:{u:alice@x.org}:s" and dedup == "hytrec:m1:{u:alice@x.org}:d"
    assert key_slot(state.encode()) == key_slot(dedup.encode())
    assert KeySpace("hytrec", "m2").state("alice@x.org") != state
    assert ks.user_of(state) == "alice@x.org" and ks.user_of(KeySpace("hytrec", "m2").state("a")) is None


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "a b", "tab\t", "nl\n", "{u:x}"])
def test_bad_user_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        check_user_id(bad)
    with pytest.raises(ValueError):
        KeySpace("hytrec", "m1").state(bad)


@pytest.mark.parametrize("bad", ["", "v{1}", "v 1", "v:1", "v*"])
def test_bad_model_versions_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        KeySpace("hytrec", bad)


def test_unreachable_server_is_store_unavailable() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    settings = StoreSettings(redis_url=url, redis_retries=0, connect_timeout_s=0.5)
    with pytest.raises(StoreUnavailable):
        asyncio.run(open_store(settings, "m1"))


# ------------------------------------------------------------------ on both back ends
def test_read_write_versions_and_metadata(redis_url: str) -> None:
    async def body(store) -> None:
        assert await store.get_many(["a", "b"]) == {"a": None, "b": None}
        c1 = await store.update_many(["a"], append(b"x"))
        assert c1["a"].version == 1 and c1["a"].attempts == 1
        c2 = await store.update_many(["a"], append(b"y"))
        assert c2["a"].version == 2
        snap = await store.get("a")
        assert payload(snap) == b"xy" and snap.version == 2 and snap.event_count == 2
        assert snap.last_ts == 1.0 and snap.updated_ms > 0
        # last_ts keeps the maximum, event count adds n_events
        await store.update_many(["a"], lambda s: {"a": Write(encode(b"z"), (), n_events=3, last_ts=0.5)})
        snap = await store.get("a")
        assert (snap.version, snap.event_count, snap.last_ts, payload(snap)) == (3, 5, 1.0, b"z")
        # a compute that writes nothing writes nothing
        assert await store.update_many(["a", "b"], lambda s: {}) == {}
        assert (await store.get("a")).version == 3 and await store.get("b") is None

    run(redis_url, body)


def test_batches_use_one_round_trip_per_phase(redis_url: str) -> None:
    users = [f"user{i}" for i in range(300)]

    async def body(store) -> None:
        calls: list[int] = []
        make = store._pipeline

        def counting_pipeline():
            pipe = make()
            execute = pipe.execute

            async def wrapped(*a, **kw):
                calls.append(len(pipe))
                return await execute(*a, **kw)

            pipe.execute = wrapped
            return pipe

        store._pipeline = counting_pipeline
        commits = await store.update_many(users, append(b"a"), event_ids={u: [f"{u}-a"] for u in users})
        assert sorted(commits) == sorted(users) and all(c.version == 1 for c in commits.values())
        assert calls == [300, 300]  # one read round trip (one READ script per user), one CAS round trip
        calls.clear()
        snaps = await store.get_many(users)
        assert calls == [300] and all(payload(snaps[u]) == b"a" for u in users)

    run(redis_url, body)


def test_dedup_applied_ids_are_reported_and_never_reapplied(redis_url: str) -> None:
    async def body(store) -> None:
        ids = {"u": ["e1", "e2"]}
        await store.update_many(["u"], lambda s: {"u": Write(encode(b"1"), ("e1",))}, event_ids=ids)
        snap = (await store.get_many(["u"], event_ids={"u": ["e1", "e2", "e3"]}))["u"]
        assert snap.applied == {"e1"}

        def skipping(snaps):
            s = snaps["u"]
            new = [e for e in ids["u"] if e not in s.applied]
            return {"u": Write(encode(payload(s) + b"".join(e.encode() for e in new)), tuple(new))}

        await store.update_many(["u"], skipping, event_ids=ids)
        assert payload(await store.get("u")) == b"1e2"
        # a compute that re-applies a known id is a caller bug
        with pytest.raises(ValueError, match="re-applies"):
            await store.update_many(["u"], lambda s: {"u": Write(encode(b"!"), ("e1",))}, event_ids=ids)
        with pytest.raises(ValueError, match="repeats"):
            await store.update_many(["u"], lambda s: {"u": Write(encode(b"!"), ("e9", "e9"))})
        # the script re-checks: a write with an applied id is refused even at the right version
        snap = await store.get("u")
        res = await store._cas({"u": (snap.version, Write(encode(b"!"), ("e2",)), "tok-dup")})
        assert res["u"][:2] == (DUPLICATE, snap.version)
        # an id the caller did not announce is caught by the script, then re-read and skipped
        before = metric(m.CAS_DUPLICATES)
        with pytest.raises(ValueError, match="re-applies"):
            await store.update_many(["u"], lambda s: {"u": Write(encode(b"!"), ("e1",))})
        assert metric(m.CAS_DUPLICATES) == before + 1
        assert payload(await store.get("u")) == b"1e2"

    run(redis_url, body)


def test_dedup_window_is_bounded(redis_url: str) -> None:
    async def body(store) -> None:
        for i in range(5):
            ids = (f"a{i}", f"b{i}")
            await store.update_many(["u"], lambda s, ids=ids: {"u": Write(encode(b"."), ids)})
        members = await store.client.zrange(store.keys.dedup("u"), 0, -1)
        assert [x.decode() for x in members] == ["a3", "b3", "a4", "b4"]

    run(redis_url, body, dedup_window=4)


def test_resent_write_is_recognised_not_applied_twice(redis_url: str) -> None:
    async def body(store) -> None:
        w = Write(encode(b"once"), (), n_events=1)
        assert (await store._cas({"u": (0, w, "tok-1")}))["u"][:2] == (COMMITTED, 1)
        assert (await store._cas({"u": (0, w, "tok-1")}))["u"][:2] == (REPLAYED, 1)
        snap = await store.get("u")
        assert (snap.version, snap.event_count) == (1, 1)

    run(redis_url, body)


def test_conflicts_are_retried_for_the_losers_only(redis_url: str) -> None:
    async def body(store) -> None:
        await store.update_many(["a", "b"], append(b"0"))
        seen: list[list[str]] = []
        interfered = False

        def compute(snaps):
            nonlocal interfered
            seen.append(sorted(snaps))
            if not interfered:  # another writer moves user a on between our read and our write
                interfered = True
                asyncio.run_coroutine_threadsafe(store.put("a", encode(b"other")), loop).result()
            return append(b"1")(snaps)

        loop = asyncio.get_running_loop()
        before = metric(m.CAS_RETRIES)
        commits = await store.update_many(["a", "b"], compute)
        assert seen == [["a", "b"], ["a"]]
        assert commits["a"].attempts == 2 and commits["b"].attempts == 1
        assert commits["a"].version == 3 and metric(m.CAS_RETRIES) == before + 1
        assert payload(await store.get("a")) == b"other1" and payload(await store.get("b")) == b"01"

    run(redis_url, body)


def test_conflicts_exhausted_raise_with_the_commits_that_landed(redis_url: str) -> None:
    """Every attempt at "a" loses: something moves its version during each compute. It has to be a writer outside
    the protocol (a bare HINCRBY), since a writer using the script is held off by the lock a retry takes."""

    async def body(store) -> None:
        loop = asyncio.get_running_loop()
        await store.put("a", encode(b"seed"))

        def compute(snaps):
            if "a" in snaps:
                bump = store.client.hincrby(store.keys.state("a"), "ver", 1)
                asyncio.run_coroutine_threadsafe(bump, loop).result()
            return append(b"1")(snaps)

        before = metric(m.CAS_CONFLICTS_EXHAUSTED)
        with pytest.raises(ConflictError) as err:
            await store.update_many(["a", "b"], compute)
        assert err.value.user_ids == ["a"] and err.value.attempts == 3
        assert set(err.value.committed) == {"b"}
        assert metric(m.CAS_CONFLICTS_EXHAUSTED) == before + 1

    run(redis_url, body, cas_max_retries=2, cas_backoff_ms=0.1)


def test_model_versions_never_read_each_other(redis_url: str) -> None:
    mv_a, mv_b = f"a{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"

    async def write_a(store) -> list[str]:
        await store.update_many(["x", "y", "z"], append(b"a"))
        return sorted([u async for u in store.scan_users(count=2)])

    async def read_b(store) -> tuple:
        return await store.get_many(["x", "y"]), [u async for u in store.scan_users()]

    async def both() -> tuple:
        a = await open_store(StoreSettings(redis_url=redis_url), mv_a)
        b = await open_store(StoreSettings(redis_url=redis_url), mv_b)
        try:
            scanned = await write_a(a)
            return scanned, await read_b(b), await a.get("x")
        finally:
            await a.close()
            await b.close()

    try:
        scanned, (snaps_b, scan_b), snap_a = asyncio.run(both())
    finally:
        asyncio.run(_drop_namespace(redis_url, mv_a))
    assert scanned == ["x", "y", "z"]
    assert snaps_b == {"x": None, "y": None} and scan_b == []
    assert payload(snap_a) == b"a"


def test_blobs_come_back_as_stored_and_malformed_hashes_are_corrupt(redis_url: str) -> None:
    """The store knows bytes: a flipped bit in a blob is returned as is (the caller's codec judges it), while a
    hash the store cannot read (version not an integer, blob missing) is corrupt for reads and for the CAS."""

    async def body(store) -> None:
        await store.update_many(["u", "v", "w", "x"], append(b"ok"))
        key = store.keys.state("u")
        blob = await store.client.hget(key, "blob")
        flipped = blob[:-1] + bytes([blob[-1] ^ 0xFF])
        await store.client.hset(key, "blob", flipped)
        before = metric(m.CORRUPT_VALUES)
        snaps = await store.get_many(["u", "v"])
        assert snaps["u"].checked_blob() == flipped and payload(snaps["v"]) == b"ok"
        assert metric(m.CORRUPT_VALUES) == before  # not the store's call
        await store.client.hset(store.keys.state("w"), "ver", "abc")
        await store.client.hdel(store.keys.state("x"), "blob")
        snaps = await store.get_many(["w", "x", "v"])
        assert payload(snaps["v"]) == b"ok"  # the others are still served
        with pytest.raises(CorruptStateError, match="corrupt state for user 'w'.*malformed"):
            snaps["w"].checked_blob()
        with pytest.raises(CorruptStateError, match="corrupt state for user 'x'.*missing blob"):
            snaps["x"].checked_blob()
        assert metric(m.CORRUPT_VALUES) == before + 2
        for user in ("w", "x"):
            with pytest.raises(CorruptStateError):
                await store.update_many([user], append(b"more"))
        assert await store.client.hget(store.keys.state("w"), "ver") == b"abc"  # nothing written over it
        assert await store.client.hget(store.keys.state("x"), "ver") == b"1"

    run(redis_url, body)


def test_delete_user_removes_every_key(redis_url: str) -> None:
    async def body(store) -> None:
        await store.update_many(["u", "v"], append(b"1"))
        keys = store.keys.keys("u")
        assert await store.client.exists(*keys[:1]) and await store.client.exists(keys[1])
        assert await store.delete_user("u") is True
        assert not await store.client.exists(keys[0]) and not await store.client.exists(keys[1])
        assert await store.delete_user("u") is False
        assert await store.get("u") is None and payload(await store.get("v")) == b"1"
        assert [u async for u in store.scan_users()] == ["v"]

    run(redis_url, body)


def test_delete_user_erases_every_model_version(redis_url: str) -> None:
    """Erasure removes the user's keys under older model versions too."""
    old_mv = f"o{uuid.uuid4().hex[:8]}"

    async def body(store) -> None:
        old = await open_store(StoreSettings(redis_url=redis_url), old_mv)
        try:
            await old.update_many(["u", "v"], append(b"old"))
            await store.update_many(["u"], append(b"new"))
            assert await store.delete_user("u") is True
            for key in (*store.keys.keys("u"), *old.keys.keys("u"), store.keys.versions("u")):
                assert not await store.client.exists(key), key
            assert payload(await old.get("v")) == b"old"  # other users untouched
        finally:
            await old.close()

    try:
        run(redis_url, body)
    finally:
        asyncio.run(_drop_namespace(redis_url, old_mv))


def test_put_replaces_count_and_last_ts(redis_url: str) -> None:
    async def body(store) -> None:
        await store.update_many(["u"], append(b"a"))
        await store.update_many(["u"], append(b"b"))
        assert (await store.get("u")).event_count == 2
        await store.put("u", encode(b"rebuilt"), n_events=7, last_ts=5.0)
        snap = await store.get("u")
        assert (snap.event_count, snap.last_ts, payload(snap), snap.version) == (7, 5.0, b"rebuilt", 3)

    run(redis_url, body)


def test_ttl_applies_to_every_key_of_the_user(redis_url: str) -> None:
    async def body(store) -> None:
        await store.update_many(["u"], append(b"1"))
        for key in store.keys.keys("u"):
            assert 0 < await store.client.pttl(key) <= 60_000

    run(redis_url, body, user_ttl_s=60)


def test_lost_script_cache_is_reloaded(redis_url: str) -> None:
    async def body(store) -> None:
        await store.update_many(["u"], append(b"1"))
        if store.cluster:
            await store.client.execute_command("SCRIPT FLUSH", target_nodes=store.client.PRIMARIES)
        else:
            await store.client.script_flush()
        await store.update_many(["u", "v"], append(b"2"))
        assert payload(await store.get("u")) == b"12" and await store.ping()

    run(redis_url, body)


def test_wrong_type_at_a_key_is_a_store_error(redis_url: str) -> None:
    async def body(store) -> None:
        await store.client.set(store.keys.state("u"), b"not a hash")
        with pytest.raises(StoreError, match="WRONGTYPE"):
            await store.get_many(["u"])

    run(redis_url, body)


def test_default_dedup_window_stays_compact(redis_url: str) -> None:
    async def body(store) -> None:
        window = store.settings.dedup_window
        for start in range(0, window + 20, 10):
            ids = tuple(f"e{i}" for i in range(start, start + 10))
            await store.update_many(["u"], lambda s, ids=ids: {"u": Write(encode(b"."), ids)})
        key = store.keys.dedup("u")
        assert await store.client.zcard(key) == window
        assert await store.client.object("encoding", key) in (b"ziplist", b"listpack")

    run(redis_url, body)


def test_logged_events_and_the_erasure_check_in_the_compare_and_set(redis_url: str) -> None:
    """``Write.log`` appends the write's events to the log stream once per commit (not for a refused or a
    re-sent write), on a cluster too; a write whose stream mark is at or below the user's erasure position is
    refused (``erased``) and writes nothing, while one above it commits."""
    from hytrec.state_store import Mark
    from hytrec.state_store.keys import tombstone_key
    from hytrec.streams.partition import StreamLayout

    layout = StreamLayout("hytrec", f"s{uuid.uuid4().hex[:8]}", 2)

    async def body(store) -> None:
        users = [f"lg{i}" for i in range(6)]
        stream = {u: layout.of_user(u).stream for u in users}

        def logged(snaps, tag="a"):  # noqa: ANN001, ANN202
            return {
                u: Write(
                    encode(tag.encode()),
                    (f"{tag}-{u}",),
                    log=((("user_id", u), ("item_id", "7"), ("ts", "1.0"), ("event_id", f"{tag}-{u}")),),
                    log_key=stream[u],
                    log_maxlen=1000,
                )
                for u in snaps
            }

        commits = await store.update_many(users, logged, event_ids={u: [f"a-{u}"] for u in users})
        assert all(len(c.logged) == 1 for c in commits.values())
        entries = [e for part in layout.partitions for e in await store.client.xrange(part.stream)]
        assert sorted(f[b"user_id"].decode() for _, f in entries) == users

        # the same event ids again: refused by the de-dup check, recomputed without them, nothing logged
        def again(snaps):  # noqa: ANN001, ANN202
            return {u: Write(encode(b"b"), (), n_events=0) for u in snaps if snaps[u].applied}

        await store.update_many(users, again, event_ids={u: [f"a-{u}"] for u in users})
        assert sum([await store.client.xlen(p.stream) for p in layout.partitions]) == len(users)

        # erasure at entry 100-0 of the user's partition: a mark at or below it is refused, above it commits
        u = users[0]
        await store.client.hset(tombstone_key("hytrec", u), u, "100-0")
        mark = layout.of_user(u).mark_field
        for entry, erased in (("99-5", True), ("100-0", True), ("100-1", False)):
            w = Write(encode(entry.encode()), (), n_events=1, marks={mark: Mark(entry, 1)})
            c = (await store.update_many([u], lambda snaps, w=w: {u: w}, marks={u: [mark]}))[u]
            assert c.erased is erased, entry
        assert payload(await store.get(u)) == b"100-1"
        await store.client.delete(tombstone_key("hytrec", u), *(p.stream for p in layout.partitions))

    run(redis_url, body)
