"""Online evaluation over the in-process app and a real Redis: impressions, attribution, sampling, bounds.

The end-to-end case replays a synthetic log through the API with the bundled demo model: before each event,
the user's top-10 at that event's timestamp (``exclude_seen=false``), then the event. The online counters must
equal the offline next-item HR@10 and MRR@10 computed here from the same answers.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
import uuid
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis

from hytrec.service import metrics
from hytrec.service.online_eval import (
    Impression,
    ImpressionLog,
    attribute,
    latest_key,
    log_key,
    sampled,
)
from hytrec.service.schemas import Recommendations, ScoredItem
from hytrec.service.settings import Settings
from hytrec.training.synth import SynthConfig, generate
from tests.redis_servers import RedisServer
from tests.test_app import run, running

VERSIONED = (metrics.ONLINE_ATTRIBUTED, metrics.ONLINE_RECIPROCAL_RANK)


def demo_settings(redis_url: str, **extra: Any) -> Settings:
    """The bundled demo model (Settings' default) on a fresh key prefix; deadlines a loaded CI machine meets
    (these cases count every answer, so none may be shed)."""
    limits = {"request_timeout_ms": 30_000.0, "max_queue_delay_ms": 30_000.0}
    return Settings(redis_url=redis_url, key_prefix=f"o{uuid.uuid4().hex[:10]}", **{**limits, **extra})


def online(version: str) -> dict[str, float]:
    """The online counters of ``version``, summed over sources and per source."""
    out: dict[str, float] = {}
    for src in ("model", "popularity"):
        out[f"attributed/{src}"] = metrics.ONLINE_ATTRIBUTED.labels(version, src)._value.get()
        out[f"hits10/{src}"] = metrics.ONLINE_HITS.labels(version, src, "10")._value.get()
        out[f"hits1/{src}"] = metrics.ONLINE_HITS.labels(version, src, "1")._value.get()
        out[f"rr/{src}"] = metrics.ONLINE_RECIPROCAL_RANK.labels(version, src)._value.get()
    for outcome in ("attributed", "no_impression"):
        out[outcome] = metrics.ONLINE_EVENTS.labels(outcome)._value.get()
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def synthetic_log(n_users: int, per_user: int, seed: int) -> list[tuple[str, str, float]]:
    """(user, item, ts) in global time order, items from the demo model's catalogue ("1".."500")."""
    log = generate(SynthConfig(n_users=n_users, n_items=500, events_per_user=str(per_user), seed=seed))
    order = np.lexsort((log.users, log.timestamps))
    return [(f"s{log.users[i]}", str(log.items[i]), float(log.timestamps[i])) for i in order]


async def replay(client: Any, app: Any, events: list[tuple[str, str, float]]) -> list[tuple[str, str, Recommendations]]:
    """Ask for the top-10 at each event's time (exclude_seen=false), then post the event; wait for the
    attribution reads still in flight."""
    out = []
    for n, (user, item, ts) in enumerate(events):
        res = await client.get(f"/v1/users/{user}/recommendations", params={"k": 10, "exclude_seen": "false", "at": ts})
        assert res.status_code == 200, res.text
        out.append((user, item, Recommendations.model_validate(res.json())))
        body = {"events": [{"user_id": user, "item_id": item, "ts": ts, "event_id": f"e{n}"}]}
        posted = await client.post("/v1/events", json=body)
        assert posted.status_code == 200 and posted.json()["applied"] == 1, posted.text
    await app.state.lifecycle.runtime.attribution.drain()
    return out


def offline(answers: list[tuple[str, str, Recommendations]], users: set[str] | None = None) -> dict[str, float]:
    """Unfiltered next-item HR@10 / HR@1 / reciprocal-rank sums per source, from the answers themselves."""
    out = {f"{m}/{s}": 0.0 for m in ("attributed", "hits10", "hits1", "rr") for s in ("model", "popularity")}
    for user, item, rec in answers:
        if users is not None and user not in users:
            continue
        src = "popularity" if rec.fallback else "model"
        ids = [i.item_id for i in rec.items]
        out[f"attributed/{src}"] += 1
        if item in ids:
            rank = ids.index(item) + 1
            out[f"hits10/{src}"] += 1
            out[f"hits1/{src}"] += rank == 1
            out[f"rr/{src}"] += 1.0 / rank
    return out


# ------------------------------------------------------------------------------------------ end to end
def test_online_hr_equals_offline_next_item_hr_with_every_user_sampled(redis_standalone_url: str) -> None:
    events = synthetic_log(n_users=12, per_user=25, seed=3)
    s = demo_settings(redis_standalone_url, impression_sample=1.0, attribution_window_s=10 * 365 * 86400)

    async def body() -> None:
        async with running(s) as (client, app):
            rt = app.state.lifecycle.runtime
            before = online(rt.model.version)
            answers = await replay(client, app, events)
            got = delta(online(rt.model.version), before)
            want = offline(answers)
            for key, value in want.items():
                assert got[key] == pytest.approx(value, abs=1e-9), key
            assert got["attributed"] == len(events) and got["no_impression"] == 0
            assert want["hits10/model"] > 0  # the demo model hits: the comparison is not between zeros
            hr_online = (got["hits10/model"] + got["hits10/popularity"]) / got["attributed"]
            hr_offline = (want["hits10/model"] + want["hits10/popularity"]) / len(events)
            print(f"online HR@10 {hr_online:.4f}  offline HR@10 {hr_offline:.4f}  over {len(events)} requests")
            # the impressions are in Redis: each user's latest one, and every one in the export stream
            await rt.impressions.flush()
            r = redis.Redis.from_url(redis_standalone_url)
            last = {}
            for user, _, rec in answers:
                last[user] = rec
            for user, rec in last.items():
                imp = Impression.decode(user, r.get(latest_key(s.key_prefix, user)))
                assert imp.items == tuple(i.item_id for i in rec.items) and imp.ts == rec.request_time
                assert 0 < r.pttl(latest_key(s.key_prefix, user)) <= s.attribution_window_s * 1000
            lines = [ln for _, f in r.xrange(log_key(s.key_prefix)) for ln in f[b"i"].decode().split("\n")]
            assert len(lines) == len(events)
            exported = [Impression.parse_line(ln) for ln in lines]
            assert [(i.user_id, i.ts, i.items) for i in exported] == [
                (u, rec.request_time, tuple(x.item_id for x in rec.items)) for u, _, rec in answers
            ]
            await rt.impressions.refresh_coverage()
            hour = int(answers[-1][2].request_time // 3600)
            served = {x.item_id for u, _, rec in answers if int(rec.request_time // 3600) == hour for x in rec.items}
            cov = metrics.ONLINE_COVERAGE.labels(rt.model.version, "model", "current")._value.get()
            assert abs(cov - len(served)) <= max(2, 0.05 * len(served))  # HyperLogLog: ~0.8 % standard error

    run(body)


def model_offline(model: Any, events: list[tuple[str, str, float]], k: int = 10) -> list[int]:
    """Offline next-item evaluation with the checkpoint itself, no service: for each event, the user's state
    built in one parallel pass over their earlier events (``ServingModel.build``), the unfiltered top-k at the
    event's time (the popularity fallback before any event), and the event's rank in it (0: a miss)."""
    history: dict[str, list[tuple[int, float]]] = {}
    ranks = []
    for user, item, ts in events:
        past = history.setdefault(user, [])
        if past:
            state = model.build([r for r, _ in past], [t for _, t in past])
            ids = model.recommend(state, [ts], k, [False])[0].item_ids
        else:
            ids = model.popular(k).item_ids
        ranks.append(ids.index(item) + 1 if item in ids else 0)
        past.append((model.row(item), ts))
    return ranks


def test_online_hr_agrees_with_the_checkpoints_own_offline_next_item_hr(redis_standalone_url: str) -> None:
    """The independent check: online counters against HR@10 computed from the checkpoint alone (parallel
    state build, float32, no Redis, no batcher), on the same log and request times."""
    from hytrec.model.serving import ServingModel

    events = synthetic_log(n_users=12, per_user=25, seed=3)
    s = demo_settings(redis_standalone_url, impression_sample=1.0, attribution_window_s=10 * 365 * 86400)

    async def body() -> tuple[dict[str, float], list]:
        async with running(s) as (client, app):
            rt = app.state.lifecycle.runtime
            before = online(rt.model.version)
            answers = await replay(client, app, events)
            return delta(online(rt.model.version), before), answers

    got, answers = asyncio.run(body())
    ranks = model_offline(ServingModel.load(s.model), events)
    n = len(events)
    hits_off = sum(0 < r <= 10 for r in ranks)
    hits_on = got["hits10/model"] + got["hits10/popularity"]
    rr_off = sum(1.0 / r for r in ranks if r)
    rr_on = got["rr/model"] + got["rr/popularity"]
    assert got["attributed"] == n and hits_off > 0
    served = [[i.item_id for i in rec.items] for _, _, rec in answers]
    discordant = sum((item in ids) != (0 < r <= 10) for (_, item, _), ids, r in zip(events, served, ranks, strict=True))
    se = math.sqrt(hits_off / n * (1 - hits_off / n) / n)
    print(
        f"online HR@10 {hits_on / n:.4f} MRR@10 {rr_on / n:.4f}; checkpoint offline HR@10 {hits_off / n:.4f} "
        f"MRR@10 {rr_off / n:.4f}; {n} requests, se {se:.4f}, requests hit in one and not the other {discordant}"
    )
    # the served states are advanced one event at a time and stored (possibly float16): ties may reorder, so
    # the agreement asked for is within the sampling error, not exact
    assert abs(hits_on - hits_off) / n <= 2 * se and discordant <= 0.02 * n


def test_online_hr_of_a_sample_is_the_offline_hr_of_the_sampled_users(redis_standalone_url: str) -> None:
    events = synthetic_log(n_users=40, per_user=12, seed=5)
    rate = 0.4
    s = demo_settings(redis_standalone_url, impression_sample=rate, attribution_window_s=10 * 365 * 86400)
    users = {u for u, _, _ in events}
    chosen = {u for u in users if sampled(u, rate)}
    assert 0 < len(chosen) < len(users)

    async def body() -> None:
        async with running(s) as (client, app):
            version = app.state.lifecycle.runtime.model.version
            before = online(version)
            answers = await replay(client, app, events)
            got = delta(online(version), before)
        mine = offline(answers, chosen)
        for key, value in mine.items():
            assert got[key] == pytest.approx(value, abs=1e-9), key
        # and within the sampling error of the HR@10 over every user
        everyone = offline(answers)
        n_all = sum(everyone[f"attributed/{x}"] for x in ("model", "popularity"))
        p_all = sum(everyone[f"hits10/{x}"] for x in ("model", "popularity")) / n_all
        n = got["attributed"]
        p = (got["hits10/model"] + got["hits10/popularity"]) / n
        se = math.sqrt(p_all * (1 - p_all) / n * (1 - n / n_all))  # finite-population correction
        print(f"sampled HR@10 {p:.4f} over {n:g} events; all users {p_all:.4f} over {n_all:g}; se {se:.4f}")
        assert abs(p - p_all) <= 4 * se

    run(body)


# ------------------------------------------------------------------------------------------- sampling
def test_sampling_is_honoured_and_the_same_in_every_process() -> None:
    ids = [f"user-{i}" for i in range(20_000)]
    for rate in (0.05, 0.3, 0.9):
        share = sum(sampled(u, rate) for u in ids) / len(ids)
        assert abs(share - rate) <= 4 * math.sqrt(rate * (1 - rate) / len(ids)), (rate, share)
    # nested: a user sampled at a rate is sampled at every higher rate
    assert all(sampled(u, 0.3) for u in ids if sampled(u, 0.05))
    assert not any(sampled(u, 0.0) for u in ids[:1000]) and all(sampled(u, 1.0) for u in ids[:1000])
    code = (
        "from hytrec.service.online_eval import sampled\n"
        "print(''.join('1' if sampled(f'user-{i}', 0.3) else '0' for i in range(500)))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == "".join("1" if sampled(f"user-{i}", 0.3) else "0" for i in range(500))


def test_only_sampled_users_get_impressions_and_always_do(redis_standalone_url: str) -> None:
    s = demo_settings(redis_standalone_url, impression_sample=0.5)
    users = [f"u{i}" for i in range(30)]

    async def body() -> None:
        async with running(s) as (client, app):
            for _ in range(2):
                for u in users:
                    assert (await client.get(f"/v1/users/{u}/recommendations", params={"at": 1e9})).status_code == 200
            await app.state.lifecycle.runtime.impressions.flush()
        r = redis.Redis.from_url(redis_standalone_url)
        held = {u for u in users if r.exists(latest_key(s.key_prefix, u))}
        assert held == {u for u in users if sampled(u, 0.5)} and 0 < len(held) < len(users)
        lines = [ln for _, f in r.xrange(log_key(s.key_prefix)) for ln in f[b"i"].decode().split("\n")]
        assert sorted(Impression.parse_line(ln).user_id for ln in lines) == sorted(u for u in held for _ in "ab")

    run(body)


# ------------------------------------------------------------------------------------- attribution window
def test_events_outside_the_window_or_before_the_impression_count_as_no_impression(
    redis_standalone_url: str,
) -> None:
    s = demo_settings(redis_standalone_url, impression_sample=1.0, attribution_window_s=600)
    t0 = 1_650_000_000.0

    async def body() -> None:
        async with running(s) as (client, app):
            rt = app.state.lifecycle.runtime
            v = rt.model.version

            async def ask(user: str, at: float) -> list[str]:
                res = await client.get(f"/v1/users/{user}/recommendations", params={"at": at, "exclude_seen": False})
                await rt.impressions.flush()  # attributed from Redis here (the end-to-end cases: from the queue)
                assert rt.impressions.pending(user) is None
                return [i["item_id"] for i in res.json()["items"]]

            async def post(user: str, item: str, ts: float, eid: str) -> None:
                ev = {"user_id": user, "item_id": item, "ts": ts, "event_id": eid}
                assert (await client.post("/v1/events", json={"events": [ev]})).status_code == 200
                await rt.attribution.drain()

            before = online(v)
            top = await ask("w1", t0)
            await post("w1", top[2], t0 + 599, "a")  # inside: a hit at rank 3 (popularity fallback, no state yet)
            await post("w1", top[0], t0 + 601, "b")  # past the window: no impression
            await post("w1", top[0], t0 + 590, "c")  # late delivery, still after the impression: attributed
            await post("w1", top[0], t0 + 590, "c")  # a repeated event id is not applied, so not counted again
            top2 = await ask("w1", t0 + 5000)
            await post("w1", top2[0], t0 + 4990, "d")  # before the latest impression: no impression
            await post("w2", "7", t0, "x")  # never served anything: no impression
            d = delta(online(v), before)
            assert d["attributed"] == 2 and d["no_impression"] == 3
            assert d["attributed/popularity"] == 2 and d["hits10/popularity"] == 2 and d["hits1/popularity"] == 1
            assert d["rr/popularity"] == pytest.approx(1 / 3 + 1)

            # the stream path (hytrec consume) is attributed too, and a redelivered entry only once
            top3 = await ask("w3", t0)
            ev = [
                {"user_id": "w3", "item_id": top3[4], "ts": t0 + 10},
                {"user_id": "w3", "item_id": "499", "ts": t0 + 20},
            ]
            from hytrec.service.schemas import Event

            batch = [Event.model_validate(e) for e in ev]
            deadline = asyncio.get_running_loop().time() + 5
            before = online(v)
            await rt.ingestor.ingest_entries(batch, ["5-0", "6-0"], "m0", 1, deadline)
            await rt.ingestor.ingest_entries(batch, ["5-0", "6-0"], "m0", 1, deadline)  # redelivered
            await rt.attribution.drain()
            d = delta(online(v), before)
            assert d["attributed"] == 2 and d["hits10/popularity"] == (1 + ("499" in top3))
            assert d["rr/popularity"] == pytest.approx(1 / 5 + (1 / (top3.index("499") + 1) if "499" in top3 else 0))

    run(body)


def test_attribute_rule() -> None:
    imp = Impression("u", 100.0, "v1", "model", ("a", "b", "c"))
    assert attribute(imp, "b", 100.0, 60) == 2
    assert attribute(imp, "z", 160.0, 60) == 0
    assert attribute(imp, "a", 160.5, 60) is None and attribute(imp, "a", 99.9, 60) is None
    assert attribute(None, "a", 100.0, 60) is None and attribute(imp, None, 101.0, 60) == 0
    assert Impression.decode("u", imp.encode()) == imp and Impression.parse_line(imp.line()) == imp


# ------------------------------------------------------------------------------------------------ bounds
def answer(user: str, n: int, ts: float) -> Recommendations:
    items = [ScoredItem(item_id=str(100 + (n * 7 + j) % 400), score=1.0) for j in range(10)]
    return Recommendations(
        user_id=user,
        items=items,
        model_version="v-bound",
        history_length=5,
        fallback=False,
        request_time=ts,
        had_state=True,
        filtered_out=0,
        exhausted=False,
    )


def test_the_impression_store_stays_under_its_bound_when_traffic_exceeds_it() -> None:
    server = RedisServer().start()  # its own server: INFO memory measures only this test's keys
    log_max, flush_max, window = 2_000, 50, 1.5

    async def body() -> None:
        client = aioredis.Redis.from_url(server.url)
        imp_log = ImpressionLog(
            client, "b", sample=1.0, max_k=10, window_s=window, log_max=log_max, flush_max=flush_max, buffer=100_000
        )
        base = (await client.info("memory"))["used_memory"]
        n_users, rounds = 5_000, 4  # 20,000 impressions: 10x what the export log may hold
        for r in range(rounds):
            for u in range(n_users):
                imp_log.record(answer(f"user{u:05d}", r * n_users + u, 1_700_000_000.0 + r))
            await imp_log.flush()
        line = Impression("user00000", 1_700_000_000.0, "v-bound", "model", tuple(str(100 + j) for j in range(10)))
        line_bytes = len(line.line()) + 1
        stream = await client.memory_usage(log_key("b"))
        entries = await client.xlen(log_key("b"))
        used = (await client.info("memory"))["used_memory"] - base
        # The stated bounds (docs/online_eval.md): the export log holds at most log_max lines, each costing its
        # length + 8 bytes, plus 1 KiB an entry and 16 KiB; a latest-impression key costs its key and value
        # + 144 bytes, for each sampled user served within the window; a coverage HyperLogLog at most 12 KiB.
        entries_max = log_max // flush_max
        log_bound = log_max * (line_bytes + 8) + entries_max * 1024 + 16_384
        key_bound = len(latest_key("b", "user00000")) + len(line.encode()) + 144
        bound = log_bound + n_users * key_bound + 12_304
        print(f"line {line_bytes} B; stream {stream} B in {entries} entries (bound {log_bound}); ")
        print(f"used_memory +{used} B for {rounds * n_users} impressions of {n_users} users (bound {bound})")
        assert entries == entries_max
        assert stream <= log_bound
        assert used <= bound
        time.sleep(window + 0.5)  # past the TTL: every latest-impression key has expired
        assert not any([await client.exists(latest_key("b", f"user{u:05d}")) for u in range(0, n_users, 10)])
        await client.aclose()

    try:
        run(body)
    finally:
        server.stop()


# --------------------------------------------------------------------------------- the stream consumer
def test_a_hytrec_consume_process_attributes_the_streamed_events(
    service_checkpoint: Any, redis_standalone_url: str, tmp_path: Any
) -> None:
    """Impressions written as a server writes them; the events through the stream to a real consumer process,
    whose own /metrics (HYTREC_CONSUME_METRICS_PORT) counts the hits."""
    import httpx

    from hytrec.streams import StreamLayout, StreamProducer
    from tests.redis_servers import free_port, wait_until
    from tests.test_streams import ConsumerProcess, _consumer_env, _drained

    prefix = f"k{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = _consumer_env(
        service_checkpoint, redis_standalone_url, prefix, impression_sample=1.0, attribution_window_s=600
    )
    env["HYTREC_CONSUME_METRICS_PORT"] = str(port)
    s = Settings(model=service_checkpoint.path, redis_url=redis_standalone_url, key_prefix=prefix)
    t0 = 1_700_000_000.0

    async def serve_impressions() -> None:
        client = aioredis.Redis.from_url(redis_standalone_url)
        imp_log = ImpressionLog(
            client, prefix, sample=1.0, max_k=10, window_s=600, log_max=100, flush_max=10, buffer=100
        )
        for u in range(4):
            items = [ScoredItem(item_id=str(10 * u + j), score=1.0) for j in range(1, 11)]
            imp_log.record(
                Recommendations(
                    user_id=f"c{u}",
                    items=items,
                    model_version="v-served",
                    history_length=3,
                    fallback=False,
                    had_state=True,
                    filtered_out=0,
                    exhausted=False,
                    request_time=t0,
                )
            )
        await imp_log.flush()
        await client.aclose()

    asyncio.run(serve_impressions())
    consumer = ConsumerProcess(env, tmp_path, "online")
    try:
        with StreamProducer.from_settings(s) as producer:
            # c0..c3 next consume their impression's rank-(u+1) item; c4 was never served; one event past the window
            producer.add([{"user_id": f"c{u}", "item_id": str(10 * u + u + 1), "ts": t0 + 30} for u in range(4)])
            producer.add([{"user_id": "c4", "item_id": "5", "ts": t0 + 30}])
            producer.add([{"user_id": "c0", "item_id": "1", "ts": t0 + 900}])
            layout = StreamLayout(prefix, s.stream_name, s.stream_partitions)
            wait_until(lambda: _drained(producer.client, layout, s.stream_group), timeout=60, what="stream drained")

        def scraped() -> dict[str, float]:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            return {
                ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1])
                for ln in text.splitlines()
                if ln.startswith("hytrec_online_") and "v-served" in ln or ln.startswith("hytrec_online_events_total")
            }

        wait_until(lambda: scraped().get('hytrec_online_events_total{outcome="no_impression"}') == 2, timeout=20)
        got = scraped()
    finally:
        consumer.stop()
    assert got['hytrec_online_events_total{outcome="attributed"}'] == 4
    assert got['hytrec_online_attributed_total{source="model",version="v-served"}'] == 4
    assert got['hytrec_online_hits_total{k="10",source="model",version="v-served"}'] == 4
    assert got['hytrec_online_hits_total{k="1",source="model",version="v-served"}'] == 1
    assert got['hytrec_online_reciprocal_rank_total{source="model",version="v-served"}'] == pytest.approx(
        1 + 1 / 2 + 1 / 3 + 1 / 4
    )


def test_delete_user_erases_the_users_impressions(redis_standalone_url: str) -> None:
    s = demo_settings(redis_standalone_url, impression_sample=1.0, attribution_window_s=3600)

    async def body() -> None:
        async with running(s) as (client, app):
            rt = app.state.lifecycle.runtime
            gone, kept = f"er-{uuid.uuid4().hex[:8]}", f"ek-{uuid.uuid4().hex[:8]}"
            for _ in range(3):
                for u in (gone, kept):
                    assert (await client.get(f"/v1/users/{u}/recommendations", params={"k": 5})).status_code == 200
            await rt.impressions.flush()
            r = redis.Redis.from_url(redis_standalone_url)

            def users_in_log() -> list[str]:
                return [
                    Impression.parse_line(ln).user_id
                    for _, f in r.xrange(log_key(s.key_prefix))
                    for ln in f[b"i"].decode().split("\n")
                    if ln
                ]

            assert users_in_log().count(gone) == 3 and r.exists(latest_key(s.key_prefix, gone))
            assert (await client.delete(f"/v1/users/{gone}")).status_code == 200
            left = [k for k in r.scan_iter(match=f"{s.key_prefix}:*", count=1000) if gone.encode() in k]
            assert left == []
            assert gone not in users_in_log() and users_in_log().count(kept) == 3
            assert r.exists(latest_key(s.key_prefix, kept))

    run(body)


def test_the_cost_benchmarks_in_process_part_runs(tmp_path: Any) -> None:
    """``hytrec bench online-eval``'s in-process costs (docs/online_eval.md quotes them) run on the current
    answer schema; a sampled answer costs more than an unsampled one (the append against the hash alone)."""
    from hytrec.benchmarks.online_eval_bench import micro_costs

    got = asyncio.run(micro_costs(tmp_path / "micro", n=2_000))
    assert set(got) == {
        "record_us_sample_0",
        "record_us_sample_1",
        "writer_us_per_impression_8_per_pipeline",
        "writer_us_per_impression_256_per_pipeline",
    }
    assert 0 < got["record_us_sample_0"] < got["record_us_sample_1"]
    assert all(v > 0 for v in got.values())


def test_a_sampled_request_costs_one_pipelined_command_and_an_unsampled_one_none() -> None:
    """The hot-path claim, counted by Redis itself (``INFO commandstats`` of a server of its own): N sampled
    answers cost N ``SET`` and one ``XADD`` per background write; unsampled answers cost no command at all."""
    server = RedisServer().start()

    async def body() -> None:
        client = aioredis.Redis.from_url(server.url)

        async def calls() -> dict[str, int]:
            stats = await client.info("commandstats")
            return {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}

        n, per = 500, 64
        for sample, users in ((0.0, range(n)), (1.0, range(n))):
            imp_log = ImpressionLog(
                client, "c", sample=sample, max_k=10, window_s=60, log_max=10_000, flush_max=per, buffer=10_000
            )
            before = await calls()
            for u in users:
                imp_log.record(answer(f"user{u}", u, 1_700_000_000.0))
            await imp_log.flush()
            after = await calls()
            spent = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
            spent.pop("info", None)
            if sample == 0.0:
                assert spent == {}, spent
            else:
                writes = -(-n // per)
                assert spent["set"] == n and spent["xadd"] == writes, spent
                assert set(spent) <= {"set", "xadd", "pfadd", "expire"}, spent
        await client.aclose()

    try:
        run(body)
    finally:
        server.stop()
