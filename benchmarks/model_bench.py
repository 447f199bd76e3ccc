"""``hytrec bench model``: training-step time and memory against length, serving cost against history.

Measured in one run on this machine (BRIEF section 3, "Efficiency"):

* forward + backward time and peak memory of one batch-1 sequence of length L (256 ... 16384) for the
  chunked HyTRec, the literal step-by-step recurrence (``use_naive_recurrence``) and a SASRec-style causal softmax
  transformer of the same width, both with the loss reduced to ``u.sum()`` ("model only") and with the
  full-softmax cross-entropy the trainer uses ("with loss");
* the serving step (one event for B users) and the request path (user vector + top-10 over the
  catalogue) against the length of the history behind the state, and the state's bytes per user.

Every measurement runs in a fresh process (:class:`hytrec.benchmarks.harness.IsolatedRunner`, forked from
a forkserver that has imported torch and the models and computed nothing), so its peak RSS (``ru_maxrss``)
and its timings belong to that point alone. The page and the plot are drawn by
:mod:`hytrec.benchmarks.model_report`, from the result JSON alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from hytrec.benchmarks.harness import BenchPage, IsolatedRunner, echo_result, read_json, write_json

SCHEMA = "hytrec-bench-model/1"
SERIES: dict[str, str] = {
    "hytrec": "HyTRec, chunked delta rule (training form)",
    "naive": "HyTRec, literal step-by-step recurrence (the reference put in place by use_naive_recurrence)",
    "sasrec_flash": "SASRec, 2 layers x 2 heads, dropout 0 (SDPA fused flash kernel)",
    "sasrec": "SASRec, 2 layers x 2 heads, dropout 0.2 (SDPA math kernel, L x L matrices)",
    "tadn_chunked": "the gated delta rule alone, chunked (one layer: 2 heads x 32 x 32), no projections",
    "tadn_naive": "the gated delta rule alone, literal loop (one layer: 2 heads x 32 x 32)",
}
Series = StrEnum("Series", [(name.upper(), name) for name in SERIES])  # the --series choices
KERNELS = ("tadn_chunked", "tadn_naive")
SLOW = ("naive", "tadn_naive")  # warmed up on a short prefix; no "with loss" mode
MODES: dict[str, str] = {"model": "loss = sum of the user vectors", "loss": "full-softmax cross-entropy"}
LOSS = "hytrec.training.losses.full_softmax_cross_entropy"  # recorded in meta.loss: what "with loss" measured
STATE_DTYPES = ("float32", "float16", "bfloat16")
STATE_GOAL_BYTES = 32 * 1024
NAIVE_GOAL, LINEAR_GOAL, FLAT_GOAL = 20.0, 20.0, 2.0
# The SDPA math kernel keeps about four L x L fp32 matrices per head and layer for backward (scores,
# probabilities, dropout mask/output); calibrated against a measured 0.98 GB at L = 4096.
MATH_ATTN_FACTOR = 4
PRELOAD = ("torch", "hytrec.model.baselines", "hytrec.model.hytrec", "hytrec.model.state", "hytrec.training.losses")
SERVING_TIMEOUT_S = 900.0


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

    def point_timeout_s(self) -> float:
        return max(120.0, self.budget_s * (self.repeats + 2) * 1.5)


# ------------------------------------------------------------------------------------- measurement
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _seeded(threads: int, seed: int) -> float:
    """Set torch's threads and seed in this (fresh) process; return its RSS baseline in MB.

    A forked child starts with its parent's ``ru_maxrss``, hence the max with the current RSS.
    """
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return max(_maxrss_mb(), _rss_mb())


def _history(length: int, n_items: int, seed: int) -> tuple[Any, Any]:
    """Random item rows (1, length) and increasing float64 timestamps with log-uniform gaps (1 s .. 12 days)."""
    import torch

    from hytrec.model.vocab import FIRST_ITEM_ROW

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

    from hytrec.model.tadn.naive import use_naive_recurrence
    from hytrec.model.vocab import FIRST_ITEM_ROW
    from hytrec.training.losses import full_softmax_cross_entropy

    base = _seeded(threads, seed)
    if series in KERNELS:
        return _kernel_point(series, length, repeats, budget_s, base)
    model = _build_model(series, n_items, length)
    model.train()
    items, times = _history(length + 1, n_items, seed)
    if series == "naive":
        use_naive_recurrence(model)

    def run(n: int) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        u = model(items[:, :n], times[:, :n], times[:, 1 : n + 1], torch.tensor([n]))
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
    """One warm-up, then up to ``repeats`` timed runs (fewer once they total ``budget_s``): the point's figures.

    Not ``torch.utils.benchmark.Timer``: a point is one run of up to a minute, and the budget must bound its
    cost; Timer's autorange warms up at full size and its ``timeit`` adds two untimed calls to every run.
    """
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

    _seeded(threads, seed)
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
        means = _round_robin_us(calls, threads)
    out: dict[str, Any] = {k: {} for k in ("step_us", "step_us_batch", "request_us", "request_us_batch")}
    for (kind, h), us in means.items():
        out[kind][h] = round(us, 2)
    return {**out, "build_state_s": build_s, "state_bytes": state_bytes}


def _request(model: Any, state: Any, now: Any) -> Any:
    """The request path: user vector at ``now``, scores over the catalogue, top-10."""
    import torch

    return torch.topk(model.item_scores(model.user_vector(state, now)), 10, dim=-1)


def _round_robin_us(
    calls: dict[Any, Callable[[], Any]], threads: int, rounds: int = 9, block_s: float = 0.02, warm_up_s: float = 0.2
) -> dict[Any, float]:
    """Median over ``rounds`` of the mean microseconds per call, blocks of about ``block_s`` taken in turn.

    ``Timer.blocked_autorange`` warms each call up and sizes its block; every round then times one block of
    each call in turn (``Timer.timeit``), so no call gets the machine's quiet or busy spell alone.
    """
    from torch.utils.benchmark import Timer

    timers = {key: Timer("fn()", globals={"fn": fn}, num_threads=threads) for key, fn in calls.items()}
    per_block = {
        key: max(1, round(block_s / t.blocked_autorange(min_run_time=warm_up_s).mean)) for key, t in timers.items()
    }
    samples: dict[Any, list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, t in timers.items():
            samples[key].append(t.timeit(per_block[key]).mean * 1e6)
    return {key: statistics.median(v) for key, v in samples.items()}


def predicted_math_attention_gb(length: int, n_layers: int = 2, n_heads: int = 2) -> float:
    return MATH_ATTN_FACTOR * n_layers * n_heads * length**2 * 4 / 1e9


# ------------------------------------------------------------------------------------------ the run
def run_benchmark(
    settings: Settings, command: str | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run every measurement of ``settings`` and return the result object (see ``model_report.JSON_KEYS``)."""
    say = progress or (lambda _msg: None)
    page = BenchPage.start(command, threads=settings.threads, quick=settings.quick)
    with IsolatedRunner(preload=PRELOAD) as runner:
        points = _train_sweep(settings, runner, say)
        say("serving: step and request cost against history length ...")
        args = (settings.histories, settings.n_items, settings.serving_threads, settings.serve_batch, settings.seed)
        serving = runner.run(serving_costs, *args, timeout_s=SERVING_TIMEOUT_S)
    if not serving.ok:
        raise RuntimeError(f"serving measurement failed ({serving.status}): {serving.error}")
    settings_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()}
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "meta": page.finish().meta(settings=settings_dict, loss=LOSS),
        "train_step": points["model"],
        "train_step_loss": points["loss"],
        **serving.value,
    }
    result["ratios"] = _ratios(result)
    result["goals"] = _goals(result)
    return result


def _train_sweep(
    settings: Settings, runner: IsolatedRunner, say: Callable[[str], None]
) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """Every training point in its own process; a series stops when a point is too slow or out of memory."""
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
                s = settings
                args = (series, length, mode, s.n_items, s.threads, s.repeats, s.budget_s, s.seed)
                out = runner.run(train_point, *args, timeout_s=s.point_timeout_s())
                res = out.value if out.ok else {"status": out.status, "error": out.error}
                row[str(length)] = res
                if out.ok:
                    figures = f"{res['seconds']:9.4f} s {res['peak_delta_mb']:8.1f} MB"
                    say(f"train {series:<12} {mode:<5} L={length:<6} {figures}")
                    if res["seconds"] > s.budget_s:
                        stop = "too slow"
                else:
                    say(f"train {series:<12} {mode:<5} L={length:<6} {out.status}: {out.error}")
                    if out.status in ("timeout", "memory"):
                        stop = "too slow" if out.status == "timeout" else "memory"
    return points


def _seconds(table: dict[str, dict[str, Any]], series: str, length: int) -> float | None:
    point = table.get(series, {}).get(str(length), {})
    return point.get("seconds") if point.get("status") == "ok" else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _ratios(res: dict[str, Any]) -> dict[str, Any]:
    model, loss = res["train_step"], res["train_step_loss"]
    both = [int(n) for n in model.get("naive", {}) if _seconds(model, "naive", n) and _seconds(model, "hytrec", n)]
    at = max(both, default=None)

    def growth(table: dict[str, dict[str, Any]], series: str) -> float | None:
        return _ratio(_seconds(table, series, 16384), _seconds(table, series, 1024))

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
        "kernel_chunked_vs_naive_L4096": _ratio(
            _seconds(model, "tadn_naive", 4096), _seconds(model, "tadn_chunked", 4096)
        ),
        "hytrec_16k_over_1k": growth(model, "hytrec"),
        "hytrec_16k_over_1k_loss": growth(loss, "hytrec"),
        "softmax_16k_over_1k": growth(model, "sasrec_flash"),
        "softmax_16k_over_1k_loss": growth(loss, "sasrec_flash"),
        "softmax_math_16k_over_1k": growth(model, "sasrec"),
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


# -------------------------------------------------------------------------------------------- CLI
def bench_model(
    quick: Annotated[bool, typer.Option("--quick", help="Short sweep (L <= 1024, H <= 1000) for smoke tests.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the tables.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot here.")] = None,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Write the Markdown page here (and its JSON).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json-out", help="Write the JSON here (default: PAGE.json).")
    ] = None,
    from_json: Annotated[
        Path | None,
        typer.Option("--from-json", help="Measure nothing: render --plot / --markdown / the tables from this JSON."),
    ] = None,
    series: Annotated[
        list[Series] | None, typer.Option("--series", help="Training series to run (repeatable; default: all).")
    ] = None,
    budget: Annotated[float | None, typer.Option("--budget", help="Seconds per fwd+bwd before a series stops.")] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="torch threads (default: CPUs available).")] = None,
    n_items: Annotated[int, typer.Option("--n-items", help="Catalogue size.")] = 10_000,
    mem_cap_gb: Annotated[
        float, typer.Option("--mem-cap-gb", help="Skip SASRec (math) points predicted above this.")
    ] = 6.0,
) -> None:
    """Training step time/memory against length (HyTRec chunked, naive, SASRec), serving cost, state bytes."""
    from hytrec.benchmarks import model_report

    if from_json is not None:
        res = read_json(from_json)
    else:
        settings = Settings.quick_run() if quick else Settings()
        settings.n_items, settings.mem_cap_gb = n_items, mem_cap_gb
        if series:
            settings.series = tuple(s.value for s in series)
        if budget is not None:
            settings.budget_s = budget
        if threads is not None:
            settings.threads = threads
        res = run_benchmark(settings, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        if json_out is None and markdown is not None:
            json_out = markdown.with_suffix(".json")
    if json_out is not None:
        write_json(json_out, res)
    if plot is not None:
        model_report.write_plot(res, plot)
    if markdown is not None:
        model_report.write_markdown(res, markdown, plot)
    echo_result(res, model_report.render_text(res), as_json=as_json)
