"""Fixtures of the service tests: a small checkpoint and real `hytrec serve` processes on free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.redis_servers import free_port

REPO = Path(__file__).resolve().parents[1]
N_ITEMS = 300
API_KEY = "test-key-0123"


@dataclass
class Checkpoint:
    path: Path
    version: str
    item_ids: list[str]


@dataclass
class ServiceProcess:
    """A `hytrec serve` subprocess; ``startup_statuses`` holds the /readyz codes seen while it started."""

    env: dict[str, str]
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    startup_statuses: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0, until: int = 200) -> ServiceProcess:
        """Start `hytrec serve` and poll /readyz until it answers ``until``."""
        self.launch()
        return self.wait_for(until, timeout)

    def launch(self) -> None:
        env = {**os.environ, **self.env, "HYTREC_PORT": str(self.port), "HYTREC_HOST": "127.0.0.1"}
        env.setdefault("HYTREC_LOG_LEVEL", "warning")
        env["PYTHONPATH"] = str(REPO)
        self.log = open(self.workdir / f"serve-{self.port}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hytrec.cli", "serve"], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_for(self, until: int = 200, timeout: float = 90.0) -> ServiceProcess:
        """Poll /readyz until it answers ``until`` (the codes seen are kept in ``startup_statuses``)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hytrec serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                code = httpx.get(self.url + "/readyz", timeout=1.0).status_code
            except httpx.TransportError:
                code = 0
            if code:
                self.startup_statuses.append(code)
            if code == until:
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"hytrec serve: /readyz never answered {until} in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return (self.workdir / f"serve-{self.port}.log").read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "log", None) is not None:
            self.log.close()


def service_env(ckpt: Checkpoint, redis_url: str, **extra: object) -> dict[str, str]:
    """Environment of a test server: its own key prefix on the shared Redis, plus ``extra`` settings."""
    env = {
        "HYTREC_MODEL": str(ckpt.path),
        "HYTREC_REDIS_URL": redis_url,
        "HYTREC_KEY_PREFIX": f"t{uuid.uuid4().hex[:10]}",
    }
    env.update({f"HYTREC_{k.upper()}": str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="module")
def service(
    service_checkpoint: Checkpoint, redis_standalone_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """One worker, API keys on, small batch and body limits."""
    env = service_env(
        service_checkpoint,
        redis_standalone_url,
        api_keys=f"other-key,{API_KEY}",
        max_batch_events=200,
        max_body_bytes=65536,
        max_k=100,
    )
    proc = ServiceProcess(env, tmp_path_factory.mktemp("serve")).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def strict_service(
    service_checkpoint: Checkpoint, redis_standalone_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """Two uvicorn workers, strict items, no API keys, generous compare-and-set retries."""
    env = service_env(service_checkpoint, redis_standalone_url, workers=2, strict_items="true", cas_max_retries=100)
    proc = ServiceProcess(env, tmp_path_factory.mktemp("serve")).start()
    try:
        yield proc
    finally:
        proc.stop()
