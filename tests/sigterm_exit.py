"""SIGTERM-to-exit of one `hytrec serve` under open-loop posts, optionally with CPU hogs beside it (not a test:
a measurement for docs/reliability.md, "Rolling restart").

    nice -n 10 .venv/bin/python -m tests.sigterm_exit WORKDIR [RATE] [HOGS] [WORKERS]

Starts a redis-server and a server on a small random model, posts single events at RATE/s (Poisson, keep-alive
connections) for 3 s, starts HOGS busy-looping processes, sends SIGTERM and prints how long the server took to
exit, and the answers seen. With WORKERS > 1 the server is uvicorn's supervisor, which exits once it has joined
every worker.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from hytrec.model.checkpoint import save_checkpoint
from tests.helpers_model import make_model
from tests.redis_servers import RedisServer
from tests.service_fixtures import N_ITEMS, Checkpoint, ServiceProcess, service_env


def main(work: Path, rate: float, hogs: int, workers: int = 1) -> None:
    work.mkdir(parents=True, exist_ok=True)
    ckpt, ids = work / "ckpt", [str(i) for i in range(1, N_ITEMS + 1)]
    if not ckpt.exists():
        ckpt.mkdir()
        save_checkpoint(ckpt, make_model(n_items=N_ITEMS), ids, [1] * len(ids))
    server = RedisServer(workdir=work).start()
    extra = {"shutdown_timeout_s": 3, "log_level": "info", "log_format": "text", "workers": workers}
    env = service_env(Checkpoint(ckpt, "x", ids), server.url, **extra)
    serve = ServiceProcess(env, work).start()
    answers: dict[object, int] = {}

    async def load(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:

            async def one(n: int) -> None:
                event = {"user_id": f"u{n % 50}", "item_id": ids[n % len(ids)], "ts": 1e9 + n, "event_id": f"e{n}"}
                try:
                    r = await client.post(serve.url + "/v1/events", json={"events": [event]})
                    key: object = r.status_code if r.status_code == 200 else f"{r.status_code} {r.text[:120]}"
                except httpx.TransportError as exc:
                    key = type(exc).__name__
                answers[key] = answers.get(key, 0) + 1

            tasks, n = [], 0
            while not stop.is_set():
                tasks.append(asyncio.create_task(one(n)))
                n += 1
                await asyncio.sleep(random.expovariate(rate))
            await asyncio.gather(*tasks)

    async def run() -> None:
        stop = asyncio.Event()
        driver = asyncio.create_task(load(stop))
        await asyncio.sleep(3)
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
        assert serve.proc is not None
        sent = time.monotonic()
        serve.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(serve.proc.wait, 60)
        took = time.monotonic() - sent
        print(f"exited {took:.2f}s after SIGTERM (rc {serve.proc.returncode}, {hogs} hogs, {workers} workers)")
        for b in busy:
            b.kill()
        stop.set()
        await driver

    try:
        asyncio.run(run())
    finally:
        serve.stop()
        server.stop()
    print(answers)
    print("\n".join(line for line in serve.output().splitlines() if "Shutting down" in line or "Finished" in line))


if __name__ == "__main__":
    main(
        Path(sys.argv[1]),
        float(sys.argv[2]) if len(sys.argv) > 2 else 10.0,
        int(sys.argv[3]) if len(sys.argv) > 3 else 0,
        int(sys.argv[4]) if len(sys.argv) > 4 else 1,
    )
