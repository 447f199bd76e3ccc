"""Hostile input gets problem documents that say what is wrong: 400 malformed-json with the reason (not UTF-8,
nested too deeply, NUL bytes), one 413 too-large type whether the size is announced or streamed, and the
issue's whole list (50 MB bodies, 10^5 events, NaN/Infinity/huge timestamps, 10 KB and unicode ids, k of
0/-1/10^9, odd paths) against a real `hytrec serve`: never a 5xx, nothing applied."""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.service_fixtures import Checkpoint, ServiceProcess, service_env
from tests.test_app import run, running, settings_for

JSON = {"content-type": "application/json"}
EVENT = '{"user_id":"hostile","item_id":"1","ts":1700000000'

MALFORMED = {
    "latin-1 body": (('{"events":[' + EVENT + ',"event_id":"\xe9"}]}').encode("latin-1"), "not UTF-8: byte 0xe9"),
    "invalid UTF-8 lead byte": (b'{"events":[' + EVENT.encode() + b',"event_id":"\xff\xfe"}]}', "not UTF-8: byte 0xff"),
    "cut UTF-8 sequence": (b'{"events":[' + EVENT.encode() + b',"event_id":"\xe2\x82"}]}', "not UTF-8: byte 0xe2"),
    "lists nested 10^4 deep": (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
    "objects nested 10^4 deep": (b'{"events":' * 10_000 + b"[]" + b"}" * 10_000, "nested too deeply"),
    "NUL inside a string": (b'{"events":[' + EVENT.encode() + b',"event_id":"a\x00b"}]}', "Invalid control character"),
    "NUL before the body": (b'\x00{"events":[]}', "Expecting property name"),
    "NUL after the body": (b'{"events":[' + EVENT.encode() + b"}]}\x00", "Extra data"),
    "only NUL bytes": (b"\x00" * 64, "not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MALFORMED))
def test_undecodable_bodies_are_malformed_json_with_the_reason(
    name: str, service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    body, reason = MALFORMED[name]
    s = settings_for(service_checkpoint, redis_standalone_url, max_body_bytes=1 << 20)

    async def check() -> None:
        async with running(s) as (client, _):
            r = await client.post("/v1/events", content=body, headers=JSON)
            assert r.status_code == 400, r.text
            assert r.headers["content-type"] == "application/problem+json"
            doc = r.json()
            assert doc["type"].endswith("/malformed-json") and doc["instance"] == "/v1/events"
            assert reason in doc["detail"] and "error parsing the body" not in doc["detail"], doc
            assert (await client.get("/v1/users/hostile")).status_code == 404  # nothing applied

    run(check)


def test_both_413_paths_give_one_type(service_checkpoint: Checkpoint, redis_standalone_url: str) -> None:
    """An announced Content-Length over the limit (refused before reading) and a chunked body that grows past it
    (refused while streaming) are the same document but for nothing."""
    s = settings_for(service_checkpoint, redis_standalone_url, max_body_bytes=4096)
    big = b'{"events":[' + b" " * 8000 + b"]}"

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    async def check() -> None:
        async with running(s) as (client, _):
            announced = await client.post("/v1/events", content=big, headers=JSON)
            streamed = await client.post("/v1/events", content=chunks(), headers=JSON)
            assert "content-length" not in streamed.request.headers  # really chunked
            assert announced.status_code == streamed.status_code == 413
            a, b = announced.json(), streamed.json()
            assert a.pop("request_id") != b.pop("request_id")  # each answer names its own request
            assert a == b
            assert announced.json()["type"].endswith("/too-large")
            assert announced.json()["instance"] == "/v1/events"

    run(check)


# ------------------------------------------------------------------ the hostile inputs, real server
def _hostile(url: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(input class, method, path, httpx keyword arguments) for every hostile request sent."""
    ev = {"user_id": "hostile", "item_id": "1", "ts": 1_700_000_000}
    out: list[tuple[str, str, str, dict[str, Any]]] = []

    def post(cls: str, **kw: Any) -> None:
        out.append((cls, "POST", "/v1/events", kw))

    def raw(cls: str, text: str) -> None:
        post(cls, content=text.encode(), headers=JSON)

    big = b'{"events":[' + b" " * (50 << 20) + b"]}"
    post("50 MB body (Content-Length)", content=big, headers=JSON)
    post("50 MB body (chunked)", content=iter([big[i : i + (1 << 20)] for i in range(0, len(big), 1 << 20)]))
    post("10^5-event batch", json={"events": [{**ev, "event_id": f"e{i}"} for i in range(100_000)]})
    post("1001-event batch (over HYTREC_MAX_BATCH_EVENTS)", json={"events": [ev] * 1001})
    for name, (body, _) in MALFORMED.items():
        post(f"malformed: {name}", content=body, headers=JSON)
    for ts in ("NaN", "Infinity", "-Infinity", "1e300", "-1", "0", "4102444800", '"soon"', "null", "true"):
        raw(f"ts = {ts}", '{"events":[{"user_id":"hostile","item_id":"1","ts":' + ts + "}]}")
    for field in ("user_id", "item_id", "event_id"):
        for value in ("x" * 10_240, "ü", "用户", "a b", "{u}", "", "a\nb", "../../etc"):
            post(f"{field}: 10 KB / unicode / odd", json={"events": [{**ev, field: value}]})
    post("item_id = -1 / 2^53 / true / 1.5", json={"events": [{**ev, "item_id": v} for v in (-1, 2**53, True, 1.5)]})
    post("unknown field", json={"events": [{**ev, "extra": 1}]})
    post("not an object", json=[ev])
    post("text/plain body", content=b'{"events":[]}', headers={"content-type": "text/plain"})
    for k in ("0", "-1", "1000000000", "1e3", "abc", ""):
        out.append((f"k = {k!r}", "GET", f"/v1/users/hostile/recommendations?k={k}", {}))
    for at in ("NaN", "inf", "-1", "1e300"):
        out.append((f"at = {at}", "GET", f"/v1/users/hostile/recommendations?at={at}", {}))
    out.append(
        ("'..' as a user id (valid: an id is a Redis key part only)", "GET", "/v1/users/%2E%2E/recommendations", {})
    )
    for path in ("/v1/users/..%2F..%2Fetc", "/v1/users/" + "u" * 10_240,
                 "/v1/users/%00", "/v1/users/%C3%BC", "/v1/items?limit=0", "/v1/items?offset=-1",
                 "/v1/items?limit=100000000"):  # fmt: skip
        out.append(("odd path or query", "GET", path, {}))
    out.append(
        ("huge Authorization header", "GET", "/v1/items", {"headers": {"Authorization": "Bearer " + "k" * 8000}})
    )
    return out


def test_hostile_inputs_against_a_real_server(
    service_checkpoint: Checkpoint, redis_standalone_url: str, tmp_path: Path
) -> None:
    """Every hostile request (with a valid key, but for the huge one) gets a 4xx problem document (never a 5xx),
    nothing is applied, the server's memory
    stays put, and it still serves a valid request afterwards. Figures printed for docs/reliability.md."""
    env = service_env(service_checkpoint, redis_standalone_url, api_keys="hostile-test-key")
    server = ServiceProcess(env, tmp_path).start()
    try:
        proc = psutil.Process(server.proc.pid)  # type: ignore[union-attr]

        def rss() -> int:
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])

        requests = _hostile(server.url)
        by_class: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        slowest = 0.0
        auth = {"Authorization": "Bearer hostile-test-key"}
        with httpx.Client(base_url=server.url, timeout=30, headers=auth) as client:
            client.get("/v1/users/warm/recommendations")  # warm the paths before measuring memory
            before = rss()
            for cls, method, path, kw in requests:
                start = time.perf_counter()
                r = client.request(method, path, **kw)
                slowest = max(slowest, time.perf_counter() - start)
                by_class[cls][r.status_code] += 1
                if cls.startswith("'..'"):
                    assert r.status_code == 200 and r.json()["fallback"] == "popularity"
                    continue
                assert 400 <= r.status_code < 500, (cls, r.status_code, r.text[:300])
                assert r.headers["content-type"] == "application/problem+json", (cls, r.headers)
                doc = r.json()
                assert doc["status"] == r.status_code and doc["type"].startswith("https://hytrec.dev/problems/")
            grown = rss() - before
            assert client.get("/v1/users/hostile").status_code == 404  # nothing of any of them was applied
            ok = client.post("/v1/events", json={"events": [{"user_id": "after", "item_id": "1", "ts": 1.7e9}]})
            assert ok.status_code == 200 and ok.json()["applied"] == 1
        statuses = collections.Counter()
        for c in by_class.values():
            statuses.update(c)
        print(f"\nhostile: {len(requests)} requests, by status {dict(sorted(statuses.items()))}, "
              f"slowest {slowest:.2f} s, RSS {grown / 2**20:+.1f} MiB")  # fmt: skip
        for cls, c in by_class.items():
            print(f"  {cls}: {dict(sorted(c.items()))}")
        assert grown < 64 << 20, grown  # a 50 MB body is never buffered whole
    finally:
        server.stop()
