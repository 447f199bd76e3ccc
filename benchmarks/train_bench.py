"""``hytrec bench train``: training throughput (target events per second) on real batches of a data file.

Times training steps (forward, next-item loss, backward, AdamW; no gradient clipping) on the first
``--batches`` batches of a seeded epoch of the data file's leave-one-out training split, built exactly as
``hytrec train`` builds them.
``--compare DIR`` also times another checkout of this project (e.g. ``git worktree add /tmp/old <commit>``)
on the same batches, alternating rounds between the two in one run, and reports the speed-up as a ratio
(machines are shared and noisy; a ratio measured in one run is what to quote).

Each pass runs :mod:`hytrec.benchmarks.train_worker` in a fresh interpreter that imports the model and
training code of the checkout it times (which may predate this file, or the ``hytrec.*`` layout).

``--processes 1,2`` measures the trainer itself instead: one epoch of ``hytrec train`` per process count
(more than one: under ``torchrun``, data-parallel; docs/training.md) and per ``--devices`` entry, reporting
samples/s (sequences and target events per second of the epoch's training time, evaluation excluded) and the
peak memory of the largest process (RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), with each
rate as a ratio to the first process count's on the same device.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from hytrec.benchmarks import train_worker
from hytrec.benchmarks.harness import REPO, BenchPage, echo_result, run_command
from hytrec.training.config import Device, ModelType

WORKER_TIMEOUT_S = 3600.0


def train_epoch(
    data: Path, processes: int, device: str, model_type: str, batch_tokens: int, threads: int
) -> dict[str, Any]:
    """One epoch of ``hytrec train`` on ``processes`` processes (torchrun when more than one); its log record."""
    with tempfile.TemporaryDirectory(prefix="hytrec-bench-train-") as tmp:
        out = Path(tmp) / "run"
        launcher = [sys.executable]
        if processes > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
        args = ["-m", "hytrec.cli", "train", "--data", str(data), "--out", str(out), "--quiet", "--epochs", "1"]
        args += ["--model-type", model_type, "--batch-tokens", str(batch_tokens), "--threads", str(threads)]
        args += ["--device", device]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"hytrec train on {processes} process(es) failed: {proc.stderr[-2000:]}")
        [record] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    seconds = record["train_seconds"]
    return {
        "processes": processes,
        "device": device,
        "sequences_per_s": round(record["sequences"] / seconds, 1),
        "targets_per_s": round(record["targets"] / seconds),
        "train_seconds": seconds,
        "peak_memory_mib": round(record["peak_memory_bytes"] / 2**20, 1),
        "memory": record["memory"],
    }


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
    processes: Annotated[
        str | None,
        typer.Option(
            "--processes",
            help="Instead: one epoch of `hytrec train` per process count, e.g. 1,2 (torchrun above 1); "
            "samples/s and peak memory.",
        ),
    ] = None,
    devices: Annotated[
        list[Device] | None, typer.Option("--devices", help="With --processes: cpu and/or cuda (repeatable).")
    ] = None,
) -> None:
    """Training throughput on real batches; with --compare, the speed-up over another checkout; with --processes,
    the trainer's samples/s and memory for each process count."""
    page = BenchPage.start(threads=threads)
    if processes is not None:
        try:
            counts = [int(n) for n in processes.split(",")]
        except ValueError:
            counts = []
        if not counts or min(counts) < 1:
            raise typer.BadParameter("process counts >= 1, comma-separated, e.g. 1,2", param_hint="--processes")
        runs = []
        for device in devices or [Device.CPU]:
            first = None
            for n in counts:
                run = train_epoch(data.resolve(), n, device.value, model_type.value, batch_tokens, threads)
                first = first or run
                run["rate_vs_first"] = round(run["sequences_per_s"] / first["sequences_per_s"], 2)
                runs.append(run)
        result = {
            "model_type": model_type.value,
            "data": str(data),
            "threads_per_process": threads,
            "batch_tokens": batch_tokens,
            "runs": runs,
        }
        result["meta"] = page.finish().meta()
        echo_result(result)
        return
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
            "epoch_seconds_estimate": round(info[name]["epoch_targets"] / rate, 3),
            "pass_seconds": [round(s, 3) for s in seconds[name]],
            "median_pass_seconds": round(statistics.median(seconds[name]), 3),
        }
    if compare:
        result["speedup"] = round(min(seconds["other"]) / min(seconds["this"]), 2)
    result["meta"] = page.finish().meta()
    echo_result(result)
