"""A trivial HTTP/1.1 endpoint, for calibrating the generator (how fast can it send?) and for its tests.

It answers every request with a fixed small body, as cheaply as asyncio allows, so that when a run against it
falls short of the offered rate the generator is to blame, not the server. Options make it misbehave on
purpose for the tests: a delay per request, one request at a time (a queue forms), a fixed error status.

    python -m hytrec.loadtest.hello --port 0        # prints "port N" once listening
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
from dataclasses import dataclass

REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Behaviour:
    """How the endpoint answers: after ``delay_s``; ``serial``: one request at a time across all connections."""

    delay_s: float = 0.0
    serial: bool = False
    status: int = 200
    body: bytes = b'{"hello":"world"}'

    def answer(self) -> bytes:
        reason = REASONS.get(self.status, "Status")
        head = f"HTTP/1.1 {self.status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(self.body)}"
        return (head + "\r\n\r\n").encode() + self.body


class _Handler(asyncio.Protocol):
    def __init__(self, behaviour: Behaviour, lock: asyncio.Lock, answer: bytes) -> None:
        self.b, self.lock, self.answer = behaviour, lock, answer
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        """Take one complete request off the buffer (head, plus a Content-Length body) and answer it."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.transport is None:
            return
        head = bytes(self.buf[:end]).lower()
        i = head.find(b"\r\ncontent-length:")
        length = int(head[i + 17 :].split(b"\r\n", 1)[0]) if i >= 0 else 0
        if len(self.buf) < end + 4 + length:
            return
        del self.buf[: end + 4 + length]
        if self.b.delay_s <= 0 and not self.b.serial:
            self.transport.write(self.answer)
            if self.buf:
                self._next()
            return
        self.busy = True
        asyncio.get_running_loop().create_task(self._slow())

    async def _slow(self) -> None:
        async with self.lock if self.b.serial else contextlib.nullcontext():
            await asyncio.sleep(self.b.delay_s)
        self.busy = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.answer)
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def start(behaviour: Behaviour, port: int = 0) -> asyncio.Server:
    """Listen on 127.0.0.1 (``port`` 0: a free one, read it from ``server.sockets[0].getsockname()``)."""
    lock = asyncio.Lock()
    answer = behaviour.answer()
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Handler(behaviour, lock, answer), "127.0.0.1", port, backlog=4096)


class HelloProcess:
    """The endpoint in its own process (own core), as calibration needs: started, port read, stopped."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> HelloProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hytrec.loadtest.hello", "--port", "0"], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("port "):
            self.proc.kill()
            raise RuntimeError(f"hello endpoint did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hytrec.loadtest.hello", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--serial", action="store_true")
    p.add_argument("--status", type=int, default=200)
    args = p.parse_args(argv)
    behaviour = Behaviour(args.delay_ms / 1000, args.serial, args.status)

    async def serve() -> None:
        server = await start(behaviour, args.port)
        print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
        async with server:
            await server.serve_forever()

    from hytrec.loadtest.engine import event_loop_runner

    with contextlib.suppress(KeyboardInterrupt), event_loop_runner() as runner:
        runner.run(serve())


if __name__ == "__main__":
    main()
