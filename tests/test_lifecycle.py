"""Model lifecycle, part 1 and 2: erasure tombstones, the archive and export, backfill to the live position
and the dual write (docs/lifecycle.md). Real Redis, real consumers in process, real app for DELETE."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis
import torch

from hytrec.eventlog import read_events
from hytrec.model.checkpoint import save_checkpoint
from hytrec.model.serving import ServingModel
from hytrec.service.backfill import Backfill
from hytrec.service.events import EventBatcher, EventIngestor
from hytrec.service.microbatch import loop_time
from hytrec.service.schemas import Event
from hytrec.service.settings import Settings
from hytrec.service.versions import add_version, open_mirrors
from hytrec.state_store import open_store
from hytrec.streams import StreamProducer
from hytrec.streams.archive import Archive, iter_log, write_training_file
from hytrec.streams.consumer import Consumer
from hytrec.streams.erasure import load_tombstones
from tests.helpers_model import make_model
from tests.service_fixtures import N_ITEMS, REPO, Checkpoint
from tests.test_app import running


@pytest.fixture(scope="module")
def model_root(tmp_path_factory: pytest.TempPathFactory, service_checkpoint: Checkpoint) -> tuple[Path, str, str]:
    """A model root holding the service checkpoint (v1) and a second, differently initialised one (v2)."""
    root = tmp_path_factory.mktemp("model-root")
    other = tmp_path_factory.mktemp("ckpt-v2")
    rng = random.Random(1)
    ids = [str(i) for i in range(1, N_ITEMS + 1)]
    save_checkpoint(other, make_model(n_items=N_ITEMS, seed=1), ids, [rng.randint(0, 100) for _ in ids])
    v1 = add_version(root, service_checkpoint.path)
    v2 = add_version(root, other)
    assert v1 == service_checkpoint.version and v2 != v1
    return root, v1, v2


def _settings(root: Path, v1: str, url: str, **extra: object) -> Settings:
    base = {
        "model": root / v1,
        "model_root": root,
        "redis_url": url,
        "key_prefix": f"l{uuid.uuid4().hex[:10]}",
        "consume_metrics_port": 0,
        "stream_lease_ms": 1500,
        "stream_partitions": 2,
        "cas_max_retries": 200,
    }
    return Settings(**{**base, **extra})


def _events(users: dict[str, int], seed: int, tag: str, t0: float = 1.7e9) -> list[dict]:
    rng = random.Random(seed)
    todo = [u for u, n in users.items() for _ in range(n)]
    rng.shuffle(todo)
    seen: Counter = Counter()
    out = []
    for u in todo:
        seen[u] += 1
        out.append({"user_id": u, "item_id": str(rng.randint(1, N_ITEMS)), "ts": t0 + seen[u], "event_id": tag})
        out[-1]["event_id"] = f"{tag}{seen[u]}"
    return out


def _counts(url: str, prefix: str, version: str, users) -> dict[str, int]:
    c = redis.Redis.from_url(url, socket_timeout=30)
    try:
        return {u: int(c.hget(f"{prefix}:{version}:{{u:{u}}}:s", "n") or 0) for u in users}
    finally:
        c.close()


def _run(body, timeout: float = 240.0) -> None:
    """Run a test body with a bound, so a stuck step fails the test (naming the bound) instead of hanging it."""

    async def bounded() -> None:
        try:
            await asyncio.wait_for(body(), timeout)
        except TimeoutError:
            pytest.fail(f"test body did not finish within {timeout:.0f} s")

    asyncio.run(bounded())


class Running:
    """An in-process ``hytrec consume`` (with the dual write of ``settings.write_versions``)."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings

    async def __aenter__(self) -> Running:
        s = self.s
        self.model = ServingModel.load(s.model)
        self.store = await open_store(s, self.model.version)
        self.batcher = EventBatcher(self.model, self.store, 64, 0.0, 512)
        self.batcher.start()
        self.mirrors = await open_mirrors(s, self.model.version, asyncio.to_thread)
        ingestor = EventIngestor(self.model, self.batcher, False, [m.ingestor for m in self.mirrors])
        self.consumer = Consumer(s, self.store, ingestor)
        self.task = asyncio.create_task(self.consumer.run())
        return self

    async def wait(self, check, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(check):
            assert time.monotonic() < deadline, "consumer did not get there in time"
            assert not self.task.done(), self.task
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        self.consumer.stop()
        await asyncio.wait_for(self.task, 30)
        for m in self.mirrors:
            await asyncio.wait_for(m.close(), 15)
        await asyncio.wait_for(self.batcher.stop(), 15)
        await asyncio.wait_for(self.store.close(), 15)


def test_deleted_user_does_not_come_back_through_consumer_archive_export_or_backfill(
    model_root: tuple[Path, str, str], redis_standalone_url: str, tmp_path: Path
) -> None:
    root, v1, v2 = model_root
    s = _settings(root, v1, redis_standalone_url)
    url, prefix = redis_standalone_url, s.key_prefix
    users = [f"u{i}" for i in range(6)]
    sync = redis.Redis.from_url(url, socket_timeout=30)
    producer = StreamProducer.from_settings(s)
    arch_dir = tmp_path / "archive"

    async def body() -> None:
        producer.add(_events(dict.fromkeys(users, 10), 0, "a"))
        async with Running(s) as c:
            await c.wait(lambda: all(n == 10 for n in _counts(url, prefix, v1, users).values()))
        first = Archive(arch_dir, producer.layout).append(sync, {})
        assert sum(p["archived"] for p in first["partitions"].values()) == 60
        again = Archive(arch_dir, producer.layout).append(sync, {})  # idempotent: nothing new to archive
        assert sum(p["archived"] for p in again["partitions"].values()) == 0
        n_files = sum(len(Archive(arch_dir, producer.layout).files(p)) for p in range(2))
        for part in producer.layout.partitions:  # the retention drops what was archived
            sync.xtrim(part.stream, maxlen=0)

        # u3's events are produced but not consumed yet when u3 and u1 are erased through the API
        producer.add(_events({"u3": 4}, 1, "b"))
        async with running(s) as (client, _):
            for u in ("u1", "u3"):
                assert (await client.delete(f"/v1/users/{u}")).status_code == 200
        stones = load_tombstones(sync, prefix)
        assert set(stones) == {"u1", "u3"}
        producer.add(_events({"u1": 5, "u2": 5}, 2, "c", t0=1.8e9))  # u1 comes back with a new history
        async with Running(s) as c:
            await c.wait(lambda: _counts(url, prefix, v1, ["u1", "u2"]) == {"u1": 5, "u2": 15})
            await asyncio.sleep(0.3)
            assert c.consumer.totals.applied == 10 and c.consumer.totals.as_dict()["applied"] == 10
        assert _counts(url, prefix, v1, ["u3"]) == {"u3": 0}  # u3's 4 earlier entries were acknowledged, unapplied
        assert sync.exists(f"{prefix}:{v1}:{{u:u3}}:s") == 0

        second = Archive(arch_dir, producer.layout).append(sync, stones)
        assert second["purge"]["erasures"] == 2 and second["purge"]["entries_removed"] == 20  # u1 and u3: 10 each
        assert sum(p["erased"] for p in second["partitions"].values()) == 4  # u3's, never archived
        assert sum(p["archived"] for p in second["partitions"].values()) == 10
        arch = Archive(arch_dir, producer.layout)
        assert sum(len(arch.files(p)) for p in range(2)) >= n_files
        archived = Counter(e.user_id for p in range(2) for e in arch.entries(p))
        assert archived == {"u0": 10, "u1": 5, "u2": 15, "u4": 10, "u5": 10}
        assert Archive(arch_dir, producer.layout).purge(stones)["erasures"] == 0  # purged once

        out = tmp_path / "train.tsv.gz"
        n = write_training_file(iter_log(sync, producer.layout, arch, stones), out)
        u, _, _ = read_events(out)
        assert n == 50 and Counter(u.tolist()) == archived

        # a rebuild of a new version from the log: u1 has only its new history, u3 nothing
        s2 = _settings(root, v2, url, key_prefix=prefix)
        m2 = ServingModel.load(root / v2)
        store = await open_store(s2, v2)
        try:
            report = await Backfill(m2, store, asyncio.to_thread).from_stream(sync, producer.layout, arch, stones)
        finally:
            await store.close()
        assert report.users == 5 and report.events == 50
        assert _counts(url, prefix, v2, users) == {"u0": 10, "u1": 5, "u2": 15, "u3": 0, "u4": 10, "u5": 10}

    try:
        _run(body)
    finally:
        producer.close()
        sync.close()


def test_backfill_from_a_stream_range_equals_streaming_the_same_events(
    model_root: tuple[Path, str, str], redis_standalone_url: str
) -> None:
    root, v1, _ = model_root
    s = _settings(root, v1, redis_standalone_url, stream_batch_size=37)  # many small increments when streaming
    url, prefix = redis_standalone_url, s.key_prefix
    lengths = {f"p{i}": n for i, n in enumerate([1, 3, 17, 63, 64, 65, 130, 200, 7, 90, 400, 2])}
    producer = StreamProducer.from_settings(s)
    sync = redis.Redis.from_url(url, socket_timeout=30)
    model = ServingModel.load(root / v1)

    async def body() -> None:
        producer.add(_events(lengths, 5, "e"))
        async with Running(s) as c:
            await c.wait(lambda: _counts(url, prefix, v1, lengths) == lengths)
        copy = await open_store(s, "backfill-copy")  # same model, another key namespace
        try:
            report = await Backfill(model, copy, asyncio.to_thread).from_stream(sync, producer.layout, None, {})
        finally:
            await copy.close()
        assert report.users == len(lengths) and report.events == sum(lengths.values())
        assert _counts(url, prefix, "backfill-copy", lengths) == lengths
        for u in lengths:
            streamed = model.decode(sync.hget(f"{prefix}:{v1}:{{u:{u}}}:s", "blob"))
            built = model.decode(sync.hget(f"{prefix}:backfill-copy:{{u:{u}}}:s", "blob"))
            for name in ("tadn", "summary", "last_ts", "count", "ring_items", "ring_ts", "hidden"):
                a, b = getattr(streamed, name), getattr(built, name)
                if a.is_floating_point():
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
                else:
                    assert torch.equal(a, b), u
            now = [1.7e9 + 1000]
            top_a = model.recommend(streamed, now, 10, [True])[0].item_ids
            top_b = model.recommend(built, now, 10, [True])[0].item_ids
            assert top_a == top_b, u
            # the mark is the user's last entry: the stream's marks field is the same on both
            part = producer.layout.of_user(u)
            assert (
                sync.hget(f"{prefix}:backfill-copy:{{u:{u}}}:s", part.mark_field).split()[0]
                == sync.hget(f"{prefix}:{v1}:{{u:{u}}}:s", part.mark_field).split()[0]
            )

    try:
        _run(body)
    finally:
        producer.close()
        sync.close()


def test_backfill_racing_a_live_consumers_dual_write_gives_exact_history_lengths(
    model_root: tuple[Path, str, str], redis_standalone_url: str
) -> None:
    root, v1, v2 = model_root
    url = redis_standalone_url
    s = _settings(root, v1, url, stream_batch_size=50)
    dual = _settings(root, v1, url, key_prefix=s.key_prefix, stream_batch_size=50, write_versions=v2)
    prefix = s.key_prefix
    users = [f"r{i}" for i in range(40)]
    producer = StreamProducer.from_settings(s)
    sync = redis.Redis.from_url(url, socket_timeout=30)
    m2 = ServingModel.load(root / v2)
    sent: Counter = Counter()
    rng = random.Random(7)

    def produce(n: int, t0: float) -> None:
        batch = []
        for _ in range(n):
            u = rng.choice(users)
            sent[u] += 1
            batch.append({"user_id": u, "item_id": str(rng.randint(1, N_ITEMS)), "ts": t0 + sent[u]})
        producer.add(batch)

    async def body() -> None:
        produce(3000, 1.7e9)  # the history, consumed by the live version only
        async with Running(s) as c:
            await c.wait(lambda: _counts(url, prefix, v1, users) == {u: sent[u] for u in users})
        stop = threading.Event()

        def keep_producing() -> None:
            while not stop.is_set():
                produce(20, 1.7e9)
                time.sleep(0.05)

        async with Running(dual) as c:  # dual write on first, then the backfill races it
            thread = threading.Thread(target=keep_producing)
            thread.start()
            await asyncio.sleep(0.3)
            store = await open_store(dual, v2)
            try:
                report = await asyncio.wait_for(
                    Backfill(m2, store, asyncio.to_thread).from_stream(sync, producer.layout, None, {}), 120
                )
            finally:
                await asyncio.sleep(0.3)
                stop.set()
                await asyncio.to_thread(thread.join, 30)
                assert not thread.is_alive(), "the producing thread did not stop"
                await store.close()
            want = {u: sent[u] for u in users}
            await c.wait(lambda: _counts(url, prefix, v1, users) == want and _counts(url, prefix, v2, users) == want)
        assert report.pending == 0
        print("race report", report.as_dict(), "events", sum(sent.values()))
        for u in users:  # the count inside the state agrees with the hash's
            state = m2.decode(sync.hget(f"{prefix}:{v2}:{{u:{u}}}:s", "blob"))
            assert int(state.count[0]) == sent[u]

    try:
        _run(body)
    finally:
        producer.close()
        sync.close()


def test_rest_posts_and_stream_entries_racing_a_backfill_give_exact_history_lengths_on_both_versions(
    model_root: tuple[Path, str, str], redis_standalone_url: str
) -> None:
    """REST posts and stream entries keep arriving, for the same users, while v2 is backfilled from the log: the
    app writes each post to its served v1 and logs it, the consumer applies the logged entry to v2 with its mark.
    Afterwards every user's history length is exact on both versions (no post missing or doubled on v2). With a
    post mirrored to v2 by the app, unmarked (the earlier design), a post racing the backfill was lost or doubled."""
    root, v1, v2 = model_root
    url = redis_standalone_url
    s = _settings(root, v1, url, stream_batch_size=50)
    dual = _settings(root, v1, url, key_prefix=s.key_prefix, stream_batch_size=50, write_versions=v2)
    prefix = s.key_prefix
    users = [f"q{i}" for i in range(30)]
    producer = StreamProducer.from_settings(s)
    sync = redis.Redis.from_url(url, socket_timeout=30)
    m2 = ServingModel.load(root / v2)
    sent: Counter = Counter()  # stream entries produced per user
    posted: Counter = Counter()  # events the app applied per user (its answers)
    rng = random.Random(11)
    n_posts = [0]

    live = users[:20]  # the users with events during the race (caught up); the others are built by the main pass

    def produce(n: int, among: list[str]) -> None:
        batch = []
        for _ in range(n):
            u = rng.choice(among)
            sent[u] += 1
            batch.append({"user_id": u, "item_id": str(rng.randint(1, N_ITEMS)), "ts": 1.7e9 + sent[u]})
        producer.add(batch)

    async def post(client, n: int, among: list[str]) -> None:  # noqa: ANN001
        n_posts[0] += 1
        events = [
            {
                "user_id": rng.choice(among),
                "item_id": str(rng.randint(1, N_ITEMS)),
                "ts": 1.7e9 + 5000 + n_posts[0],
                "event_id": f"p{n_posts[0]}-{k}",
            }
            for k in range(n)
        ]
        r = await client.post("/v1/events", json={"events": events})
        assert r.status_code == 200 and r.json()["applied"] == n, r.text
        posted.update(e["user_id"] for e in events)

    def want() -> dict[str, int]:
        return {u: sent[u] + posted[u] for u in users}

    async def body() -> None:
        async with running(dual) as (client, app):  # writes v1 only (and logs): v2 is the consumer's
            assert app.state.lifecycle.runtime.mirrors == ()
            produce(2000, users)  # the history, in v1 only
            for _ in range(20):
                await post(client, 10, users)
            async with Running(s) as c:
                await c.wait(lambda: _counts(url, prefix, v1, users) == want())
            assert _counts(url, prefix, v2, users) == dict.fromkeys(users, 0)
            stop = threading.Event()

            def keep_producing() -> None:
                while not stop.is_set():
                    produce(10, live)
                    time.sleep(0.03)

            async def keep_posting() -> None:
                while not stop.is_set():
                    await post(client, 5, live)
                    await asyncio.sleep(0.02)

            async with Running(dual) as c:  # the dual write on first, then the backfill races both paths
                thread = threading.Thread(target=keep_producing)
                thread.start()
                posting = asyncio.create_task(keep_posting())
                await asyncio.sleep(0.3)
                store = await open_store(dual, v2)
                try:
                    report = await asyncio.wait_for(
                        Backfill(m2, store, asyncio.to_thread).from_stream(sync, producer.layout, None, {}), 120
                    )
                    await asyncio.sleep(0.3)
                finally:
                    stop.set()
                    await asyncio.to_thread(thread.join, 30)
                    assert not thread.is_alive(), "the producing thread did not stop"
                    await asyncio.wait_for(posting, 30)
                    await store.close()
                await c.wait(
                    lambda: _counts(url, prefix, v1, users) == want() and _counts(url, prefix, v2, users) == want()
                )
                logged = c.consumer.totals.logged
        assert report.pending == 0
        assert 0 < report.caught_up < report.users  # both backfill paths ran: a plain write, and a catch-up
        print(
            "rest race report",
            report.as_dict(),
            "stream",
            sum(sent.values()),
            "posted",
            sum(posted.values()),
            "posts",
            n_posts[0],
            "logged seen by the dual consumer",
            logged,
        )
        assert sum(posted.values()) > 200 and logged > 0  # posts did arrive while v2 was dual-written
        for u in users:  # the count inside the state agrees with the hash's
            state = m2.decode(sync.hget(f"{prefix}:{v2}:{{u:{u}}}:s", "blob"))
            assert int(state.count[0]) == want()[u], u

    try:
        _run(body)
    finally:
        producer.close()
        sync.close()


def test_write_versions_that_no_consumer_writes_are_reported(
    model_root: tuple[Path, str, str],
    redis_standalone_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """While posts are logged, a write version gets posted events from a consumer only: the worker opens no
    mirror for it, counts it in ``hytrec_write_versions_unconsumed`` until a consumer reports writing it, and
    ``hytrec versions show`` names it under ``unconsumed``. A backfill of the served version warns and names who
    serves it."""
    from hytrec.service.commands import backfill, versions_show
    from hytrec.service.swap import set_desired
    from hytrec.service.versions import MirrorSet

    root, v1, v2 = model_root
    url = redis_standalone_url
    s = _settings(root, v1, url, versions_poll_s=600.0)
    env = (("REDIS_URL", url), ("KEY_PREFIX", s.key_prefix), ("VERSIONS_POLL_S", "600"), ("MODEL", str(root / v1)))
    for name, value in env:  # restored after the test (the backfill command sets HYTREC_MODEL itself)
        monkeypatch.setenv(f"HYTREC_{name}", value)

    async def shown() -> list[str]:  # the command itself, in a thread (it runs its own event loop)
        capsys.readouterr()
        await asyncio.to_thread(versions_show)
        return json.loads(capsys.readouterr().out)["unconsumed"]

    async def gauge(client) -> float:  # noqa: ANN001
        text = (await client.get("/metrics")).text
        return next(float(x.split()[-1]) for x in text.splitlines() if x.startswith("hytrec_write_versions_unconsumed"))

    async def body() -> None:
        async with running(s) as (client, app):
            lc = app.state.lifecycle
            await lc.watcher.check()
            assert lc.watcher.unconsumed == [] and await gauge(client) == 0
            await set_desired(lc.runtime.store.client, s.key_prefix, write=[v2])
            await lc.watcher.check()
            assert lc.runtime.mirrors == ()  # the worker writes v1 alone
            assert lc.watcher.unconsumed == [v2] and await gauge(client) == 1
            assert await shown() == [v2]
            async with Running(s) as c:  # a consumer following the desired versions writes v1 and v2
                mirrors = MirrorSet(s, c.consumer.ingestor, c.store.client, asyncio.to_thread, c.consumer.id)
                await mirrors.refresh()
                try:
                    await lc.watcher.check()
                    assert lc.watcher.unconsumed == [] and await gauge(client) == 0
                    assert await shown() == []
                finally:
                    await mirrors.close()  # its writers entry goes
            await lc.watcher.check()
            assert lc.watcher.unconsumed == [v2] and await gauge(client) == 1

            async def backfill_of(version: str) -> dict:  # the command itself, from the (empty) stream
                capsys.readouterr()
                await asyncio.to_thread(backfill, from_stream=True, model=root / version)
                out = capsys.readouterr()
                return {**json.loads(out.out), "stderr": out.err}

            served = await backfill_of(v1)  # the version this worker serves: a warning, and who serves it
            assert served["served_by"] == [f"worker-{os.getpid()}"] and "warning" in served["stderr"]
            prepared = await backfill_of(v2)
            assert prepared["served_by"] == [] and "warning" not in prepared["stderr"]

    _run(body, 120)


def _logged(sync: redis.Redis, layout) -> list[tuple[str, dict]]:  # noqa: ANN001
    """Every entry the service logged (``origin=rest``), over all partitions."""
    out = []
    for part in layout.partitions:
        for eid, fields in sync.xrange(part.stream):
            f = {k.decode(): v.decode() for k, v in fields.items()}
            if f.get("origin") == "rest":
                out.append((eid.decode(), f))
    return out


def test_posted_events_are_logged_once_exported_and_a_backfill_from_the_log_equals_the_live_state(
    model_root: tuple[Path, str, str], redis_standalone_url: str, tmp_path: Path
) -> None:
    """POST /v1/events lands in the event log exactly once per applied event (a resent post and a rejected one
    log nothing), ``hytrec export`` writes it, a consumer of the same stream does not apply it again, and a
    backfill from the log rebuilds the live states (same top-10)."""
    root, v1, _ = model_root
    url = redis_standalone_url
    s = _settings(root, v1, url, strict_items=True)
    prefix = s.key_prefix
    users = [f"w{i}" for i in range(8)]
    posts = _events(dict.fromkeys(users, 30), 3, "r")  # 240 events, event ids r1..r30 per user
    no_ids = [{"user_id": "w1", "item_id": "5", "ts": 1.7e9 + 100}]
    sync = redis.Redis.from_url(url, socket_timeout=30)
    producer = StreamProducer.from_settings(s)
    model = ServingModel.load(root / v1)
    want = {u: 30 for u in users} | {"w1": 32}

    async def body() -> None:
        async with running(s) as (client, _):
            for k in range(0, len(posts), 40):
                r = await client.post("/v1/events", json={"events": posts[k : k + 40]})
                assert r.status_code == 200 and r.json()["applied"] == 40, r.text
            again = await client.post("/v1/events", json={"events": posts[:40]})  # a resent post
            assert again.status_code == 200 and again.json()["applied"] == 0 and again.json()["duplicates"] == 40
            bad = [{"user_id": "w0", "item_id": "no-such-item", "ts": 1.7e9 + 50, "event_id": "x1"}, posts[0]]
            bad[1] = {**bad[1], "event_id": "x2"}
            rejected = await client.post("/v1/events", json={"events": bad})  # strict mode: nothing applied
            assert rejected.status_code == 422
            for _ in range(2):  # no event id: each post is a new event, applied and logged
                assert (await client.post("/v1/events", json={"events": no_ids})).json()["applied"] == 1
        assert _counts(url, prefix, v1, users) == want
        logged = _logged(sync, producer.layout)
        assert Counter(f["user_id"] for _, f in logged) == want
        ids = [(f["user_id"], f["event_id"]) for _, f in logged if "event_id" in f]
        assert len(ids) == len(set(ids)) == 240 and not any(e.startswith("x") for _, e in ids)
        for eid, f in logged:  # each in its user's partition
            assert any(eid == e.decode() for e, _ in sync.xrange(producer.layout.of_user(f["user_id"]).stream))

        async with Running(s) as c:  # the consumer acknowledges them and applies none
            await c.wait(lambda: c.consumer.totals.logged == len(logged))
            assert c.consumer.totals.applied == 0
        assert _counts(url, prefix, v1, users) == want

        env = {
            **os.environ,
            "HYTREC_REDIS_URL": url,
            "HYTREC_KEY_PREFIX": prefix,
            "HYTREC_STREAM_PARTITIONS": "2",
            "PYTHONPATH": str(REPO),
        }
        out = tmp_path / "train.tsv.gz"
        res = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "hytrec.cli", "export", "--out", str(out)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout)["events"] == sum(want.values())
        u, items, _ = read_events(out)
        assert Counter(u.tolist()) == want

        copy = await open_store(s, "rebuilt")  # same model, another key namespace
        try:
            report = await Backfill(model, copy, asyncio.to_thread).from_stream(sync, producer.layout, None, {})
        finally:
            await copy.close()
        assert report.users == len(users) and report.events == sum(want.values())
        for user in users:
            live = model.decode(sync.hget(f"{prefix}:{v1}:{{u:{user}}}:s", "blob"))
            built = model.decode(sync.hget(f"{prefix}:rebuilt:{{u:{user}}}:s", "blob"))
            torch.testing.assert_close(live.tadn, built.tadn, rtol=1e-4, atol=1e-4)
            now = [1.7e9 + 1000]
            top = [model.recommend(st, now, 10, [True])[0].item_ids for st in (live, built)]
            assert top[0] == top[1], user

    try:
        _run(body)
    finally:
        producer.close()
        sync.close()


def test_a_stream_write_racing_a_delete_is_refused_inside_the_compare_and_set(
    model_root: tuple[Path, str, str], redis_standalone_url: str
) -> None:
    """A consumer batch read before ``DELETE /v1/users/{id}`` and committed after it must not bring the user
    back: the erasure lands between the batch's read and its compare-and-set (deterministically, from inside
    the store's runner), and the write is refused by the script, for a user with a state and a new one."""
    from hytrec.state_store import entry_key
    from hytrec.streams.erasure import stream_layout, write_tombstone

    root, v1, _ = model_root
    url = redis_standalone_url
    s = _settings(root, v1, url)
    prefix = s.key_prefix
    layout = stream_layout(s)
    model = ServingModel.load(root / v1)
    producer = StreamProducer.from_settings(s)
    sync = redis.Redis.from_url(url, socket_timeout=30)

    async def body() -> None:
        base = await open_store(s, v1)
        ing = EventIngestor(model, EventBatcher(model, base, 64, 0.0, 64), False)
        ing.batcher.start()
        old = _events({"old": 5}, 1, "a")
        entries = producer.add(old)  # "old" has a state built from its first 3 entries
        part = layout.of_user("old")
        first = await ing.ingest_entries(
            [Event(**e) for e in old[:3]], entries[:3], part.mark_field, 1, loop_time() + 60
        )
        assert first.applied == 3
        fresh = _events({"new": 4}, 2, "b")
        fresh_ids = producer.add(fresh)
        await ing.batcher.stop()
        await base.close()

        erase_next: list[str] = []  # erased by the next compute, between the batch's read and its CAS

        async def racing(fn):  # noqa: ANN001, ANN202
            while erase_next:
                user = erase_next.pop()
                await write_tombstone(store.client, layout, user)
                await store.delete_user(user)
            return await asyncio.to_thread(fn)

        store = await open_store(s, v1, runner=racing)
        batcher = EventBatcher(model, store, 64, 0.0, 64)
        batcher.start()
        ing = EventIngestor(model, batcher, False)
        try:
            erase_next.append("old")  # a state before: the delete moves its version, the retry is refused
            late = await ing.ingest_entries(
                [Event(**e) for e in old[3:]], entries[3:], part.mark_field, 1, loop_time() + 60
            )
            assert not erase_next and late.applied == 0 and late._erased == 2
            erase_next.append("new")  # no state before: the version check alone would let the write in
            mark = layout.of_user("new").mark_field
            res = await ing.ingest_entries([Event(**e) for e in fresh], fresh_ids, mark, 1, loop_time() + 60)
            assert not erase_next and res.applied == 0 and res._erased == 4
            assert sync.exists(f"{prefix}:{v1}:{{u:old}}:s", f"{prefix}:{v1}:{{u:new}}:s") == 0
            # an entry produced after the erasure is a new history: applied
            after = _events({"old": 1}, 3, "c", t0=1.8e9)
            after_ids = producer.add(after)
            assert entry_key(after_ids[0]) > entry_key(entries[-1])
            res = await ing.ingest_entries([Event(**e) for e in after], after_ids, part.mark_field, 1, loop_time() + 60)
            assert res.applied == 1 and _counts(url, prefix, v1, ["old"]) == {"old": 1}
        finally:
            await batcher.stop()
            await store.close()

    try:
        _run(body)
    finally:
        producer.close()
        sync.close()


def test_a_consumer_follows_the_desired_versions_without_a_restart(
    model_root: tuple[Path, str, str], redis_standalone_url: str
) -> None:
    """A consumer started on v1 consumes with v2 once v2 is the desired live version and stops writing v1 once
    v1 leaves the write set, then goes back: each change is followed from its announcement (the poll period is
    far longer than the test), and every produced event is held once by the versions written at the time."""
    from hytrec.service.swap import set_desired, writers_key
    from hytrec.service.versions import MirrorSet

    root, v1, v2 = model_root
    url = redis_standalone_url
    s = _settings(root, v1, url, versions_poll_s=600.0, stream_batch_size=50)
    prefix = s.key_prefix
    users = [f"f{i}" for i in range(6)]
    producer = StreamProducer.from_settings(s)
    sync = redis.Redis.from_url(url, socket_timeout=30)
    t0 = [1.7e9]

    def produce(n: int) -> None:
        producer.add(_events(dict.fromkeys(users, n), int(t0[0]) % 97, f"e{int(t0[0])}-", t0=t0[0]))
        t0[0] += 1000

    async def body() -> None:
        async with Running(s) as c:
            mirrors = MirrorSet(s, c.consumer.ingestor, c.store.client, asyncio.to_thread, c.consumer.id, c.consumer)
            await mirrors.refresh()
            follow = asyncio.create_task(mirrors.follow())
            me = f"consumer-{c.consumer.id}"

            def writes() -> str:
                raw = sync.hget(writers_key(prefix), me)
                return " ".join(raw.decode().split()[:2]) if raw else ""

            try:
                produce(10)
                await c.wait(lambda: _counts(url, prefix, v1, users) == dict.fromkeys(users, 10), 30)
                assert writes() == f"{v1} {v1}"

                await set_desired(c.store.client, prefix, live=v2, write=[v1])  # promote, v1 still written
                await c.wait(lambda: writes() == f"{v2} {v2},{v1}", 15)
                assert c.consumer.ingestor.model.version == v2
                produce(5)
                await c.wait(lambda: _counts(url, prefix, v1, users) == dict.fromkeys(users, 15), 30)
                await c.wait(lambda: _counts(url, prefix, v2, users) == dict.fromkeys(users, 5), 30)

                await set_desired(c.store.client, prefix, write=[])  # v1 no longer written: no restart needed
                await c.wait(lambda: writes() == f"{v2} {v2}", 15)
                produce(4)
                await c.wait(lambda: _counts(url, prefix, v2, users) == dict.fromkeys(users, 9), 30)
                await asyncio.sleep(0.5)
                assert _counts(url, prefix, v1, users) == dict.fromkeys(users, 15)

                await set_desired(c.store.client, prefix, live=v1, write=[v2])  # and back (a rollback)
                await c.wait(lambda: writes() == f"{v1} {v1},{v2}", 15)
                produce(2)
                await c.wait(lambda: _counts(url, prefix, v1, users) == dict.fromkeys(users, 17), 30)
                await c.wait(lambda: _counts(url, prefix, v2, users) == dict.fromkeys(users, 11), 30)
            finally:
                follow.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follow
                await mirrors.close()

    try:
        _run(body)
    finally:
        producer.close()
        sync.close()
