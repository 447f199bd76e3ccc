"""Comparing model versions on the impression log: the interval and the rule on synthetic data, and the
``hytrec impressions export`` / ``compare`` commands end to end over a real Redis."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from typer.testing import CliRunner

from hytrec.cli import app
from hytrec.service.impressions import Arm, attribute_log, decide, newcombe, wilson
from hytrec.service.online_eval import Impression, ImpressionLog
from hytrec.service.schemas import Recommendations, ScoredItem

T0 = 1_700_000_000.0


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(1.96**2 / (10 + 1.96**2), abs=2e-4)  # z^2 / (n + z^2)
    lo, hi = wilson(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_newcombe_interval_covers_the_true_difference_at_its_level() -> None:
    rng = random.Random(7)
    pa, pb, n, sims = 0.2, 0.25, 300, 400
    covered = 0
    for _ in range(sims):
        ha = sum(rng.random() < pa for _ in range(n))
        hb = sum(rng.random() < pb for _ in range(n))
        lo, hi = newcombe(hb, n, ha, n)
        covered += lo <= pb - pa <= hi
    assert covered / sims >= 0.92  # nominal 0.95; 400 runs: a standard error of about 0.011


def synthetic(p: dict[str, float], n_users: int, per_user: int, seed: int):
    """Impressions of two versions (users split by parity) and the next events, hitting rank 1..10 with ``p``."""
    rng = random.Random(seed)
    imps, events = [], []
    for u in range(n_users):
        version = "va" if u % 2 else "vb"
        for j in range(per_user):
            ts = T0 + u * 1000 + j * 60
            items = tuple(str(rng.randrange(1, 10_000)) for _ in range(10))
            imps.append(Impression(f"u{u}", ts, version, "model", items))
            item = items[rng.randrange(10)] if rng.random() < p[version] else "x"
            events.append((f"u{u}", item, ts + 5))
    return imps, events


def test_the_rule_finds_a_better_candidate_and_no_difference_where_there_is_none() -> None:
    imps, events = synthetic({"va": 0.30, "vb": 0.36}, n_users=800, per_user=8, seed=1)
    res = attribute_log(imps, events, window_s=30)
    a, b = res.arms["va", "model"], res.arms["vb", "model"]
    assert a.attributed == b.attributed == 3200 and res.no_impression == 0
    v = decide(b, a)
    assert v.decision == "better" and v.low < 0.06 < v.high and v.low > 0
    assert decide(a, b).decision == "worse"
    imps, events = synthetic({"va": 0.30, "vb": 0.30}, n_users=800, per_user=8, seed=2)
    res = attribute_log(imps, events, window_s=30)
    v = decide(res.arms["vb", "model"], res.arms["va", "model"])
    assert v.decision == "undecided" and v.low < 0 < v.high
    # the interval narrows with the sample: a sixteenth of the events, about four times as wide
    small = decide(Arm("b", "m", 200, 72), Arm("a", "m", 200, 60))
    large = decide(Arm("b", "m", 3200, 1152), Arm("a", "m", 3200, 960))
    assert 3.6 < (small.high - small.low) / (large.high - large.low) < 4.4
    assert small.decision == "undecided" and large.decision == "better"  # the same 6-point gain


def test_offline_attribution_uses_the_latest_impression_within_the_window() -> None:
    imps = [
        Impression("u", T0, "v1", "model", ("a", "b")),
        Impression("u", T0 + 100, "v2", "popularity", ("c", "d")),
    ]
    events = [("u", "b", T0 + 50), ("u", "d", T0 + 100), ("u", "a", T0 + 130), ("u", "c", T0 + 200), ("w", "a", T0)]
    res = attribute_log(imps, events, window_s=60)
    assert res.arms["v1", "model"].hits == 1 and res.arms["v1", "model"].rr == 0.5
    v2 = res.arms["v2", "popularity"]
    assert (v2.attributed, v2.hits, v2.rr) == (2, 1, 0.5)  # "a" misses the newer impression; T0+200 is outside
    assert res.no_impression == 2


def test_export_and_compare_commands(redis_standalone_url: str, tmp_path: Path) -> None:
    prefix = f"c{uuid.uuid4().hex[:10]}"

    async def fill() -> None:
        client = aioredis.Redis.from_url(redis_standalone_url)
        log = ImpressionLog(
            client, prefix, sample=1.0, max_k=10, window_s=600, log_max=10_000, flush_max=7, buffer=10_000
        )
        for u in range(40):
            for j in range(5):
                items = [ScoredItem(item_id=str(100 + (u + j + r) % 50), score=1.0) for r in range(10)]
                log.record(
                    Recommendations(
                        user_id=f"u{u}",
                        items=items,
                        model_version="va" if u % 2 else "vb",
                        history_length=j,
                        fallback=False,
                        had_state=True,
                        filtered_out=0,
                        exhausted=False,
                        request_time=T0 + u * 1000 + j * 60,
                    )
                )
        await log.flush()
        await client.aclose()

    asyncio.run(fill())
    env = {"HYTREC_REDIS_URL": redis_standalone_url, "HYTREC_KEY_PREFIX": prefix}
    out = tmp_path / "imps.jsonl"
    res = CliRunner().invoke(app, ["impressions", "export", "--output", str(out)], env=env)
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 200 and rows[0]["user_id"] == "u0" and rows[0]["items"][0] == "100"
    assert set(rows[0]) == {"entry", "user_id", "ts", "model_version", "source", "items"}
    # resuming after the first entry skips exactly its impressions
    first = rows[0]["entry"]
    res = CliRunner().invoke(app, ["impressions", "export", "--since", first], env=env)
    assert res.exit_code == 0 and sum(1 for r in rows if r["entry"] == first) == 7
    assert len([ln for ln in res.stdout.splitlines() if ln.startswith("{")]) == 193

    # the next event hits rank 1 for every even ("vb") user, misses for the odd ones
    lines = ["user_id\titem_id\ttimestamp"]
    for r in rows:
        u = int(r["user_id"][1:])
        lines.append(f"{r['user_id']}\t{r['items'][0] if u % 2 == 0 else 'zz'}\t{r['ts'] + 10}")
    (tmp_path / "events.tsv").write_text("\n".join(lines) + "\n")
    args = ["impressions", "compare", str(out), str(tmp_path / "events.tsv"), "--baseline", "va:model", "--json"]
    res = CliRunner().invoke(app, args, env=env)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    arms = {a["version"]: a for a in report["arms"]}
    assert arms["vb"]["hr"] == 1.0 and arms["va"]["hr"] == 0.0 and arms["vb"]["mrr"] == 1.0
    assert report["comparisons"] == [
        {**report["comparisons"][0], "candidate": "vb:model", "baseline": "va:model", "decision": "better"}
    ]
    res = CliRunner().invoke(app, [*args[:-1], "--baseline", "nope:model"], env=env)
    assert res.exit_code == 2 and "nope:model" in res.output
