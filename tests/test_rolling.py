"""A rolling restart under open-loop load: two `hytrec serve` processes on one Redis behind a small client-side
balancer; each in turn gets SIGTERM, drains, exits and is started again on its port while the load continues.

What must hold: no acknowledged event is lost, and nothing but 200 and the documented 503s (not-ready while a
process starts, overloaded) comes back. The balancer does what a proxy does with a backend that went away: a
request that could not be sent (connection refused, or a kept-alive connection closed before any answer) goes
to the other backend; event ids make that safe.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from pathlib import Path

import httpx

from hytrec.model.serving import ServingModel
from tests.fault_load import Answer, Batch, EventFeed, _answer, ids_of, read_states, resend, statuses
from tests.redis_servers import RedisServer
from tests.service_fixtures import Checkpoint, ServiceProcess, service_env

RATE = 10.0
MAX_IN_FLIGHT = 64  # outstanding requests of the driver; past it an arrival is dropped (and re-sent at the end)
NOT_SENT = (httpx.ConnectError, httpx.RemoteProtocolError)  # no answer began: safe to send elsewhere


async def _balanced_load(
    urls: list[str], rate: float, stop: asyncio.Event, feed: EventFeed, start: float
) -> tuple[list[Answer], int]:
    """Open-loop event posts, round robin over ``urls``, until ``stop`` is set; a request that was not sent
    goes to the next backend. Returns the answers and how many sends were re-routed."""
    rng = random.Random(3)
    answers: list[Answer] = []
    rerouted = in_flight = 0
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
    async with httpx.AsyncClient(timeout=5.0, limits=limits) as client:

        async def one(n: int, sched: float, batch: Batch) -> None:
            nonlocal in_flight
            try:
                await send(n, sched, batch)
            finally:
                in_flight -= 1

        async def send(n: int, sched: float, batch: Batch) -> None:
            nonlocal rerouted
            error = ""
            for attempt in range(len(urls) * 2):
                url = urls[(n + attempt) % len(urls)]
                try:
                    resp = await client.post(url + "/v1/events", json={"events": batch.events})
                except NOT_SENT as exc:
                    rerouted += 1
                    error = repr(exc)
                    await asyncio.sleep(0.02)
                    continue
                except httpx.TransportError as exc:
                    error = repr(exc)
                    break
                answers.append(_answer("events", sched, start, resp, batch))
                return
            answers.append(Answer("events", sched, time.monotonic() - start, 0, error=error, batch=batch))

        tasks = []
        t = rng.expovariate(rate)
        n = 0
        while not stop.is_set():
            delay = start + t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            batch = feed.next()
            if in_flight >= MAX_IN_FLIGHT:  # never sent (the client's own limit): re-sent at the end like a 503
                answers.append(Answer("events", t, t, 0, error="dropped", batch=batch))
            else:
                in_flight += 1
                tasks.append(asyncio.create_task(one(n, t, batch)))
            n += 1
            t += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return answers, rerouted


def test_rolling_restart_under_load_loses_no_acknowledged_event(service_checkpoint: Checkpoint, tmp_path: Path) -> None:
    server = RedisServer(workdir=tmp_path, extra=("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""))
    server.start()
    env = service_env(service_checkpoint, server.url, dedup_window=1000, shutdown_timeout_s=3)
    procs = [ServiceProcess(env, tmp_path / "a"), ServiceProcess(env, tmp_path / "b")]
    for p in procs:
        p.workdir.mkdir()
        p.start()
    feed = EventFeed("roll", service_checkpoint.item_ids, users=50, size=4, per_batch=2)
    rolled: list[dict[str, float]] = []
    try:

        async def roll() -> None:
            for i in range(len(procs)):
                await asyncio.sleep(1.5)
                old = procs[i]
                began = time.monotonic()
                assert old.proc is not None
                old.proc.send_signal(signal.SIGTERM)
                await asyncio.to_thread(old.proc.wait, 20)
                exited = time.monotonic()
                old.stop()  # closes its log
                new = ServiceProcess(env, old.workdir, port=old.port)
                await asyncio.to_thread(new.start)
                procs[i] = new
                rolled.append({"drained_s": exited - began, "back_s": time.monotonic() - began})

        async def main() -> tuple[list[Answer], int]:
            stop = asyncio.Event()
            load = asyncio.ensure_future(_balanced_load([p.url for p in procs], RATE, stop, feed, time.monotonic()))
            await roll()
            await asyncio.sleep(2.0)  # the load goes on a while after the last process is back
            stop.set()
            return await load

        answers, rerouted = asyncio.run(main())
        dropped = sum(a.error == "dropped" for a in answers)
        seen = statuses(a for a in answers if a.error != "dropped")
        assert set(seen) <= {"200", "503 not-ready", "503 overloaded"}, seen
        assert dropped < 0.05 * len(answers), f"the driver dropped {dropped} of {len(answers)}"
        assert seen["200"] > 0.8 * len(answers), seen
        model = ServingModel.load(service_checkpoint.path)
        prefix = env["HYTREC_KEY_PREFIX"]
        with server.client() as c:
            stored = read_states(c, model, prefix, feed.users)
        held = {u: s.ids for u, s in stored.items()}
        for u, ids in ids_of(a.batch for a in answers if a.status == 200).items():
            assert ids <= held[u], f"user {u}: {len(ids - held[u])} acknowledged events lost"
        assert all(s.count == len(s.ids) for s in stored.values())
        unacked = [a.batch for a in answers if a.status != 200 and a.batch is not None]
        assert all(r.status_code == 200 for r in asyncio.run(resend(procs[0].url, unacked)))
        with server.client() as c:
            final = read_states(c, model, prefix, feed.users)
        for u, ids in ids_of(feed.batches).items():
            assert final[u].ids == ids and final[u].count == len(ids), (u, final[u].count, len(ids))
        print(
            f"\nrolling restart of 2 processes under {RATE:g} req/s: {len(answers)} posts {dict(seen)}, {dropped} "
            f"dropped by the driver, {rerouted} sends re-routed; {rolled}; 0 acknowledged events lost; "
            f"{len(unacked)} re-sent: exact counts"
        )
    finally:
        for p in procs:
            p.stop()
        server.stop()
