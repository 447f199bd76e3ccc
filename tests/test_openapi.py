"""The OpenAPI document describes the API that runs: every error status each operation answers, as problem
documents; security declared exactly when a key is needed; item ids whose schema equals their validation;
405 naming every method of the path."""

from __future__ import annotations

from typing import Any

import jsonschema
import jsonschema_rs
import pydantic
import pytest

from hytrec.service.app import create_app
from hytrec.service.schemas import Event
from hytrec.service.settings import Settings
from tests.service_fixtures import Checkpoint
from tests.test_app import run, running, settings_for

PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _doc(**settings: Any) -> dict[str, Any]:
    return create_app(Settings(redis_url="redis://127.0.0.1:1", **settings)).openapi()


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}


def test_open_service_documents_no_security_and_no_401() -> None:
    doc = _doc()
    assert "securitySchemes" not in doc["components"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for (method, path), op in _operations(doc).items():
        assert "security" not in op and not {"401", "403", "429"} & set(op["responses"]), (method, path)
        for code, answer in op["responses"].items():
            if code[0] in "45":
                assert answer["content"] == PROBLEM, (method, path, code)
        if path.startswith("/v1/"):
            assert op["responses"]["503"]["headers"]["Retry-After"]["required"] is True


def test_keys_and_limits_document_401_403_429_and_the_bearer_scheme() -> None:
    doc = _doc(api_keys="a:read,b", rate_limit_per_s=5, rate_limit_burst=3)
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    ops = _operations(doc)
    for (method, path), op in ops.items():
        codes = set(op["responses"])
        assert not path.startswith("/v1/admin"), "no admin key: the admin routes are left out (they answer 404)"
        if path.startswith("/v1/"):
            assert op["security"] == [{"HTTPBearer": []}]
            assert {"200", "401", "403", "429", "503"} <= codes, (method, path)
            assert op["responses"]["429"]["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 1}
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
        else:
            assert "security" not in op and "401" not in codes
    post = ops[("POST", "/v1/events")]["responses"]
    assert {"400", "413", "422"} <= set(post) and "HTTPValidationError" not in str(post)
    assert "422" not in ops[("GET", "/v1/model")]["responses"]  # takes nothing to validate
    assert "404" in ops[("GET", "/v1/users/{user_id}/recommendations")]["responses"]  # a user id holding '/'
    problem = doc["components"]["schemas"]["Problem"]
    assert set(problem["required"]) == {"type", "title", "status", "detail"}


def test_the_problem_schema_matches_what_the_service_sends(
    service_checkpoint: Checkpoint, redis_standalone_url: str
) -> None:
    s = settings_for(service_checkpoint, redis_standalone_url, api_keys="k")

    async def body() -> None:
        async with running(s) as (client, app):
            doc = app.openapi()
            schema = {"$ref": "#/components/schemas/Problem", "components": doc["components"]}
            auth = {"Authorization": "Bearer k"}
            answers = [
                await client.get("/v1/items"),  # 401
                await client.post("/v1/events", content=b"{", headers={**auth, "content-type": "application/json"}),
                await client.post("/v1/events", json={"events": [{"user_id": ""}]}, headers=auth),  # 422
                await client.get("/v1/users/nobody", headers=auth),  # 404
                await client.patch("/v1/users/nobody", headers=auth),  # 405
            ]
            assert [r.status_code for r in answers] == [401, 400, 422, 404, 405]
            for r in answers:
                assert r.headers["content-type"] == "application/problem+json"
                jsonschema.validate(r.json(), schema)

    run(body)


def test_admin_operations_are_left_out_until_admin_keys_are_set() -> None:
    """Checked on a route added the way the admin routes are: absent from the document while it answers 404
    (an undocumented route, so a client tool never sends it other methods expecting 405), then documented
    with its key."""
    from fastapi import APIRouter

    def doc_with_admin(**settings: Any) -> dict[str, Any]:
        app = create_app(Settings(redis_url="redis://127.0.0.1:1", **settings))
        admin = APIRouter(prefix="/v1/admin")

        @admin.put("/items/{item_id}", operation_id="admin_put_item")
        async def put_item(item_id: str) -> dict[str, str]:
            return {"item_id": item_id}

        app.include_router(admin)
        app.openapi_schema = None
        return app.openapi()

    assert not any(path.startswith("/v1/admin") for path in doc_with_admin()["paths"])
    on = _operations(doc_with_admin(admin_keys="adm"))[("PUT", "/v1/admin/items/{item_id}")]
    assert on["security"] == [{"HTTPBearer": []}] and "401" in on["responses"] and "403" not in on["responses"]
    both = _operations(doc_with_admin(admin_keys="adm", api_keys="r:read"))[("PUT", "/v1/admin/items/{item_id}")]
    assert {"401", "403", "404"} <= set(both["responses"])


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a",
        "x" * 128,
        "x" * 129,
        "a b",
        "a\n",
        "ü",
        0,
        7,
        -1,
        2**53 - 1,
        2**53,
        2**63,
        5.0,
        5.5,
        True,
        None,
        [1],
        {},
    ],
)
def test_item_id_schema_and_validation_agree(value: object) -> None:
    doc = _doc()
    schema = {"$ref": "#/components/schemas/Event", "components": doc["components"]}
    event = {"user_id": "u", "item_id": value, "ts": 1.0}
    fits = jsonschema_rs.validator_for(schema).is_valid(event)  # ECMA-262 regexes, as JSON Schema says
    try:
        Event.model_validate(event)
        accepted = True
    except pydantic.ValidationError:
        accepted = False
    assert fits == accepted, (value, fits, accepted)


def test_405_names_every_method_of_the_path(service_checkpoint: Checkpoint, redis_standalone_url: str) -> None:
    s = settings_for(service_checkpoint, redis_standalone_url)

    async def body() -> None:
        async with running(s) as (client, _):
            r = await client.patch("/v1/users/u1")
            assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET"
            assert r.json()["type"].endswith("/method-not-allowed")
            r = await client.get("/v1/events")
            assert r.status_code == 405 and r.headers["allow"] == "POST"

    run(body)


@pytest.mark.parametrize("value", [1.0, 1_700_000_000, 0, -1, 4102444800, 1e300, True, False, None, [], {}])
def test_ts_schema_and_validation_agree(value: object) -> None:
    """(A numeric string is the one exception: accepted, for stream entries whose fields are all text.)"""
    doc = _doc()
    schema = {"$ref": "#/components/schemas/Event", "components": doc["components"]}
    event = {"user_id": "u", "item_id": "1", "ts": value}
    fits = jsonschema_rs.validator_for(schema).is_valid(event)
    try:
        Event.model_validate(event)
        accepted = True
    except pydantic.ValidationError:
        accepted = False
    assert fits == accepted, (value, fits, accepted)
