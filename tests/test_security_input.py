"""Hostile bodies get problem documents that say what is wrong: 400 malformed-json with the reason (not UTF-8,
nested too deeply, NUL bytes), one 413 too-large type whether the size is announced or streamed; nothing is
applied for any of them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.service_fixtures import Checkpoint
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
            assert announced.json() == streamed.json()
            assert announced.json()["type"].endswith("/too-large")
            assert announced.json()["instance"] == "/v1/events"

    run(check)
