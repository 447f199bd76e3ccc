"""benchmarks/long_history_report.py: the long-range table from run directories (files written here as
``hytrec train`` writes them; no training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hytrec.benchmarks.long_history_report import compare, load_run, main, render


def _write_run(path: Path, model_type: str, filtered: list[int], unfiltered: list[int], n_layers: int = 2) -> Path:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"model_type": model_type, "best_epoch": 2, "epochs_run": 3}))
    (path / "train_config.json").write_text(json.dumps({"epochs": 7, "n_layers": n_layers}))
    (path / "log.jsonl").write_text("".join(json.dumps({"train_seconds": s}) + "\n" for s in (10.0, 11.5, 12.0)))
    np.save(path / "test_ranks.npy", np.array(filtered, dtype=np.int64))
    np.save(path / "test_ranks_unfiltered.npy", np.array(unfiltered, dtype=np.int64))
    return path


def test_ratio_and_difference_against_the_baseline(tmp_path: Path) -> None:
    # baseline hits 2 of 8 users, the candidate 4 of 8 (a superset): ratio 2, difference +0.25
    base = _write_run(tmp_path / "rs", "recent-softmax", [0, 3, 50, 50, 50, 50, 50, 50], [0] * 8)
    cand = _write_run(tmp_path / "h", "hytrec-hybrid", [0, 3, 9, 1, 50, 50, 50, 50], [0] * 7 + [10], n_layers=3)
    rows = compare([load_run(base), load_run(cand)], "recent-softmax", n=200)
    assert rows[0]["ratio filtered"] is None
    r = rows[1]
    assert r["model"] == "hytrec-hybrid (3 TADN + window)"
    assert r["HR@10 filtered"] == pytest.approx(0.5) and rows[0]["HR@10 filtered"] == pytest.approx(0.25)
    ratio, lo, hi = r["ratio filtered"]
    assert ratio == pytest.approx(2.0) and lo <= ratio <= hi and lo >= 1.0  # never below 1: a paired superset
    assert r["diff filtered"][0] == pytest.approx(0.25)
    assert r["ratio unfiltered"][0] == pytest.approx(7 / 8)
    assert r["train_seconds"] == pytest.approx(33.5) and r["epochs_planned"] == 7
    table = render(rows, "recent-softmax")
    assert "| hytrec-hybrid (3 TADN + window) | 2/3 (7) | 34 | 0.5000 |" in table
    assert "+0.2500 [" in table


def test_unpaired_runs_are_refused(tmp_path: Path) -> None:
    base = _write_run(tmp_path / "rs", "recent-softmax", [0, 1, 2], [0, 1, 2])
    other = _write_run(tmp_path / "h", "hytrec", [0, 1], [0, 1])
    with pytest.raises(ValueError, match="test users"):
        compare([load_run(base), load_run(other)], "recent-softmax")
    with pytest.raises(ValueError, match="exactly one"):
        compare([load_run(other)], "recent-softmax")


def test_cli_writes_the_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _write_run(tmp_path / "rs", "recent-softmax", [0, 20, 20, 20], [20] * 4)
    cand = _write_run(tmp_path / "h", "hytrec", [0, 0, 20, 20], [20] * 4)
    main([str(base), str(cand), "--json", str(tmp_path / "rows.json"), "--resamples", "100", "--gap", "1000"])
    assert "HR@10 ratio vs recent-softmax" in capsys.readouterr().out
    table = json.loads((tmp_path / "rows.json").read_text())
    assert table["gap"] == 1000
    rows = table["rows"]
    assert [r["model"] for r in rows] == ["recent-softmax", "hytrec"]
    assert np.isnan(rows[1]["ratio unfiltered"][0])  # 0 / 0: no hit for either model


def test_plot_from_tables(tmp_path: Path) -> None:
    base = _write_run(tmp_path / "rs", "recent-softmax", [0, 20, 20, 20], [0, 20, 20, 20])
    cand = _write_run(tmp_path / "h", "hytrec", [0, 0, 20, 20], [20, 20, 20, 20])
    main([str(base), str(cand), "--json", str(tmp_path / "t.json"), "--gap", "100", "--label", "test"])
    main(["--plot", str(tmp_path / "p.png"), str(tmp_path / "t.json")])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
