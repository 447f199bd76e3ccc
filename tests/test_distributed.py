"""Data-parallel training: two CPU processes on gloo under torchrun follow one process's loss curve.

Same global batch by construction (every rank computes the same epoch plan and trains on its share of each
batch's users; training/distributed.py). Dropout 0: each rank draws its own dropout masks, so with dropout
the curves are two different samples. Measured on this log (2 epochs, 10 steps, one thread per process): the
largest per-step relative loss difference was 1.1e-6; one process at 2 threads instead of 1 differs from
itself by 3.0e-7 over the same steps (and both grow to ~5e-5 by step 15): float summation order, amplified
by Adam, not a different computation. The bound asserted is 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hytrec.model.checkpoint import load_checkpoint
from hytrec.training.data import Interactions, leave_one_out
from hytrec.training.evaluate import evaluate
from hytrec.training.synth import SynthConfig, generate, write_interactions
from hytrec.training.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
CFG = {"d_model": 16, "window": 8, "chunk_size": 16, "batch_tokens": 768, "epochs": 2, "threads": 1, "dropout": 0.0}
TOLERANCE = 1e-4


def _steps(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "steps.jsonl").read_text().splitlines()]


def test_two_gloo_processes_follow_the_single_process_curve(tmp_path: Path) -> None:
    data = tmp_path / "log.tsv"
    write_interactions(generate(SynthConfig(n_users=80, n_items=60, events_per_user="10:60", seed=5)), data)
    one = train(data, tmp_path / "one", TrainConfig(**CFG), quiet=True)

    args = [f"--{k.replace('_', '-')}={v}" for k, v in CFG.items()]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += ["-m", "hytrec.cli", "train", "--data", str(data), "--out", str(tmp_path / "two"), "--quiet", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"

    a, b = _steps(tmp_path / "one"), _steps(two)
    assert len(a) == len(b) >= 8
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))
    assert worst <= TOLERANCE, (worst, a, b)
    log = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [r["processes"] for r in log] == [2, 2]

    # Evaluation was sharded over the two ranks and gathered: it equals one process ranking every user with
    # the checkpoint rank 0 wrote.
    metrics = json.loads((two / "metrics.json").read_text())
    split = leave_one_out(Interactions.from_file(data))
    alone = evaluate(load_checkpoint(two).model, split.test)
    assert np.array_equal(np.load(two / "test_ranks.npy"), alone.ranks)
    assert metrics["test"]["all"] == pytest.approx(alone.summary["all"], abs=0)
    assert metrics["test"]["all"]["n"] == one["test"]["all"]["n"] == len(split.test)
    assert not [p.name for p in two.iterdir() if ".tmp-" in p.name or ".ckpt-" in p.name or p.name.endswith(".old")]
