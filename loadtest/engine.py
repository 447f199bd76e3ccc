"""The open-loop generator: requests leave on a Poisson schedule fixed in advance, whatever the answers do.

A closed-loop tool (each worker waits for its reply before sending the next) slows down with the server and so
never sees the queue it would have built: coordinated omission. Here every arrival has a scheduled send time,
is sent then on its own connection if fewer than ``max_in_flight`` requests are outstanding (else it is counted
as *dropped by the generator*), and its latency runs from the scheduled time, so a server or a generator that
falls behind shows up as latency. Every scheduled request of the measured window ends as exactly one of: an
HTTP status, a timeout (recorded at latency = timeout), a connection error, or a drop.

Several processes (:class:`Generators`) each run a share of the rate with their own seed from a common start
time; their HdrHistograms travel back encoded and are merged exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import random
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection as Pipe
from typing import Any

from hdrh.histogram import HdrHistogram

from hytrec.loadtest.wire import Pool, ProtocolError, Target
from hytrec.loadtest.workload import RequestMaker, Workload, poisson_arrivals

HIST_MAX_US = 60_000_000


def new_hist() -> HdrHistogram:
    """Latencies in microseconds, 1 us to 60 s, 3 significant digits."""
    return HdrHistogram(1, HIST_MAX_US, 3)


def record(hist: HdrHistogram, seconds: float) -> None:
    hist.record_value(min(HIST_MAX_US, max(0, round(seconds * 1e6))))


@contextlib.contextmanager
def event_loop_runner() -> Iterator[asyncio.Runner]:
    """An asyncio runner on uvloop when installed (cheaper per request than the default loop)."""
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner


@dataclass
class EndpointStats:
    """Counts and histograms of one endpoint in one process; ``last_*`` are seconds after the window start."""

    scheduled: int = 0
    sent: int = 0
    dropped: int = 0
    answered: int = 0
    timeouts: int = 0
    conn_errors: int = 0
    status: dict[str, int] = field(default_factory=dict)
    last_send: float = 0.0
    last_answer: float = 0.0
    hist: HdrHistogram = field(default_factory=new_hist)  # answered (any status) and timed out
    hist_ok: HdrHistogram = field(default_factory=new_hist)  # 2xx only

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("hist")}
        return {**out, "hist": self.hist.encode().decode(), "hist_ok": self.hist_ok.encode().decode()}


@dataclass
class Plan:
    """What one generator process runs: its share of the rate, over ``warmup`` + ``duration`` seconds."""

    url: str
    workload: Workload
    rate: float
    duration: float
    warmup: float = 0.0
    timeout: float = 5.0
    max_in_flight: int = 256
    max_requests: int = 1_000_000
    seed: int = 0
    start_at: float | None = None  # time.perf_counter() of offset 0, shared by the processes (system-wide clock)


async def run_plan(plan: Plan) -> dict[str, Any]:
    """Send the plan's schedule, wait for the last answer or timeout, return the stats (histograms encoded)."""
    perf = time.perf_counter
    target = Target(plan.url)
    rng = random.Random(plan.seed)
    arrivals = poisson_arrivals(rng, plan.rate, plan.warmup + plan.duration, plan.max_requests)
    maker = RequestMaker(plan.workload, target, rng)
    stats = {name: EndpointStats() for name in plan.workload.mix}
    lag = new_hist()  # scheduled -> bytes written, the generator's own delay
    pool = Pool(target)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()
    in_flight = 0
    timeout = plan.timeout
    start = plan.start_at if plan.start_at is not None else perf() + 0.05
    window = start + plan.warmup

    async def one(st: EndpointStats, data: bytes, sched: float, measured: bool) -> None:
        nonlocal in_flight
        began = perf()
        conn = None
        try:
            async with asyncio.timeout(sched + timeout - began):
                conn = await pool.acquire()
                sent = perf()
                if measured:
                    st.sent += 1
                    st.last_send = max(st.last_send, sent - window)
                    record(lag, sent - sched)
                status, _ = await conn.request(data)
        except TimeoutError:
            if conn is not None:
                conn.close()
            if measured:
                st.timeouts += 1
                st.last_answer = max(st.last_answer, perf() - window)
                record(st.hist, timeout)
        except (OSError, ProtocolError, ValueError):
            if conn is not None:
                conn.close()
            if measured:
                st.conn_errors += 1
        else:
            now = perf()
            pool.release(conn)
            if measured:
                latency = now - min(sched, began)  # from the schedule; from the send if a timer fired early
                st.answered += 1
                st.last_answer = max(st.last_answer, now - window)
                key = str(status)
                st.status[key] = st.status.get(key, 0) + 1
                record(st.hist, latency)
                if 200 <= status < 300:
                    record(st.hist_ok, latency)
        finally:
            in_flight -= 1

    behind = 0
    for offset in arrivals:
        sched = start + offset
        delay = sched - perf()
        if delay > 0:
            behind = 0
            await asyncio.sleep(delay)
        else:  # late: keep sending, but let answers in now and then
            behind += 1
            if behind % 8 == 0:
                await asyncio.sleep(0)
        name = maker.pick()
        st = stats[name]
        measured = offset >= plan.warmup
        st.scheduled += measured
        if in_flight >= plan.max_in_flight:
            st.dropped += measured
            continue
        in_flight += 1
        task = loop.create_task(one(st, maker.build(name), sched, measured))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:  # every task ends by its own timeout; the margin only guards against a bug hanging the run
        _, stuck = await asyncio.wait(set(pending), timeout=timeout + 5)
        for task in stuck:
            task.cancel()
    pool.close()
    return {
        "endpoints": {name: st.to_dict() for name, st in stats.items()},
        "lag": lag.encode().decode(),
        "connections": pool.opened,
    }


def _worker(pipe: Pipe) -> None:
    """A generator process: runs each plan it receives on one event loop until it gets None."""
    with event_loop_runner() as runner:
        pipe.send("ready")
        while (plan := pipe.recv()) is not None:
            try:
                pipe.send(runner.run(run_plan(plan)))
            except Exception:
                pipe.send({"error": traceback.format_exc()})


def process_seed(seed: int, rate_index: int, process: int) -> int:
    """Independent streams: one seed per (run seed, rate of the sweep, generator process)."""
    return seed * 1_000_003 + rate_index * 1009 + process


class Generators:
    """``n`` generator processes kept for a whole sweep (1: run in this process, no fork or pickling)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pipes: list[Pipe] = []
        self.procs: list[Any] = []
        if n > 1:
            ctx = mp.get_context("spawn")  # no inherited event loop or sockets
            for _ in range(n):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(theirs,), daemon=True)
                proc.start()
                theirs.close()
                self.pipes.append(ours)
                self.procs.append(proc)
            for pipe in self.pipes:
                if not pipe.poll(60) or pipe.recv() != "ready":
                    raise RuntimeError("a generator process did not start")

    def run(self, plan: Plan, rate_index: int = 0) -> list[dict[str, Any]]:
        """Run ``plan`` split over the processes (rate / n each, own seeds, one common start); their stats."""
        if self.n == 1:
            with event_loop_runner() as runner:
                return [runner.run(run_plan(replace(plan, seed=process_seed(plan.seed, rate_index, 0))))]
        start_at = time.perf_counter() + 0.2
        for i, pipe in enumerate(self.pipes):
            seed = process_seed(plan.seed, rate_index, i)
            pipe.send(replace(plan, rate=plan.rate / self.n, seed=seed, start_at=start_at))
        results = [pipe.recv() for pipe in self.pipes]
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError("a generator process failed:\n" + errors[0])
        return results

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self.pipes, self.procs = [], []

    def __enter__(self) -> Generators:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
