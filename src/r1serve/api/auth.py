"""Who is calling. The API depends on :func:`authenticate`; what it checks is the ``Authenticator`` on
``app.state.authenticator``, so the accounts layer can swap in managed keys without touching routes.

A key comes as ``Authorization: Bearer``, or, for the console's own calls only, as a sign-in session
(api/sessions.py: the cookie counts only with the console's header, from the console's origin); the
session's caller is checked again on each use (``Authenticator.resume``), so a revoked key's sessions end.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Protocol

from fastapi import Request

from r1serve.api.context import scope_header
from r1serve.api.sessions import Session, SessionStore, console_call, page_session, session_of
from r1serve.errors import AuthenticationError, R1ServeError


@dataclass(frozen=True)
class Caller:
    """The authenticated client; ``key_id`` is None on an open server."""

    key_id: str | None = None
    admin: bool = False  # may see operator detail (upstream errors and addresses in /health)


class Authenticator(Protocol):
    async def __call__(self, request: Request) -> Caller: ...

    async def resume(self, request: Request, caller: Caller) -> Caller:
        """``caller`` (from a sign-in session) as it stands now; AuthenticationError once its key is gone."""
        ...


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

    async def resume(self, request: Request, caller: Caller) -> Caller:
        if caller not in self._callers:  # static keys live as long as the process; a guard all the same
            raise AuthenticationError("Your console session has ended: sign in again.", code="session_expired")
        return caller


async def optional_caller(request: Request) -> Caller | None:
    """The caller when the request carries a valid key (or is a signed-in console's), else None; never an
    error (for public pages)."""
    if bearer_token(request) is None and not console_call(request):
        return None
    try:
        return await authenticate(request)
    except R1ServeError:
        return None


async def api_is_open(request: Request) -> bool:
    """No key sent and none asked for: the API is open (loopback, no keys), and so is the console."""
    if bearer_token(request) is not None:
        return False
    authenticator: Authenticator = request.app.state.authenticator
    try:
        await authenticator(request)
    except AuthenticationError:
        return False
    return True


async def live_session(request: Request) -> Session | None:
    """For a page's GET: the session the cookie names, if it is alive and its key still valid (a dead one
    is ended). Pages only decide which static HTML to send; their data calls are checked on their own."""
    session = page_session(request)
    if session is None:
        return None
    authenticator: Authenticator = request.app.state.authenticator
    try:
        session.caller = await authenticator.resume(request, session.caller)
    except AuthenticationError:
        store: SessionStore = request.app.state.sessions
        store.end(request.cookies.get("r1serve_session", ""))
        return None
    return session


async def _session_caller(request: Request, authenticator: Authenticator) -> Caller | None:
    session = session_of(request)
    if session is None:
        return None
    try:
        session.caller = await authenticator.resume(request, session.caller)
    except AuthenticationError:
        store: SessionStore = request.app.state.sessions
        store.end(request.cookies.get("r1serve_session", ""))
        raise
    return session.caller


async def authenticate(request: Request) -> Caller:
    """FastAPI dependency for every protected route."""
    authenticator: Authenticator = request.app.state.authenticator
    caller = await _session_caller(request, authenticator) if console_call(request) else None
    if caller is None:
        caller = await authenticator(request)
    request.state.caller = caller
    return caller
