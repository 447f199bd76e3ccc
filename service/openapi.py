"""The OpenAPI document of the API that runs: every error each operation can answer, as the problem documents
they are, and the security scheme only where a key is needed. Generic over the routes: an operation added later
is described by the same rules (its path and method decide its scope, as in ``auth.required_scope``).

What FastAPI writes alone is only the 200 and a 422 ``application/json`` ``HTTPValidationError`` that the
service never sends; the Guard's answers (401, 403, 404 for admin, 413, 429, 503) and the handlers' (400,
405...) live outside the routes, so they are added here from the same settings the Guard is built from.
"""

from __future__ import annotations

from typing import Any

from hytrec.service.auth import AccessControl, required_scope
from hytrec.service.errors import PROBLEM_JSON, TYPE_BASE
from hytrec.service.settings import Settings

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

PROBLEM_SCHEMAS: dict[str, Any] = {
    "Problem": {
        "title": "Problem",
        "description": "An RFC 9457 problem document (service/errors.py); `type` names the case, e.g. "
        f"`{TYPE_BASE}validation`.",
        "type": "object",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "format": "uri", "description": "The kind of problem."},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string", "description": "What is wrong, naming the field where one is."},
            "instance": {"type": "string", "description": "The request's path."},
            "errors": {
                "type": "array",
                "description": "On 422: every invalid field.",
                "items": {"$ref": "#/components/schemas/ProblemField"},
            },
            "may_have_applied": {
                "type": "boolean",
                "description": "On a 503 to POST /v1/events: false (or absent) when nothing of the post was applied, "
                "so it can be re-sent at any time; true when it may have landed in full or in part, so a resend "
                "is safe only while its event ids are within the user's HYTREC_DEDUP_WINDOW.",
            },
        },
        "additionalProperties": True,
    },
    "ProblemField": {
        "title": "ProblemField",
        "type": "object",
        "required": ["field", "in", "message", "type"],
        "properties": {
            "field": {"type": "string", "description": "e.g. `events[3].ts`"},
            "in": {"type": "string", "description": "body, query, path or header"},
            "message": {"type": "string"},
            "type": {"type": "string"},
        },
    },
}

RETRY_AFTER = {
    "description": "Seconds to wait before retrying.",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}
WWW_AUTHENTICATE = {"description": 'Bearer realm="hytrec"', "required": True, "schema": {"type": "string"}}


def _problem(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if headers:
        out["headers"] = {name.replace("_", "-"): h for name, h in headers.items()}
    return out


def _kinds(*kinds: str) -> str:
    return ", ".join(f"`{k}`" for k in kinds)


def describe_errors(schema: dict[str, Any], s: Settings, access: AccessControl) -> dict[str, Any]:
    """Rewrite ``schema`` (FastAPI's document) in place to list every answer the service can give; returns it."""
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(PROBLEM_SCHEMAS)
    bearer_used = False
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            op = item.get(method)
            if op is None:
                continue
            responses: dict[str, Any] = op.setdefault("responses", {})
            for code, answer in responses.items():  # whatever a route declared: errors are problem documents
                if code[0] in "45":
                    answer["content"] = _problem("")["content"]
            has_body = "requestBody" in op
            has_params = bool(op.get("parameters")) or has_body
            if has_params:
                responses["422"] = _problem(f"Invalid fields, each named in `errors` ({_kinds('validation')}).")
            else:
                responses.pop("422", None)
            if has_body:
                responses["400"] = _problem(f"The body is not JSON ({_kinds('malformed-json')}), with the reason.")
                responses["413"] = _problem(
                    f"The body is over HYTREC_MAX_BODY_BYTES = {s.max_body_bytes} bytes ({_kinds('too-large')})."
                )
            if any(p.get("in") == "path" for p in op.get("parameters", [])):
                responses.setdefault("404", _problem(""))
                if not responses["404"]["description"]:
                    responses["404"]["description"] = (
                        f"No such route: a path parameter holding '/' ({_kinds('not-found')})."
                    )
            scope = required_scope(method.upper(), path)
            needs_key = (scope == "admin" and access.admin_enabled) or (scope in ("read", "write") and not access.open)
            if scope == "admin":
                responses["404"] = _problem(
                    f"No admin key is configured (HYTREC_ADMIN_KEYS): the admin routes are off ({_kinds('not-found')})."
                )
            if needs_key:
                op["security"] = [{"HTTPBearer": []}]
                bearer_used = True
                responses["401"] = _problem(
                    f"No valid API key ({_kinds('unauthorized')}).", WWW_Authenticate=WWW_AUTHENTICATE
                )
                if not access.open:  # a read or write key lacking the scope
                    responses["403"] = _problem(
                        f"The API key lacks the {scope!r} scope this operation needs ({_kinds('forbidden')})."
                    )
            else:
                op.pop("security", None)
            if scope is not None:
                if s.rate_limit_per_s is not None:
                    responses["429"] = _problem(
                        f"The API key is over HYTREC_RATE_LIMIT_PER_S = {s.rate_limit_per_s:g} requests/s "
                        f"(burst {s.rate_limit_burst}) ({_kinds('rate-limited')}).",
                        Retry_After=RETRY_AFTER,
                    )
                responses["503"] = _problem(
                    "Not ready, over capacity, past its deadline or the state store unavailable "
                    f"({_kinds('not-ready', 'overloaded', 'unavailable', 'conflict')}).",
                    Retry_After=RETRY_AFTER,
                )
            elif "503" in responses or path in ("/readyz", "/healthz"):
                responses["503"] = _problem(
                    f"Not ready, or the model failed to load ({_kinds('not-ready', 'failed')})."
                )
    if bearer_used:
        components.setdefault("securitySchemes", {})["HTTPBearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key of HYTREC_API_KEYS (or HYTREC_ADMIN_KEYS on /v1/admin).",
        }
    else:
        components.pop("securitySchemes", None)
    return schema
