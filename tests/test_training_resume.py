"""`hytrec train --resume` after a SIGKILL continues the same curve: bitwise on CPU (one thread, fp32)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from hytrec.training.synth import SynthConfig, generate, write_interactions
from hytrec.training.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
CFG = {"d_model": 16, "window": 8, "chunk_size": 16, "batch_tokens": 768, "epochs": 3, "threads": 1}


@pytest.fixture(scope="module")
def log_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synth") / "log.tsv"
    write_interactions(generate(SynthConfig(n_users=50, n_items=60, events_per_user="10:60", seed=4)), path)
    return path


def _cli_args(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def _steps(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


def _state_step(run: Path) -> int:
    try:
        return json.loads((run / "train_state" / "state.json").read_text())["info"]["global_step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.parametrize("extra", [{}, {"loss": "sampled", "negatives": 16, "schedule": "cosine", "warmup_steps": 3}])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path: Path, log_file: Path, extra: dict) -> None:
    cfg = {**CFG, **extra, "checkpoint_every": 1}  # dropout 0.2 (the default): the torch RNG must be restored too
    full = train(log_file, tmp_path / "full", TrainConfig(**cfg), quiet=True)
    total = len(_steps(tmp_path / "full"))

    run = tmp_path / "cut"
    command = [sys.executable, "-c", "from hytrec.cli import app; app()", "train", "--data", str(log_file)]
    proc = subprocess.Popen([*command, "--out", str(run), "--quiet", *_cli_args(cfg)], cwd=REPO)
    deadline = time.monotonic() + 120
    while _state_step(run) < total // 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (run / "metrics.json").exists(), "the run finished first"
    cut_at = _state_step(run)
    assert 0 < cut_at < total

    resumed = train(log_file, run, TrainConfig(**cfg), resume=True, quiet=True)
    assert _steps(run) == _steps(tmp_path / "full")  # every step's loss and learning rate, bit for bit
    assert resumed["model_version"] == full["model_version"]  # the hash of the best checkpoint's weights
    assert resumed["test"]["all"] == full["test"]["all"] and resumed["epochs_run"] == full["epochs_run"]
    assert np.array_equal(np.load(run / "test_ranks.npy"), np.load(tmp_path / "full" / "test_ranks.npy"))
    a = load_file(tmp_path / "full" / "train_state" / "state.safetensors")
    b = load_file(run / "train_state" / "state.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])]  # weights, moments, RNG
    logs = [[json.loads(x) for x in (r / "log.jsonl").read_text().splitlines()] for r in (tmp_path / "full", run)]
    assert [(r["epoch"], r["train_loss"], r["val"]) for r in logs[0]] == [
        (r["epoch"], r["train_loss"], r["val"]) for r in logs[1]
    ]


def test_resume_without_a_state_starts_afresh_and_a_state_of_another_world_size_is_refused(
    tmp_path: Path, log_file: Path
) -> None:
    cfg = TrainConfig(**{**CFG, "epochs": 1})
    first = train(log_file, tmp_path / "a", cfg, resume=True, quiet=True)  # nothing to resume: a fresh run
    assert first["epochs_run"] == 1
    state = tmp_path / "a" / "train_state" / "state.json"
    doc = json.loads(state.read_text())
    doc["world_size"] = 2
    state.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="2 processes"):
        train(log_file, tmp_path / "a", TrainConfig(**{**CFG, "epochs": 2}), resume=True, quiet=True)
