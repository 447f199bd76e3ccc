"""``hytrec soak`` (the soak itself is not part of the test run): the growth measure, and a short real run."""

from __future__ import annotations

import json
import subprocess
import sys

from hytrec.loadtest.soak import growth
from tests.service_fixtures import REPO, Checkpoint


def test_growth_compares_medians_after_the_warmup_with_the_end() -> None:
    rows = [{"t_s": t, "m": m} for t, m in [(0, 10.0), (5, 50.0), (10, 51.0), (15, 49.0), (20, 60.0), (25, 52.0)]]
    rows += [{"t_s": 30, "m": 53.0}, {"t_s": 35}]  # a sample that failed to read Redis has no value
    assert growth(rows, "m", 5) == {"after_warmup_mb": 50.0, "end_mb": 53.0, "growth_mb": 3.0}
    assert growth(rows, "m", 99) is None
    assert growth([], "m", 0) is None


def test_a_short_soak_reports_samples_and_exits_by_its_bounds(service_checkpoint: Checkpoint) -> None:
    args = [sys.executable, "-m", "hytrec.cli", "soak", "--minutes", "0.15", "--window-s", "4.5", "--sample-s", "1"]
    args += ["--rate", "15", "--model", str(service_checkpoint.path), "--warmup-s", "2", "--max-errors", "-1"]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr[-3000:]  # --max-errors -1 cannot hold: the run must fail on it
    out = json.loads(proc.stdout)
    assert out["pass"]["errors"] is False and out["failed"] == 0, out["windows"]
    assert out["requests"] > 50 and len(out["windows"]) == 2
    assert len(out["samples"]) >= 6 and all(s["server_rss_mb"] > 20 for s in out["samples"])
    assert all(s["redis_used_memory_mb"] > 0 and s["redis_keys"] > 0 for s in out["samples"][-2:])
    assert set(out["growth"]) == {"server_rss", "redis_used_memory"} and out["growth"]["server_rss"] is not None
    counters = out["server_counters"]  # the server's own counts, read from its /metrics before it stopped
    assert isinstance(counters, dict) and counters["events"].get("applied", 0) > 0, counters
    assert sum(counters["http_5xx"].values()) == sum(int(w["status"].get("503", 0)) for w in out["windows"])
