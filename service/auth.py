"""Optional bearer-key authentication of the /v1 routes (HYTREC_API_KEYS)."""

from __future__ import annotations

import hmac


class ApiKeyAuth:
    """With keys configured, ``Authorization: Bearer <key>`` must name one of them (the Guard answers 401)."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def check(self, header: str | None) -> bool:
        """Whether the Authorization header carries a configured key (compared in constant time)."""
        if not self._keys:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        ok = False
        for key in self._keys:  # compare against every key, so timing does not tell which one matched
            ok |= hmac.compare_digest(given, key)
        return ok
