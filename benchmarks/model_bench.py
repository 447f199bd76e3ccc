"""``hytrec bench model``: training-step time and memory against length, serving cost against history.

Measured in one run on this machine (BRIEF section 3, "Efficiency"):

* forward + backward time and peak memory of one batch-1 sequence of length L (256 ... 16384) for the
  chunked HyTRec, the literal step-by-step recurrence (``naive=True``) and a SASRec-style causal softmax
  transformer of the same width, both with the loss reduced to ``u.sum()`` ("model only") and with the
  full-softmax cross-entropy the trainer uses ("with loss");
* the serving step (one event for B users) and the request path (user vector + top-10 over the
  catalogue) against the length of the history behind the state, and the state's bytes per user.

Every training point runs in a fresh process forked from a clean fork server (torch imported, nothing
computed), so its peak RSS (``ru_maxrss``) and its timings belong to that point alone.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import platform
import resource
import select
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import typer

SCHEMA = "hytrec-bench-model/1"
SERIES: dict[str, str] = {
    "hytrec": "HyTRec, chunked delta rule (training form)",
    "naive": "HyTRec, literal step-by-step recurrence (naive=True)",
    "sasrec_flash": "SASRec, 2 layers x 2 heads, dropout 0 (SDPA fused flash kernel)",
    "sasrec": "SASRec, 2 layers x 2 heads, dropout 0.2 (SDPA math kernel, L x L matrices)",
    "tadn_chunked": "the gated delta rule alone, chunked (one layer: 2 heads x 32 x 32), no projections",
    "tadn_naive": "the gated delta rule alone, literal loop (one layer: 2 heads x 32 x 32)",
}
KERNELS = ("tadn_chunked", "tadn_naive")
SLOW = ("naive", "tadn_naive")  # warmed up on a short prefix; no "with loss" mode
MODES: dict[str, str] = {"model": "loss = sum of the user vectors", "loss": "full-softmax cross-entropy"}
STATE_DTYPES = ("float32", "float16", "bfloat16")
STATE_GOAL_BYTES = 32 * 1024
NAIVE_GOAL, LINEAR_GOAL, FLAT_GOAL = 20.0, 20.0, 2.0
# The SDPA math kernel keeps about four L x L fp32 matrices per head and layer for backward (scores,
# probabilities, dropout mask/output); calibrated against a measured 0.98 GB at L = 4096.
MATH_ATTN_FACTOR = 4


@dataclass
class Settings:
    """What one benchmark run measures."""

    lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384)
    histories: tuple[int, ...] = (10, 100, 1000, 10_000, 100_000)
    series: tuple[str, ...] = tuple(SERIES)
    n_items: int = 10_000
    repeats: int = 3  # timed runs per point after one warm-up (fewer once their total passes the budget)
    budget_s: float = 60.0  # a series stops after a point whose median run takes longer than this
    mem_cap_gb: float = 6.0  # SASRec (math kernel) points predicted above this are not run
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    serving_threads: int = 1  # the service's default HYTREC_TORCH_THREADS: one torch thread per worker
    serve_batch: int = 64
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_run(cls) -> Settings:
        return cls(lengths=(256, 512, 1024), histories=(10, 100, 1000), repeats=2, budget_s=5.0, quick=True)


# ------------------------------------------------------------------------------------- measurement
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _history(length: int, n_items: int, seed: int) -> tuple[Any, Any]:
    """Random item rows (1, length) and increasing float64 timestamps with log-uniform gaps (1 s .. 12 days)."""
    import torch

    from hytrec.model.config import FIRST_ITEM_ROW

    g = torch.Generator().manual_seed(seed)
    items = torch.randint(FIRST_ITEM_ROW, n_items + FIRST_ITEM_ROW, (1, length), generator=g)
    gaps = torch.exp(torch.rand(1, length, generator=g, dtype=torch.float64) * math.log(1e6))
    return items, 1.7e9 + torch.cumsum(gaps, dim=1)


def _build_model(series: str, n_items: int, length: int) -> Any:
    from hytrec.model.baselines import SASRec, SASRecConfig
    from hytrec.model.config import HyTRecConfig
    from hytrec.model.hytrec import HyTRec

    if series in ("hytrec", "naive"):
        return HyTRec(HyTRecConfig(n_items=n_items))
    dropout = 0.0 if series == "sasrec_flash" else 0.2
    return SASRec(SASRecConfig(n_items=n_items, max_len=length, dropout=dropout))


def train_point(
    series: str, length: int, mode: str, n_items: int, threads: int, repeats: int, budget_s: float, seed: int
) -> dict[str, Any]:
    """Time forward + backward of one sequence (batch 1) in this process; returns seconds and peak RSS."""
    import torch

    from hytrec.model.config import FIRST_ITEM_ROW
    from hytrec.training.losses import full_softmax_cross_entropy

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    base = max(_maxrss_mb(), _rss_mb())
    if series in KERNELS:
        return _kernel_point(series, length, repeats, budget_s, base)
    model = _build_model(series, n_items, length)
    model.train()
    items, times = _history(length + 1, n_items, seed)
    kwargs = {"naive": True} if series == "naive" else {}

    def run(n: int) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        u = model(items[:, :n], times[:, :n], times[:, 1 : n + 1], torch.tensor([n]), **kwargs)
        targets = items[0, 1 : n + 1]
        if mode == "loss":
            loss = full_softmax_cross_entropy(u[0], model.item_emb.weight[FIRST_ITEM_ROW:], targets - FIRST_ITEM_ROW)
        else:
            loss = u.sum()
        loss.backward()
        return time.perf_counter() - start

    return _timed(run, length, series in SLOW, repeats, budget_s, base)


def _timed(
    run: Callable[[int], float], length: int, slow: bool, repeats: int, budget_s: float, base: float
) -> dict[str, Any]:
    """One warm-up, then up to ``repeats`` timed runs (fewer once they total ``budget_s``): the point's figures."""
    # A literal loop has no size-dependent set-up: warm it up on a short prefix, not a second full run.
    run(min(length, 128) if slow else length)
    runs: list[float] = []
    while len(runs) < repeats and (not runs or sum(runs) <= budget_s):
        runs.append(run(length))
    peak = _maxrss_mb()
    return {
        "status": "ok",
        "seconds": statistics.median(runs),
        "runs": [round(r, 6) for r in runs],
        "peak_rss_mb": round(peak, 1),
        "peak_delta_mb": round(peak - base, 1),
    }


def _kernel_point(series: str, length: int, repeats: int, budget_s: float, base: float) -> dict[str, Any]:
    """Forward + backward of the delta rule alone on random inputs shaped like one default TADN layer."""
    import torch
    import torch.nn.functional as F

    from hytrec.model.tadn import chunk_gated_delta_rule, naive_gated_delta_rule

    h, d = 2, 32
    q, k = (F.normalize(torch.randn(1, h, length, d), dim=-1).requires_grad_() for _ in range(2))
    v = torch.randn(1, h, length, d, requires_grad=True)
    g = (-0.1 * torch.rand(1, h, length)).requires_grad_()
    beta = torch.rand(1, h, length, requires_grad=True)
    leaves = (q, k, v, g, beta)

    def run(n: int) -> float:
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        args = [t[:, :, :n] for t in leaves]
        if series == "tadn_naive":
            o, state = naive_gated_delta_rule(*args)
        else:
            o, state = chunk_gated_delta_rule(*args, chunk_size=64)
        (o.sum() + state.sum()).backward()
        return time.perf_counter() - start

    return _timed(run, length, series in SLOW, repeats, budget_s, base)


def serving_costs(histories: tuple[int, ...], n_items: int, threads: int, batch: int, seed: int) -> dict[str, Any]:
    """Per-event step and per-request cost against history length H, and the state's bytes per user.

    The states of every H are built first; then the timed blocks go round-robin over (H, kind), so any
    slow spell of a shared machine falls on every H alike instead of on one of them.
    """
    import torch

    from hytrec.model.config import HyTRecConfig
    from hytrec.model.hytrec import HyTRec
    from hytrec.model.state import StateBatch, encode_state

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = HyTRecConfig(n_items=n_items)
    model = HyTRec(cfg).eval()
    build_s: dict[str, float] = {}
    calls: dict[tuple[str, str], Callable[[], Any]] = {}
    state_bytes: dict[str, int] = {}
    with torch.inference_mode():
        for h in histories:
            items, times = _history(h + 1, n_items, seed + h)
            start = time.perf_counter()
            one = model.build_state(items[:, :h], times[:, :h], torch.tensor([h]))
            build_s[str(h)] = round(time.perf_counter() - start, 6)
            if h == max(histories):
                state_bytes = {d: len(encode_state(one, cfg, "bench", d)) for d in STATE_DTYPES}
            for suffix, state in (("", one), ("_batch", StateBatch.cat([one] * batch))):
                n = len(state)
                ev_items, ev_ts = items[:, h].expand(n).clone(), times[:, h].expand(n).clone()
                now = ev_ts + 30.0
                calls["step_us" + suffix, str(h)] = partial(model.step, state, ev_items, ev_ts)
                calls["request_us" + suffix, str(h)] = partial(_request, model, state, now)
        means = _round_robin_us(calls)
    out: dict[str, Any] = {k: {} for k in ("step_us", "step_us_batch", "request_us", "request_us_batch")}
    for (kind, h), us in means.items():
        out[kind][h] = round(us, 2)
    return {**out, "build_state_s": build_s, "state_bytes": state_bytes}


def _request(model: Any, state: Any, now: Any) -> Any:
    """The request path: user vector at ``now``, scores over the catalogue, top-10."""
    import torch

    return torch.topk(model.item_scores(model.user_vector(state, now)), 10, dim=-1)


def _round_robin_us(
    calls: dict[Any, Callable[[], Any]], rounds: int = 9, block_s: float = 0.02, warm_up_s: float = 0.2
) -> dict[Any, float]:
    """Median over ``rounds`` of the mean microseconds per call, blocks of about ``block_s`` taken in turn."""
    per_block: dict[Any, int] = {}
    for key, fn in calls.items():
        start, n = time.perf_counter(), 0
        while n < 3 or time.perf_counter() - start < warm_up_s:
            fn()
            n += 1
        per_block[key] = max(1, round(n * block_s / (time.perf_counter() - start)))
    samples: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            start = time.perf_counter()
            for _ in range(per_block[key]):
                fn()
            samples[key].append((time.perf_counter() - start) / per_block[key] * 1e6)
    return {key: statistics.median(v) for key, v in samples.items()}


# --------------------------------------------------------------------------------- process control
def _run_forked(target: str, kwargs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Fork; the child runs ``target(**kwargs)`` and sends back JSON; it is killed after ``timeout_s``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: keep the server's stdout (its answer channel) clean
        os.close(read_fd)
        os.dup2(2, 1)
        try:
            result = globals()[target](**kwargs)
        except BaseException as exc:  # reported as the point's status, the sweep goes on
            result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        with os.fdopen(write_fd, "w") as f:
            f.write(json.dumps(result))
        os._exit(0)
    os.close(write_fd)
    deadline, buf, timed_out = time.monotonic() + timeout_s, b"", False
    with os.fdopen(read_fd, "rb", buffering=0) as f:
        while True:
            ready, _, _ = select.select([f], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            chunk = f.read(1 << 16)
            if not chunk:
                break
            buf += chunk
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"status": "timeout", "error": f"killed after {timeout_s:.0f} s"}
    if buf:
        return json.loads(buf)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL  # the OOM killer's signal
    return {"status": "memory" if killed else "error", "error": f"child ended with wait status {status}"}


def serve_forks() -> None:
    """Fork server: torch and the models imported once, nothing computed (so forking is safe); then for
    each request line ``{"target", "kwargs", "timeout_s"}`` on stdin, one fresh forked child, one JSON line out."""
    import hytrec.model.baselines
    import hytrec.model.hytrec
    import hytrec.model.state  # noqa: F401

    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps(_run_forked(req["target"], req["kwargs"], req["timeout_s"])), flush=True)


class ForkServer:
    """A ``python -c serve_forks()`` subprocess: every measurement runs in a fresh process of its own."""

    def __init__(self) -> None:
        env = dict(os.environ)
        # OpenMP's default wait policy, as users get it. On a machine shared with other jobs, spinning threads
        # stall each other: run the benchmark alone, or set OMP_WAIT_POLICY=PASSIVE (recorded in the page).
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.omp_wait_policy = env.get("OMP_WAIT_POLICY", "default")
        code = f"from {__name__} import serve_forks; serve_forks()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def run(self, target: str, kwargs: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"target": target, "kwargs": kwargs, "timeout_s": timeout_s}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited with code {self.proc.wait()}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def predicted_math_attention_gb(length: int, n_layers: int = 2, n_heads: int = 2) -> float:
    return MATH_ATTN_FACTOR * n_layers * n_heads * length**2 * 4 / 1e9


# ------------------------------------------------------------------------------------------ the run
def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run_benchmark(
    settings: Settings, command: str = "hytrec bench model", progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run every measurement of ``settings`` and return the result object (see ``JSON_KEYS``)."""
    say = progress or (lambda _msg: None)
    started = time.time()
    load_start = os.getloadavg()
    server = ForkServer()
    try:
        points, serving = _sweep(settings, server, say)
    finally:
        server.close()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command,
            "quick": settings.quick,
            "threads": settings.threads,
            "omp_wait_policy": server.omp_wait_policy,
            "load_avg_start": [round(x, 2) for x in load_start],
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
            "wall_s": round(time.time() - started, 1),
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()},
            **_machine(),
        },
        "train_step": points["model"],
        "train_step_loss": points["loss"],
        **serving,
    }
    result["ratios"] = _ratios(result)
    result["goals"] = _goals(result)
    return result


def _sweep(
    settings: Settings, server: ForkServer, say: Callable[[str], None]
) -> tuple[dict[str, dict[str, dict[str, dict[str, Any]]]], dict[str, Any]]:
    """Training points (a series stops when too slow or out of memory), then the serving costs."""
    points: dict[str, dict[str, dict[str, dict[str, Any]]]] = {m: {} for m in MODES}
    for series in settings.series:
        for mode in ("model",) if series in SLOW + KERNELS else tuple(MODES):
            row = points[mode].setdefault(series, {})
            stop: str | None = None
            for length in settings.lengths:
                if stop is not None:
                    row[str(length)] = {"status": stop}
                    continue
                if series == "sasrec" and predicted_math_attention_gb(length) > settings.mem_cap_gb:
                    gb = predicted_math_attention_gb(length)
                    row[str(length)] = {"status": "memory", "predicted_gb": round(gb, 2)}
                    continue
                kwargs = {
                    "series": series,
                    "length": length,
                    "mode": mode,
                    "n_items": settings.n_items,
                    "threads": settings.threads,
                    "repeats": settings.repeats,
                    "budget_s": settings.budget_s,
                    "seed": settings.seed,
                }
                timeout = max(120.0, settings.budget_s * (settings.repeats + 2) * 1.5)
                res = server.run("train_point", kwargs, timeout)
                row[str(length)] = res
                if res["status"] == "ok":
                    figures = f"{res['seconds']:9.4f} s {res['peak_delta_mb']:8.1f} MB"
                    say(f"train {series:<12} {mode:<5} L={length:<6} {figures}")
                    if res["seconds"] > settings.budget_s:
                        stop = "too slow"
                else:
                    say(f"train {series:<12} {mode:<5} L={length:<6} {res['status']}: {res.get('error', '')}")
                    if res["status"] in ("timeout", "memory"):
                        stop = "too slow" if res["status"] == "timeout" else "memory"
    say("serving: step and request cost against history length ...")
    serving = server.run(
        "serving_costs",
        {
            "histories": settings.histories,
            "n_items": settings.n_items,
            "threads": settings.serving_threads,
            "batch": settings.serve_batch,
            "seed": settings.seed,
        },
        timeout_s=900.0,
    )
    if "step_us" not in serving:
        raise RuntimeError(f"serving measurement failed: {serving}")
    return points, serving


def _seconds(table: dict[str, dict[str, Any]], series: str, length: int) -> float | None:
    point = table.get(series, {}).get(str(length), {})
    return point.get("seconds") if point.get("status") == "ok" else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _ratios(res: dict[str, Any]) -> dict[str, Any]:
    model, loss = res["train_step"], res["train_step_loss"]
    both = [int(n) for n in model.get("naive", {}) if _seconds(model, "naive", n) and _seconds(model, "hytrec", n)]
    at = max(both, default=None)
    kernel = _ratio(_seconds(model, "tadn_naive", 4096), _seconds(model, "tadn_chunked", 4096))
    scaling = {}
    for series, row in model.items():
        ok = sorted(int(n) for n in row if _seconds(model, series, int(n)))
        if len(ok) >= 2:
            lo = 1024 if 1024 in ok and ok[-1] > 1024 else ok[0]
            t_ratio = _ratio(_seconds(model, series, ok[-1]), _seconds(model, series, lo))
            scaling[series] = {"from_L": lo, "to_L": ok[-1], "length_ratio": ok[-1] // lo, "time_ratio": t_ratio}
    flat = {key: _ratio(max(res[key].values()), min(res[key].values())) for key in ("step_us", "step_us_batch")}
    return {
        "chunked_vs_naive_L4096": _ratio(_seconds(model, "naive", 4096), _seconds(model, "hytrec", 4096)),
        "chunked_vs_naive": {
            "L": at,
            "ratio": _ratio(_seconds(model, "naive", at), _seconds(model, "hytrec", at)) if at else None,
        },
        "kernel_chunked_vs_naive_L4096": kernel,
        "hytrec_16k_over_1k": _ratio(_seconds(model, "hytrec", 16384), _seconds(model, "hytrec", 1024)),
        "hytrec_16k_over_1k_loss": _ratio(_seconds(loss, "hytrec", 16384), _seconds(loss, "hytrec", 1024)),
        "softmax_16k_over_1k": _ratio(_seconds(model, "sasrec_flash", 16384), _seconds(model, "sasrec_flash", 1024)),
        "softmax_16k_over_1k_loss": _ratio(_seconds(loss, "sasrec_flash", 16384), _seconds(loss, "sasrec_flash", 1024)),
        "softmax_math_16k_over_1k": _ratio(_seconds(model, "sasrec", 16384), _seconds(model, "sasrec", 1024)),
        "scaling": scaling,
        "step_max_over_min": flat["step_us"],
        "step_batch_max_over_min": flat["step_us_batch"],
    }


def _goals(res: dict[str, Any]) -> dict[str, bool | None]:
    r = res["ratios"]
    naive, linear = r["chunked_vs_naive_L4096"], r["hytrec_16k_over_1k"]
    return {
        "chunked_vs_naive_L4096_ge_20": None if naive is None else naive >= NAIVE_GOAL,
        "hytrec_16k_over_1k_le_20": None if linear is None else linear <= LINEAR_GOAL,
        "state_fp16_le_32KiB": res["state_bytes"]["float16"] <= STATE_GOAL_BYTES,
        "step_flat_le_2x": r["step_max_over_min"] <= FLAT_GOAL,
    }


# ---------------------------------------------------------------------------------------- reporting
JSON_KEYS: list[tuple[str, str]] = [
    ("schema", f'"{SCHEMA}"'),
    ("meta", "date, command, quick, threads, load averages at start/end, wall_s, settings, cpu, torch, python"),
    (
        "train_step[series][L]",
        "forward + backward of one sequence, loss = sum of outputs: status (ok | too slow | memory | "
        "timeout | error), seconds (median), runs, peak_rss_mb (process peak), peak_delta_mb (above the "
        "process before the model was built); series: " + ", ".join(SERIES),
    ),
    ("train_step_loss[series][L]", "the same with the full-softmax cross-entropy (not for naive, tadn_*)"),
    ("step_us[H] / step_us_batch[H]", "one serving step, microseconds per call for 1 user / for the batch"),
    ("request_us[H] / request_us_batch[H]", "user_vector + scores over the catalogue + top-10, per call"),
    ("build_state_s[H]", "seconds to build one user's state from H events (parallel form, no grad)"),
    ("state_bytes.{float32,float16,bfloat16}", "encode_state blob of one user, default config, full ring"),
    ("ratios.chunked_vs_naive_L4096", "naive / chunked seconds at L = 4096 (null if not both measured)"),
    ("ratios.chunked_vs_naive", "{L, ratio} at the largest L where both ran"),
    ("ratios.kernel_chunked_vs_naive_L4096", "the same for the delta rule alone (tadn_naive / tadn_chunked)"),
    ("ratios.hytrec_16k_over_1k[_loss]", "HyTRec time(16384) / time(1024), model only [with loss]"),
    ("ratios.softmax_16k_over_1k[_loss]", "the same for sasrec_flash (null if not run)"),
    ("ratios.softmax_math_16k_over_1k", "the same for sasrec (math kernel; null if not run)"),
    ("ratios.scaling[series]", "{from_L, to_L, length_ratio, time_ratio} over the measured range"),
    ("ratios.step_max_over_min / step_batch_max_over_min", "flatness of step_us / step_us_batch over H"),
    (
        "goals.{chunked_vs_naive_L4096_ge_20, hytrec_16k_over_1k_le_20, state_fp16_le_32KiB, step_flat_le_2x}",
        "booleans (null when the figure was not measured, e.g. with --quick)",
    ),
]


def _fmt_point(p: dict[str, Any] | None) -> str:
    if p is None:
        return "-"
    if p.get("status") != "ok":
        return f"not run ({p['status']})" if p["status"] in ("too slow", "memory") else p["status"]
    return f"{p['seconds']:.3f} s / {p['peak_delta_mb']:.0f} MB"


def _train_table(table: dict[str, dict[str, Any]], lengths: list[str]) -> list[str]:
    series = list(table)
    lines = ["| L | " + " | ".join(series) + " |", "|---:|" + "---:|" * len(series)]
    for n in lengths:
        lines.append(f"| {n} | " + " | ".join(_fmt_point(table[s].get(n)) for s in series) + " |")
    return lines


def _fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if x is None else format(x, spec) + unit


def _goal_rows(res: dict[str, Any]) -> list[str]:
    r, g = res["ratios"], res["goals"]
    cvn = r["chunked_vs_naive"]

    def ok(v: bool | None) -> str:
        return "not measured" if v is None else ("PASS" if v else "FAIL")

    return [
        "| goal | figure | target | result |",
        "|---|---:|---:|---|",
        f"| chunked vs naive recurrence, fwd+bwd, L = 4096 | {_fmt(r['chunked_vs_naive_L4096'], '.1f', 'x')} | >= 20x "
        f"| {ok(g['chunked_vs_naive_L4096_ge_20'])} |",
        f"| (chunked vs naive at the largest L both ran: {cvn['L']}) | {_fmt(cvn['ratio'], '.1f', 'x')} | | |",
        f"| (the delta rule alone, chunked vs literal loop, L = 4096) "
        f"| {_fmt(r['kernel_chunked_vs_naive_L4096'], '.1f', 'x')} | | |",
        f"| HyTRec time(16384) / time(1024), model only | {_fmt(r['hytrec_16k_over_1k'])} | <= 20 "
        f"| {ok(g['hytrec_16k_over_1k_le_20'])} |",
        f"| HyTRec time(16384) / time(1024), with loss | {_fmt(r['hytrec_16k_over_1k_loss'])} | (<= 20) | |",
        f"| softmax (flash) time(16384) / time(1024), model only | {_fmt(r['softmax_16k_over_1k'])} | (compare) | |",
        f"| softmax (flash) time(16384) / time(1024), with loss | {_fmt(r['softmax_16k_over_1k_loss'])} "
        "| (compare) | |",
        f"| softmax (math) time(16384) / time(1024) | {_fmt(r['softmax_math_16k_over_1k'])} | (compare) | |",
        f"| state bytes per user, fp16 | {res['state_bytes']['float16']} | <= {STATE_GOAL_BYTES} "
        f"| {ok(g['state_fp16_le_32KiB'])} |",
        f"| step cost max/min over history length (1 user) | {_fmt(r['step_max_over_min'])} | <= {FLAT_GOAL} "
        f"| {ok(g['step_flat_le_2x'])} |",
    ]


def _serving_rows(res: dict[str, Any]) -> list[str]:
    b = res["meta"]["settings"]["serve_batch"]
    lines = [
        f"| H (events behind the state) | step, 1 user (us) | step, {b} users (us per user) | request, 1 user (us) "
        f"| request, {b} users (us per user) | build_state (s) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for h in res["step_us"]:
        lines.append(
            f"| {h} | {res['step_us'][h]:.1f} | {res['step_us_batch'][h] / b:.1f} | {res['request_us'][h]:.1f} "
            f"| {res['request_us_batch'][h] / b:.1f} | {res['build_state_s'][h]:.3f} |"
        )
    return lines


def render_text(res: dict[str, Any]) -> str:
    """Plain-text report for the terminal."""
    lengths = [str(n) for n in res["meta"]["settings"]["lengths"]]
    sb = res["state_bytes"]
    parts = [
        f"HyTRec model benchmark ({res['meta']['date']}, {res['meta']['cpu']}, {res['meta']['threads']} threads, "
        f"torch {res['meta']['torch']})",
        "",
        "forward+backward, batch 1, model only (median seconds / peak MB above baseline):",
        *_train_table(res["train_step"], lengths),
        "",
        "forward+backward with full-softmax cross-entropy:",
        *_train_table(res["train_step_loss"], lengths),
        "",
        *_serving_rows(res),
        "",
        f"state bytes per user: float32 {sb['float32']}, float16 {sb['float16']}, bfloat16 {sb['bfloat16']}",
        "",
        *_goal_rows(res),
    ]
    return "\n".join(parts)


def render_markdown(res: dict[str, Any], plot_rel: str | None) -> str:
    """The page docs/benchmarks/model.md, every figure from ``res``."""
    m, s = res["meta"], res["meta"]["settings"]
    lengths = [str(n) for n in s["lengths"]]
    sb = res["state_bytes"]
    lines = [
        "# Model benchmark: training step against length, serving cost against history",
        "",
        f"Generated by `{m['command']}` on {m['date']} (wall time {m['wall_s']:.0f} s). Do not edit by hand: "
        "rerun the command (`make bench-model`) to regenerate this page, its plot and its JSON.",
        "",
        f"**Machine:** {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['threads']} threads "
        f"(OMP_WAIT_POLICY={m['omp_wait_policy']}), Python {m['python']}, {m['platform']}. Load average "
        f"(1/5/15 min) {m['load_avg_start']} at the start and {m['load_avg_end']} at the end: the machine is "
        "shared, so other jobs may have run alongside; absolute times are this machine's, compare ratios."
        + (" **Quick run (--quick): short sweep, not the full benchmark.**" if m["quick"] else ""),
        "",
        "## Goals",
        "",
        *_goal_rows(res),
        "",
    ]
    if plot_rel:
        lines += [f"![time and memory against length, serving cost against history]({plot_rel})", ""]
    lines += [
        "## Training step against sequence length",
        "",
        f"One sequence (batch 1) of L events, catalogue of {s['n_items']} items, default configs: HyTRec "
        "d_model 64, 2 TADN heads, 2 TADN blocks, window 64, chunk 64; SASRec d_model 64, 2 layers, 2 heads, "
        "max_len = L. Each point runs in a fresh process forked from a server that has imported torch and "
        "computed nothing: one warm-up run (for the literal loops a 128-event prefix, as they have no size-dependent "
        f"set-up), then up to {s['repeats']} timed runs (fewer once their total passes {s['budget_s']:.0f} s); "
        "the figure is the median. A run is model(...) + loss + backward, gradients cleared before it, no "
        "optimiser step. Memory is the process's peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) minus its RSS "
        "before the model was built: model, inputs, activations, gradients and allocator slack (the JSON also "
        "has the absolute peak).",
        "",
        "Series: " + "; ".join(f"**{k}**: {v}" for k, v in SERIES.items() if k in s["series"]) + ".",
        "",
        f"A series stops after a point whose median exceeds {s['budget_s']:.0f} s (the rest: *not run (too "
        "slow)*); nothing is extrapolated. SASRec with dropout > 0 makes PyTorch's CPU SDPA fall back to the "
        f"math kernel, which materialises L x L matrices: points predicted above {s['mem_cap_gb']:.0f} GB "
        f"({MATH_ATTN_FACTOR} fp32 L x L matrices per head and layer, calibrated on a measured point) are "
        "*not run (memory)*. sasrec_flash is the same transformer with dropout 0, where SDPA takes its fused "
        "flash kernel (O(L) memory, still O(L^2) time).",
        "",
        "### Model only (loss = sum of the user vectors)",
        "",
        "Median seconds / peak MB above the process baseline.",
        "",
        *_train_table(res["train_step"], lengths),
        "",
        "Growth of time over the measured range (time ratio for the length ratio; linear = equal): "
        + "; ".join(
            f"{k} {_fmt(v['time_ratio'], '.1f', 'x')} for {v['length_ratio']}x ({v['from_L']} to {v['to_L']})"
            for k, v in res["ratios"]["scaling"].items()
        )
        + ".",
        "",
        "### With the training loss (full-softmax cross-entropy over the catalogue at every position)",
        "",
        "`training.losses.full_softmax_cross_entropy`, the trainer's full loss (computed in blocks of rows, "
        "so the L x catalogue logit matrix is never stored); at d_model 64 the catalogue products dominate.",
        "",
        *_train_table(res["train_step_loss"], lengths),
        "",
        "## Serving: per-event step and per-request cost against history length",
        "",
        "A user's state is built from a random history of H events with `model.build_state` (the parallel "
        f"form); for {s['serve_batch']} users it is that state repeated. Under `torch.inference_mode`, with "
        f"{s.get('serving_threads', s['threads'])} torch thread(s) (the service runs one per worker), "
        "`model.step` applies one event; a request is `user_vector` + scores over the whole catalogue + "
        "top-10. Each figure is the median over 9 rounds of the mean time per call in a block of about 20 ms; "
        "the blocks of all (H, kind) are taken in turn, so a slow spell of the shared machine hits every H "
        "alike. "
        "The state has a fixed size, so the step cannot depend on H; the table measures it anyway.",
        "",
        *_serving_rows(res),
        "",
        "## State bytes per user",
        "",
        "`len(encode_state(state, cfg, model_version, dtype))` for the default config (2 layers x 2 heads x "
        "32 x 32 TADN matrices, a 64-float summary, a full ring of 64 (item, timestamp), header, CRC); the "
        "dtype applies to the TADN matrices.",
        "",
        "| float32 | float16 | bfloat16 |",
        "|---:|---:|---:|",
        f"| {sb['float32']} | {sb['float16']} | {sb['bfloat16']} |",
        "",
        "## JSON keys",
        "",
        "`hytrec bench model --json` prints one object; `--json-out PATH` (or, by default, the `--markdown` "
        "path with `.json`) writes it. L and H keys are strings. Stable keys:",
        "",
        *(f"- `{k}`: {v}" for k, v in JSON_KEYS),
        "",
    ]
    return "\n".join(lines)


def write_plot(res: dict[str, Any], path: Path) -> None:
    """Time and memory against L (log-log) for every series, step and request cost against H."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m, ax_s) = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = {
        "hytrec": "tab:blue",
        "naive": "tab:red",
        "sasrec_flash": "tab:green",
        "sasrec": "tab:orange",
        "tadn_chunked": "tab:cyan",
        "tadn_naive": "tab:pink",
    }
    for key, style, label in (("train_step", "-", ""), ("train_step_loss", "--", " + loss")):
        for series, row in res[key].items():
            ok = [(int(n), p) for n, p in row.items() if p.get("status") == "ok"]
            if not ok:
                continue
            xs = [n for n, _ in ok]
            color = colors.get(series)
            style = ":" if series in KERNELS else style
            ax_t.plot(xs, [p["seconds"] for _, p in ok], style, marker="o", ms=3, color=color, label=series + label)
            mem = [max(p["peak_delta_mb"], 1e-1) for _, p in ok]
            ax_m.plot(xs, mem, style, marker="o", ms=3, color=color, label=series + label)
    lengths = res["meta"]["settings"]["lengths"]
    for ax, title, ylabel in (
        (ax_t, "forward + backward time, batch 1", "seconds (median)"),
        (ax_m, "peak memory above baseline", "MB (peak RSS)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths], rotation=45)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7, loc="upper left")
    b = res["meta"]["settings"]["serve_batch"]
    hs = [int(h) for h in res["step_us"]]
    for key, div, label, style in (
        ("step_us", 1, "step, 1 user", "-"),
        ("step_us_batch", b, f"step, {b} users (per user)", "--"),
        ("request_us", 1, "request, 1 user", "-"),
        ("request_us_batch", b, f"request, {b} users (per user)", "--"),
    ):
        color = "tab:purple" if key.startswith("step") else "tab:brown"
        ax_s.plot(hs, [res[key][str(h)] / div for h in hs], style, marker="o", ms=3, color=color, label=label)
    ax_s.set_xscale("log")
    ax_s.set_yscale("log")
    ax_s.set_xlabel("history length H behind the state (events)")
    ax_s.set_ylabel("microseconds")
    ax_s.set_title("serving cost against history length")
    ax_s.grid(True, which="both", alpha=0.3)
    ax_s.legend(fontsize=7)
    m = res["meta"]
    fig.suptitle(f"HyTRec model benchmark: {m['cpu']}, {m['threads']} threads, torch {m['torch']}, {m['date']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- CLI
def bench_model(
    quick: bool = typer.Option(False, "--quick", help="Short sweep (L <= 1024, H <= 1000) for smoke tests."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the tables."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG plot here."),
    markdown: Path | None = typer.Option(None, "--markdown", help="Write the Markdown page here (and its JSON)."),
    json_out: Path | None = typer.Option(None, "--json-out", help="Write the JSON here (default: PAGE.json)."),
    budget: float | None = typer.Option(None, "--budget", help="Seconds per fwd+bwd before a series stops."),
    threads: int | None = typer.Option(None, "--threads", help="torch threads (default: CPUs available)."),
    n_items: int = typer.Option(10_000, "--n-items", help="Catalogue size."),
    mem_cap_gb: float = typer.Option(6.0, "--mem-cap-gb", help="Skip SASRec (math) points predicted above this."),
) -> None:
    """Training step time/memory against length (HyTRec chunked, naive, SASRec), serving cost, state bytes."""
    settings = Settings.quick_run() if quick else Settings()
    settings.n_items, settings.mem_cap_gb = n_items, mem_cap_gb
    if budget is not None:
        settings.budget_s = budget
    if threads is not None:
        settings.threads = threads
    command = shlex.join(["hytrec", *sys.argv[1:]])
    res = run_benchmark(settings, command=command, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    if json_out is None and markdown is not None:
        json_out = markdown.with_suffix(".json")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(res, indent=2) + "\n")
    if plot is not None:
        write_plot(res, plot)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        plot_rel = os.path.relpath(plot, markdown.parent) if plot is not None else None
        markdown.write_text(render_markdown(res, plot_rel))
    typer.echo(json.dumps(res, indent=2) if as_json else render_text(res))
