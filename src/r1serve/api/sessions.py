"""Console sign-in: an API key exchanged for a server-side session, held in a cookie that is no key.

* ``POST /console/session`` with ``Authorization: Bearer KEY`` checks the key as any API call would and
  sets ``r1serve_session``: 32 random bytes, ``HttpOnly`` (no script reads it), ``SameSite=Strict`` (no
  other site's page makes the browser send it), ``Path=/``, ``Secure`` when the page came over https
  (the request's scheme, or the sign-in's ``Origin`` behind a TLS proxy). Sessions end
  ``R1SERVE_CONSOLE_SESSION_TTL`` after sign-in or ``R1SERVE_CONSOLE_SESSION_IDLE`` after their last use;
  a key holds at most ``MAX_PER_KEY`` at once.
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


# Sessions one key may hold at once: past it, that key's least recently used session ends, so no key can
# sign other keys' users out by signing in over and over (the table's cap ends the least recently used).
MAX_PER_KEY = 16


@dataclass
class Session:
    caller: Caller  # who signed in: the key's identity and rights, not the key
    expires: float  # time.monotonic() deadline
    name: str
    key: str | None  # the key's display prefix (r1-abcd…), for the page; None for static keys
    idle_until: float = float("inf")  # time.monotonic(): unused this long, it ends


class SessionStore:
    """Sessions by the sha256 of their id, least recently used first (so the caps end those), with each
    key's sessions indexed too (a sign-in costs the same however many sessions exist)."""

    def __init__(self, ttl: float, max_sessions: int, idle: float | None = None) -> None:
        self.ttl = ttl
        self.max_sessions = max_sessions
        self.idle = idle if idle is not None else ttl
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()
        self._by_key: dict[str | None, OrderedDict[bytes, None]] = {}

    @staticmethod
    def _digest(session_id: str) -> bytes:
        return hashlib.sha256(session_id.encode("latin-1", "replace")).digest()

    def _drop(self, digest: bytes) -> None:
        session = self._sessions.pop(digest, None)
        if session is not None:
            mine = self._by_key.get(session.caller.key_id)
            if mine is not None:
                mine.pop(digest, None)
                if not mine:
                    del self._by_key[session.caller.key_id]

    def create(self, caller: Caller, *, name: str, key: str | None) -> str:
        session_id = secrets.token_urlsafe(32)
        digest = self._digest(session_id)
        now = time.monotonic()
        mine = self._by_key.setdefault(caller.key_id, OrderedDict())
        while len(mine) >= MAX_PER_KEY:
            self._drop(next(iter(mine)))  # this key's least recently used
        mine[digest] = None
        self._sessions[digest] = Session(caller, now + self.ttl, name, key, idle_until=now + self.idle)
        while len(self._sessions) > self.max_sessions:
            self._drop(next(iter(self._sessions)))
        return session_id

    def get(self, session_id: str) -> Session | None:
        digest = self._digest(session_id)
        session = self._sessions.get(digest)
        if session is None:
            return None
        now = time.monotonic()
        if session.expires <= now or session.idle_until <= now:
            self._drop(digest)
            return None
        session.idle_until = now + self.idle
        self._sessions.move_to_end(digest)  # recently used: the last the caps end
        self._by_key[session.caller.key_id].move_to_end(digest)
        return session

    def end(self, session_id: str) -> bool:
        digest = self._digest(session_id)
        found = digest in self._sessions
        self._drop(digest)
        return found

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
        # Behind a TLS-terminating proxy the request itself is http; the sign-in page's Origin says https.
        secure=request.url.scheme == "https" or (scope_header(request.scope, b"origin") or b"").startswith(b"https://"),
    )
