"""``hytrec bench train``: training throughput (target events per second) on real batches of a data file.

Times training steps (forward, next-item loss, backward, AdamW; no gradient clipping) on the first
``--batches`` batches of a seeded epoch of the data file's leave-one-out training split, built exactly as
``hytrec train`` builds them.
``--compare DIR`` also times another checkout of this project (e.g. ``git worktree add /tmp/old <commit>``)
on the same batches, alternating rounds between the two in one run, and reports the speed-up as a ratio
(machines are shared and noisy; a ratio measured in one run is what to quote).

Each pass runs :mod:`hytrec.benchmarks.train_worker` in a fresh interpreter that imports the model and
training code of the checkout it times (which may predate this file, or the ``hytrec.*`` layout).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from hytrec.benchmarks import train_worker
from hytrec.benchmarks.harness import REPO, BenchPage, echo_result, run_command
from hytrec.training.config import ModelType

WORKER_TIMEOUT_S = 3600.0


def time_checkout(src: Path, data: Path, model_type: str, batches: int, batch_tokens: int, threads: int) -> dict:
    """One timed pass of ``src``'s code, in a fresh interpreter started in ``src``."""
    argv = [sys.executable, train_worker.__file__, str(src), str(data), model_type]
    out = run_command([*argv, str(batches), str(batch_tokens), str(threads)], cwd=src, timeout_s=WORKER_TIMEOUT_S)
    return out.unwrap()


def bench_train(
    data: Annotated[Path, typer.Option("--data", help="Interactions file (its leave-one-out training split is used).")],
    model_type: Annotated[ModelType, typer.Option("--model-type", help="Any `hytrec train --model-type`.")] = (
        ModelType.HYTREC
    ),
    batches: Annotated[int, typer.Option("--batches", help="Batches of the seeded epoch to time.")] = 20,
    batch_tokens: Annotated[int, typer.Option("--batch-tokens", help="Events per batch, as in `hytrec train`.")] = 8192,
    threads: Annotated[int, typer.Option("--threads", help="torch threads.")] = 1,
    rounds: Annotated[
        int, typer.Option("--rounds", help="Timed passes per checkout (alternating with --compare).")
    ] = 2,
    compare: Annotated[
        Path | None, typer.Option("--compare", help="Another checkout of this project to time too.")
    ] = None,
) -> None:
    """Training throughput on real batches; with --compare, the speed-up over another checkout."""
    page = BenchPage.start(threads=threads)
    sides = {"this": REPO, **({"other": compare.resolve()} if compare else {})}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    info: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for name, src in sides.items():
            res = time_checkout(src, data.resolve(), model_type.value, batches, batch_tokens, threads)
            seconds[name].append(res["seconds"])
            info[name] = res
    result: dict[str, Any] = {
        "model_type": model_type.value,
        "data": str(data),
        "batches": batches,
        "threads": threads,
    }
    for name in sides:
        best = min(seconds[name])
        rate = info[name]["targets"] / best
        result[name] = {
            "checkout": str(sides[name]),
            "code": info[name]["code"],
            "targets_per_s": round(rate),
            "epoch_seconds_estimate": round(info[name]["epoch_targets"] / rate, 1),
            "pass_seconds": [round(s, 3) for s in seconds[name]],
            "median_pass_seconds": round(statistics.median(seconds[name]), 3),
        }
    if compare:
        result["speedup"] = round(min(seconds["other"]) / min(seconds["this"]), 2)
    result["meta"] = page.finish().meta()
    echo_result(result)
