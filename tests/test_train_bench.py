"""`hytrec bench train`: throughput on real batches, and the A/B ratio against another checkout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hytrec.cli import app
from hytrec.training.synth import SynthConfig, generate, write_interactions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "log.tsv.gz"
    write_interactions(generate(SynthConfig(n_users=30, n_items=50, events_per_user="20:60", seed=1)), path)
    return path


def test_bench_train_times_this_and_another_checkout(tmp_path: Path, log: Path) -> None:
    """The other side runs the other checkout's code, not the installed package's."""
    other = tmp_path / "other"
    for folder in ("hytrec", "model", "training"):  # what the training code imports
        shutil.copytree(REPO / folder, other / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", other)
    res = CliRunner().invoke(
        app,
        ["bench", "train", "--data", str(log), "--model-type", "tadn-only", "--batches", "2", "--batch-tokens",
         "512", "--rounds", "1", "--compare", str(other)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["model_type"] == "tadn-only" and out["meta"]["threads"] == 1
    assert out["this"]["code"] == str(REPO) and out["other"]["code"] == str(other.resolve())
    for side in ("this", "other"):
        assert out[side]["targets_per_s"] > 0 and len(out[side]["pass_seconds"]) == 1
        assert out[side]["epoch_seconds_estimate"] > 0
    assert out["speedup"] > 0


def test_bench_train_rejects_an_unknown_model_type(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["bench", "train", "--data", str(tmp_path / "x"), "--model-type", "gpt"])
    assert res.exit_code == 2 and "gpt" in res.output


def test_bench_state_dtype_reports_each_storage_dtype(tmp_path: Path, log: Path) -> None:
    from hytrec.training.train import TrainConfig, train

    cfg = TrainConfig(d_model=16, window=8, chunk_size=16, batch_tokens=4096, epochs=1)
    train(log, tmp_path / "m", cfg, quiet=True)
    res = CliRunner().invoke(app, ["bench", "state-dtype", "--model", str(tmp_path / "m"), "--data", str(log)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    batches = out["batches"]
    assert batches and out["meta"]["threads"] == 1 and out["meta"]["command"].startswith("hytrec")
    for per_dtype in batches.values():
        assert per_dtype["float32"]["max_rel_error"] < 1e-4 and per_dtype["float32"]["mean_top10_shared"] == 10
        assert per_dtype["float16"]["max_rel_error"] >= per_dtype["float32"]["max_rel_error"]


def test_bench_train_processes_reports_samples_per_second_and_memory(log: Path) -> None:
    """One epoch of the real trainer on 1 and on 2 processes (torchrun, gloo)."""
    res = CliRunner().invoke(
        app,
        ["bench", "train", "--data", str(log), "--model-type", "tadn-only", "--batch-tokens", "512",
         "--processes", "1,2"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [(r["processes"], r["device"]) for r in out["runs"]] == [(1, "cpu"), (2, "cpu")]
    for r in out["runs"]:
        assert r["sequences_per_s"] > 0 and r["targets_per_s"] > 0 and r["train_seconds"] > 0
        assert 50 < r["peak_memory_mib"] < 16_000 and r["memory"] == "peak RSS"  # a torch process: tens of MiB up
    assert out["runs"][0]["rate_vs_first"] == 1.0
    bad = CliRunner().invoke(app, ["bench", "train", "--data", str(log), "--processes", "0,x"])
    assert bad.exit_code == 2 and "--processes" in bad.output
