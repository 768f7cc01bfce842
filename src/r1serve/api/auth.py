"""Who is calling. The API depends on :func:`authenticate`; what it checks is the ``Authenticator`` on
``app.state.authenticator``, so the accounts layer can swap in managed keys without touching routes.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request

from r1serve.api.context import scope_header
from r1serve.errors import AuthenticationError, R1ServeError


@dataclass(frozen=True)
class Caller:
    """The authenticated client; ``key_id`` is None on an open server."""

    key_id: str | None = None
    admin: bool = False  # may see operator detail (upstream errors and addresses in /health)


class Authenticator(Protocol):
    async def __call__(self, request: Request) -> Caller: ...


def bearer_token(request: Request) -> str | None:
    raw = scope_header(request.scope, b"authorization")
    header = "" if raw is None else raw.decode("latin-1")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class StaticKeys:
    """Bearer keys from settings (``R1SERVE_API_KEYS``); no keys means the API is open."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys]
        # Callers are frozen, so one per key serves every request (building one cost a microsecond each).
        self._callers = [Caller(key_id=f"static-{i}") for i in range(len(keys))]
        self._open = Caller()

    async def __call__(self, request: Request) -> Caller:
        if not self._keys:
            return self._open
        token = bearer_token(request)
        if token is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
                "(Authorization: Bearer YOUR_KEY).",
                headers={"WWW-Authenticate": "Bearer"},
            )
        given = token.encode()
        # Compare against every key without stopping early, so timing does not say which one is close.
        matched = -1
        for i, key in enumerate(self._keys):
            if hmac.compare_digest(given, key):
                matched = i
        if matched < 0:
            hint = token[-4:] if len(token) > 8 else ""
            raise AuthenticationError(
                f"Incorrect API key provided{': ...' + hint if hint else ''}.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return self._callers[matched]


async def optional_caller(request: Request) -> Caller | None:
    """The caller when the request carries a valid key, else None; never an error (for public pages)."""
    if bearer_token(request) is None:
        return None
    authenticator: Authenticator = request.app.state.authenticator
    try:
        return await authenticator(request)
    except R1ServeError:
        return None


async def authenticate(request: Request) -> Caller:
    """FastAPI dependency for every protected route."""
    authenticator: Authenticator = request.app.state.authenticator
    caller = await authenticator(request)
    request.state.caller = caller
    return caller
