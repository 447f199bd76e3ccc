"""The inference service end to end: real `hytrec serve` processes, real Redis, the typed httpx client."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from hytrec.service.client import AsyncHyTRecClient, HyTRecClient, HyTRecError
from hytrec.training.synth import SynthConfig, generate, write_interactions
from tests.redis_servers import RedisServer
from tests.service_fixtures import (  # noqa: F401 - fixtures
    API_KEY,
    REPO,
    ServiceProcess,
    service,
    service_env,
    strict_service,
)

T0 = 1_700_000_000.0


@pytest.fixture
def client(service: ServiceProcess):  # noqa: F811
    with HyTRecClient(service.url, api_key=API_KEY, timeout=30.0) as c:
        yield c


def test_readyz_waits_for_a_redis_that_comes_up_later(service_checkpoint, tmp_path: Path) -> None:  # noqa: F811
    """Started before its Redis, the service answers /readyz 503 (with Retry-After) and /healthz 200, then
    becomes ready by itself once the Redis answers: no restart."""
    redis_server = RedisServer()  # a free port, nothing listening yet
    proc = ServiceProcess(service_env(service_checkpoint, redis_server.url, retry_after_s=2), tmp_path)
    try:
        proc.start(until=503)
        waiting = httpx.get(proc.url + "/readyz")
        assert waiting.status_code == 503 and waiting.headers["retry-after"] == "2"
        assert "connecting to redis" in waiting.json()["detail"]
        assert httpx.get(proc.url + "/healthz").status_code == 200
        redis_server.start()
        proc.wait_for(200)
        assert httpx.get(proc.url + "/readyz").json()["status"] == "ready"
    finally:
        proc.stop()
        redis_server.stop()


def test_full_flow(client: HyTRecClient, service: ServiceProcess, service_checkpoint) -> None:  # noqa: F811
    user = "flow:user@1"
    events = [{"user_id": user, "item_id": str(i), "ts": T0 + 60 * i, "event_id": f"e{i}"} for i in range(1, 21)]
    events.append({"user_id": user, "item_id": "no-such-item", "ts": T0 + 2000, "event_id": "e-unknown"})
    events.append({"user_id": user, "item_id": 7, "ts": T0 + 10, "event_id": "e-late"})  # out of order, int id
    events.append(dict(events[0]))  # repeated event id in the batch
    res = client.post_events(events)
    assert (res.applied, res.duplicates, res.unknown_items, res.out_of_order, res.users) == (22, 1, 1, 1, 1)
    again = client.post_events(events[:5])  # already applied: skipped
    assert (again.applied, again.duplicates) == (0, 5)

    rec = client.recommendations(user, k=10, at=T0 + 3000)
    assert rec.fallback is False and rec.history_length == 22
    assert rec.model_version == service_checkpoint.version and rec.request_time == T0 + 3000
    assert len(rec.items) == 10 and [i.score for i in rec.items] == sorted((i.score for i in rec.items), reverse=True)
    seen = {str(i) for i in range(1, 21)} | {"7"}
    assert not seen & {i.item_id for i in rec.items}  # exclude_seen (default) drops the ring buffer's items
    full = client.recommendations(user, k=40, at=T0 + 3000, exclude_seen=False)  # 40 > 21 seen: 10 unseen remain
    unseen = [(i.item_id, i.score) for i in full.items if i.item_id not in seen]
    assert [(i.item_id, i.score) for i in rec.items] == unseen[:10]  # the same ranking with the seen items dropped

    summary = client.user(user)
    assert summary is not None and summary.history_length == 22 and summary.model_version == service_checkpoint.version
    assert [e.item_id for e in summary.recent[-3:]] == ["20", None, "7"]  # newest last; unknown item -> null
    assert summary.last_ts == T0 + 2000 and summary.state_bytes > 0 and summary.store_version == 1

    assert client.delete_user(user) is True
    assert client.user(user) is None
    fallback = client.recommendations(user, k=5)
    assert fallback.fallback == "popularity" and fallback.history_length == 0 and len(fallback.items) == 5
    assert client.delete_user(user) is False

    info = client.model()
    assert info.version == service_checkpoint.version and info.n_items == 300 and info.config["window"] == 64
    metrics = httpx.get(service.url + "/metrics").text
    for name in ("hytrec_events_total", "hytrec_http_request_seconds_bucket", "hytrec_microbatch_size", "hytrec_model"):
        assert name in metrics
    assert httpx.get(service.url + "/docs").status_code == 200


def _problem(resp: httpx.Response, status: int, field: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["type"] and body["detail"]
    if field is not None:
        assert field in [e["field"] for e in body["errors"]], body
    return body


def test_client_errors_are_4xx_and_change_nothing(client: HyTRecClient, service: ServiceProcess) -> None:  # noqa: F811
    user = "errors-user"
    client.post_events([{"user_id": user, "item_id": "3", "ts": T0, "event_id": "first"}])
    before = client.user(user)
    ok = {"user_id": user, "item_id": "4", "ts": T0 + 5}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    url = service.url
    with httpx.Client(base_url=url, headers=auth) as http:
        cases = [
            (http.post("/v1/events", content=b'{"events": [', headers={"content-type": "application/json"}), 400, None),
            (http.post("/v1/events", json={"events": [ok, {"user_id": user, "item_id": "5"}]}), 422, "events[1].ts"),
            (http.post("/v1/events", json={"events": [ok, {**ok, "ts": "soon"}]}), 422, "events[1].ts"),
            (http.post("/v1/events", json={"events": [{**ok, "ts": -1.0}]}), 422, "events[0].ts"),
            (http.post("/v1/events", json={"events": [{**ok, "ts": 5e9}]}), 422, "events[0].ts"),
            (http.post("/v1/events", json={"events": [{**ok, "user_id": 12}]}), 422, "events[0].user_id"),
            (http.post("/v1/events", json={"events": [ok] * 201}), 422, "events"),
            (http.post("/v1/events", json={"events": []}), 422, "events"),
            (http.post("/v1/events", json={"evnts": [ok]}), 422, "events"),
            (http.post("/v1/events", json={"events": [ok, {**ok, "user_id": "u}:s"}]}), 422, "events[1].user_id"),
            (http.post("/v1/events", json={"events": [{**ok, "user_id": "x" * 129}]}), 422, "events[0].user_id"),
            (http.post("/v1/events", json={"events": [{**ok, "item_id": "a b"}]}), 422, "events[0].item_id"),
            (http.post("/v1/events", json={"events": [{**ok, "event_id": ""}]}), 422, "events[0].event_id"),
            (http.post("/v1/events", content=b"x" * 70000, headers={"content-type": "application/json"}), 413, None),
            (http.get(f"/v1/users/{user}/recommendations", params={"k": 0}), 422, "k"),
            (http.get(f"/v1/users/{user}/recommendations", params={"k": 101}), 422, "k"),
            (http.get(f"/v1/users/{user}/recommendations", params={"k": "ten"}), 422, "k"),
            (http.get(f"/v1/users/{user}/recommendations", params={"at": "-5"}), 422, "at"),
            (http.get("/v1/users/bad%7Buser%7D/recommendations"), 422, "user_id"),
            (http.delete("/v1/users/bad%20user"), 422, "user_id"),
            (http.get("/v1/nothing-here"), 404, None),
            (httpx.post(url + "/v1/events", json={"events": [ok]}), 401, None),
            (
                httpx.post(url + "/v1/events", json={"events": [ok]}, headers={"Authorization": "Bearer nope"}),
                401,
                None,
            ),
            (httpx.delete(f"{url}/v1/users/{user}", headers={"Authorization": f"Basic {API_KEY}"}), 401, None),
            (httpx.get(f"{url}/v1/users/{user}"), 401, None),
        ]
        for resp, status, field in cases:
            _problem(resp, status, field)
            assert client.user(user) == before  # nothing applied, nothing erased
    assert _problem(cases[-2][0], 401) and cases[-2][0].headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(HyTRecError) as err:
        client.recommendations(user, k=1000)
    assert err.value.status == 422 and err.value.problem["errors"][0]["field"] == "k"


def test_unknown_item_in_strict_mode_rejects_the_batch(strict_service: ServiceProcess) -> None:  # noqa: F811
    with HyTRecClient(strict_service.url, timeout=30.0) as client:
        client.post_events([{"user_id": "strict-user", "item_id": "1", "ts": T0}])
        before = client.user("strict-user")
        events = [
            {"user_id": "strict-user", "item_id": "2", "ts": T0 + 1},
            {"user_id": "other", "item_id": "x9", "ts": T0},
        ]
        with pytest.raises(HyTRecError) as err:
            client.post_events(events)
        assert err.value.status == 422 and [e["field"] for e in err.value.problem["errors"]] == ["events[1].item_id"]
        assert client.user("strict-user") == before and client.user("other") is None


def _applied_events(url: str) -> float:
    """hytrec_events_total{outcome="applied"}, summed over the workers by the multiprocess collector."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith('hytrec_events_total{outcome="applied"}'):
            return float(line.split()[-1])
    return 0.0


def test_concurrent_writers_on_two_workers_lose_nothing(strict_service: ServiceProcess) -> None:  # noqa: F811
    clients, batches, per_batch = 16, 6, 3
    applied_before = _applied_events(strict_service.url)

    async def writer(c: int) -> None:
        async with AsyncHyTRecClient(strict_service.url, timeout=30.0, retries=10) as client:
            for b in range(batches):
                events = [
                    {"user_id": "hot-user", "item_id": str(1 + (c * 7 + b + j) % 300), "ts": T0 + c + b + j,
                     "event_id": f"c{c}-b{b}-{j}"}
                    for j in range(per_batch)
                ]  # fmt: skip
                await client.post_events(events)

    async def main() -> None:
        await asyncio.gather(*(writer(c) for c in range(clients)))

    asyncio.run(main())
    with HyTRecClient(strict_service.url) as client:
        summary = client.user("hot-user")
        assert summary is not None and summary.history_length == clients * batches * per_batch
        assert client.recommendations("hot-user").history_length == clients * batches * per_batch
    # every event counted once as applied, across both workers (retried batches apply nothing twice)
    assert _applied_events(strict_service.url) - applied_before == clients * batches * per_batch


def test_parity_with_offline_recommend(client: HyTRecClient, service_checkpoint, tmp_path: Path) -> None:  # noqa: F811
    """3,000 events posted in random-size batches give the top-10 of `hytrec recommend --history`."""
    log = generate(SynthConfig(n_users=1, n_items=300, events_per_user=3000, seed=3))
    path = tmp_path / "history.tsv"
    write_interactions(log, path)
    user_id = f"synth-{log.users[0]}"
    order = np.argsort(log.timestamps, kind="stable")
    events = [{"user_id": user_id, "item_id": str(log.items[i]), "ts": float(log.timestamps[i])} for i in order]
    rng = random.Random(7)
    pos = 0
    while pos < len(events):
        size = rng.randint(1, 200)
        client.post_events(events[pos : pos + size])
        pos += size
    at = float(log.timestamps.max()) + 30.0
    online = client.recommendations(user_id, k=10, at=at)
    out = subprocess.run(
        [sys.executable, "-m", "hytrec.cli", "recommend", "--model", str(service_checkpoint.path),
         "--history", str(path), "--user", str(log.users[0]), "--at", repr(at), "-k", "10", "--json"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    offline = json.loads(out.stdout)
    assert online.history_length == offline["history_length"] == 3000
    assert [i.item_id for i in online.items] == [i["item_id"] for i in offline["items"]]
    for a, b in zip(online.items, offline["items"], strict=True):
        assert abs(a.score - b["score"]) <= 1e-3 * max(abs(b["score"]), 1e-6)
