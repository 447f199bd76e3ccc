"""The access model: bearer API keys with scopes (read, write, admin), decided per request by the Guard.

Every /v1 route needs one scope, derived from its method and path alone (``required_scope``), so a new route
is protected the moment it exists and no route can forget its check:

- ``/v1/admin/...`` needs **admin**. Admin keys come from their own setting (``HYTREC_ADMIN_KEYS``); while
  none is configured those routes answer 404, as if they did not exist, even when the other routes are open.
- ``POST /v1/events`` and ``DELETE /v1/users/{id}`` need **write**.
- every other /v1 route needs **read**.

``HYTREC_API_KEYS`` holds the keys of the read and write routes, each ``key`` (read and write) or
``key:scope+scope``. While it is empty those routes are open. An admin key has every scope.
Keys are compared in constant time against every configured key, so timing tells neither whether nor which
key matched. Only a short hash of a key (``Principal.key_id``) is ever put in a metric label, log or Redis key.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
DEFAULT_SCOPES: frozenset[str] = frozenset({"read", "write"})
ADMIN_PREFIX = "/v1/admin"


def required_scope(method: str, path: str) -> Scope | None:
    """The scope a request needs (None: outside /v1, open to all, e.g. /healthz and /metrics)."""
    if not path.startswith("/v1/"):
        return None
    if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/"):
        return "admin"
    if (method == "POST" and path == "/v1/events") or (method == "DELETE" and path.startswith("/v1/users/")):
        return "write"
    return "read"


def key_id(key: str) -> str:
    """A short, non-reversible name of a key: safe for metric labels, logs and rate-limit keys."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def parse_keys(spec: str) -> list[tuple[str, frozenset[str]]]:
    """``"k1,k2:read,k3:read+write"`` -> keys with their scopes; ValueError naming a bad entry."""
    out: list[tuple[str, frozenset[str]]] = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        key, sep, scopes = entry.rpartition(":")
        if not sep:
            key, granted = entry, DEFAULT_SCOPES
        else:
            granted = frozenset(s.strip() for s in scopes.split("+"))
            bad = granted - set(SCOPES) or ({"admin"} & granted)
            if bad or not key:
                raise ValueError(
                    f"API key entry with scopes {scopes!r}: a key, then scopes read and/or write joined by '+' "
                    "(admin keys go in HYTREC_ADMIN_KEYS)"
                )
        out.append((key, granted))
    return out


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``key_id`` is a hash of the key (``anonymous`` while the routes are open)."""

    key_id: str
    scopes: frozenset[str]


ANONYMOUS = Principal("anonymous", DEFAULT_SCOPES)


@dataclass(frozen=True, slots=True)
class Denied:
    """Why a request is refused: 401 (no valid key), 403 (the key lacks the scope) or 404 (admin is off)."""

    status: Literal[401, 403, 404]
    detail: str


class AccessControl:
    """Decides, from the method, path and Authorization header, who calls and whether they may."""

    def __init__(self, keys: list[tuple[str, frozenset[str]]], admin_keys: list[str]) -> None:
        self._keys = [(k.encode(), Principal(key_id(k), scopes)) for k, scopes in keys]
        self._keys += [(k.encode(), Principal(key_id(k), frozenset(SCOPES))) for k in admin_keys]
        self.open = not keys  # the read and write routes need no key
        self.admin_enabled = bool(admin_keys)

    @classmethod
    def from_specs(cls, api_keys: str, admin_keys: str) -> AccessControl:
        return cls(parse_keys(api_keys), [k.strip() for k in admin_keys.split(",") if k.strip()])

    def identify(self, header: str | None) -> Principal | None:
        """The principal of a bearer key, or None; compared in constant time against every key."""
        scheme, _, token = (header or "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not given:
            return None
        found: Principal | None = None
        for key, principal in self._keys:  # no early exit: timing does not tell which key matched
            if hmac.compare_digest(given, key):
                found = principal
        return found

    def decide(self, method: str, path: str, header: str | None) -> Principal | Denied | None:
        """The caller, or why they are refused; None for routes outside /v1."""
        scope = required_scope(method, path)
        if scope is None:
            return None
        if scope == "admin" and not self.admin_enabled:
            return Denied(404, f"no route {path!r}")
        if scope != "admin" and self.open:
            return self.identify(header) or ANONYMOUS
        principal = self.identify(header)
        if principal is None:
            return Denied(401, "a valid API key is required: Authorization: Bearer <key>")
        if scope not in principal.scopes:
            return Denied(403, f"this API key lacks the {scope!r} scope that {method} {path} needs")
        return principal
