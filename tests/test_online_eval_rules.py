"""The online-evaluation alert bites: promtool's unit tests of deploy/prometheus/rules_test.yml fail when the
rule is rendered with another threshold or minimum volume (tests/test_prometheus.py runs them as rendered by
default, where they pass)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from hytrec import ops
from tests.test_deploy import REPO, require_tool


def promtool_with(tmp_path: Path, **online: float) -> subprocess.CompletedProcess[str]:
    groups = ops.rule_groups()
    (alert,) = ops.online_alerts(**online)  # type: ignore[arg-type]
    for group in groups["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert.name:
                rule["expr"] = alert.expr
    (tmp_path / "rules.yml").write_text(ops.dump_yaml(groups))
    (tmp_path / "rules_test.yml").write_text((REPO / "deploy/prometheus/rules_test.yml").read_text())
    return subprocess.run(
        [require_tool("promtool"), "test", "rules", "rules_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "online",
    [{"drop": 0.6}, {"drop": 0.05}, {"min_events": 50}, {"min_events": 5000}],
    ids=["halving-under-a-60%-threshold", "dip-over-a-5%-threshold", "low-volume-counts", "too-few-events"],
)
def test_another_threshold_or_minimum_breaks_the_unit_tests(tmp_path: Path, online: dict[str, float]) -> None:
    res = promtool_with(tmp_path, **online)
    assert res.returncode != 0 and "HyTRecOnlineHitRateDrop" in res.stdout + res.stderr
