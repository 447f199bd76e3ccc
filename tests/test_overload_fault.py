"""``python -m hytrec.benchmarks.overload_fault`` end to end on a tiny run: a real server, its embedded Redis
paused inside the overload, the generator's ceiling checked; the summary renders from the JSON."""

from __future__ import annotations

from hytrec.benchmarks.overload_fault import run, summary
from hytrec.benchmarks.serving_bench import Settings


def test_a_tiny_overload_with_a_pause_inside_runs_and_is_summarised() -> None:
    res = run(Settings.quick_run(), 200.0, 300, (1.0, 1.0, 1.0), {"defaults": {}}, rounds=1)
    (one,) = res["runs"]
    assert one["fault"]["pause_ms"] == 300 and abs(one["fault"]["late_ms"]) < 500  # the pause was sent on time
    assert list(one["phases"]) == ["baseline", "overload", "overload_paused", "overload_after", "recovery"]
    scheduled = sum(p["endpoints"]["all"]["scheduled"] for p in one["phases"].values())
    answered = sum(sum(p["endpoints"]["all"]["status"].values()) for p in one["phases"].values())
    assert scheduled > 0 and answered == scheduled  # every scheduled request got an HTTP answer
    assert set().union(*(p["endpoints"]["all"]["status"] for p in one["phases"].values())) <= {"200", "503"}
    assert one["ready_after"]["status"] == "ready"
    assert res["ceiling"]["ceiling_rps"] is not None
    text = summary(res)
    assert "### defaults, round 0" in text and "overload_paused" in text and "Generator ceiling" in text
