"""Online evaluation of a candidate (docs/online_eval.md, docs/lifecycle.md): over the in-process app, a real
Redis and the lifecycle's two checkpoints, a canary share and shadow scoring at once.

The canary's answers must be impressions with source ``canary`` and the candidate's version; in shadow mode the
candidate's answer to a live user must be a ``shadow`` impression beside the served one (never replacing it,
never served); each event must count once per (version, source) it followed, in the Prometheus counters and in
``hytrec impressions export`` + ``compare`` (real processes), and ``compare`` must apply the documented rule:
a planted gain of the canary is found "better" with the Newcombe interval of the counts this test makes itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import redis

from hytrec.service import metrics, swap
from hytrec.service.impressions import newcombe
from hytrec.service.online_eval import Impression, latest_key
from hytrec.service.settings import Settings
from hytrec.service.swap import canary_bucket, set_desired
from tests.service_fixtures import N_ITEMS, REPO
from tests.test_app import running
from tests.test_lifecycle import model_root  # noqa: F401 - the fixture

T0 = 1.7e9
ARMS = ("model", "popularity", "canary", "shadow")


def counters(versions: tuple[str, ...]) -> dict[tuple[str, str, str], float]:
    out = {}
    for v in versions:
        for src in ARMS:
            out[v, src, "attributed"] = metrics.ONLINE_ATTRIBUTED.labels(v, src)._value.get()
            out[v, src, "hits10"] = metrics.ONLINE_HITS.labels(v, src, "10")._value.get()
    for outcome in ("attributed", "no_impression"):
        out["-", "-", outcome] = metrics.ONLINE_EVENTS.labels(outcome)._value.get()
    return out


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "hytrec.cli", *args], cwd=REPO, env=full, capture_output=True, text=True, timeout=120
    )


def test_canary_and_shadow_impressions_are_attributed_side_by_side_and_compared_by_the_rule(
    model_root: tuple[Path, str, str],  # noqa: F811
    redis_standalone_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, v1, v2 = model_root
    s = Settings(
        model=root / v1,
        model_root=root,
        redis_url=redis_standalone_url,
        key_prefix=f"oc{uuid.uuid4().hex[:10]}",
        versions_poll_s=0.2,
        write_versions=v2,  # REST dual-writes the candidate, so it has every user's state:
        log_posted_events=False,  # with the log on a consumer would write it, and none runs here
        impression_sample=1.0,
        request_timeout_ms=30_000.0,
        max_queue_delay_ms=30_000.0,
    )
    users = [f"oc{i}" for i in range(60)]
    rounds = 5
    rng = random.Random(7)
    caplog.set_level(logging.INFO, logger="hytrec.shadow")
    log_rows: list[tuple[str, str, float]] = []
    expected: Counter[tuple[str, str, str]] = Counter()
    env = {"HYTREC_REDIS_URL": redis_standalone_url, "HYTREC_KEY_PREFIX": s.key_prefix}
    imps = tmp_path / "imps.jsonl"

    async def body() -> dict:
        async with running(s) as (client, app):
            lc = app.state.lifecycle
            warm = [{"user_id": u, "item_id": str(j + 1), "ts": T0 + j} for u in users for j in range(3)]
            assert (await client.post("/v1/events", json={"events": warm})).status_code == 200
            log_rows.extend((e["user_id"], e["item_id"], e["ts"]) for e in warm)
            await lc.runtime.attribution.drain()
            await set_desired(lc.runtime.store.client, s.key_prefix, candidate=v2, canary=0.5, shadow=True)
            deadline = time.monotonic() + 30
            while not (lc.runtime.candidate is not None and lc.runtime.canary == 0.5 and lc.runtime.shadow):
                assert time.monotonic() < deadline, "the candidate was not installed"
                await asyncio.sleep(0.05)
            rt = lc.runtime
            before = counters((v1, v2))
            for r in range(rounds):
                ts = T0 + 100 + 60 * r
                answers = {}
                for u in users:
                    res = await client.get(
                        f"/v1/users/{u}/recommendations", params={"k": 10, "exclude_seen": "false", "at": ts}
                    )
                    assert res.status_code == 200, res.text
                    answers[u] = res.json()
                while swap._SHADOWS:  # noqa: SLF001 - every shadow of this round scored before its events
                    await asyncio.sleep(0.01)
                shadows = {}
                for rec in caplog.records:
                    if rec.name == "hytrec.shadow":
                        line = json.loads(rec.getMessage())
                        if line["request_time"] == ts:
                            shadows[line["user_id"]] = line["candidate"]["items"]
                events = []
                for u, a in answers.items():
                    ids = [i["item_id"] for i in a["items"]]
                    canary = canary_bucket(u) < 0.5
                    assert a["model_version"] == (v2 if canary else v1) and not a["fallback"]
                    # planted: a canary user's next item is one it was served half the time, a live user's 15 %
                    item = rng.choice(ids) if rng.random() < (0.5 if canary else 0.15) else str(rng.randint(1, N_ITEMS))
                    events.append({"user_id": u, "item_id": item, "ts": ts})
                    log_rows.append((u, item, ts))
                    arm = (v2, "canary") if canary else (v1, "model")
                    expected[(*arm, "attributed")] += 1
                    expected[(*arm, "hits10")] += item in ids
                    if not canary:  # the shadow scores live users only
                        assert len(shadows[u]) == 10
                        expected[v2, "shadow", "attributed"] += 1
                        expected[v2, "shadow", "hits10"] += item in shadows[u]
                assert set(shadows) == {u for u in users if canary_bucket(u) >= 0.5}
                await rt.impressions.flush()  # half the attributions then read Redis, half the queued ones
                posted = await client.post("/v1/events", json={"events": events})
                assert posted.status_code == 200 and posted.json()["applied"] == len(events), posted.text
                await rt.attribution.drain()
                await rt.impressions.flush()
            after = counters((v1, v2))
            sync = redis.Redis.from_url(redis_standalone_url)
            try:  # the shadow impression sits beside the served one, of the same request
                for u in users[:10]:
                    served = Impression.decode(u, sync.get(latest_key(s.key_prefix, u)))
                    shadow = sync.get(latest_key(s.key_prefix, u, shadow=True))
                    if canary_bucket(u) < 0.5:
                        assert (served.model_version, served.source, shadow) == (v2, "canary", None)
                    else:
                        sh = Impression.decode(u, shadow)
                        assert (served.model_version, served.source) == (v1, "model")
                        assert (sh.model_version, sh.source, sh.ts) == (v2, "shadow", served.ts)
                # the export (a process of its own) before an erasure, which takes the shadow impression too
                done = await asyncio.to_thread(_cli, ["impressions", "export", "-o", str(imps)], env)
                assert done.returncode == 0, done.stderr
                live_user = next(u for u in users if canary_bucket(u) >= 0.5)
                keys = [latest_key(s.key_prefix, live_user), latest_key(s.key_prefix, live_user, shadow=True)]
                assert sync.exists(*keys) == 2
                assert (await client.delete(f"/v1/users/{live_user}")).status_code == 200
                assert sync.exists(*keys) == 0
            finally:
                sync.close()
            return {k: after[k] - before[k] for k in after}

    async def bounded() -> dict:
        return await asyncio.wait_for(body(), 240)

    got = asyncio.run(bounded())
    n_events = rounds * len(users)
    assert got["-", "-", "attributed"] == n_events and got["-", "-", "no_impression"] == 0
    for key in [k for k in got if k[0] != "-"]:
        assert got[key] == expected[key], (key, got[key], expected[key])
    assert expected[v1, "model", "attributed"] + expected[v2, "canary", "attributed"] == n_events
    assert expected[v2, "shadow", "attributed"] == expected[v1, "model", "attributed"] > 0

    # offline: the export and the documented comparison, as separate processes
    exported = [json.loads(x) for x in imps.read_text().splitlines()]
    assert Counter((r["model_version"], r["source"]) for r in exported) == {
        (v1, "model"): expected[v1, "model", "attributed"],
        (v2, "canary"): expected[v2, "canary", "attributed"],
        (v2, "shadow"): expected[v2, "shadow", "attributed"],
    }
    tsv = tmp_path / "events.tsv"
    tsv.write_text("user_id\titem_id\ttimestamp\n" + "".join(f"{u}\t{i}\t{t!r}\n" for u, i, t in log_rows))
    done = _cli(["impressions", "compare", str(imps), str(tsv), "--baseline", f"{v1}:model", "--json"], env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["no_impression"] == 3 * len(users)  # the warm-up events came before any impression
    arms = {(a["version"], a["source"]): a for a in report["arms"]}
    assert set(arms) == {(v1, "model"), (v2, "canary"), (v2, "shadow")}
    for (v, src), a in arms.items():
        assert (a["attributed"], a["hits"]) == (expected[v, src, "attributed"], expected[v, src, "hits10"])
    base = (expected[v1, "model", "hits10"], expected[v1, "model", "attributed"])
    verdicts = {c["candidate"]: c for c in report["comparisons"]}
    for src in ("canary", "shadow"):
        c = verdicts[f"{v2}:{src}"]
        low, high = newcombe(expected[v2, src, "hits10"], expected[v2, src, "attributed"], *base)
        assert c["baseline"] == f"{v1}:model"
        assert (c["low"], c["high"]) == pytest.approx((low, high), abs=1e-12)
        assert c["decision"] == ("better" if low > 0 else "worse" if high < 0 else "undecided")
    assert verdicts[f"{v2}:canary"]["decision"] == "better"  # the planted gain: 0.5 against 0.15 of next items
    print(
        "canary/shadow attribution:",
        {f"{v}:{src}": (a["attributed"], a["hits"], round(a["hr"], 4)) for (v, src), a in arms.items()},
        {k: (round(c["low"], 4), round(c["high"], 4), c["decision"]) for k, c in verdicts.items()},
    )


def test_two_served_workers_count_canary_and_shadow_as_the_offline_comparison_does(
    model_root: tuple[Path, str, str],  # noqa: F811
    redis_standalone_url: str,
    tmp_path: Path,
) -> None:
    """The same over a real ``hytrec serve`` with 2 workers (an answer and the next event may reach different
    workers: attribution then reads Redis), modes set by ``hytrec versions set``: the served arms' counters on
    /metrics equal the test's counts from the answers, and every arm's, the shadow's included, equals what
    ``hytrec impressions compare`` finds offline in the exported log."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from tests.service_fixtures import Checkpoint, ServiceProcess, service_env

    root, v1, v2 = model_root
    env = service_env(
        Checkpoint(root / v1, v1, []),
        redis_standalone_url,
        workers=2,
        model_root=root,
        write_versions=v2,
        log_posted_events=False,  # REST writes the candidate itself: no consumer runs in this test
        impression_sample=1.0,
        versions_poll_s=0.3,
        request_timeout_ms=30000,
        max_queue_delay_ms=30000,
    )
    cli_env = {k: env[k] for k in ("HYTREC_REDIS_URL", "HYTREC_KEY_PREFIX")} | {"HYTREC_MODEL_ROOT": str(root)}
    users = [f"op{i}" for i in range(40)]
    canary_users = {u for u in users if canary_bucket(u) < 0.5}
    assert 0 < len(canary_users) < len(users)
    rng = random.Random(11)
    server = ServiceProcess(env, tmp_path).start()
    expected: Counter[tuple[str, str, str]] = Counter()
    log_rows: list[tuple[str, str, float]] = []
    close = {"Connection": "close"}  # each request on a new connection: both workers answer
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            warm = [{"user_id": u, "item_id": str(j + 1), "ts": T0 + j} for u in users for j in range(3)]
            assert http.post("/v1/events", json={"events": warm}).status_code == 200
            log_rows.extend((e["user_id"], e["item_id"], e["ts"]) for e in warm)
            done = _cli(["versions", "set", "--candidate", v2, "--canary", "0.5", "--shadow"], cli_env)
            assert done.returncode == 0, done.stderr
            probe, workers, streak = sorted(canary_users)[0], set(), 0
            deadline = time.monotonic() + 60
            while streak < 30 or len(workers) < 2:  # every worker serves the canary (and so the shadow)
                assert time.monotonic() < deadline, "the workers did not take the candidate"
                r = http.get(f"/v1/users/{probe}/recommendations", params={"at": T0 + 50}, headers=close)
                ok = r.status_code == 200 and r.json()["model_version"] == v2
                streak = streak + 1 if ok else 0
                workers |= {r.headers["x-hytrec-worker"]} if ok else set()
            time.sleep(0.5)  # the probe's impressions written before its user's first event below
            for rnd in range(3):
                ts = T0 + 100 + 60 * rnd
                events = []
                for u in users:
                    params = {"k": 10, "exclude_seen": "false", "at": ts}
                    r = http.get(f"/v1/users/{u}/recommendations", params=params, headers=close)
                    assert r.status_code == 200, r.text
                    ids = [i["item_id"] for i in r.json()["items"]]
                    arm = (v2, "canary") if u in canary_users else (v1, "model")
                    assert r.json()["model_version"] == arm[0]
                    p = 0.5 if u in canary_users else 0.15
                    item = rng.choice(ids) if rng.random() < p else str(rng.randint(1, N_ITEMS))
                    events.append({"user_id": u, "item_id": item, "ts": ts})
                    log_rows.append((u, item, ts))
                    expected[(*arm, "attributed")] += 1
                    expected[(*arm, "hits")] += item in ids
                time.sleep(1.0)  # impressions (100 ms gather) and shadows written by both workers
                posted = http.post("/v1/events", json={"events": events}, headers=close)
                assert posted.status_code == 200 and posted.json()["applied"] == len(events), posted.text
            time.sleep(1.0)  # the attribution reads of the last batch
            text = http.get("/metrics").text
        got: Counter[tuple[str, str, str]] = Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                lab = sample.labels
                if sample.name == "hytrec_online_attributed_total":
                    got[lab["version"], lab["source"], "attributed"] += sample.value
                elif sample.name == "hytrec_online_hits_total" and lab.get("k") == "10":
                    got[lab["version"], lab["source"], "hits"] += sample.value
                elif sample.name == "hytrec_online_events_total":
                    got["-", "-", lab["outcome"]] += sample.value
        n = len(users) * 3
        assert got["-", "-", "attributed"] == n and got["-", "-", "no_impression"] == len(warm)
        for arm in ((v1, "model"), (v2, "canary")):
            for what in ("attributed", "hits"):
                assert got[(*arm, what)] == expected[(*arm, what)], (arm, what, got, expected)
        assert got[v2, "shadow", "attributed"] == expected[v1, "model", "attributed"]
        imps = tmp_path / "imps.jsonl"
        done = _cli(["impressions", "export", "-o", str(imps)], cli_env)
        assert done.returncode == 0, done.stderr
        tsv = tmp_path / "events.tsv"
        tsv.write_text("user_id\titem_id\ttimestamp\n" + "".join(f"{u}\t{i}\t{t!r}\n" for u, i, t in log_rows))
        done = _cli(["impressions", "compare", str(imps), str(tsv), "--baseline", f"{v1}:model", "--json"], cli_env)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        offline = {(a["version"], a["source"]): (a["attributed"], a["hits"]) for a in report["arms"]}
        online = {
            (v, src): (got[v, src, "attributed"], got[v, src, "hits"])
            for v, src in ((v1, "model"), (v2, "canary"), (v2, "shadow"))
        }
        print("two workers, online = offline:", online, report["comparisons"])
        assert offline == online
        assert {c["candidate"]: c["decision"] for c in report["comparisons"]}[f"{v2}:canary"] == "better"
    finally:
        server.stop()


def test_served_and_shadow_impressions_are_read_together_and_erased_on_standalone_and_cluster(
    redis_url: str,
) -> None:
    """Both keys of a user share its hash slot, so the attribution's ``MGET`` and the erasure's ``DEL`` work on
    a Redis Cluster too; a shadow of an earlier request is not taken as beside the latest served one."""
    from hytrec.service.online_eval import ImpressionLog, beside
    from hytrec.service.schemas import Recommendations, ScoredItem
    from hytrec.state_store import StoreSettings, open_store

    def rec(user: str, version: str, ts: float, fallback: bool = False) -> Recommendations:
        items = [ScoredItem(item_id=str(j), score=1.0) for j in range(1, 6)]
        return Recommendations(
            user_id=user,
            items=items,
            model_version=version,
            history_length=1,
            fallback="popularity" if fallback else False,
            request_time=ts,
            had_state=not fallback,
            filtered_out=0,
            exhausted=False,
        )

    async def body() -> None:
        prefix = f"ob{uuid.uuid4().hex[:8]}"
        store = await open_store(StoreSettings(redis_url=redis_url, key_prefix=prefix))
        log = ImpressionLog(
            store.client,
            prefix,
            sample=1.0,
            max_k=10,
            window_s=600,
            log_max=1000,
            flush_max=16,
            buffer=1000,
            cluster=store.cluster,
        )
        users = [f"sc{i}" for i in range(20)]
        try:
            for u in users:
                assert log.record(rec(u, "v1", T0)).source == "model"
                assert log.record(rec(u, "v2", T0), source="shadow").source == "shadow"
            assert log.record(rec("sc0", "v2", T0 + 5), source="canary").source == "canary"
            assert log.record(rec("sc1", "v2", T0 + 5, fallback=True), source="canary").source == "popularity"
            assert [i.source for i in log.pending("sc2")] == ["model", "shadow"]  # all there is to know
            log.record(rec("solo", "v1", T0))
            assert log.pending("solo") is None  # shadows are being scored: Redis may hold its shadow, so ask
            await log.flush()
            got = await log.latest(users)
            for u in users[2:]:
                served, shadow = got[u]
                assert (served.model_version, served.source, shadow.model_version, shadow.source) == (
                    "v1",
                    "model",
                    "v2",
                    "shadow",
                )
                assert beside(shadow, served) is shadow
            served, shadow = got["sc0"]
            assert served.source == "canary" and beside(shadow, served) is None  # the shadow of an earlier request
            await log.erase("sc3")
            assert (await log.latest(["sc3"]))["sc3"] == (None, None)
            assert (await log.latest(["sc4"]))["sc4"][1] is not None
        finally:
            await store.close()

    asyncio.run(asyncio.wait_for(body(), 60))
