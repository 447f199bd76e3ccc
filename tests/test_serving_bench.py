"""``hytrec bench serving``: the page rendered from a small hand-made result, and a --quick run end to end.

The end-to-end run starts real servers (this checkout also plays the "before" one) on loopback ports; its
figures are not asserted (a shared CI machine is too noisy), only that every section ran, is on the page and
in the JSON, and that every scheduled request of every run is accounted for. The catalogue, alternatives and
profile sections run for real on tiny sizes (faiss, the three serving paths, py-spy on a live server); what is
asserted is what does not depend on timing: recall of an exhaustive search, agreement of the recompute with
the incremental answer, the profile's parse, the page and the merge of a --section run into an existing JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hytrec.benchmarks import profile_bench
from hytrec.benchmarks.catalogue_bench import CatalogueSettings, recall, run_catalogue
from hytrec.benchmarks.harness import BenchPage
from hytrec.benchmarks.recompute_bench import ALTERNATIVES, RecomputeSettings, run_recompute
from hytrec.benchmarks.serving_bench import INGEST_SHAPES, SCHEMA, SECTIONS, Settings, make_checkpoint
from hytrec.benchmarks.serving_report import (
    NAMES,
    accounting,
    all_runs,
    ann_verdict,
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


def pyspy_problem() -> str | None:
    """Why py-spy cannot profile here (None: it can)."""
    exe = profile_bench.pyspy()
    return "py-spy is not installed" if exe is None else profile_bench.check_pyspy(exe)


@pytest.fixture(scope="module")
def catalogue() -> dict[str, Any]:
    """The catalogue section on 1,000 items; IVF's second setting probes every list (an exhaustive search)."""
    cs = CatalogueSettings(
        sizes=(1000,), queries=64, history=10, repeats=1, hnsw_ef_search=(8, 200), ivf_nprobe=(1, 63)
    )
    return {"settings": asdict(cs), **run_catalogue(cs, timeout_s=120)}


@pytest.fixture(scope="module")
def alternatives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    make_checkpoint(ckpt, 500, 64, "float16")
    rs = RecomputeSettings(histories=(10, 300), users=3, seconds=0.2, rounds=2)
    return {"settings": asdict(rs), **run_recompute(ckpt, rs, timeout_s=120)}


_HEAD = 'process 1:"hytrec serve";thread (0x1);<module> (hytrec/cli.py:1);serve (service/commands.py:9)'
COLLAPSED = "\n".join(  # py-spy's raw format: one stack a line, then its sample count
    [
        f"{_HEAD};run (asyncio/runners.py:3) 5",
        f"{_HEAD};Guard.__call__ (service/guard.py:4);ServingModel.recommend (model/serving.py:7);mm (t.py:2) 3",
        'process 1:"hytrec serve";thread (0x2);_worker (thread.py:8);ServingModel.recommend (model/serving.py:9) 2',
        "not a stack line",
    ]
)


@pytest.fixture(scope="module")
def result(catalogue: dict[str, Any], alternatives: dict[str, Any]) -> dict[str, Any]:
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
        "catalogue": catalogue,
        "alternatives": alternatives,
        "profile": {"pyspy_version": "0.4.3", "svg": "serving_profile.svg", "svg_dir": "/elsewhere",
                    "pyspy": {k: {"command": f"py-spy record --format {k}", "rc": 0, "stderr": ""}
                              for k in ("flamegraph", "raw")},
                    "top": profile_bench.top_functions(COLLAPSED), "run": _load(25, 5.0)},
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


def test_catalogue_recall(catalogue: dict[str, Any]) -> None:
    assert recall([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], [[10, 9, 8, 7, 6, 5, 4, 3, 2, 99]]) == 0.9
    size = catalogue["by_size"]["1000"]
    assert "error" not in size, size
    rows = {(r["method"], r["params"].split(", ")[-1]): r for r in size["rows"]}
    assert rows["exact fp32", "torch matmul + topk"]["recall_at_10"] == 1.0  # its own ground truth
    assert rows["faiss IVF-Flat", "nprobe=63"]["recall_at_10"] >= 0.99  # every list probed: exhaustive (up to ties)
    assert rows["faiss IVF-Flat", "nprobe=1"]["recall_at_10"] < rows["faiss IVF-Flat", "nprobe=63"]["recall_at_10"]
    assert rows["faiss HNSW", "efSearch=8"]["recall_at_10"] <= rows["faiss HNSW", "efSearch=200"]["recall_at_10"]
    assert 0.5 < rows["exact bf16", "torch matmul + topk"]["recall_at_10"] <= 1.0
    assert rows["faiss HNSW", "efSearch=8"]["memory_mb"] > rows["exact fp32", "torch matmul + topk"]["memory_mb"]
    assert all(r["batch1"]["n"] == 64 and r["batch64"]["n"] == 1 for r in size["rows"])
    assert -1 < size["queries"]["mean_pairwise_cosine"] < 1
    verdict = ann_verdict(catalogue)["1000"]
    best = min(r["batch1"]["p50_per_query_ms"] for m, r in rows.items() if m[0].startswith("exact"))
    assert verdict["batch1"]["exact"]["batch1"]["p50_per_query_ms"] == best
    assert verdict["batch1"]["ann"] is None or verdict["batch1"]["ann"]["recall_at_10"] >= 0.95


def test_alternatives_agree(alternatives: dict[str, Any]) -> None:
    for v in alternatives["by_history"].values():
        assert v["top10_agreement_parallel_vs_incremental"] >= 0.8  # fp16 state: the same answer, up to near-ties
        for name in ALTERNATIVES:
            assert v[name]["requests"] >= 2 and v[name]["p50_ms"] <= v[name]["p99_ms"] <= v[name]["max_ms"]
        ratio = v["incremental"]["requests_per_s"] / v["parallel"]["requests_per_s"]
        assert v["incremental_over_parallel"] == pytest.approx(ratio)


def test_profile_parse() -> None:
    top = profile_bench.top_functions(COLLAPSED)
    assert top["samples"] == 10
    assert [(r["function"], r["samples"]) for r in top["self"]] == [
        ("run", 5),
        ("mm", 3),
        ("ServingModel.recommend", 2),
    ]
    assert top["self"][0]["file"] == "asyncio/runners.py" and top["self"][0]["share"] == 0.5
    incl = {r["function"]: r["samples"] for r in top["inclusive"]}
    assert incl == {"ServingModel.recommend": 5, "Guard.__call__": 3}  # own code only, `serve` left out


def test_page_from_small_json(result: dict[str, Any], tmp_path: Path) -> None:
    plots = write_plots(result, tmp_path)
    assert set(plots) == {"saturation", "before_after", "overload", "catalogue", "alternatives"}  # history failed
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
    assert (
        "**1,000 items**" in page and "| faiss IVF-Flat | nlist=63, nprobe=63 |" in page and "**Conclusion**:" in page
    )
    assert "**In-process, at the use-case level, not over HTTP**" in page and "| 300 | HyTRec incremental" in page
    assert "(not at 10^4 events: a quick run)" in page
    assert "| 1 | `run` | asyncio/runners.py | 5 | 50.0% |" in page and "written to `/elsewhere`" in page


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_run_end_to_end(tmp_path: Path) -> None:
    md = tmp_path / "serving.md"
    args = ["bench", "serving", "--quick", "--before", str(REPO), "--markdown", str(md), "--plot-dir", str(tmp_path)]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    res = json.loads(md.with_suffix(".json").read_text())
    assert res["schema"] == SCHEMA and res["meta"]["quick"] is True
    expected = dict.fromkeys(SECTIONS, "ok")
    if pyspy_problem() is not None:
        expected["profile"] = "not measured"
    assert {n: v["status"] for n, v in res["sections"].items()} == expected, res["sections"]
    runs = list(all_runs(res))
    assert len(runs) >= 12
    for run in runs:
        for e in run["endpoints"].values():
            assert e["unaccounted"] == 0
            assert e["scheduled"] == e["answered"] + e["timeouts"] + e["conn_errors"] + e["dropped"]
    hot = res["sections"]["hot_user"]["by_workers"]["1"]
    assert sum(hot["statuses"].values()) == hot["sent"] and hot["applied"] == hot["history_length"]
    page = md.read_text()
    assert "0 unaccounted" in page
    assert "Every section was measured." in page or expected["profile"] != "ok"
    for name in SECTIONS:
        assert f"## {NAMES[name]}" in page
    pngs = ("saturation", "before_after", "overload", "history", "catalogue", "alternatives")
    for png in (f"serving_{name}.png" for name in pngs):
        assert (tmp_path / png).stat().st_size > 10_000 and f"({png})" in page
    again = CliRunner().invoke(app, ["bench", "serving", "--from-json", str(md.with_suffix(".json")), "--json"])
    assert again.exit_code == 0 and json.loads(again.output)["sections"] == res["sections"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_profile_section_and_merge(tmp_path: Path) -> None:
    """py-spy on a live quick server; then a run of another section keeps the profile from the JSON it rewrites."""
    if (why := pyspy_problem()) is not None:
        pytest.skip(f"py-spy cannot profile here: {why}")
    md, base = tmp_path / "serving.md", ["bench", "serving", "--quick", "--plot-dir", str(tmp_path)]
    out = CliRunner().invoke(app, [*base, "--markdown", str(md), "--section", "profile"])
    assert out.exit_code == 0, out.output
    prof = json.loads(md.with_suffix(".json").read_text())["sections"]["profile"]
    assert prof["status"] == "ok", prof
    assert prof["top"]["samples"] > 0 and prof["top"]["self"] and prof["run"]["endpoints"]["all"]["unaccounted"] == 0
    assert (tmp_path / "serving_profile.svg").read_text().lstrip().startswith("<?xml")
    assert "(serving_profile.svg)" in md.read_text()
    again = CliRunner().invoke(app, [*base, "--markdown", str(md), "--section", "alternatives"])
    assert again.exit_code == 0, again.output
    res = json.loads(md.with_suffix(".json").read_text())
    assert res["sections"]["alternatives"]["status"] == "ok" and "kept" not in res["sections"]["alternatives"]
    kept = res["sections"]["profile"]
    assert kept["kept"]["date"] and kept["kept"]["settings"]["profile_s"] == 1.0 and kept["top"] == prof["top"]
    assert res["sections"]["catalogue"]["status"] == "not measured"  # measured in neither run
    page = md.read_text()
    assert "Kept from an earlier run" in page and "This run measured only 9. The alternatives" in page
