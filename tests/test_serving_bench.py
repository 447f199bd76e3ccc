"""``hytrec bench serving``: the page rendered from a small hand-made result, and a --quick run end to end.

The end-to-end run starts real servers (this checkout also plays the "before" one) on loopback ports; its
figures are not asserted (a shared CI machine is too noisy), only that every section ran, is on the page and
in the JSON, and that every scheduled request of every run is accounted for.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hytrec.benchmarks.harness import BenchPage
from hytrec.benchmarks.serving_bench import INGEST_SHAPES, SCHEMA, SECTIONS, Settings
from hytrec.benchmarks.serving_report import (
    NAMES,
    accounting,
    all_runs,
    capacity,
    non_2xx_latency,
    pooled,
    recovery_s,
    render_markdown,
    render_summary,
    write_plots,
)
from hytrec.cli import app
from hytrec.loadtest import report
from hytrec.loadtest.commands import calibration_ceiling
from hytrec.loadtest.engine import EndpointStats, new_hist, record

REPO = Path(__file__).resolve().parents[1]
MIX = {"recommend": 0.8, "events": 0.2}


def _run(rate: float, answers: dict[str, list[tuple[int, float]]], dropped: int = 0) -> dict[str, Any]:
    """A generator run as ``report.merge_run`` makes it, from (status, latency ms) answers per endpoint."""
    endpoints = {}
    for name, rows in answers.items():
        st = EndpointStats(scheduled=len(rows) + dropped, sent=len(rows), answered=len(rows), dropped=dropped)
        for status, ms in rows:
            st.status[str(status)] = st.status.get(str(status), 0) + 1
            record(st.hist, ms / 1000)
            if 200 <= status < 300:
                record(st.hist_ok, ms / 1000)
        endpoints[name] = st.to_dict()
    mix = {name: 1 / len(answers) for name in answers} if set(answers) != set(MIX) else MIX
    one = {"endpoints": endpoints, "lag": new_hist().encode().decode(), "connections": 1}
    return report.merge_run([one], rate, mix, 1.0, 5.0)


def _load(rate: float, ms: float, n: int = 10, shed: int = 0, shed_ms: float = 900.0) -> dict[str, Any]:
    rows = [(200, ms)] * n + [(503, shed_ms)] * shed
    return _run(rate, {"recommend": rows, "events": [(200, ms)] * 2})


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    s = Settings.quick_run()
    hello = [_run(r, {"hello": [(200, 1.0)] * 20}) for r in s.calib_rates]
    ceiling, verdicts = calibration_ceiling(hello, 10.0)
    phases = {"baseline": _load(25, 5.0), "overload": _load(200, 40.0, shed=30), "recovery": _load(25, 8.0)}
    windows = [{"t_s": 0, "phase": "baseline", **_load(25, 5.0)}, {"t_s": 1, "phase": "overload", **_load(200, 40)}]
    windows += [{"t_s": 2 + i, "phase": "recovery", **_load(25, ms)} for i, ms in enumerate((50.0, 8.0, 6.0))]
    ingest = {
        shape: {**kw, "runs": [_run(r, {"events": [(200, 30.0)] * 5}) for r in getattr(s, rates)]}
        for shape, (rates, kw) in INGEST_SHAPES.items()
    }
    sections = {
        "ceiling": {"runs": hello, "verdicts": verdicts, "ceiling_rps": ceiling, "all_passed": True,
                    "highest_rate_used": 200, "ceiling_over_highest": ceiling / 200},
        "saturation": {"by_workers": {"1": {"runs": [_load(25, 5.0), _load(50, 7.0, shed=3)]}}},
        "before_after": {"before_path": "/old", "before_commit": "a" * 40, "runs": [
            {"server": "before", "round": 0, **_load(25, 10.0)}, {"server": "after", "round": 0, **_load(25, 5.0)}]},
        "overload": {"rss_kb": {"before": 100_000, "after": 120_000, "after_2s": 110_000, "peak_hwm": 130_000},
                     "windows": windows, "phases": phases},
        "ingestion": ingest,
        "hot_user": {"by_workers": {"1": {"user": "hot-w1", "sent": 20, "statuses": {"200": 18, "503": 2},
                                          "applied": 18, "seconds": 1.0, "history_length": 18}}},
        "history": {"status": "not measured", "reason": "failed: RuntimeError: boom"},
    }  # fmt: skip
    for sec in sections.values():
        sec.setdefault("status", "ok")
        sec["wall_s"] = 1.0
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
    meta = BenchPage.start("hytrec bench serving --quick --section saturation").finish().meta(settings=settings)
    return {"schema": SCHEMA, "meta": meta, "sections": {n: sections[n] for n in SECTIONS}}


def test_figures(result: dict[str, Any]) -> None:
    sec = result["sections"]
    assert capacity(sec["saturation"]["by_workers"]["1"]["runs"], 100.0) == 25  # 50 req/s had 503s
    assert capacity([_load(25, 5.0), _load(50, 150.0)], 100.0) == 25  # too slow
    over = sec["overload"]["phases"]["overload"]["endpoints"]["all"]
    assert non_2xx_latency(over)["count"] == 30 and non_2xx_latency(over)["p50"] == pytest.approx(900, rel=0.01)
    assert over["latency_2xx_ms"]["p99"] == pytest.approx(40, rel=0.01)
    assert recovery_s(sec["overload"]["windows"], 10.0) == 1.0  # the first recovery window is over 10 ms
    assert recovery_s(sec["overload"]["windows"], 5.0) is None
    pool = pooled([_load(25, 10.0), _load(25, 20.0)])
    assert pool["recommend"]["latency_ms"]["count"] == 20 and pool["recommend"]["ok_share"] == 1.0
    acc = accounting(result)
    assert acc["unaccounted"] == 0 and acc["scheduled"] == acc["ended"] == sum(
        e["scheduled"] for run in all_runs(result) for n, e in run["endpoints"].items() if n != "all"
    )


def test_page_from_small_json(result: dict[str, Any], tmp_path: Path) -> None:
    plots = write_plots(result, tmp_path)
    assert set(plots) == {"saturation", "before_after", "overload"}  # history was not measured
    assert all((tmp_path / f).stat().st_size > 10_000 for f in plots.values())
    page = render_markdown(json.loads(json.dumps(result)), plots)  # what a JSON round trip gives
    for name in SECTIONS:
        assert f"## {NAMES[name]}" in page
    assert "* **7. History length**: failed: RuntimeError: boom." in page  # listed as not measured, plainly
    assert "**Not measured**: failed: RuntimeError: boom." in page
    assert "capacity **25 req/s**" in page
    assert "**30 answered 503 (" in page and "Worker RSS" in page
    assert "| 25 | all | 10 | 5 | 0.50x |" in page  # before/after: after p50 half of before
    assert "hytrec bench serving --quick --section ingestion" in page  # each section's own command
    assert "Generator ceiling: **at least 1600 req/s**" in page and "**PASS**" in page
    assert "(serving_overload.png)" in page and "serving_history.png" not in page
    assert "| 1 | 20 | 18 | 503: 2 | 18 | 18 | yes |" in page
    assert "7. History length: NOT MEASURED" in render_summary(result)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    md = tmp_path / "serving.md"
    args = ["bench", "serving", "--quick", "--before", str(REPO), "--markdown", str(md), "--plot-dir", str(tmp_path)]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    res = json.loads(md.with_suffix(".json").read_text())
    assert res["schema"] == SCHEMA and res["meta"]["quick"] is True
    assert {n: v["status"] for n, v in res["sections"].items()} == dict.fromkeys(SECTIONS, "ok"), res["sections"]
    runs = list(all_runs(res))
    assert len(runs) >= 12
    for run in runs:
        for e in run["endpoints"].values():
            assert e["unaccounted"] == 0
            assert e["scheduled"] == e["answered"] + e["timeouts"] + e["conn_errors"] + e["dropped"]
    hot = res["sections"]["hot_user"]["by_workers"]["1"]
    assert sum(hot["statuses"].values()) == hot["sent"] and hot["applied"] == hot["history_length"]
    page = md.read_text()
    assert "Every section was measured." in page and "0 unaccounted" in page
    for name in SECTIONS:
        assert f"## {NAMES[name]}" in page
    for png in ("serving_saturation.png", "serving_before_after.png", "serving_overload.png", "serving_history.png"):
        assert (tmp_path / png).stat().st_size > 10_000 and f"({png})" in page
    again = CliRunner().invoke(app, ["bench", "serving", "--from-json", str(md.with_suffix(".json")), "--json"])
    assert again.exit_code == 0 and json.loads(again.output)["sections"] == res["sections"]
