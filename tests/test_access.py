"""The access model: scoped keys decided from method and path, admin routes hidden until an admin key is set."""

from __future__ import annotations

import pydantic
import pytest

from hytrec.service.auth import AccessControl, Denied, Principal, key_id, parse_keys, required_scope
from hytrec.service.settings import Settings
from tests.service_fixtures import Checkpoint
from tests.test_app import events, run, running, settings_for


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("GET", "/v1/users/u1/recommendations", "read"),
        ("GET", "/v1/users/u1", "read"),
        ("GET", "/v1/items", "read"),
        ("GET", "/v1/model", "read"),
        ("POST", "/v1/users/u1/rank", "read"),
        ("POST", "/v1/events", "write"),
        ("DELETE", "/v1/users/u1", "write"),
        ("PUT", "/v1/admin/items/7", "admin"),
        ("GET", "/v1/admin", "admin"),
        ("GET", "/v1/administrator", "read"),
        ("GET", "/healthz", None),
        ("GET", "/metrics", None),
    ],
)
def test_every_route_needs_the_scope_its_method_and_path_imply(method: str, path: str, scope: str | None) -> None:
    assert required_scope(method, path) == scope


def test_key_specs_parse_and_bad_scopes_fail_naming_the_setting_without_the_key() -> None:
    assert parse_keys(" a , b:read ,c:read+write,d:write,") == [
        ("a", frozenset({"read", "write"})),
        ("b", frozenset({"read"})),
        ("c", frozenset({"read", "write"})),
        ("d", frozenset({"write"})),
    ]
    for bad in ("secret-key-1:admin", "secret-key-1:reed", ":read"):
        with pytest.raises(pydantic.ValidationError) as err:
            Settings(api_keys=bad)
        assert "api_keys" in str(err.value) and "secret-key-1" not in str(err.value)
    s = Settings(api_keys="secret-key-1:read", admin_keys="secret-admin-2")
    assert "secret-key-1" not in repr(s) and "secret-admin-2" not in repr(s)


def test_decisions_without_http() -> None:
    ac = AccessControl.from_specs("r:read,w:write", "adm")
    assert ac.decide("GET", "/v1/items", "Bearer r") == Principal(key_id("r"), frozenset({"read"}))
    assert ac.decide("GET", "/v1/items", "Bearer adm").scopes == {"read", "write", "admin"}  # type: ignore[union-attr]
    for header in ("Basic r", "Bearer ", "Bearer rr", None):
        assert isinstance(d := ac.decide("GET", "/v1/items", header), Denied) and d.status == 401
    assert isinstance(d := ac.decide("POST", "/v1/events", "Bearer r"), Denied) and d.status == 403
    assert ac.decide("GET", "/healthz", None) is None
    hidden = AccessControl.from_specs("", "")
    assert hidden.decide("GET", "/v1/items", None).key_id == "anonymous"  # type: ignore[union-attr]
    assert isinstance(d := hidden.decide("PUT", "/v1/admin/items/1", "Bearer anything"), Denied) and d.status == 404
    assert key_id("r") != key_id("w") and len(key_id("r")) == 12


def test_scopes_through_the_app(service_checkpoint: Checkpoint, redis_standalone_url: str) -> None:
    s = settings_for(
        service_checkpoint, redis_standalone_url, api_keys="reader:read,writer:write,both", admin_keys="adm"
    )

    def auth(key: str | None) -> dict[str, str]:
        return {} if key is None else {"Authorization": f"Bearer {key}"}

    async def body() -> None:
        async with running(s) as (client, _):
            post = {"events": events("acc-1", 3)}
            got = {}
            for key in (None, "reader", "writer", "both", "adm", "wrong"):
                got[key] = (
                    (await client.post("/v1/events", json=post, headers=auth(key))).status_code,
                    (await client.get("/v1/users/acc-1/recommendations", headers=auth(key))).status_code,
                    (await client.delete("/v1/users/acc-0", headers=auth(key))).status_code,
                    (await client.put("/v1/admin/nothing-here", headers=auth(key))).status_code,
                )
            assert got == {
                None: (401, 401, 401, 401),
                "reader": (403, 200, 403, 403),
                "writer": (200, 403, 200, 403),
                "both": (200, 200, 200, 403),
                "adm": (200, 200, 200, 404),  # passes the guard; no such admin route exists
                "wrong": (401, 401, 401, 401),
            }
            r = await client.post("/v1/events", json=post, headers=auth("reader"))
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.json()["type"].endswith("forbidden") and "'write'" in r.json()["detail"]
            assert "reader" not in r.text

    run(body)


def test_admin_routes_answer_404_while_no_admin_key_is_set_even_with_open_routes(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    s = settings_for(service_checkpoint, redis_standalone_url)

    async def body() -> None:
        async with running(s) as (client, _):
            assert (await client.get("/v1/items")).status_code == 200  # open
            for key in (None, "anything"):
                headers = {} if key is None else {"Authorization": f"Bearer {key}"}
                r = await client.put("/v1/admin/items/1", json={"hidden": True}, headers=headers)
                assert r.status_code == 404 and r.json()["type"].endswith("not-found")

    run(body)
