"""``hytrec bench train``: training throughput (target events per second) on real batches of a data file.

Times training steps (forward, next-item loss, backward, AdamW; no gradient clipping) on the first
``--batches`` batches of a seeded epoch of the data file's leave-one-out training split, built exactly as
``hytrec train`` builds them.
``--compare DIR`` also times another checkout of this project (e.g. ``git worktree add /tmp/old <commit>``)
on the same batches, alternating rounds between the two in one run, and reports the speed-up as a ratio
(machines are shared and noisy; a ratio measured in one run is what to quote).

This file runs as a script too (``python benchmarks/train_bench.py --worker ...``), so that it can time
a checkout that predates it: the worker imports ``model`` and ``training`` from ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import typer


def _worker(data: str, model_type: str, batches: int, batch_tokens: int, threads: int) -> dict:
    """Time one pass over the batches (after one warm-up pass) with the code on ``sys.path``."""
    import time

    import numpy as np
    import torch

    from hytrec.model.checkpoint import build_model
    from hytrec.training.data import Interactions, leave_one_out, train_batches
    from hytrec.training.train import TrainConfig, next_item_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    split = leave_one_out(Interactions.from_file(data))
    cfg = TrainConfig(model_type=model_type, batch_tokens=batch_tokens, lr=2e-3)
    model, _ = build_model(cfg.model_type, cfg.model_config(split.data.vocab.n_items))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    seq_len = cfg.max_len + 1 if cfg.max_len else None
    epoch = list(train_batches(split.train, batch_tokens, seed=np.random.default_rng(0), max_len=seq_len))
    chosen = epoch[:batches]
    targets = sum(int(b.lengths.sum()) - len(b) for b in chosen)
    epoch_targets = sum(int(b.lengths.sum()) - len(b) for b in epoch)

    def one_pass() -> float:
        start = time.perf_counter()
        for b in chosen:
            loss = next_item_loss(model, b.to_torch(), cfg, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - start

    one_pass()
    return {"targets": targets, "epoch_targets": epoch_targets, "seconds": one_pass()}


def _run_worker(src: Path, args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", *args],
        cwd=src,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_train(
    data: Path = typer.Option(..., "--data", help="Interactions file (its leave-one-out training split is used)."),
    model_type: str = typer.Option("hytrec", "--model-type", help="Any `hytrec train --model-type`."),
    batches: int = typer.Option(20, "--batches", help="Batches of the seeded epoch to time."),
    batch_tokens: int = typer.Option(8192, "--batch-tokens", help="Events per batch, as in `hytrec train`."),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
    rounds: int = typer.Option(2, "--rounds", help="Timed passes per checkout (alternating with --compare)."),
    compare: Path | None = typer.Option(None, "--compare", help="Another checkout of this project to time too."),
) -> None:
    """Training throughput on real batches; with --compare, the speed-up over another checkout."""
    here = Path(__file__).resolve().parents[1]
    args = [str(data.resolve()), model_type, str(batches), str(batch_tokens), str(threads)]
    sides = {"this": here, **({"other": compare.resolve()} if compare else {})}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    info: dict[str, dict] = {}
    for _ in range(rounds):
        for name, src in sides.items():
            res = _run_worker(src, args)
            seconds[name].append(res["seconds"])
            info[name] = res
    result = {"model_type": model_type, "data": str(data), "batches": batches, "threads": threads}
    for name in sides:
        best = min(seconds[name])
        rate = info[name]["targets"] / best
        result[name] = {
            "checkout": str(sides[name]),
            "targets_per_s": round(rate),
            "epoch_seconds_estimate": round(info[name]["epoch_targets"] / rate, 1),
            "pass_seconds": [round(s, 3) for s in seconds[name]],
            "median_pass_seconds": round(statistics.median(seconds[name]), 3),
        }
    if compare:
        result["speedup"] = round(min(seconds["other"]) / min(seconds["this"]), 2)
    typer.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        d, mt, nb, bt, th = sys.argv[2:]
        print(json.dumps(_worker(d, mt, int(nb), int(bt), int(th))))
    else:
        raise SystemExit("usage: hytrec bench train --data FILE [--compare DIR]")
