"""What every HTTP request carries from its first byte to its access line: :class:`RequestContext`.

:class:`~r1serve.api.middleware.RequestContextMiddleware` opens one per request (request id, start
time) and closes it (metrics, access line); the hot paths (api/hotpaths.py) find it in the scope and
record what the middleware cannot see, such as a client that hung up before any response (499).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import MutableMapping
from contextvars import Token
from typing import Any

from r1serve.api.metrics import observe
from r1serve.logs import log_access, request_id_var

# A client's own id is echoed only when it is safe to put in a log line and a header.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_HEADERS_KEY = "r1serve.headers"
_CONTEXT_KEY = "r1serve.context"


def scope_header(scope: MutableMapping[str, Any], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case, as ASGI gives names) straight from the scope:
    cheaper than building starlette's Headers on the request path, which looks up three headers (request
    id, authorization, content-length). The name -> value dict is built once per request, by C code,
    and kept in the scope."""
    raw = scope["headers"]
    cached = scope.get(_HEADERS_KEY)
    if cached is None or cached[0] is not raw:  # built for other headers (a middleware replaced them)
        # Reversed, so that the first of repeated headers is the one kept.
        cached = scope[_HEADERS_KEY] = (raw, dict(reversed(raw)))
    return cached[1].get(name)


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()  # uuid4().hex's 32 hex digits, without building a UUID


def request_id_from(scope: MutableMapping[str, Any]) -> str:
    """The request's id: the client's ``x-request-id`` when it is safe to echo, else a new one."""
    raw = scope_header(scope, b"x-request-id")
    if raw is not None:
        client_value = raw.decode("latin-1")
        if _SAFE_ID.fullmatch(client_value):
            return client_value
    return new_request_id()


class RequestContext:
    """One HTTP request's id, start time and final status."""

    __slots__ = ("request_id", "id_header", "started", "status", "body", "_token")

    def __init__(self, scope: MutableMapping[str, Any]) -> None:
        self.request_id = request_id_from(scope)
        self.id_header = (b"x-request-id", self.request_id.encode("latin-1"))
        self.started = time.perf_counter()
        # The status sent, or one recorded without a response (499: the client left first); 0: none yet.
        self.status = 0
        self.body: bytes | None = None  # the whole request body, once the middleware has read it
        self._token: Token[str] = request_id_var.set(self.request_id)
        scope[_CONTEXT_KEY] = self
        scope.setdefault("state", {})["request_id"] = self.request_id

    def close(self, scope: MutableMapping[str, Any]) -> None:
        """Metrics and the access line; the route label is the matched route's path template."""
        elapsed = time.perf_counter() - self.started
        route = scope.get("route")
        observe(getattr(route, "path", None) or "unmatched", scope["method"], self.status, elapsed)
        log_access(scope["method"], scope["path"], self.status, elapsed)
        request_id_var.reset(self._token)


def context_of(scope: MutableMapping[str, Any]) -> RequestContext | None:
    return scope.get(_CONTEXT_KEY)
