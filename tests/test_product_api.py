"""The product routes on the demo model over a real Redis: filters, candidate ranking, similar items, sessions,
batch, the live catalogue (metadata, hidden flags across worker processes), event types and the limits.

Every filtered answer is checked against the full-catalogue ranking filtered in Python.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from hytrec.model.serving import ServingModel
from hytrec.service.catalogue import Catalogue, read_items_file
from hytrec.service.settings import Settings, demo_model
from tests.service_fixtures import ServiceProcess
from tests.test_app import run, running

T0 = 1_700_000_000.0
DEMO = demo_model()
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def demo_settings(redis_url: str, **extra: Any) -> Settings:
    return Settings(model=DEMO, redis_url=redis_url, key_prefix=f"p{uuid.uuid4().hex[:10]}", **extra)


def visit(user: str | None, items: list[str], types: list[str | None] | None = None) -> list[dict[str, Any]]:
    out = []
    for n, item in enumerate(items):
        e: dict[str, Any] = {"item_id": item, "ts": T0 + 60 * n}
        if user is not None:
            e |= {"user_id": user, "event_id": f"{user}-{n}"}
        if types is not None and types[n] is not None:
            e["event_type"] = types[n]
        out.append(e)
    return out


HISTORY = [str(i) for i in (335, 397, 194, 17, 139, 159, 112, 470, 219, 359, 5, 6, 7, 8, 9)]
AT = T0 + 3600


@pytest.fixture(scope="module")
def genres() -> dict[str, list[str]]:
    return {k: v[1] for k, v in read_items_file(DEMO / "catalogue.tsv").items()}


async def full(client: httpx.AsyncClient, user: str, exclude_seen: bool = False) -> list[tuple[str, float]]:
    r = await client.get(f"/v1/users/{user}/recommendations", params={"k": 500, "exclude_seen": exclude_seen, "at": AT})
    assert r.status_code == 200, r.text
    return [(i["item_id"], i["score"]) for i in r.json()["items"]]


def test_catalogue_reads_the_items_file_through_the_vocabulary(redis_standalone_url: str) -> None:
    model = ServingModel.load(DEMO)
    cat = Catalogue.load(model.vocab, DEMO / "catalogue.tsv")
    assert cat.unknown_in_file == 0 and len(cat.item_categories) == 500 and len(cat.categories) == 20
    page_cat = Catalogue(model.vocab, {"1": ("One", ["a", "b"]), "no-such": ("x", ["c"])})
    assert page_cat.unknown_in_file == 1 and set(page_cat.categories) == {"a", "b"}

    async def body() -> None:
        async with running(demo_settings(redis_standalone_url)) as (client, _):
            page = (await client.get("/v1/items", params={"limit": 3})).json()
            assert page["total"] == 500 and all(i["categories"] and not i["hidden"] for i in page["items"])
            one = (await client.get("/v1/items/1")).json()
            assert one["categories"] == ["genre-5"] and one["title"] == "Item 1" and one["hidden"] is False
            missing = await client.get("/v1/items/99999")
            assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/problem")

    run(body)


@pytest.mark.skipif(not (SHARED / "ml-1m" / "items.tsv").is_file(), reason="ML-1M not available beside the repo")
def test_movielens_genres_are_read_at_run_time_from_shared_data() -> None:
    vocab = ServingModel.load(Path(__file__).resolve().parents[1] / "models" / "ml1m-hytrec").vocab
    cat = Catalogue.load(vocab, SHARED / "ml-1m" / "items.tsv")
    assert len(cat.item_categories) == vocab.n_items and "Comedy" in cat.categories


def test_filtered_and_paged_answers_equal_the_full_ranking_filtered_in_python(
    redis_standalone_url: str, genres: dict[str, list[str]]
) -> None:
    async def body() -> None:
        async with running(demo_settings(redis_standalone_url, admin_keys="adm")) as (client, _):
            assert (await client.post("/v1/events", json={"events": visit("f1", HISTORY)})).status_code == 200
            ranking = await full(client, "f1")
            assert len(ranking) == 500
            seen = set(HISTORY)

            async def ask(**params: Any) -> dict[str, Any]:
                r = await client.get("/v1/users/f1/recommendations", params={"at": AT, **params})
                assert r.status_code == 200, r.text
                return r.json()

            def pairs(doc: dict[str, Any]) -> list[tuple[str, float]]:
                return [(i["item_id"], i["score"]) for i in doc["items"]]

            doc_api = (await client.get("/openapi.json")).json()
            listed = doc_api["components"]["schemas"]["RankRequest"]["properties"]["categories"]["items"]["enum"]
            assert listed == sorted({g for gs in genres.values() for g in gs})  # the catalogue's, documented
            plain = await ask(k=10)
            assert pairs(plain) == [p for p in ranking if p[0] not in seen][:10]
            assert plain["filtered_out"] == len(seen) and plain["had_state"] and not plain["exhausted"]
            exclude = [p[0] for p in ranking[:30:3]]
            cats = ["genre-3", "genre-7"]
            doc = await ask(k=12, exclude=exclude, categories=cats, offset=5, exclude_seen=False)
            keep = [p for p in ranking if p[0] not in exclude and set(genres[p[0]]) & set(cats)]
            assert pairs(doc) == keep[5:17] and doc["offset"] == 5
            assert doc["filtered_out"] == 500 - len(keep)
            # fewer than k survive: the answer says so, nothing padded
            few = await ask(k=100, categories=["genre-1"], exclude_seen=True)
            only = [p for p in ranking if p[0] not in seen and genres[p[0]] == ["genre-1"]]
            assert pairs(few) == only and few["exhausted"] and len(only) < 100
            # a hidden item is never recommended, on the model path and the popularity fallback
            top = plain["items"][0]["item_id"]
            popular = (await client.get("/v1/users/nobody/recommendations", params={"k": 3})).json()
            assert popular["fallback"] == "popularity" and not popular["had_state"]
            adm = {"Authorization": "Bearer adm"}
            for item in (top, popular["items"][0]["item_id"]):
                r = await client.put(f"/v1/admin/items/{item}", json={"hidden": True}, headers=adm)
                assert r.status_code == 200 and r.json()["hidden"] is True
            hidden = await ask(k=10)
            assert top not in [i["item_id"] for i in hidden["items"]]
            assert (
                pairs(hidden) == [p for p in ranking if p[0] not in seen | {top, popular["items"][0]["item_id"]}][:10]
            )
            fallback = (await client.get("/v1/users/nobody/recommendations", params={"k": 3})).json()
            assert [i["item_id"] for i in fallback["items"]] == [i["item_id"] for i in popular["items"][1:]] + [
                fallback["items"][-1]["item_id"]
            ]
            assert fallback["filtered_out"] == 2
            # events on a hidden item are still applied
            r = await client.post("/v1/events", json={"events": [{"user_id": "f1", "item_id": top, "ts": T0 + 1e4}]})
            assert r.json()["applied"] == 1
            assert (await client.get("/v1/users/f1")).json()["history_length"] == len(HISTORY) + 1
            bulk = await client.put(
                "/v1/admin/items", json={"item_ids": [top, "zzz-unknown"], "hidden": False}, headers=adm
            )
            assert bulk.json()["changed"] == [top] and bulk.json()["unknown"] == ["zzz-unknown"]
            assert (await client.get(f"/v1/items/{top}")).json()["hidden"] is False

    run(body)


def test_rank_is_the_full_catalogue_scores_restricted_to_the_candidates(redis_standalone_url: str) -> None:
    async def body() -> None:
        async with running(demo_settings(redis_standalone_url, admin_keys="adm")) as (client, _):
            await client.post("/v1/events", json={"events": visit("r1", HISTORY)})
            scores = dict(await full(client, "r1"))
            cands = ["42", "7", "300", "no-such", "335", "499", "42", "120", "61"]
            await client.put("/v1/admin/items/300", json={"hidden": True}, headers={"Authorization": "Bearer adm"})
            r = await client.post("/v1/users/r1/rank", json={"candidates": cands, "exclude": ["61"], "at": AT})
            assert r.status_code == 200, r.text
            doc = r.json()
            assert doc["unknown"] == ["no-such"] and doc["hidden"] == ["300"] and doc["filtered"] == ["61"]
            want = sorted(["42", "7", "335", "499", "120"], key=lambda c: -scores[c])
            assert [i["item_id"] for i in doc["items"]] == want  # 335 was seen: exclude_seen is off here
            for i in doc["items"]:
                assert i["score"] == pytest.approx(scores[i["item_id"]], rel=1e-5, abs=1e-5)
            seen = await client.post("/v1/users/r1/rank", json={"candidates": cands, "exclude_seen": True, "at": AT})
            assert "335" in seen.json()["filtered"] and "7" in seen.json()["filtered"]
            cold = (await client.post("/v1/users/cold/rank", json={"candidates": ["335", "1"]})).json()
            assert cold["fallback"] == "popularity" and [i["item_id"] for i in cold["items"]] == ["335", "1"]

    run(body)


def test_similar_items_are_the_exact_cosine_neighbours(redis_standalone_url: str, genres: dict[str, list[str]]) -> None:
    model = ServingModel.load(DEMO)
    emb = torch.nn.functional.normalize(model.model.item_emb.weight[2:].detach(), dim=1)
    idx = model.row("17") - 2
    cos = (emb @ emb[idx]).tolist()
    order = sorted((i for i in range(500) if i != idx), key=lambda i: -cos[i])

    async def body() -> None:
        async with running(demo_settings(redis_standalone_url)) as (client, _):
            doc = (await client.get("/v1/items/17/similar", params={"k": 5})).json()
            assert [i["item_id"] for i in doc["items"]] == [model.item_ids[i] for i in order[:5]]
            assert doc["items"][0]["score"] == pytest.approx(cos[order[0]], abs=1e-6)
            g = genres["17"][0]
            doc = (await client.get("/v1/items/17/similar", params={"k": 5, "categories": g, "offset": 2})).json()
            same = [model.item_ids[i] for i in order if genres[model.item_ids[i]] == [g]]
            assert [i["item_id"] for i in doc["items"]] == same[2:7]
            assert (await client.get("/v1/items/nope/similar")).status_code == 404

    run(body)


def test_session_answers_equal_the_stored_user_path(redis_standalone_url: str) -> None:
    async def body() -> None:
        s = demo_settings(redis_standalone_url, never_again_types="purchase", count_only_types="impression")
        async with running(s) as (client, _):
            types = [None, "view", "purchase", "impression", None] * 3
            for n, items in enumerate((HISTORY, [str(i) for i in range(100, 180)])):  # steps and chunked form
                ty = (types * 6)[: len(items)]
                user = f"s{n}"
                posted = (await client.post("/v1/events", json={"events": visit(user, items, ty)})).json()
                assert posted["counted_only"] == ty.count("impression") and posted["never_again"] == ty.count(
                    "purchase"
                )
                stored = (await client.get(f"/v1/users/{user}/recommendations", params={"k": 20, "at": AT})).json()
                sess = await client.post(
                    "/v1/sessions/recommendations", json={"events": visit(None, items, ty), "k": 20, "at": AT}
                )
                assert sess.status_code == 200, sess.text
                assert sess.json()["items"] == stored["items"] and sess.json()["filtered_out"] == stored["filtered_out"]
                assert sess.json()["history_length"] == stored["history_length"]
                bought = [i for i, t in zip(items, ty, strict=True) if t == "purchase"]
                assert bought and not set(bought) & {i["item_id"] for i in stored["items"]}
            # the never-again set outlives the ring buffer: a purchase 80 events back is still excluded
            long_ago = [i for i, t in zip([str(i) for i in range(100, 180)], (types * 6)[:80], strict=True)][2]
            again = await client.get("/v1/users/s1/recommendations", params={"k": 500, "at": AT})
            assert long_ago not in {i["item_id"] for i in again.json()["items"]}
            assert long_ago in {i for i, _ in await full(client, "s1")}
            assert (await client.get("/v1/users/nobody-s")).status_code == 404  # sessions wrote nothing

    run(body)


def test_batch_equals_single_answers_and_a_bad_id_fails_only_its_entry(redis_standalone_url: str) -> None:
    async def body() -> None:
        async with running(demo_settings(redis_standalone_url)) as (client, _):
            await client.post("/v1/events", json={"events": visit("b1", HISTORY)})
            await client.post("/v1/events", json={"events": visit("b2", HISTORY[:5])})
            entries = [
                {"user_id": "b1", "k": 5, "at": AT},
                {"user_id": "bad id!", "k": 5},
                {"user_id": "b2", "k": 7, "categories": ["genre-2"], "offset": 1, "at": AT},
                {"user_id": "b3-cold", "k": 3, "exclude": ["335"], "at": AT},
                {"user_id": "b1", "k": 3, "categories": ["no-such-genre"], "at": AT},
            ]
            r = await client.post("/v1/recommendations:batch", json={"requests": entries})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert [x["error"] is None for x in results] == [True, False, True, True, False]
            assert results[1]["error"]["status"] == 422 and "user_id" in results[1]["error"]["detail"]
            assert results[4]["error"]["status"] == 422 and "no-such-genre" in results[4]["error"]["detail"]
            for e, res in zip(entries, results, strict=True):
                if res["error"] is None:
                    params = {k: v for k, v in e.items() if k != "user_id"}
                    single = (await client.get(f"/v1/users/{e['user_id']}/recommendations", params=params)).json()
                    got, alone = res["recommendations"]["items"], single["items"]
                    # same items in the same order; scores equal up to float32 rounding of a batched product
                    assert [i["item_id"] for i in got] == [i["item_id"] for i in alone]
                    assert [i["score"] for i in got] == pytest.approx([i["score"] for i in alone], rel=1e-5)
                    assert res["recommendations"]["filtered_out"] == single["filtered_out"]

    run(body)


def test_every_list_and_bound_is_limited_with_a_problem_naming_the_field(redis_standalone_url: str) -> None:
    s = demo_settings(
        redis_standalone_url,
        admin_keys="adm",
        max_k=20,
        max_filter_items=2,
        max_candidates=3,
        max_session_events=2,
        max_batch_users=2,
        max_hide_items=2,
    )

    async def body() -> None:
        async with running(s) as (client, _):
            adm = {"Authorization": "Bearer adm"}
            cases = [
                (client.get("/v1/users/u/recommendations", params={"exclude": ["1", "2", "3"]}), "exclude"),
                (client.get("/v1/users/u/recommendations", params={"categories": ["a", "b", "c"]}), "categories"),
                (client.get("/v1/users/u/recommendations", params={"categories": ["nope"]}), "categories"),
                (client.get("/v1/users/u/recommendations", params={"offset": 21}), "offset"),
                (client.get("/v1/items/1/similar", params={"k": 21}), "k"),
                (client.post("/v1/users/u/rank", json={"candidates": ["1", "2", "3", "4"]}), "candidates"),
                (client.post("/v1/users/u/rank", json={"candidates": ["1"], "exclude": ["1", "2", "3"]}), "exclude"),
                (client.post("/v1/sessions/recommendations", json={"events": visit(None, ["1", "2", "3"])}), "events"),
                (client.post("/v1/sessions/recommendations", json={"events": [], "k": 21}), "k"),
                (client.post("/v1/recommendations:batch", json={"requests": [{"user_id": "a"}] * 3}), "requests"),
                (
                    client.put("/v1/admin/items", json={"item_ids": ["1", "2", "3"], "hidden": True}, headers=adm),
                    "item_ids",
                ),
                (client.put("/v1/admin/items/1", json={"hidden": "maybe"}, headers=adm), "hidden"),
                (client.post("/v1/users/u/rank", json={"candidates": ["bad id"]}), "candidates[0]"),
            ]
            for request, field in cases:
                r = await request
                assert r.status_code == 422, (field, r.text)
                assert r.headers["content-type"].startswith("application/problem+json")
                assert r.json()["errors"][0]["field"] == field, r.json()

    run(body)


def test_hiding_reaches_a_second_worker_process_within_a_second(redis_standalone_url: str, tmp_path: Path) -> None:
    prefix = f"w{uuid.uuid4().hex[:10]}"
    env = {
        "HYTREC_REDIS_URL": redis_standalone_url,
        "HYTREC_KEY_PREFIX": prefix,
        "HYTREC_ADMIN_KEYS": "adm",
    }
    a = ServiceProcess(dict(env), tmp_path)
    b = ServiceProcess(dict(env), tmp_path)
    a.launch()
    b.launch()
    try:
        a.wait_for()
        b.wait_for()
        item = httpx.get(b.url + "/v1/users/nobody/recommendations", params={"k": 1}).json()["items"][0]["item_id"]

        def top_on_b() -> str:
            return httpx.get(b.url + "/v1/users/nobody/recommendations", params={"k": 1}).json()["items"][0]["item_id"]

        for hidden, want in ((True, lambda got: got != item), (False, lambda got: got == item)):
            start = time.monotonic()
            r = httpx.put(
                a.url + f"/v1/admin/items/{item}", json={"hidden": hidden}, headers={"Authorization": "Bearer adm"}
            )
            assert r.status_code == 200
            while not want(top_on_b()):
                assert time.monotonic() - start < 1.0, "worker b did not apply the flag within a second"
                time.sleep(0.02)
            assert httpx.get(b.url + f"/v1/items/{item}").json()["hidden"] is hidden
    finally:
        a.stop()
        b.stop()


def test_the_client_covers_every_product_route(redis_standalone_url: str) -> None:
    from hytrec.service.client import AsyncHyTRecClient

    async def body() -> None:
        async with running(demo_settings(redis_standalone_url, admin_keys="adm")) as (_, app):
            transport = httpx.ASGITransport(app=app)
            async with AsyncHyTRecClient("http://app", transport=transport, api_key="adm") as c:
                await c.post_events(visit("c1", HISTORY))
                top = await c.recommendations("c1", k=5, at=AT, categories=["genre-3"], exclude=["1"], offset=1)
                assert top.had_state and len(top.items) == 5 and top.offset == 1
                ranked = await c.rank("c1", ["42", "7", "nope"], at=AT)
                assert ranked.unknown == ["nope"] and len(ranked.items) == 2
                sess = await c.session(visit(None, HISTORY), k=5, at=AT)
                assert [i.item_id for i in sess.items] == [
                    i.item_id for i in (await c.recommendations("c1", k=5, at=AT)).items
                ]
                batch = await c.batch([{"user_id": "c1", "k": 2}, {"user_id": "no good"}])
                assert batch.results[0].recommendations is not None and batch.results[1].error is not None
                page = await c.items(offset=0, limit=2)
                assert page.total == 500 and len(page.items) == 2
                assert (await c.item("nope")) is None and (await c.item("42")).categories  # type: ignore[union-attr]
                assert len((await c.similar("42", k=3)).items) == 3
                assert (await c.set_hidden("42")).hidden
                assert (await c.set_hidden_many(["42", "x"], hidden=False)).unknown == ["x"]
                assert not (await c.item("42")).hidden  # type: ignore[union-attr]

    run(body)


def test_stream_entries_apply_the_event_types(redis_standalone_url: str) -> None:
    """The stream path (``hytrec consume``) handles event types with the REST path's settings and code."""

    async def body() -> None:
        import asyncio

        from hytrec.service.schemas import Event

        s = demo_settings(redis_standalone_url, never_again_types="purchase", count_only_types="impression")
        async with running(s) as (client, app):
            rt = app.state.lifecycle.runtime
            ty = [None, "view", "purchase", "impression", "impression", None]
            items = HISTORY[: len(ty)]
            user = f"st-{uuid.uuid4().hex[:8]}"
            batch = [Event.model_validate(e) for e in visit(user, items, ty)]
            ids = [f"{n + 1}-0" for n in range(len(batch))]
            deadline = asyncio.get_running_loop().time() + 10
            res = await rt.ingestor.ingest_entries(batch, ids, "m0", 1, deadline)
            assert res.counted_only == 2 and res.never_again == 1
            assert res.applied == len(ty) - 2  # count-only entries are not applied
            again = await rt.ingestor.ingest_entries(batch, ids, "m0", 1, deadline)  # redelivered: nothing twice
            assert again.applied == 0
            doc = (await client.get(f"/v1/users/{user}/recommendations", params={"k": 500, "at": AT})).json()
            assert doc["history_length"] == len(ty) - 2
            assert items[2] not in {i["item_id"] for i in doc["items"]}  # the purchase is never served again
            posted = (await client.post("/v1/events", json={"events": visit(f"r-{user}", items, ty)})).json()
            assert (posted["counted_only"], posted["never_again"]) == (res.counted_only, res.never_again)

    run(body)
