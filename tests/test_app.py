"""The app in process (httpx's ASGI transport, lifespan run) over a real Redis: the fast paths of the service.

The process-level behaviour (workers, signals, the CLI) is in test_service.py; here each case costs
milliseconds, so the corners get covered: limits from the settings in validation and in the OpenAPI, corrupt
stored states, readiness, schema-true answers.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis

from hytrec.service.app import create_app
from hytrec.service.schemas import IngestResult, Recommendations, UserSummary
from hytrec.service.settings import Settings
from hytrec.state_store import metrics as store_metrics
from tests.service_fixtures import Checkpoint

T0 = 1_700_000_000.0


@asynccontextmanager
async def running(
    settings: Settings, wait_ready: bool = True, hold: threading.Event | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The app with its lifespan running, and an httpx client talking ASGI to it.

    ``hold``: the torch thread waits for it before anything else, so the model cannot load until it is set.
    """
    app = create_app(settings)
    if hold is not None:
        app.state.lifecycle.executor.submit(hold.wait)
    async with app.router.lifespan_context(app):
        lifecycle = app.state.lifecycle
        if wait_ready:  # until the runtime is built or the start-up failed
            for _ in range(1000):
                if lifecycle.runtime is not None or lifecycle.error is not None:
                    break
                await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client, app


def settings_for(ckpt: Checkpoint, redis_url: str, **extra: Any) -> Settings:
    return Settings(model=ckpt.path, redis_url=redis_url, key_prefix=f"a{uuid.uuid4().hex[:10]}", **extra)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def events(user: str, n: int, start: int = 1) -> list[dict[str, Any]]:
    return [
        {"user_id": user, "item_id": str(i), "ts": T0 + 60 * i, "event_id": f"{user}-{i}"}
        for i in range(start, n + start)
    ]


def test_limits_come_from_the_settings_in_validation_and_openapi(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    s = settings_for(service_checkpoint, redis_standalone_url, max_k=7, max_batch_events=5, admin_keys="adm")

    async def body() -> None:
        async with running(s) as (client, app):
            assert app.state.lifecycle.runtime is not None
            doc = (await client.get("/openapi.json")).json()
            get = doc["paths"]["/v1/users/{user_id}/recommendations"]["get"]
            k = next(p for p in get["parameters"] if p["name"] == "k")
            assert k["schema"]["maximum"] == 7 and k["schema"]["minimum"] == 1
            assert doc["components"]["schemas"]["EventBatch"]["properties"]["events"]["maxItems"] == 5
            offset = doc["components"]["schemas"]["RankRequest"]["properties"].get("offset")
            cats = doc["components"]["schemas"]["SessionRequest"]["properties"]["categories"]
            assert not app.state.lifecycle.runtime.catalogue.categories and offset is None  # no items file here
            assert cats["maxItems"] == 0 and "enum" not in cats["items"]  # so no category may be asked for
            assert doc["components"]["schemas"]["SessionRequest"]["properties"]["offset"]["maximum"] == 7
            ops = {op["operationId"]: op["tags"] for path in doc["paths"].values() for op in path.values()}
            assert ops == {
                "post_events": ["events"],
                "get_recommendations": ["users"],
                "get_user": ["users"],
                "delete_user": ["users"],
                "get_model": ["model"],
                "list_items": ["items"],
                "get_item": ["items"],
                "similar_items": ["items"],
                "flag_item": ["admin"],
                "flag_items": ["admin"],
                "rank_candidates": ["recommendations"],
                "session_recommendations": ["recommendations"],
                "batch_recommendations": ["recommendations"],
                "healthz": ["operations"],
                "readyz": ["operations"],
                "get_versions": ["admin"],
                "set_versions": ["admin"],
            }
            too_many = await client.post("/v1/events", json={"events": events("lim", 6)})
            assert too_many.status_code == 422 and too_many.json()["errors"][0]["field"] == "events"
            assert (await client.get("/v1/users/lim")).status_code == 404  # nothing applied
            assert (await client.post("/v1/events", json={"events": events("lim", 5)})).status_code == 200
            big_k = await client.get("/v1/users/lim/recommendations", params={"k": 8})
            assert big_k.status_code == 422 and big_k.json()["errors"][0]["field"] == "k"
            assert len((await client.get("/v1/users/lim/recommendations", params={"k": 7})).json()["items"]) == 7

    run(body)


def test_answers_match_their_schemas_and_exclude_seen_filters_the_ranking(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    s = settings_for(service_checkpoint, redis_standalone_url)

    async def body() -> None:
        async with running(s) as (client, _):
            posted = await client.post("/v1/events", json={"events": events("sch", 30)})
            assert IngestResult.model_validate(posted.json()).applied == 30
            params = {"k": 10, "at": T0 + 5000}
            rec = Recommendations.model_validate(
                (await client.get("/v1/users/sch/recommendations", params=params)).json()
            )
            full = Recommendations.model_validate(
                (
                    await client.get("/v1/users/sch/recommendations", params={**params, "k": 60, "exclude_seen": False})
                ).json()
            )
            seen = {str(i) for i in range(1, 31)}
            unseen = [(i.item_id, i.score) for i in full.items if i.item_id not in seen]
            assert len(unseen) >= 10  # 60 over 300 items: at most 30 of them seen
            # the filtered answer is the unfiltered ranking with the seen items taken out, same scores
            assert [(i.item_id, i.score) for i in rec.items] == unseen[:10]
            summary = UserSummary.model_validate((await client.get("/v1/users/sch")).json())
            # fewer events than the window: the padding rows of the ring buffer are not reported
            assert summary.history_length == 30 and [e.item_id for e in summary.recent] == [
                str(i) for i in range(1, 31)
            ]

    run(body)


def test_corrupt_state_is_never_served_nor_overwritten(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    s = settings_for(service_checkpoint, redis_standalone_url)

    async def body() -> None:
        async with running(s) as (client, app):
            await client.post("/v1/events", json={"events": events("bad", 5) + events("good", 5)})
            store = app.state.lifecycle.runtime.store
            key = store.keys.state("bad")
            r = redis.Redis.from_url(redis_standalone_url)
            blob = r.hget(key, "blob")
            r.hset(key, "blob", blob[:40] + bytes([blob[40] ^ 0x01]) + blob[41:])
            flipped = r.hget(key, "blob")
            before = store_metrics.CORRUPT_VALUES._value.get()

            rec = (await client.get("/v1/users/bad/recommendations", params={"k": 5})).json()
            assert rec["fallback"] == "popularity" and len(rec["items"]) == 5 and rec["history_length"] == 0
            post = await client.post("/v1/events", json={"events": events("bad", 2, start=50) + events("good", 1, 60)})
            assert post.status_code == 500 and post.json()["type"].endswith("/corrupt-state")
            assert "'bad'" in post.json()["detail"]
            user = await client.get("/v1/users/bad")
            assert user.status_code == 500 and user.json()["type"].endswith("/corrupt-state")
            assert r.hget(key, "blob") == flipped and r.hget(key, "ver") == b"1"  # left for DELETE or a backfill
            assert store_metrics.CORRUPT_VALUES._value.get() == before + 3
            good = (await client.get("/v1/users/good")).json()
            assert good["history_length"] == 5  # the batch that met the corrupt user applied nothing
            assert (await client.delete("/v1/users/bad")).json()["deleted"] is True
            assert (await client.post("/v1/events", json={"events": events("bad", 2)})).status_code == 200

    run(body)


def test_not_ready_is_503_with_retry_after(service_checkpoint: Checkpoint, redis_standalone_url: str) -> None:
    s = settings_for(service_checkpoint, redis_standalone_url, retry_after_s=3)

    async def body() -> None:
        release = threading.Event()
        async with running(s, wait_ready=False, hold=release) as (client, _):
            for resp in (
                await client.get("/readyz"),
                await client.post("/v1/events", json={"events": events("nr", 1)}),
                await client.get("/v1/users/nr/recommendations"),
            ):
                assert resp.status_code == 503 and resp.headers["retry-after"] == "3"
                assert resp.json()["type"].endswith("/not-ready") and "not ready" in resp.json()["detail"]
            health = await client.get("/healthz")
            assert health.status_code == 200 and health.json() == {"status": "ok", "model_version": None}
            release.set()
            for _ in range(1000):
                if (await client.get("/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            assert (await client.get("/readyz")).json()["status"] == "ready"

    run(body)


def test_a_model_that_cannot_load_fails_health(tmp_path: Any, redis_standalone_url: str) -> None:
    s = Settings(model=tmp_path / "nothing", redis_url=redis_standalone_url)

    async def body() -> None:
        async with running(s) as (client, app):
            assert app.state.lifecycle.runtime is None
            health = await client.get("/healthz")
            assert health.status_code == 503 and "cannot load the model" in health.json()["detail"]
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and "cannot load the model" in ready.json()["detail"]

    run(body)


def test_items_are_listed_in_pages_with_their_popularity(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    s = settings_for(service_checkpoint, redis_standalone_url)

    async def body() -> None:
        async with running(s) as (client, app):
            seen, offset, pages = [], 0, 0
            while offset is not None:
                page = (await client.get("/v1/items", params={"offset": offset, "limit": 128})).json()
                assert page["total"] == len(service_checkpoint.item_ids) and page["offset"] == offset
                seen += page["items"]
                offset, pages = page["next_offset"], pages + 1
            assert pages == 3 and [i["item_id"] for i in seen] == service_checkpoint.item_ids
            vocab = app.state.lifecycle.runtime.model.vocab
            assert [i["popularity"] for i in seen] == vocab.popularity.tolist()
            past = (await client.get("/v1/items", params={"offset": 10_000})).json()
            assert past["items"] == [] and past["next_offset"] is None
            bad = await client.get("/v1/items", params={"limit": 0})
            assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "limit"

    run(body)


def test_concurrent_posts_for_one_user_merge_into_one_write(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    """Single flight: 16 concurrent single-event posts for one user, no compare-and-set retries allowed and no
    client retries: inside one worker they are merged, so none races another and every event is applied."""
    s = settings_for(service_checkpoint, redis_standalone_url, cas_max_retries=0)

    async def body() -> None:
        release = threading.Event()
        async with running(s) as (client, app):
            sizes_before = _batch_sizes(app)
            app.state.lifecycle.executor.submit(release.wait)  # hold the torch thread so the posts pile up
            posts = [
                client.post("/v1/events", json={"events": [{"user_id": "hot", "item_id": str(i), "ts": T0 + i}]})
                for i in range(1, 17)
            ]
            tasks = [asyncio.create_task(p) for p in posts]
            await asyncio.sleep(0.2)
            release.set()
            answers = await asyncio.gather(*tasks)
            assert [a.status_code for a in answers] == [200] * 16
            assert sum(a.json()["applied"] for a in answers) == 16
            assert (await client.get("/v1/users/hot")).json()["history_length"] == 16
            # 16 posts in at most 2 writes: the one held in the torch thread, then all the others together
            assert _batch_sizes(app) - sizes_before <= 2

    run(body)


def _batch_sizes(app: Any) -> float:
    """How many events batches ran so far (the _count of hytrec_microbatch_size{path="events"})."""
    from hytrec.service import metrics

    for metric in metrics.MICROBATCH_SIZE.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels.get("path") == "events":
                return sample.value
    return 0.0


@pytest.mark.parametrize(
    ("limits", "reason", "admitted"),
    [
        # the in-flight cap: 6 admitted (1 taken by the batcher, 5 queued), 4 answered at once
        ({"max_in_flight": 6, "max_queue": 100}, "6 requests in flight", {6}),
        # the queue bound, checked at admission: 3 queued plus the one the batcher may have taken first
        ({"max_in_flight": 100, "max_queue": 3}, "3 requests already queued", {3, 4}),
    ],
)
def test_overload_is_shed_at_once_with_retry_after(
    service_checkpoint: Checkpoint, redis_standalone_url: str, limits: dict, reason: str, admitted: set[int]
) -> None:
    """With the torch thread held, the excess over a bound is answered 503 overloaded with Retry-After while the
    admitted requests are still waiting, and every admitted one is served once the thread is free."""
    s = settings_for(
        service_checkpoint,
        redis_standalone_url,
        request_timeout_ms=60_000,
        max_queue_delay_ms=60_000,  # this test is about the two counts; the next one sheds by delay
        **limits,
    )

    async def body() -> None:
        release = threading.Event()
        async with running(s) as (client, app):
            await client.post("/v1/events", json={"events": events("ov", 3)})
            app.state.lifecycle.executor.submit(release.wait)
            tasks = []
            for _ in range(10):
                tasks.append(asyncio.create_task(client.get("/v1/users/ov/recommendations")))
                await asyncio.sleep(0.01)  # in order: the first ones reach the queue first
            for _ in range(500):  # until the shed ones are answered (a loaded machine is slow)
                await asyncio.sleep(0.01)
                if sum(t.done() for t in tasks) >= 10 - max(admitted):
                    break
            await asyncio.sleep(0.2)
            shed = [t.result() for t in tasks if t.done()]
            assert 10 - len(shed) in admitted
            for resp in shed:
                assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
                assert resp.json()["type"].endswith("/overloaded") and f"({reason})" in resp.json()["detail"]
            release.set()
            served = await asyncio.gather(*[t for t in tasks if not t.done()])
            assert [r.status_code for r in served] == [200] * (10 - len(shed))  # every admitted one served
            assert (await client.get("/v1/users/ov/recommendations")).status_code == 200  # recovered

    run(body)


def test_a_standing_queue_is_shed_before_the_request_is_parsed(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    """Once the oldest queued request has waited HYTREC_MAX_QUEUE_DELAY_MS, new arrivals for that batcher are
    answered 503 at the guard, before their body is even read (a malformed body gets 503, not 422), while
    the other batcher's routes and the queued requests are unaffected."""
    s = settings_for(service_checkpoint, redis_standalone_url, max_queue_delay_ms=50, request_timeout_ms=60_000)

    async def body() -> None:
        release = threading.Event()
        async with running(s) as (client, app):
            assert (await client.post("/v1/events", json={"events": events("qd", 2)})).status_code == 200
            before = _shed(app, "recommend", "queue_delay")
            app.state.lifecycle.executor.submit(release.wait)  # the torch thread is busy: nothing drains
            first = asyncio.create_task(client.get("/v1/users/qd/recommendations"))  # the batch in progress
            await asyncio.sleep(0.05)
            queued = asyncio.create_task(client.get("/v1/users/qd/recommendations"))  # waits behind it
            await asyncio.sleep(0.2)  # the queued one is now older than 50 ms
            shed = await client.get("/v1/users/qd/recommendations")  # over the target for over 100 ms
            assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
            assert shed.json()["type"].endswith("/overloaded") and "not draining" in shed.json()["detail"]
            assert _shed(app, "recommend", "queue_delay") == before + 1
            assert (await client.get("/v1/model")).status_code == 200  # other routes are not shed
            release.set()
            assert (await first).status_code == 200 and (await queued).status_code == 200
            assert (await client.get("/v1/users/qd/recommendations")).status_code == 200  # drained: admitted

    run(body)


def test_a_queue_over_its_delay_target_for_less_than_the_interval_sheds_nothing(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    """CoDel's interval: a queue over HYTREC_MAX_QUEUE_DELAY_MS is shed only once it has stayed over it for
    HYTREC_QUEUE_STANDING_MS, so a stall shorter than that (one long batch, a collector pause) costs no 503."""
    s = settings_for(
        service_checkpoint,
        redis_standalone_url,
        max_queue_delay_ms=50,
        queue_standing_ms=1500,
        request_timeout_ms=60_000,
    )

    async def body() -> None:
        release = threading.Event()
        async with running(s) as (client, app):
            assert (await client.post("/v1/events", json={"events": events("qs", 2)})).status_code == 200
            before = _shed(app, "recommend", "queue_delay")
            app.state.lifecycle.executor.submit(release.wait)  # the torch thread is busy: nothing drains
            first = asyncio.create_task(client.get("/v1/users/qs/recommendations"))
            await asyncio.sleep(0.05)
            queued = asyncio.create_task(client.get("/v1/users/qs/recommendations"))
            await asyncio.sleep(0.25)  # the queued one waited 250 ms, over the 50 ms target for about 200 ms
            admitted = asyncio.create_task(client.get("/v1/users/qs/recommendations"))
            await asyncio.sleep(1.5)  # now over the target for longer than the 1.5 s interval
            shed = await client.get("/v1/users/qs/recommendations")
            assert shed.status_code == 503 and "not draining" in shed.json()["detail"]
            assert _shed(app, "recommend", "queue_delay") == before + 1
            release.set()
            for task in (first, queued, admitted):
                assert (await task).status_code == 200

    run(body)


def _shed(app: Any, path: str, reason: str) -> float:
    from hytrec.service import metrics

    return metrics.SHED.labels(path, reason)._value.get()


def test_a_request_past_its_deadline_is_answered_503(service_checkpoint: Checkpoint, redis_standalone_url: str) -> None:
    s = settings_for(service_checkpoint, redis_standalone_url, request_timeout_ms=150)

    async def body() -> None:
        release = threading.Event()
        async with running(s) as (client, app):
            app.state.lifecycle.executor.submit(release.wait)
            try:
                resp = await client.post("/v1/events", json={"events": events("late", 2)})
            finally:
                release.set()
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
            assert "HYTREC_REQUEST_TIMEOUT_MS = 150 ms" in resp.json()["detail"]

    run(body)


def test_the_product_posts_are_shed_before_their_body_is_parsed(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    """Rank, session and batch POSTs go through the recommendation batcher: under its pressure they are answered
    503 at the guard, a malformed body included (it is never read), while /v1/events still parses (400)."""
    s = settings_for(service_checkpoint, redis_standalone_url, max_queue_delay_ms=50, request_timeout_ms=60_000)

    async def body() -> None:
        release = threading.Event()
        async with running(s) as (client, app):
            assert (await client.post("/v1/events", json={"events": events("qp", 2)})).status_code == 200
            before = _shed(app, "recommend", "queue_delay")
            app.state.lifecycle.executor.submit(release.wait)
            first = asyncio.create_task(client.get("/v1/users/qp/recommendations"))
            await asyncio.sleep(0.05)
            queued = asyncio.create_task(client.get("/v1/users/qp/recommendations"))
            await asyncio.sleep(0.2)
            bad = {"content": b"{not json", "headers": {"content-type": "application/json"}}
            paths = ("/v1/users/qp/rank", "/v1/sessions/recommendations", "/v1/recommendations:batch")
            for path in paths:
                shed = await client.post(path, **bad)
                assert shed.status_code == 503 and shed.headers["retry-after"] == "1", (path, shed.text)
                assert shed.json()["type"].endswith("/overloaded"), path
            assert _shed(app, "recommend", "queue_delay") == before + len(paths)
            assert (await client.post("/v1/events", **bad)).status_code == 400  # its batcher drains: parsed
            release.set()
            assert (await first).status_code == 200 and (await queued).status_code == 200
            assert (await client.post("/v1/users/qp/rank", **bad)).status_code == 400  # drained: parsed again

    run(body)


def test_the_hot_routes_answers_match_their_documented_schemas(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    """The events and recommendations routes answer with their models' own serializer, past FastAPI's response
    validation: their JSON must still validate against the ``response_model`` the OpenAPI document names."""
    from hytrec.service.schemas import IngestResult, Recommendations

    s = settings_for(service_checkpoint, redis_standalone_url)

    async def body() -> None:
        async with running(s) as (client, _):
            posted = await client.post("/v1/events", json={"events": events("schema", 3)})
            assert posted.status_code == 200 and posted.headers["content-type"] == "application/json"
            ingest = IngestResult.model_validate_json(posted.content)
            assert ingest.applied == 3
            for query in ("", "?k=3&exclude_seen=false"):
                got = await client.get(f"/v1/users/schema/recommendations{query}")
                assert got.status_code == 200 and got.headers["content-type"] == "application/json"
                answer = Recommendations.model_validate_json(got.content)
                assert answer.user_id == "schema" and answer.had_state and answer.history_length == 3
                assert len(answer.items) == (3 if query else 10)
            doc = (await client.get("/openapi.json")).json()["paths"]
            for path, method, name in (
                ("/v1/events", "post", "IngestResult"),
                ("/v1/users/{user_id}/recommendations", "get", "Recommendations"),
            ):
                schema = doc[path][method]["responses"]["200"]["content"]["application/json"]["schema"]
                assert schema == {"$ref": f"#/components/schemas/{name}"}

    run(body)


def test_a_loop_that_stays_behind_sheds_at_admission_and_recovers(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    """The event loop blocked for 300 ms (a callback hogging it, as parsing a flood of bodies does): the request
    that was waiting behind it is answered 503 overloaded by the guard, before its body is read; once the loop
    keeps time again, the same request is served."""
    s = settings_for(service_checkpoint, redis_standalone_url, max_loop_lag_ms=20, queue_standing_ms=50)

    async def body() -> None:
        async with running(s) as (client, _app):
            await asyncio.sleep(0.1)  # the sampler keeps time
            before = _shed(_app, "admission", "loop_lag")
            asyncio.get_running_loop().call_soon(time.sleep, 0.3)
            await asyncio.sleep(0)  # the loop runs the hog; this request is parsed right after it
            resp = await client.post("/v1/events", json={"events": events("lag", 2)})
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1", resp.text
            assert resp.json()["type"].endswith("/overloaded") and "event loop" in resp.json()["detail"]
            assert _shed(_app, "admission", "loop_lag") == before + 1
            assert "may_have_applied" not in resp.json()  # shed before the route: nothing applied
            await asyncio.sleep(0.1)  # on time again
            ok = await client.post("/v1/events", json={"events": events("lag", 2)})
            assert ok.status_code == 200 and ok.json()["applied"] == 2, ok.text

    run(body)
