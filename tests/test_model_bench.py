"""``hytrec bench model`` at tiny sizes: the JSON structure, positive figures, the page and the plot.

The goals themselves are not asserted: shared CI machines are too noisy for timing thresholds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hytrec.benchmarks.harness import Outcome
from hytrec.benchmarks.model_bench import LOSS, SERIES, Settings, _train_sweep, run_benchmark
from hytrec.benchmarks.model_report import JSON_KEYS, render_markdown, render_text, write_plot
from hytrec.cli import app

PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "model.md"

LENGTHS = (64, 128)
HISTORIES = (10, 100)


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    settings = Settings(
        lengths=LENGTHS, histories=HISTORIES, n_items=300, repeats=1, budget_s=30.0, threads=1, serve_batch=4
    )
    return run_benchmark(settings, command="pytest")


def _positive(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_training_points(result: dict[str, Any]) -> None:
    assert result["schema"] == "hytrec-bench-model/1"
    meta = result["meta"]
    assert meta["command"] == "pytest" and meta["threads"] == 1 and meta["loss"] == LOSS
    assert meta["settings"]["lengths"] == list(LENGTHS) and meta["wall_s"] > 0 and meta["python"]
    assert set(result["train_step"]) == set(SERIES)
    assert set(result["train_step_loss"]) == set(SERIES) - {"naive", "tadn_naive", "tadn_chunked"}
    for table in (result["train_step"], result["train_step_loss"]):
        for series, row in table.items():
            assert list(row) == [str(n) for n in LENGTHS], series
            for point in row.values():
                assert point["status"] == "ok", point
                assert _positive(point["seconds"]) and all(_positive(r) for r in point["runs"])
                assert _positive(point["peak_rss_mb"]) and point["peak_delta_mb"] >= 0
                assert point["peak_rss_mb"] >= point["peak_delta_mb"]


def test_serving_and_state(result: dict[str, Any]) -> None:
    for key in ("step_us", "step_us_batch", "request_us", "request_us_batch", "build_state_s"):
        assert list(result[key]) == [str(h) for h in HISTORIES]
        assert all(_positive(v) for v in result[key].values()), key
    sizes = result["state_bytes"]
    assert set(sizes) == {"float32", "float16", "bfloat16"}
    assert sizes["float32"] > sizes["float16"] == sizes["bfloat16"] > 0


def test_ratios_and_goals(result: dict[str, Any]) -> None:
    r = result["ratios"]
    assert r["chunked_vs_naive_L4096"] is None  # not measured at these lengths, and never extrapolated
    assert r["chunked_vs_naive"]["L"] == max(LENGTHS) and _positive(r["chunked_vs_naive"]["ratio"])
    for key in ("hytrec_16k_over_1k", "hytrec_16k_over_1k_loss", "softmax_16k_over_1k", "softmax_math_16k_over_1k"):
        assert r[key] is None
    assert set(r["scaling"]) == set(SERIES)
    assert all(_positive(s["time_ratio"]) and s["length_ratio"] == 2 for s in r["scaling"].values())
    assert _positive(r["step_max_over_min"]) and _positive(r["step_batch_max_over_min"])
    goals = result["goals"]
    assert goals["chunked_vs_naive_L4096_ge_20"] is None and goals["hytrec_16k_over_1k_le_20"] is None
    assert isinstance(goals["state_fp16_le_32KiB"], bool) and isinstance(goals["step_flat_le_2x"], bool)
    json.dumps(result, allow_nan=False)


def test_reports(result: dict[str, Any], tmp_path: Path) -> None:
    text = render_text(result)
    assert "hytrec" in text and "state bytes per user" in text
    page = render_markdown(result, "model.png")
    assert "`pytest`" in page and "![" in page and "## JSON keys" in page
    assert all(f"`{key}`" in page for key, _ in JSON_KEYS)
    png = tmp_path / "model.png"
    write_plot(result, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_slow_stops_a_series() -> None:
    settings = Settings(
        lengths=(32, 64),
        histories=(10,),
        series=("naive",),
        n_items=100,
        repeats=1,
        budget_s=1e-6,
        threads=1,
        serve_batch=2,
    )
    res = run_benchmark(settings, command="pytest")
    row = res["train_step"]["naive"]
    assert row["32"]["status"] == "ok" and row["64"] == {"status": "too slow"}
    assert set(res["train_step"]) == {"naive"} and res["train_step_loss"] == {}


class _Scripted:
    """A runner whose every call ends as ``outcomes[(series, length)]`` (default: ok, 1 s)."""

    def __init__(self, outcomes: dict[tuple[str, int], Outcome]) -> None:
        self.outcomes, self.calls = outcomes, []

    def run(self, fn: Any, series: str, length: int, *args: Any, timeout_s: float) -> Outcome:
        self.calls.append((series, length))
        ok = Outcome("ok", {"status": "ok", "seconds": 1.0, "peak_delta_mb": 1.0})
        return self.outcomes.get((series, length), ok)


def test_a_failed_point_stops_its_series_by_kind() -> None:
    """Out of memory or past its deadline: the rest of the series is not run; an error costs one point only."""
    settings = Settings(lengths=(1, 2, 3), series=("hytrec", "naive", "tadn_naive"), threads=1)
    runner = _Scripted(
        {
            ("hytrec", 1): Outcome("memory", error="killed by SIGKILL"),
            ("naive", 2): Outcome("timeout", error="killed after 1 s"),
            ("tadn_naive", 1): Outcome("error", error="ValueError: x"),
        }
    )
    points = _train_sweep(settings, runner, lambda _msg: None)  # type: ignore[arg-type]
    assert points["model"]["hytrec"] == {
        "1": {"status": "memory", "error": "killed by SIGKILL"},
        "2": {"status": "memory"},
        "3": {"status": "memory"},
    }
    assert points["model"]["naive"]["2"]["status"] == "timeout" and points["model"]["naive"]["3"] == {
        "status": "too slow"
    }
    assert points["model"]["tadn_naive"]["1"]["status"] == "error"
    assert [p["status"] for p in points["model"]["tadn_naive"].values()][1:] == ["ok", "ok"]
    assert ("hytrec", 2) not in runner.calls and ("naive", 3) not in runner.calls
    assert points["loss"]["hytrec"]["1"]["status"] == "memory"  # the loss mode is its own series


def test_the_committed_page_is_its_json_rendered(tmp_path: Path) -> None:
    """docs/benchmarks/model.md is exactly what the report code makes of model.json; re-rendering it from
    the CLI measures nothing and leaves the JSON alone."""
    data = PAGE.with_suffix(".json")
    assert render_markdown(json.loads(data.read_text()), "model.png") == PAGE.read_text()
    page, png = tmp_path / "model.md", tmp_path / "model.png"
    before = data.read_bytes()
    cli = ["bench", "model", "--from-json", str(data), "--markdown", str(page), "--plot", str(png)]
    res = CliRunner().invoke(app, cli)
    assert res.exit_code == 0, res.output
    assert page.read_text() == PAGE.read_text() and png.read_bytes()[:4] == b"\x89PNG"
    assert data.read_bytes() == before and not page.with_suffix(".json").exists()
    assert "HyTRec model benchmark (2026-11-24 07:58 UTC" in res.output
