"""Done-when of the model lifecycle: a new checkpoint goes from training to serving all traffic by the runbook's
commands (docs/lifecycle.md), with no restart of the service and no failed request, under stream and REST load
(recommendation GETs, and event POSTs for the same users as the stream: v2 must hold every one of both once).

Real processes: `hytrec serve` (2 workers), `hytrec consume`, and every runbook command as its own process.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis

from hytrec.streams import StreamProducer
from tests.service_fixtures import REPO, Checkpoint, ServiceProcess, service_env
from tests.test_lifecycle import _settings, model_root  # noqa: F401 - the fixture
from tests.test_lifecycle_serving import ADMIN, _wait_workers

USERS = [f"e{i}" for i in range(40)]


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> dict:
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "hytrec.cli", *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=timeout
    )
    assert res.returncode == 0, (args, res.stdout[-2000:], res.stderr[-3000:])
    out = res.stdout.strip().splitlines()
    try:
        return json.loads("\n".join(out))
    except json.JSONDecodeError:
        return {"text": res.stdout.strip()}


class Load(threading.Thread):
    """Open-loop recommendation GETs (Poisson, one connection each) until stopped; every outcome kept."""

    def __init__(self, url: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.url, self.rate = url, rate
        self.stop = threading.Event()
        self.answers: list[dict] = []

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        rng = random.Random(11)
        limits = httpx.Limits(max_keepalive_connections=0, max_connections=200)
        async with httpx.AsyncClient(base_url=self.url, timeout=10.0, limits=limits) as client:

            async def one(user: str) -> None:
                try:
                    r = await client.get(f"/v1/users/{user}/recommendations?k=5")
                    v = r.json().get("model_version") if r.status_code == 200 else r.text[:200]
                    self.answers.append({"status": r.status_code, "version": v, "t": time.monotonic()})
                except httpx.HTTPError as exc:
                    self.answers.append({"status": 0, "version": repr(exc), "t": time.monotonic()})

            tasks = []
            while not self.stop.is_set():
                await asyncio.sleep(rng.expovariate(self.rate))
                tasks.append(asyncio.create_task(one(rng.choice(USERS))))
            await asyncio.gather(*tasks)


class Poster(threading.Thread):
    """``POST /v1/events`` of 2 events for USERS every 0.2 s until stopped; counts what the service applied."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.posted: Counter = Counter()
        self.answers: list[dict] = []

    def run(self) -> None:
        rng = random.Random(9)
        n = 0
        with httpx.Client(base_url=self.url, timeout=10.0) as client:
            while not self.stop.is_set():
                n += 1
                events = [
                    {
                        "user_id": rng.choice(USERS),
                        "item_id": str(rng.randint(1, 300)),
                        "ts": 1.8e9 + n,
                        "event_id": f"p{n}-{k}",
                    }
                    for k in range(2)
                ]
                try:
                    r = client.post("/v1/events", json={"events": events})
                    self.answers.append({"status": r.status_code, "version": "post", "t": time.monotonic()})
                    if r.status_code == 200 and r.json()["applied"] == len(events):
                        self.posted.update(e["user_id"] for e in events)
                    elif r.status_code == 200:
                        self.answers[-1]["status"] = f"200 applied {r.json()['applied']}"
                except httpx.HTTPError as exc:
                    self.answers.append({"status": 0, "version": repr(exc), "t": time.monotonic()})
                time.sleep(0.2)


class Producer(threading.Thread):
    """Stream events for USERS at a steady rate until stopped; counts what it produced per user."""

    def __init__(self, settings) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.s = settings
        self.stop = threading.Event()
        self.sent: Counter = Counter()

    def run(self) -> None:
        rng = random.Random(5)
        with StreamProducer.from_settings(self.s) as producer:
            while not self.stop.is_set():
                batch = []
                for _ in range(10):
                    u = rng.choice(USERS)
                    self.sent[u] += 1
                    batch.append({"user_id": u, "item_id": str(rng.randint(1, 300)), "ts": 1.7e9 + self.sent[u]})
                producer.add(batch)
                time.sleep(0.1)


def _wait(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.2)


@pytest.mark.timeout(600)  # a whole runbook, real processes (serve, consume, train, backfill...), ~3-5 min here
def test_new_checkpoint_from_training_to_all_traffic_by_the_runbook(
    model_root: tuple[Path, str, str],  # noqa: F811
    redis_standalone_url: str,
    tmp_path: Path,
) -> None:
    root, v1, _ = model_root
    s = _settings(root, v1, redis_standalone_url)
    env = service_env(
        Checkpoint(root / v1, v1, []),
        redis_standalone_url,
        workers=2,
        model_root=root,
        admin_keys=ADMIN,
        versions_poll_s=0.5,
        stream_partitions=2,
        stream_lease_ms=1500,
        max_queue_delay_ms=250,  # the shared 2-core test machine (see the swap test)
        request_timeout_ms=3000,
    )
    env["HYTREC_KEY_PREFIX"] = s.key_prefix
    cli_env = {**env, "HYTREC_CONSUME_METRICS_PORT": "0"}
    server = ServiceProcess(env, tmp_path).start()
    consumers: list[subprocess.Popen] = []

    def start_consumer(model: Path) -> subprocess.Popen:
        full = {**os.environ, **cli_env, "HYTREC_MODEL": str(model), "PYTHONPATH": str(REPO)}
        log = open(tmp_path / f"consume-{len(consumers)}.log", "wb")  # noqa: SIM115 - lives with the process
        p = subprocess.Popen(
            [sys.executable, "-m", "hytrec.cli", "consume"], cwd=REPO, env=full, stdout=log, stderr=log
        )
        consumers.append(p)
        return p

    sync = redis.Redis.from_url(redis_standalone_url, socket_timeout=30)
    producer, load, poster = Producer(s), Load(server.url, 20), Poster(server.url)
    timeline: list[tuple[str, float]] = []

    def step(name: str) -> None:
        timeline.append((name, time.monotonic()))

    def writers_all_include(version: str, n: int) -> bool:
        shown = _cli(["versions", "show"], cli_env)["writers"]
        return len(shown) == n and all(version in w.split(" ")[1].split(",") for w in shown.values())

    def consumers_write(version: str) -> bool:  # the workers write what they serve; a consumer the others
        shown = _cli(["versions", "show"], cli_env)
        mine = [w for who, w in shown["writers"].items() if who.startswith("consumer-")]
        return bool(mine) and all(version in w.split(" ")[1].split(",") for w in mine) and not shown["unconsumed"]

    def counts(version: str) -> dict[str, int]:
        return {u: int(sync.hget(f"{s.key_prefix}:{version}:{{u:{u}}}:s", "n") or 0) for u in USERS}

    try:
        _wait_workers(server.url, 2)
        start_consumer(root / v1)
        producer.start()
        load.start()
        poster.start()
        time.sleep(3)
        # 1. the training data: archive, then export archive + stream
        step("archive")
        _cli(["archive", "--dir", str(tmp_path / "archive")], cli_env)
        step("export")
        exported = _cli(
            ["export", "--archive", str(tmp_path / "archive"), "--out", str(tmp_path / "train.tsv.gz")], cli_env
        )
        assert exported["events"] > 0
        # 2. train a new checkpoint and add it to the model root
        step("train")
        train = ["train", "--data", str(tmp_path / "train.tsv.gz"), "--out", str(tmp_path / "new"), "--epochs", "1"]
        train += ["--d-model", "16", "--window", "8", "--chunk-size", "16", "--batch-tokens", "2048", "--quiet"]
        _cli(train, cli_env)
        v2 = _cli(["versions", "add", str(tmp_path / "new")], cli_env)["text"]
        assert v2 != v1 and (root / v2).is_dir()
        # 3. dual write on, wait until every consumer writes v2 (posts reach v2 from the log), then backfill
        step("write v2")
        _cli(["versions", "set", "--write", v2], cli_env)
        _wait(lambda: consumers_write(v2), 60, "every consumer writes v2")
        step("backfill")
        filled = _cli(
            ["backfill", "--from-stream", "--model", str(root / v2), "--archive", str(tmp_path / "archive")], cli_env
        )
        assert filled["pending"] == 0 and filled["users"] >= len(USERS)
        # 4. canary, then all traffic
        step("canary")
        _cli(["versions", "set", "--candidate", v2, "--canary", "0.5"], cli_env)
        _wait(lambda: any(a["version"] == v2 for a in load.answers[-40:]), 60, "the canary serves")
        step("promote")
        _cli(["versions", "set", "--live", v2, "--candidate", "", "--write", v1], cli_env)
        _wait(
            lambda: len(load.answers) > 40 and all(a["version"] == v2 for a in load.answers[-40:]), 60, "v2 serves all"
        )
        # 5. retire v1: consumers move to v2 (rolling), dual write off, then drop
        step("consumers on v2")
        start_consumer(root / v2)
        time.sleep(3)
        consumers[0].send_signal(signal.SIGTERM)
        assert consumers[0].wait(60) == 0
        _cli(["versions", "set", "--write", ""], cli_env)
        _wait(
            lambda: (
                writers_all_include(v2, 3)
                and not any(v1 in w for w in _cli(["versions", "show"], cli_env)["writers"].values())
            ),
            60,
            "nobody writes v1",
        )
        time.sleep(2)
        producer.stop.set()
        poster.stop.set()
        producer.join(30)
        poster.join(30)
        assert not producer.is_alive() and not poster.is_alive(), "the producer or poster thread did not stop"
        want = {u: producer.sent[u] + poster.posted[u] for u in USERS}
        _wait(lambda: counts(v2) == want, 90, "v2 holds every produced and posted event once")
        step("drop v1")
        dropped = _cli(["versions", "drop", v1], cli_env)
        assert dropped["users"] >= len(USERS) and not list(sync.scan_iter(f"{s.key_prefix}:{v1}:{{u:*", count=1000))
        time.sleep(1)
    finally:
        load.stop.set()
        load.join(30)
        producer.stop.set()
        poster.stop.set()
        for p in consumers:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
        server.stop()
        sync.close()
    failed = [a for a in load.answers + poster.answers if a["status"] != 200]
    served = Counter(a["version"] for a in load.answers if a["status"] == 200)
    t0 = timeline[0][1]
    print(
        "runbook end to end:",
        json.dumps(
            {
                "requests": len(load.answers),
                "failed": len(failed),
                "served": {k[:24]: n for k, n in served.items()},
                "events_produced": sum(producer.sent.values()),
                "posts": len(poster.answers),
                "events_posted": sum(poster.posted.values()),
                "backfill": filled,
                "steps_s": {name: round(t - t0, 1) for name, t in timeline},
            }
        ),
    )
    assert not failed, failed[:5]
    assert server.proc is not None and server.startup_statuses  # one serve process the whole time
