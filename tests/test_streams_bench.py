"""``hytrec bench streams`` end to end on a tiny stream: real consumers on its own embedded Redis. Timings are not
asserted (a shared machine is too noisy); what is: every run's
counts are exact, the gate shares the partitions between two consumers, the lag run drains, and the page and
the plot are rendered from the JSON alone."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from hytrec.benchmarks import stream_report
from hytrec.benchmarks.stream_bench import REPO, SCHEMA, Settings, package_tree, run_bench


def test_package_tree_imports_the_other_checkout(tmp_path: Path) -> None:
    """--before runs another checkout's consumer through PYTHONPATH: its modules, not the installed ones."""
    tree = package_tree(REPO, tmp_path / "tree")
    code = "import hytrec.streams.consumer as c, hytrec.cli; print(c.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tree)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tree / "hytrec" / "streams" / "consumer.py")


def test_bench_streams_quick_end_to_end(tmp_path: Path) -> None:
    s = replace(Settings.quick_run(), events=600, users=60, batch=100, big_batch=300, partitions=(2,), lag_s=2.0)
    res = run_bench(s, None, tmp_path, progress=lambda m: None)
    assert res["schema"] == SCHEMA
    assert res["sections"]["throughput"]["status"] == "ok", res["sections"]["throughput"]
    runs = res["sections"]["throughput"]["runs"]
    assert {(r["code"], r["consumers"], r["partitions"], r["batch"]) for r in runs} == {
        ("after", 1, 2, 100), ("after", 1, 1, 300), ("after", 2, 2, 100),
    }  # fmt: skip
    for r in runs:
        assert r["exact"] and r["stored_events"] == r["events"] == 600 and r["events_per_s"] > 0
        assert sum(t["applied"] for t in r["consumers_totals"]) == 600
    two = next(r for r in runs if r["consumers"] == 2)
    assert all(t["partitions"] for t in two["consumers_totals"])  # the gate let both take a share
    lag = res["sections"]["lag"]
    assert lag["status"] == "ok", lag
    (run,) = lag["runs"]
    assert run["exact"] and run["produced"] == run["stored_events"] > 0 and run["drained_after_s"] is not None
    assert run["samples"] and all(x["lag_entries"] >= 0 for x in run["samples"])
    plots = stream_report.write_plots(res, tmp_path)
    assert (tmp_path / plots["lag"]).stat().st_size > 0
    page = stream_report.render_markdown(res, plots)
    assert "## 1. Throughput" in page and "streams_lag.png" in page
    assert "Not measured: not selected" in page  # the profile was not asked for
