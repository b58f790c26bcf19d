"""API-key check for the /v1 routes: `Authorization: Bearer <key>` must match one configured key.

No keys configured -> no check (the server binds to 127.0.0.1 by default). Health and readiness stay
open so probes need no secret; metrics, version and the API docs too, unless `key_protects_all`.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from kiln.serve.errors import AuthenticationError
from kiln.serve.state import server_state


def _matches(given: str, keys: list[str]) -> bool:
    # Constant-time comparison against every key, so timing does not reveal a key's prefix.
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: raise 401 unless the request carries a configured key."""
    keys = server_state(request).settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("missing API key: send `Authorization: Bearer <key>`")
    if not _matches(token.strip(), keys):
        raise AuthenticationError("incorrect API key")
