"""Model lifecycle, part 3 to 5: the version swap under load (real `hytrec serve`, 2 workers), canary share
and stickiness, shadow logs, and dropping a retired version (docs/lifecycle.md)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import redis

from hytrec.service.settings import Settings
from hytrec.service.swap import canary_bucket, set_desired
from hytrec.state_store import open_store
from tests.service_fixtures import REPO, Checkpoint, ServiceProcess, service_env
from tests.test_app import running
from tests.test_lifecycle import model_root  # noqa: F401 - the fixture

ADMIN = "admin-key-0123"


async def open_loop(url: str, path_of, rate: float, seconds: float, rng: random.Random) -> list[dict]:
    """Send GETs at Poisson times whatever the answers (open loop), one connection each; every outcome kept."""
    out: list[dict] = []
    limits = httpx.Limits(max_keepalive_connections=0, max_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=10.0, limits=limits) as client:

        async def one(path: str, sent: float) -> None:
            try:
                r = await client.get(path)
                body = r.json() if r.status_code == 200 else r.text
                out.append(
                    {
                        "status": r.status_code,
                        "worker": r.headers.get("x-hytrec-worker"),
                        "seq": int(r.headers.get("x-hytrec-seq", "0")),
                        "version": body.get("model_version") if isinstance(body, dict) else None,
                        "detail": None if isinstance(body, dict) else body[:300],
                        "sent": sent,
                    }
                )
            except httpx.HTTPError as exc:
                out.append({"status": 0, "error": repr(exc), "sent": sent})

        tasks = []
        start = time.monotonic()
        t = 0.0
        while t < seconds:
            t += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))
            tasks.append(asyncio.create_task(one(path_of(), t)))
        await asyncio.gather(*tasks)
    return out


def _run(body, timeout: float = 180.0):  # noqa: ANN001, ANN202
    """Run a test body with a bound, so a stuck step fails the test (naming the bound) instead of hanging it."""

    async def bounded():  # noqa: ANN202
        try:
            return await asyncio.wait_for(body(), timeout)
        except TimeoutError:
            pytest.fail(f"test body did not finish within {timeout:.0f} s")

    return asyncio.run(bounded())


def _wait_workers(url: str, n: int, timeout: float = 60.0) -> None:
    """Until ``n`` distinct workers have answered /readyz 200 (the supervisor's first ready one is not all)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < n:
        assert time.monotonic() < deadline, f"only workers {seen} became ready"
        r = httpx.get(url + "/readyz", headers={"Connection": "close"}, timeout=5)
        if r.status_code == 200:
            seen.add(r.headers["x-hytrec-worker"])
        time.sleep(0.02)


def test_swap_under_open_loop_load_no_failed_request_and_each_worker_switches_once(
    model_root: tuple[Path, str, str],  # noqa: F811
    redis_standalone_url: str,
    tmp_path: Path,
) -> None:
    root, v1, v2 = model_root
    env = service_env(
        Checkpoint(root / v1, v1, []),
        redis_standalone_url,
        workers=2,
        model_root=root,
        admin_keys=ADMIN,
        versions_poll_s=0.5,
        max_queue_delay_ms=250,  # the shared 2-core test machine: shedding at 25 ms would fail requests without a swap
        request_timeout_ms=3000,
    )
    server = ServiceProcess(env, tmp_path).start()
    _wait_workers(server.url, 2)
    rng = random.Random(3)
    try:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            events = [
                {"user_id": f"w{u}", "item_id": str(rng.randint(1, 300)), "ts": 1.7e9 + k}
                for u in range(30)
                for k in range(5)
            ]
            posted = http.post("/v1/events", json={"events": events})
            assert posted.status_code == 200 and posted.json()["model_version"] == v1, posted.text

        async def body() -> list[dict]:
            load = asyncio.create_task(
                open_loop(server.url, lambda: f"/v1/users/w{rng.randrange(30)}/recommendations?k=5", 30, 9.0, rng)
            )
            await asyncio.sleep(3.0)
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as admin:
                r = await admin.put(
                    "/v1/admin/model", json={"version": v2}, headers={"Authorization": f"Bearer {ADMIN}"}
                )
                assert r.status_code == 200, r.text
                assert r.json()["desired"]["live"] == v2
                bad = await admin.put(
                    "/v1/admin/model", json={"candidate": "nope-1"}, headers={"Authorization": f"Bearer {ADMIN}"}
                )
                assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "candidate"
            return await load

        answers = _run(body)
        failed = [a for a in answers if a["status"] != 200]
        by_worker: dict[str, list[dict]] = defaultdict(list)
        for a in answers:
            if a["status"] == 200:
                by_worker[a["worker"]].append(a)
        switches = {}
        for w, rows in by_worker.items():
            versions = [a["version"] for a in sorted(rows, key=lambda a: a["seq"])]
            switches[w] = sum(1 for x, y in zip(versions, versions[1:], strict=False) if x != y)
            assert versions[0] == v1 and versions[-1] == v2, (w, versions)
        print(
            "swap under load:",
            json.dumps(
                {
                    "requests": len(answers),
                    "failed": len(failed),
                    "workers": {w: {"answers": len(r), "switches": switches[w]} for w, r in by_worker.items()},
                    "v1_answers": sum(a.get("version") == v1 for a in answers),
                    "v2_answers": sum(a.get("version") == v2 for a in answers),
                }
            ),
        )
        assert not failed, [(a["sent"], a.get("detail") or a.get("error")) for a in failed[:5]]
        assert len(by_worker) == 2 and all(n == 1 for n in switches.values()), switches
        seen = set()
        for _ in range(40):  # readiness names the new version on every worker
            r = httpx.get(server.url + "/readyz", headers={"Connection": "close"})
            assert r.status_code == 200 and r.json()["model_version"] == v2
            seen.add(r.headers["x-hytrec-worker"])
            m = httpx.get(server.url + "/v1/model", headers={"Connection": "close"})
            assert m.json()["version"] == v2
            event = {"user_id": "w0", "item_id": "1", "ts": 1.8e9 + len(seen)}
            p = httpx.post(server.url + "/v1/events", json={"events": [event]}, headers={"Connection": "close"})
            assert p.status_code == 200 and p.json()["model_version"] == v2, p.text  # a post names it too
        assert len(seen) == 2
    finally:
        server.stop()


def _app_settings(root: Path, v1: str, url: str, **extra: object) -> Settings:
    return Settings(
        model=root / v1,
        model_root=root,
        redis_url=url,
        key_prefix=f"c{uuid.uuid4().hex[:10]}",
        admin_keys=ADMIN,
        versions_poll_s=0.2,
        **extra,
    )


async def _until(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.05)


def test_canary_share_is_honoured_and_sticky_and_shadow_logs_both(
    model_root: tuple[Path, str, str],  # noqa: F811
    redis_standalone_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, v1, v2 = model_root
    s = _app_settings(root, v1, redis_standalone_url)
    n = 1500

    async def body() -> None:
        async with running(s) as (client, app):
            lc = app.state.lifecycle
            store = lc.runtime.store
            await set_desired(store.client, s.key_prefix, candidate=v2, canary=0.3)
            await _until(lambda: lc.runtime.candidate is not None and lc.runtime.canary == 0.3)

            async def version(u: str) -> str:
                r = await client.get(f"/v1/users/{u}/recommendations?k=3")
                assert r.status_code == 200
                return r.json()["model_version"]

            users = [f"cu-{i}" for i in range(n)]
            first = {u: await version(u) for u in users}
            share = sum(v == v2 for v in first.values()) / n
            sigma = (0.3 * 0.7 / n) ** 0.5
            assert abs(share - 0.3) < 4 * sigma, share
            assert all((first[u] == v2) == (canary_bucket(u) < 0.3) for u in users)
            again = {u: await version(u) for u in users[:300]}
            assert all(again[u] == first[u] for u in again)  # sticky
            await set_desired(store.client, s.key_prefix, canary=0.5)
            await _until(lambda: lc.runtime.canary == 0.5)
            wider = {u: await version(u) for u in users[:300]}
            assert all(wider[u] == v2 for u in users[:300] if first[u] == v2)  # a larger share keeps them
            print("canary share measured", share, "of", n, "users at 0.3 (sigma", round(sigma, 4), ")")

            caplog.set_level(logging.INFO, logger="hytrec.shadow")
            await set_desired(store.client, s.key_prefix, canary=0.0, shadow=True)
            await _until(lambda: lc.runtime.shadow and lc.runtime.canary == 0.0)
            served = {await version(u) for u in users[:20]}
            assert served == {v1}
            await _until(lambda: len([r for r in caplog.records if r.name == "hytrec.shadow"]) >= 20)
            line = json.loads(next(r for r in caplog.records if r.name == "hytrec.shadow").getMessage())
            assert line["live"]["version"] == v1 and line["candidate"]["version"] == v2
            assert len(line["live"]["items"]) == 3 and len(line["candidate"]["items"]) == 3

    _run(body)


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "hytrec.cli", *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=120
    )


def test_versions_drop_removes_the_versions_keys_and_refuses_the_live_one(
    model_root: tuple[Path, str, str],  # noqa: F811
    redis_standalone_url: str,
) -> None:
    root, v1, v2 = model_root
    # REST dual-writes v2 itself: the form without the event log (with it, a consumer writes v2)
    s = _app_settings(root, v1, redis_standalone_url, write_versions=v2, log_posted_events=False)

    async def body() -> None:
        async with running(s) as (client, app):
            assert [m.model.version for m in app.state.lifecycle.runtime.mirrors] == [v2]
            events = [
                {"user_id": f"d{u}", "item_id": str(k + 1), "ts": 1.7e9 + k, "event_id": f"e{k}"}
                for u in range(120)
                for k in range(3)
            ]
            assert (await client.post("/v1/events", json={"events": events})).status_code == 200
        store = await open_store(s, v1)
        await set_desired(store.client, s.key_prefix, live=v1)
        await store.close()

    _run(body)
    c = redis.Redis.from_url(redis_standalone_url, socket_timeout=30)
    p = s.key_prefix
    try:
        assert len(list(c.scan_iter(f"{p}:{v2}:*", count=1000))) == 240  # state + dedup set of 120 users
        assert c.sismember(f"{p}:{{u:d7}}:v", v2)
        env = {"HYTREC_REDIS_URL": redis_standalone_url, "HYTREC_KEY_PREFIX": p, "HYTREC_MODEL_ROOT": str(root)}
        refused = _cli(["versions", "drop", v1], env)
        assert refused.returncode == 1 and "refused" in refused.stdout
        done = _cli(["versions", "drop", v2], env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"model_version": v2, "keys_removed": 240, "users": 120}
        assert list(c.scan_iter(f"{p}:{v2}:*", count=1000)) == []
        assert len(list(c.scan_iter(f"{p}:{v1}:*", count=1000))) == 240  # the live version untouched
        assert not c.sismember(f"{p}:{{u:d7}}:v", v2) and c.sismember(f"{p}:{{u:d7}}:v", v1)
    finally:
        c.close()


def test_a_checkpoint_that_fails_the_parity_probe_is_not_swapped_in(
    model_root: tuple[Path, str, str],  # noqa: F811
    redis_standalone_url: str,
    tmp_path: Path,
) -> None:
    """A desired version whose weights score no finite top-10 (finite item embeddings scaled by 1e20, so the
    checkpoint passes validation and the scores overflow) fails the probe: the worker keeps serving v1, says why
    in ``GET /v1/admin/model`` (``worker.swap_error``), and swaps nothing."""
    import torch

    from hytrec.model.checkpoint import save_checkpoint
    from hytrec.service.versions import add_version
    from tests.helpers_model import make_model
    from tests.service_fixtures import N_ITEMS

    root, v1, _ = model_root
    bad = make_model(n_items=N_ITEMS, seed=3)
    with torch.no_grad():
        bad.item_emb.weight.mul_(1e20)
    ids = [str(i) for i in range(1, N_ITEMS + 1)]
    save_checkpoint(tmp_path / "bad", bad, ids, [1] * N_ITEMS)
    v3 = add_version(root, tmp_path / "bad")
    s = _app_settings(root, v1, redis_standalone_url)

    async def body() -> None:
        async with running(s) as (client, app):
            lc = app.state.lifecycle
            await set_desired(lc.runtime.store.client, s.key_prefix, live=v3)
            await _until(lambda: lc.watcher.error is not None, 60)
            assert lc.watcher.error.startswith("ProbeFailed"), lc.watcher.error
            assert lc.runtime.model.version == v1 and lc.watcher.swaps == 0
            shown = await client.get("/v1/admin/model", headers={"Authorization": f"Bearer {ADMIN}"})
            assert shown.status_code == 200 and shown.json()["worker"]["swap_error"] == lc.watcher.error
            r = await client.get("/v1/users/p1/recommendations?k=3")
            assert r.status_code == 200 and r.json()["model_version"] == v1

    asyncio.run(asyncio.wait_for(body(), 120))
