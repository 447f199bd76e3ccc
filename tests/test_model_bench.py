"""``hytrec bench model`` at tiny sizes: the JSON structure, positive figures, the page and the plot.

The goals themselves are not asserted: shared CI machines are too noisy for timing thresholds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from hytrec.benchmarks.model_bench import (
    JSON_KEYS,
    SERIES,
    Settings,
    render_markdown,
    render_text,
    run_benchmark,
    write_plot,
)

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
