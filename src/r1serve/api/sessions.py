"""Console sign-in: an API key exchanged for a server-side session, held in a cookie that is no key.

* ``POST /console/session`` with ``Authorization: Bearer KEY`` checks the key as any API call would and
  sets ``r1serve_session``: 32 random bytes, ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no
  other site's page makes the browser send it), ``Path=/``, ``Secure`` when the page came over https.
  The server keeps only the id's sha256 and who signed in (the key's id, never the key), in memory:
  sessions are cheap to lose, and a restart signs everyone out (documented in the README).
* ``DELETE /console/session`` ends the session on the server (the cookie is then worth nothing) and
  clears it; revoking or expiring the key ends every session made with it at its next use.
* ``GET /console/session`` says whether the server is open, who is signed in and whether they are admin.

The cookie alone authorises nothing. A request is taken as the session's only when it also carries the
header ``X-R1serve-Console: 1`` (a cross-site form cannot set a header, and a cross-site ``fetch`` that
sets one needs a CORS pre-flight, which this server never grants), comes from the server's own origin
(``Origin`` if sent, and for anything but GET/HEAD ``Origin`` must be sent; ``Sec-Fetch-Site`` if sent
must say ``same-origin``) and carries no ``Authorization`` of its own (a key given wins). Without the
header the cookie is ignored, so a form posted from another site is an unauthenticated request: 401.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.responses import Response

from r1serve.api.context import scope_header
from r1serve.api.guard import same_origin
from r1serve.errors import AuthenticationError, PermissionDenied

if TYPE_CHECKING:  # auth.py imports this module: the sessions are one of the ways in
    from r1serve.api.auth import Caller

COOKIE = "r1serve_session"
CSRF_HEADER = "x-r1serve-console"
_CSRF_RAW = CSRF_HEADER.encode()


@dataclass
class Session:
    caller: Caller  # who signed in: the key's identity and rights, not the key
    expires: float  # time.monotonic() deadline
    name: str
    key: str | None  # the key's display prefix (r1-abcd…), for the page; None for static keys


class SessionStore:
    """Sessions by the sha256 of their id, oldest first (so the cap ends the oldest)."""

    def __init__(self, ttl: float, max_sessions: int) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    @staticmethod
    def _digest(session_id: str) -> bytes:
        return hashlib.sha256(session_id.encode("latin-1", "replace")).digest()

    def create(self, caller: Caller, *, name: str, key: str | None) -> str:
        session_id = secrets.token_urlsafe(32)
        self._sessions[self._digest(session_id)] = Session(caller, time.monotonic() + self.ttl, name, key)
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session_id

    def get(self, session_id: str) -> Session | None:
        digest = self._digest(session_id)
        session = self._sessions.get(digest)
        if session is not None and session.expires <= time.monotonic():
            del self._sessions[digest]
            return None
        return session

    def end(self, session_id: str) -> bool:
        return self._sessions.pop(self._digest(session_id), None) is not None

    def __len__(self) -> int:
        return len(self._sessions)


def cookie_value(request: Request) -> str | None:
    return request.cookies.get(COOKIE) or None


def _own_origin(request: Request, *, required: bool) -> bool:
    origin = scope_header(request.scope, b"origin")
    host = (scope_header(request.scope, b"host") or b"").decode("latin-1")
    if origin is None:
        if required:
            return False
    elif not same_origin(origin.decode("latin-1").strip().rstrip("/").lower(), host):
        return False
    site = scope_header(request.scope, b"sec-fetch-site")
    return site is None or site in (b"same-origin", b"none")


def console_call(request: Request) -> bool:
    """True when this request is the console's own (cookie, header, own origin, no key of its own)."""
    # The header first: a raw header scan, so API calls (which never carry it) pay no cookie parsing.
    if scope_header(request.scope, _CSRF_RAW) != b"1" or cookie_value(request) is None:
        return False
    if scope_header(request.scope, b"authorization") is not None:
        return False
    return _own_origin(request, required=request.method not in ("GET", "HEAD"))


def session_of(request: Request) -> Session | None:
    """The session a console call carries; a console call with a dead session is a 401 (sign in again)."""
    store: SessionStore | None = getattr(request.app.state, "sessions", None)
    value = cookie_value(request)
    if store is None or value is None:
        return None
    session = store.get(value)
    if session is None:
        raise AuthenticationError("Your console session has ended: sign in again.", code="session_expired")
    return session


def page_session(request: Request) -> Session | None:
    """For a page's GET (a navigation: no custom header possible): the session, if the cookie names a live
    one. Pages only decide what static HTML to send; every call for data is checked as a console call."""
    store: SessionStore | None = getattr(request.app.state, "sessions", None)
    value = cookie_value(request)
    return None if store is None or value is None else store.get(value)


def check_state_change(request: Request) -> None:
    if scope_header(request.scope, _CSRF_RAW) != b"1":
        raise PermissionDenied(f"Console requests carry the {CSRF_HEADER}: 1 header.", code="csrf_failed")
    if not _own_origin(request, required=True):
        raise PermissionDenied("Console requests come from the console's own origin.", code="csrf_failed")


def set_cookie(request: Request, response: Response, value: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
