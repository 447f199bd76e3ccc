"""A minimal HTTP/1.1 keep-alive client on raw asyncio protocols: the cheapest way to send a request per arrival.

httpx (and its pools, headers objects and retries) costs enough CPU per request that one core saturates near
400 req/s, so the generator itself would become the bottleneck it is meant to measure. Here a request is a
prebuilt ``bytes`` written to a persistent connection and an answer is parsed just far enough to know its status
and where it ends (Content-Length or chunked). No pipelining: one request per connection at a time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from typing import Any
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost",)


class ProtocolError(ConnectionError):
    """The server's answer was not HTTP/1.x we can frame; the connection is unusable."""


class Target:
    """Host, port and Host header of an ``http://`` base URL (no TLS: the generator must stay cheap)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"only http://host:port URLs are supported, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.base_path = parts.path.rstrip("/")
        self.host_header = f"{self.host}:{self.port}"

    def is_loopback(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def request_bytes(target: Target, method: str, path: str, body: bytes = b"", api_key: str | None = None) -> bytes:
    """One HTTP/1.1 request, built once per send (a few string joins, no header objects)."""
    head = f"{method} {target.base_path}{path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
    if api_key:
        head += f"Authorization: Bearer {api_key}\r\n"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode("latin-1") + body


class Connection(asyncio.Protocol):
    """One persistent connection; :meth:`request` writes a request and resolves with ``(status, body)``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.keep_alive = True
        self._head_end = -1  # parse state of the answer being received
        self._status = 0
        self._length = -1  # -1: not known yet; -2: chunked; -3: until close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            try:
                self._parse()
            except (ProtocolError, ValueError) as exc:
                self.waiter.set_exception(ProtocolError(f"unparsable answer: {exc}"))
                self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        if self._length == -3 and self._head_end >= 0:  # body delimited by the close
            waiter.set_result((self._status, bytes(self.buf[self._head_end :])))
        else:
            waiter.set_exception(ConnectionResetError(f"connection closed before the answer ended: {exc}"))

    def request(self, data: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None and self.waiter is None
        self.waiter = asyncio.get_running_loop().create_future()
        self._head_end, self._length = -1, -1
        self.transport.write(data)
        if self.buf:  # bytes that arrived unasked (should not happen without pipelining)
            self.data_received(b"")
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _parse(self) -> None:
        buf = self.buf
        if self._head_end < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    raise ProtocolError("answer head over 64 KiB")
                return
            head = bytes(buf[:end]).lower()
            if not head.startswith(b"http/1."):
                raise ProtocolError(f"not an HTTP/1.x answer: {head[:40]!r}")
            self._status = int(head[9:12])
            self._head_end = end + 4
            self.keep_alive = head.startswith(b"http/1.1") and b"\r\nconnection: close" not in head
            i = head.find(b"\r\ncontent-length:")
            if self._status < 200 or self._status in (204, 304):
                self._length = 0
            elif i >= 0:
                stop = head.find(b"\r\n", i + 17)
                self._length = int(head[i + 17 : stop if stop >= 0 else None])
            elif b"\r\ntransfer-encoding: chunked" in head:
                self._length = -2
            else:
                self._length, self.keep_alive = -3, False
        if self._length >= 0:
            end = self._head_end + self._length
            if len(buf) < end:
                return
            body = bytes(buf[self._head_end : end])
        elif self._length == -2:
            parsed = _dechunk(buf, self._head_end)
            if parsed is None:
                return
            body, end = parsed
        else:
            return  # until close: connection_lost resolves it
        del buf[:end]
        waiter, self.waiter = self.waiter, None
        assert waiter is not None
        waiter.set_result((self._status, body))


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    """The body of a complete chunked answer starting at ``pos`` and where it ends, or None if incomplete."""
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        except ValueError as exc:
            raise ProtocolError("bad chunk size") from exc
        if size == 0:
            end = buf.find(b"\r\n\r\n", eol)  # trailers, then the blank line
            return (bytes(out), end + 4) if end >= 0 else None
        if len(buf) < eol + 2 + size + 2:
            return None
        out += buf[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2


class Pool:
    """Idle persistent connections to one target, opened on demand; a connection serves one request at a time."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.idle: list[Connection] = []
        self.opened = 0

    async def acquire(self) -> Connection:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Connection, self.target.host, self.target.port)
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.opened += 1
        return conn

    def release(self, conn: Connection) -> None:
        if conn.closed or not conn.keep_alive:
            conn.close()
        else:
            self.idle.append(conn)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


async def get_json(pool: Pool, path: str, api_key: str | None = None, timeout: float = 10.0) -> Any:
    """GET a JSON document (setup only: the catalogue); raises on a non-2xx answer."""
    conn = await pool.acquire()
    try:
        async with asyncio.timeout(timeout):
            status, body = await conn.request(request_bytes(pool.target, "GET", path, api_key=api_key))
    except BaseException:
        conn.close()
        raise
    pool.release(conn)
    if not 200 <= status < 300:
        raise RuntimeError(f"GET {path}: HTTP {status}: {body[:300].decode(errors='replace')}")
    return json.loads(body)
