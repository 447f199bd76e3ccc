"""``hytrec bench serving``: the service under open-loop load, end to end on this machine, in one run.

It starts every server itself (``hytrec serve`` on a free loopback port with its own embedded Redis in a
temporary folder) and drives it with the open-loop generator of :mod:`hytrec.loadtest` through its Python API
(``engine.Plan``, ``Generators``, ``report.merge_run``: one generator process, this one). The sections run in
priority order (:data:`SECTIONS`); one that fails, is not selected, or would start past ``--budget-min`` is
recorded with the reason and the page says it was not measured. Page and plots: :mod:`.serving_report`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from hytrec.benchmarks.harness import (
    BenchPage,
    echo_result,
    package_tree,
    read_json,
    run_isolated,
    write_json,
    write_text,
)

SCHEMA = "hytrec-bench-serving/1"
SECTIONS = ("ceiling", "saturation", "before_after", "overload", "ingestion", "hot_user", "history")
SECTIONS += ("catalogue", "alternatives", "profile")
PROFILE_SVG = "serving_profile.svg"
Section = StrEnum("Section", [(name.upper(), name) for name in SECTIONS])
USERS_PREFIX = "load-"  # the generator's default: pre-warmed users are the ones it draws
INGEST_SHAPES = {  # name: (Settings field of the rates in posts/s, Workload fields)
    "spread": ("ingest_rates", {"users": 1000, "zipf_s": 0.0, "events_per_post": 100, "users_per_post": 100}),
    "one_user": ("bulk_rates", {"users": 1, "events_per_post": 1000, "users_per_post": 1}),
}


@dataclass
class Settings:
    """What one run measures (rates in req/s, times in seconds)."""

    n_items: int = 100_000
    d_model: int = 64
    state_dtype: str = "float16"
    users: int = 1000
    zipf: float = 1.1
    mix: str = "recommend=0.8,events=0.2"
    prewarm_events: int = 5  # per user, before the load
    calib_rates: tuple[float, ...] = (1600, 3200, 4800, 6400, 9600, 12800)
    calib_s: float = 3.0
    rates: tuple[float, ...] = (25, 50, 100, 200, 400, 800, 1600)
    workers: tuple[int, ...] = (1, 2)
    duration_s: float = 10.0
    warmup_s: float = 2.0
    ab_rates: tuple[float, ...] = (100, 200, 300, 400)
    ab_rounds: int = 2
    baseline_s: float = 5.0
    overload_rps: float = 1600
    overload_s: float = 30.0
    recover_rps: float = 200
    recover_s: float = 15.0
    recover_p99_ms: float = 10.0
    ingest_rates: tuple[float, ...] = (5, 10, 20, 40, 80)  # posts/s of 100 events over 100 users
    bulk_rates: tuple[float, ...] = (2, 4, 8, 16, 32)  # posts/s of 1,000 events for one user
    ingest_s: float = 8.0
    hot_writers: int = 16
    hot_posts: int = 100  # per writer
    histories: tuple[int, ...] = (100, 1000, 10_000, 100_000)
    history_rps: float = 50
    history_s: float = 8.0
    catalogue_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    catalogue_queries: int = 256  # user vectors from the model (see benchmarks/catalogue_bench.py)
    catalogue_history: int = 200  # events per query user
    alt_histories: tuple[int, ...] = (100, 1000, 10_000)
    alt_s: float = 4.0  # per alternative and history length
    profile_rps: float = 200
    profile_s: float = 15.0  # per recording (flame graph, then collapsed stacks)
    profile_rate: int = 100  # py-spy samples/s
    timeout_s: float = 5.0
    max_in_flight: int = 2048  # above the server's admission cap (512), so its 503s show, not generator drops
    capacity_p99_ms: float = 100.0
    budget_min: float = 40.0
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_run(cls) -> Settings:
        """A smoke run of every section: tiny catalogue, one worker count, 1-2 rates of about 1 s."""
        return cls(
            n_items=2000, users=50, prewarm_events=2, calib_rates=(800, 1600), calib_s=1.0, rates=(25, 50),
            workers=(1,), duration_s=1.0, warmup_s=0.3, ab_rates=(25,), ab_rounds=1, baseline_s=1.0,
            overload_rps=200, overload_s=2.0, recover_rps=25, recover_s=2.0, ingest_rates=(5,), bulk_rates=(2,),
            ingest_s=1.0, hot_writers=4, hot_posts=5, histories=(10, 100), history_rps=20, history_s=1.0,
            catalogue_sizes=(2000,), catalogue_queries=64, catalogue_history=20, alt_histories=(10, 100), alt_s=0.3,
            profile_rps=25, profile_s=1.0, quick=True,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ servers
def make_checkpoint(directory: str, n_items: int, d_model: int, state_dtype: str) -> str:
    """A random-weight HyTRec checkpoint (timing only); item ids ``i<row>``, Zipf-like popularity."""
    import torch

    from hytrec.model.checkpoint import save_checkpoint
    from hytrec.model.config import HyTRecConfig
    from hytrec.model.hytrec import HyTRec

    torch.manual_seed(0)
    model = HyTRec(HyTRecConfig(n_items=n_items, d_model=d_model, state_dtype=state_dtype, dropout=0.0))
    return save_checkpoint(
        directory, model, [f"i{j}" for j in range(n_items)], [10_000 // (j + 1) for j in range(n_items)]
    )


def vm_kb(pid: int, key: str = "VmRSS") -> int | None:
    """``VmRSS`` (or ``VmHWM``, the peak) of a process in KiB, from /proc/<pid>/status."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def get_json(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


class Server:
    """``hytrec serve`` of this checkout (or of ``before``, through PYTHONPATH), started at once on a free port,
    output to a log file; SIGTERM stops it and its embedded Redis. One worker: uvicorn serves in ``pid`` itself."""

    def __init__(
        self, ckpt: Path, workers: int, logs: Path, before: Path | None = None, extra: dict[str, str] | None = None
    ) -> None:
        self.workers, self.before = workers, before
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = Path(tempfile.mkdtemp(prefix="hytrec-bench-serving-"))
        self.log = logs / f"{'before' if before else 'after'}-w{workers}-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYTREC_")}
        env.update(HYTREC_MODEL=str(ckpt), HYTREC_HOST="127.0.0.1", HYTREC_PORT=str(self.port))
        # the older checkout's code laid out as its package (PYTHONPATH=<checkout> alone imports the installed one)
        tree = package_tree(before, self.data / "before-code") if before else ""
        env.update(HYTREC_WORKERS=str(workers), HYTREC_DATA_DIR=str(self.data), PYTHONPATH=str(tree))
        env.update(extra or {})
        with open(self.log, "wb") as log:
            argv = [sys.executable, "-m", "hytrec.cli", "serve"]
            self.proc = subprocess.Popen(argv, cwd=tree or self.data, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def wait_ready(self, timeout_s: float = 180.0) -> Server:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"server not ready (exit {self.proc.poll()}): {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.data, ignore_errors=True)


# ---------------------------------------------------------------------------------------- the load
def _loop(coro: Any) -> Any:
    from hytrec.loadtest.engine import event_loop_runner

    with event_loop_runner() as runner:
        return runner.run(coro)


def events_body(events: list[tuple[str, str, float, str | None]]) -> bytes:
    """A POST /v1/events body from (user, item, ts, event id or None) tuples."""
    rows = [{"user_id": u, "item_id": i, "ts": round(t, 3), **({"event_id": e} if e else {})} for u, i, t, e in events]
    return json.dumps({"events": rows}, separators=(",", ":")).encode()


async def post_events(url: str, bodies: list[bytes], concurrency: int = 1, strict: bool = True) -> dict[str, Any]:
    """POST the bodies, ``concurrency`` closed-loop senders, each on its own keep-alive connection, no retries;
    statuses, events applied (from the 200 answers), seconds per post. ``strict``: raise on a non-200."""
    from hytrec.loadtest.wire import Pool, ProtocolError, Target, request_bytes

    target, todo, out = Target(url), iter(bodies), {"statuses": {}, "applied": 0, "post_s": []}

    async def sender() -> None:
        pool = Pool(target)
        for body in todo:
            conn, t0 = await pool.acquire(), time.perf_counter()
            try:
                async with asyncio.timeout(60):
                    status, answer = await conn.request(request_bytes(target, "POST", "/v1/events", body))
            except (TimeoutError, OSError, ProtocolError) as exc:
                conn.close()
                status, answer = type(exc).__name__, b""
            pool.release(conn)  # a closed one is dropped
            out["post_s"].append(time.perf_counter() - t0)
            out["statuses"][str(status)] = out["statuses"].get(str(status), 0) + 1
            if status == 200:
                out["applied"] += json.loads(answer)["applied"]
            elif strict:
                raise RuntimeError(f"POST /v1/events: {status}: {answer[:300]!r}")
        pool.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return {**out, "seconds": round(time.perf_counter() - t0, 3), "statuses": dict(sorted(out["statuses"].items()))}


def prewarm(url: str, s: Settings, items: list[str]) -> int:
    """``prewarm_events`` events for each user the generator draws, in posts of <= 1,000, timestamps in the past."""
    base = time.time() - 86_400
    ev = [
        (f"{USERS_PREFIX}{u}", items[(u * 7919 + j) % len(items)], base + j * 60 + u * 1e-3, None)
        for u in range(s.users)
        for j in range(s.prewarm_events)
    ]
    return _loop(post_events(url, [events_body(ev[i : i + 1000]) for i in range(0, len(ev), 1000)]))["applied"]


def workload(s: Settings, items: tuple[list[str], list[int]], mix: str | None = None, **kw: Any) -> Any:
    from hytrec.loadtest.workload import Workload, parse_mix

    w = Workload(parse_mix(mix or s.mix), **{"users": s.users, "zipf_s": s.zipf, **kw})
    w.items, w.item_weights = items[0], [p + 1.0 for p in items[1]]  # the CLI's default --item-sampling
    w.check()
    return w


def slim(run: dict[str, Any]) -> dict[str, Any]:
    """A run of the generator without its encoded histograms (the JSON stays small)."""
    return {**run, "endpoints": {n: {k: v for k, v in e.items() if k != "hdr"} for n, e in run["endpoints"].items()}}


def sweep(url: str, w: Any, rates: Any, s: Settings, duration: float, warmup: float, index: int = 0, hdr=False):
    """The runs of ``hytrec loadtest --sweep``: one ``engine.Plan`` per rate, merged as the CLI merges them
    (``hdr``: keep the encoded histograms, for pooling runs later)."""
    from hytrec.loadtest import engine, report

    runs = []
    with engine.Generators(1) as gens:
        for i, rate in enumerate(rates):
            plan = engine.Plan(url, w, rate, duration, warmup, s.timeout_s, s.max_in_flight, seed=s.seed)
            run = report.merge_run(gens.run(plan, index + i), rate, w.mix, duration, s.timeout_s)
            runs.append(run if hdr else slim(run))
    return runs


def timeline(
    url: str, w: Any, phases: list[tuple[str, float, float, bool]], s: Settings, start: float | None = None
) -> dict[str, Any]:
    """Phases back to back on one shared clock (``Plan.start_at``) in one event loop, so each starts the instant
    the one before ends (stragglers overlap the next): a phase is one plan (its own pool and in-flight cap, as one
    ``hytrec loadtest`` rate) or, ``windowed``, consecutive one-second plans. A report per window and per phase
    (the phases keep their histograms: the report splits 2xx from the rest). ``start``: the first phase's
    ``time.perf_counter()`` instant, when a caller times something else against the load (a fault)."""
    from hytrec.loadtest import engine, report

    plans, t = [], 0.0
    for name, rate, seconds, windowed in phases:
        for _ in range(round(seconds) if windowed else 1):
            seed, d = engine.process_seed(s.seed, 1000 + len(plans), 0), 1.0 if windowed else seconds
            plans.append((name, t, engine.Plan(url, w, rate, d, 0.0, s.timeout_s, s.max_in_flight, seed=seed)))
            t += d
    if start is None:
        start = time.perf_counter() + 0.5 + 0.1 * len(plans)  # time for every plan to build its samplers first
    plans = [(name, at, replace(p, start_at=start + at)) for name, at, p in plans]

    async def main() -> list[dict[str, Any]]:
        return await asyncio.gather(*(engine.run_plan(p) for _, _, p in plans))

    results = list(zip(plans, _loop(main()), strict=True))
    windows = [{"t_s": at, "phase": name, **slim(report.merge_run([r], p.rate, w.mix, p.duration, s.timeout_s))}
               for (name, at, p), r in results]  # fmt: skip
    merged = {}
    for name, rate, seconds, _ in phases:
        merged[name] = report.merge_run([r for (n, _, _), r in results if n == name], rate, w.mix, seconds, s.timeout_s)
    return {"windows": windows, "phases": merged}


# --------------------------------------------------------------------------------------- sections
class Skipped(Exception):
    """A section that cannot run here (the reason goes on the page)."""


class Lab:
    """What the sections share: settings, checkpoint, its items (read once from a current server's
    GET /v1/items), and the shared servers (one per worker count, for the sections that need no fresh one)."""

    def __init__(self, s: Settings, ckpt: Path, logs: Path, before: Path | None, artifacts: Path) -> None:
        self.s, self.ckpt, self.logs, self.before = s, ckpt, logs, before
        self.artifacts = artifacts  # where files other than the JSON go (the profile's flame graph)
        self.items: tuple[list[str], list[int]] = ([], [])
        self._shared: dict[int, Server] = {}
        self._warm: set[int] = set()

    def _ready(self, srv: Server, warm: bool) -> Server:
        """Wait until it answers; read the catalogue once (from a current server); pre-warm the users once."""
        srv.wait_ready()
        if not self.items[0] and not srv.before:
            from hytrec.loadtest.wire import Target
            from hytrec.loadtest.workload import fetch_items

            self.items = _loop(fetch_items(Target(srv.url), None, 1000, self.s.n_items))
        if warm and srv.port not in self._warm:
            prewarm(srv.url, self.s, self.items[0])
            self._warm.add(srv.port)
        return srv

    def shared(self, workers: int, warm: bool = True) -> Server:
        if workers not in self._shared:
            self._shared[workers] = Server(self.ckpt, workers, self.logs)
        return self._ready(self._shared[workers], warm)

    @contextmanager
    def fresh(self, *before: bool, warm: bool = True, extra: dict[str, str] | None = None) -> Iterator[list[Server]]:
        """New one-worker servers (``True``: the --before checkout's), started together, stopped at the end
        (``extra``: settings in their environment)."""
        servers = [Server(self.ckpt, 1, self.logs, self.before if b else None, extra) for b in before]
        try:
            yield [self._ready(srv, warm) for srv in servers]  # a current one first: it serves the items
        finally:
            for srv in servers:
                srv.stop()

    def close(self) -> None:
        for srv in self._shared.values():
            srv.stop()


def sec_ceiling(lab: Lab) -> dict[str, Any]:
    from hytrec.loadtest.commands import calibration_ceiling
    from hytrec.loadtest.hello import HelloProcess

    s = lab.s
    with HelloProcess() as hello:
        runs = sweep(hello.url, workload(s, ([], []), "hello"), s.calib_rates, s, s.calib_s, 1.0)
    ceiling, verdicts = calibration_ceiling(runs, 10.0)
    top = max(max(s.rates), s.overload_rps, max(s.ab_rates))
    ratio = None if ceiling is None else round(ceiling / top, 2)
    return {
        "runs": runs,
        "verdicts": verdicts,
        "ceiling_rps": ceiling,
        "all_passed": all(v["pass"] for v in verdicts),
        "highest_rate_used": top,
        "ceiling_over_highest": ratio,
    }


def sec_saturation(lab: Lab) -> dict[str, Any]:
    s, out = lab.s, {}
    for n in s.workers:
        out[str(n)] = {"runs": sweep(lab.shared(n).url, workload(s, lab.items), s.rates, s, s.duration_s, s.warmup_s)}
    return {"by_workers": out}


def sec_before_after(lab: Lab) -> dict[str, Any]:
    s, runs = lab.s, []
    if lab.before is None:
        raise Skipped("no --before checkout given")
    commit = subprocess.run(["git", "-C", str(lab.before), "rev-parse", "HEAD"], capture_output=True, text=True)
    with lab.fresh(False, True) as (after, before):  # the old server has no GET /v1/items: ids from the new one
        w = workload(s, lab.items)
        for i, rate in enumerate(s.ab_rates):
            for rnd in range(s.ab_rounds):
                for name, srv in (("before", before), ("after", after)):  # one seed: the same requests and times
                    run = sweep(srv.url, w, (rate,), s, s.duration_s, s.warmup_s, i * 100 + rnd, hdr=True)[0]
                    runs.append({"server": name, "round": rnd, **run})
    return {"before_commit": commit.stdout.strip() or None, "before_path": str(lab.before), "runs": runs}


def sec_overload(lab: Lab) -> dict[str, Any]:
    s = lab.s
    with lab.fresh(False) as (srv,):
        rss = {"before": vm_kb(srv.pid)}
        phases = [("baseline", s.recover_rps, s.baseline_s, True), ("overload", s.overload_rps, s.overload_s, False)]
        phases.append(("recovery", s.recover_rps, s.recover_s, True))
        tl = timeline(srv.url, workload(s, lab.items), phases, s)
        rss.update(after=vm_kb(srv.pid), peak_hwm=vm_kb(srv.pid, "VmHWM"))
        time.sleep(2)
        rss["after_2s"] = vm_kb(srv.pid)
    return {"rss_kb": rss, **tl}


def sec_ingestion(lab: Lab) -> dict[str, Any]:
    s, srv, out = lab.s, lab.shared(1, warm=False), {}
    for name, (rates, kw) in INGEST_SHAPES.items():
        w = workload(s, lab.items, "events", user_prefix=f"ing-{name}-", **kw)
        out[name] = {"runs": sweep(srv.url, w, getattr(s, rates), s, s.ingest_s, 1.0), **kw}
    return out


def sec_hot_user(lab: Lab) -> dict[str, Any]:
    s, out = lab.s, {}
    for workers in s.workers:
        srv, user = lab.shared(workers, warm=False), f"hot-w{workers}"
        items = lab.items[0]  # read by the first server started (a section run alone has none before)
        n, base = s.hot_writers * s.hot_posts, time.time()
        bodies = [events_body([(user, items[j % len(items)], base + j * 1e-3, f"h{j}")]) for j in range(n)]
        res = _loop(post_events(srv.url, bodies, s.hot_writers, strict=False))
        res.pop("post_s")
        length = get_json(srv.url, f"/v1/users/{user}")["history_length"]
        out[str(workers)] = {"user": user, "sent": n, **res, "history_length": length}
    return {"by_workers": out}


def sec_history(lab: Lab) -> dict[str, Any]:
    s, srv, out, items = lab.s, lab.shared(1, warm=False), {}, lab.items[0]
    for n in s.histories:
        user, base = f"hist{n}-0", time.time() - n * 0.5 - 60
        ev = [(user, items[(j * 7919) % len(items)], base + j * 0.5, None) for j in range(n)]
        built = _loop(post_events(srv.url, [events_body(ev[i : i + 1000]) for i in range(0, n, 1000)]))
        w = workload(s, lab.items, "recommend", users=1, user_prefix=f"hist{n}-")
        out[str(n)] = {
            "history_length": get_json(srv.url, f"/v1/users/{user}")["history_length"],
            "build_s": built["seconds"],
            "build_posts": len(built["post_s"]),
            "run": sweep(srv.url, w, (s.history_rps,), s, s.history_s, 1.0)[0],
        }
    return {"by_history": out}


def sec_catalogue(lab: Lab) -> dict[str, Any]:
    from hytrec.benchmarks.catalogue_bench import CatalogueSettings, run_catalogue

    try:
        import faiss  # noqa: F401
    except ImportError as exc:
        raise Skipped(f"faiss is not installed (pip install faiss-cpu): {exc}") from exc
    s = lab.s
    cs = CatalogueSettings(sizes=s.catalogue_sizes, d_model=s.d_model, queries=s.catalogue_queries,
                           history=s.catalogue_history, repeats=1 if s.quick else 2, seed=s.seed)  # fmt: skip
    return {"settings": asdict(cs), **run_catalogue(cs)}


def sec_alternatives(lab: Lab) -> dict[str, Any]:
    from hytrec.benchmarks.recompute_bench import RecomputeSettings, run_recompute

    s = lab.s
    rs = RecomputeSettings(histories=s.alt_histories, seconds=s.alt_s, seed=s.seed)
    return {"settings": asdict(rs), **run_recompute(str(lab.ckpt), rs)}


def sec_profile(lab: Lab) -> dict[str, Any]:
    """py-spy on a fresh one-worker server while the open-loop generator sends ``profile_rps`` (the usual mix):
    a flame graph, then collapsed stacks for the table, back to back under one continuous load."""
    from hytrec.benchmarks import profile_bench
    from hytrec.loadtest import engine, report

    s, exe = lab.s, profile_bench.pyspy()
    if exe is None:
        raise Skipped("py-spy is not installed (pip install py-spy)")
    if (why := profile_bench.check_pyspy(exe)) is not None:
        raise Skipped(f"py-spy cannot read processes here: {why}")
    raw = lab.logs / "profile.collapsed.txt"
    with lab.fresh(False) as (srv,):
        w, seconds = workload(s, lab.items), 2 * s.profile_s + 2.0  # both recordings, plus slack for py-spy's start
        start = time.perf_counter() + 1.0
        plan = engine.Plan(srv.url, w, s.profile_rps, seconds, s.warmup_s, s.timeout_s, s.max_in_flight, seed=s.seed)
        plan = replace(plan, start_at=start)
        rec = profile_bench.Recorder(exe, srv.pid, start + s.warmup_s, s.profile_s, lab.artifacts / PROFILE_SVG, raw,
                                     s.profile_rate)  # fmt: skip
        rec.start()
        run = report.merge_run([_loop(engine.run_plan(plan))], s.profile_rps, w.mix, seconds, s.timeout_s)
        rec.join(s.profile_s * 2 + 300)
    for name, r in rec.result.items():
        if r["rc"] != 0:
            raise RuntimeError(f"py-spy ({name}) exited {r['rc']}: {r['stderr']}")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "pyspy_version": version.removeprefix("py-spy ").strip(),
        "pyspy": rec.result,
        "svg": PROFILE_SVG,
        "svg_dir": str(lab.artifacts),
        "top": profile_bench.top_functions(raw.read_text()),
        "run": slim(run),
    }


RUNNERS: dict[str, Callable[[Lab], dict[str, Any]]] = {name: globals()[f"sec_{name}"] for name in SECTIONS}


def _section(lab: Lab, name: str) -> dict[str, Any]:
    """One section's result; a section that fails must not lose the others."""
    started = time.monotonic()
    try:
        out = {"status": "ok", **RUNNERS[name](lab)}
    except Skipped as exc:
        out = {"status": "not measured", "reason": str(exc)}
    except Exception as exc:
        out = {"status": "not measured", "reason": f"failed: {type(exc).__name__}: {exc}"}
    return {**out, "wall_s": round(time.monotonic() - started, 1)}


def run_bench(
    s: Settings,
    before: Path | None = None,
    sections: tuple[str, ...] = SECTIONS,
    command: str | None = None,
    progress: Callable[[str], None] = lambda m: None,
    artifacts: Path | None = None,
) -> dict[str, Any]:
    """Every selected section in priority order; the result JSON. ``artifacts``: where the profile's flame graph
    goes (default: the run's temporary folder, deleted at the end)."""
    page, t0 = BenchPage.start(command, quick=s.quick), time.monotonic()
    res: dict[str, Any] = {"schema": SCHEMA, "sections": {}}
    with tempfile.TemporaryDirectory(prefix="hytrec-bench-serving-") as tmp:
        ckpt, logs = Path(tmp) / "checkpoint", Path(tmp) / "logs"
        logs.mkdir()
        version = run_isolated(make_checkpoint, str(ckpt), s.n_items, s.d_model, s.state_dtype, timeout_s=600).unwrap()
        lab = Lab(s, ckpt, logs, before, artifacts or logs)
        (artifacts or logs).mkdir(parents=True, exist_ok=True)
        try:
            for name in SECTIONS:
                if name not in sections:
                    out = {"status": "not measured", "reason": "not selected (--section)"}
                elif time.monotonic() - t0 > s.budget_min * 60:
                    out = {"status": "not measured", "reason": f"time budget spent (--budget-min {s.budget_min:g})"}
                else:
                    progress(f"[{time.monotonic() - t0:5.0f} s] {name} ...")
                    out = _section(lab, name)
                res["sections"][name] = out
                progress(f"        {name}: {out['status']} {out.get('reason', '')}")
        finally:
            lab.close()
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
    res["meta"] = page.finish().meta(settings=settings, model_version=version, sections=list(sections))
    return res


def merge_kept(res: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """``res`` (a run of some sections) with every section it did not select taken from ``old`` (the JSON it
    overwrites) where that one was measured, marked ``kept`` with its own run's date, command and settings, so
    one section can be re-measured without re-running the page. Only a JSON of this schema and the same
    ``--quick`` is merged."""
    if old.get("schema") != SCHEMA or bool(old["meta"].get("quick")) != bool(res["meta"].get("quick")):
        return res
    chosen, merged = set(res["meta"]["sections"]), {}
    for name in SECTIONS:
        prev = old["sections"].get(name)
        if name not in chosen and prev is not None and prev["status"] == "ok":
            meta = old["meta"]
            kept = {"date": meta["date"], "command": meta["command"], "settings": meta["settings"]}
            kept.update(git_commit=meta.get("git_commit"), git_dirty=meta.get("git_dirty"), cpu=meta.get("cpu"))
            kept["logical_cpus"] = meta.get("logical_cpus")
            merged[name] = {**prev, "kept": prev.get("kept", kept)}
        else:
            merged[name] = res["sections"][name]
    return {**res, "sections": merged}


# -------------------------------------------------------------------------------------------- CLI
def bench_serving(
    quick: Annotated[bool, typer.Option("--quick", help="Tiny catalogue, 1-2 rates of ~1 s (smoke test).")] = False,
    markdown: Annotated[Path | None, typer.Option("--markdown", help="Write the page here (and PAGE.json).")] = None,
    plot_dir: Annotated[Path | None, typer.Option("--plot-dir", help="Write the PNG plots in this folder.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="The JSON (default: PAGE.json).")] = None,
    from_json: Annotated[Path | None, typer.Option("--from-json", help="Measure nothing: render this JSON.")] = None,
    before: Annotated[Path | None, typer.Option("--before", help="Older checkout for the before/after.")] = None,
    section: Annotated[list[Section] | None, typer.Option("--section", help="Run only these (repeatable).")] = None,
    budget_min: Annotated[float, typer.Option("--budget-min", help="No section starts after this.")] = 40.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON instead of the summary.")] = False,
) -> None:
    """The service under open-loop load: ceiling, saturation, before/after, overload, ingestion, hot user, history,
    catalogue size (exact vs faiss), the alternatives (recompute vs incremental), a py-spy profile.

    With ``--section``, the sections not selected are kept from the JSON being overwritten (when it has them)."""
    from hytrec.benchmarks import serving_report

    if from_json is not None:
        res = read_json(from_json)
    else:
        s = replace(Settings.quick_run() if quick else Settings(), budget_min=budget_min)
        chosen = tuple(x.value for x in section) if section else SECTIONS
        if json_out is None and markdown is not None:
            json_out = markdown.with_suffix(".json")
        artifacts = plot_dir or (markdown.parent if markdown is not None else None)
        res = run_bench(s, before.resolve() if before else None, chosen, progress=lambda m: typer.echo(m, err=True),
                        artifacts=artifacts)  # fmt: skip
        if section and json_out is not None and json_out.exists():
            res = merge_kept(res, read_json(json_out))
    if json_out is not None:
        write_json(json_out, res)
    plots = serving_report.write_plots(res, plot_dir) if plot_dir is not None else {}
    if markdown is not None:
        write_text(markdown, serving_report.render_markdown(res, plots))
    echo_result(res, serving_report.render_summary(res), as_json=as_json)
