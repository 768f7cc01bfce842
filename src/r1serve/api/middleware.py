"""One pure-ASGI middleware for what every request needs: request id, body limit, access log, metrics,
and the last-resort 500.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: that one runs the app in a separate task and
hides ``http.disconnect`` from streaming responses, and a client that hangs up must stop its
generation promptly.
"""

from __future__ import annotations

import json
import logging
import time

from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from r1serve.api.context import log_access, request_id_from, request_id_var, scope_header
from r1serve.api.errors import error_body
from r1serve.api.metrics import observe

log = logging.getLogger("r1serve.api")

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = request_id_from(scope)
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        try:
            if scope["method"] in _BODY_METHODS:
                replay = await self._read_body(scope, receive, send_with_id)
                if replay is None:
                    return
                receive = replay
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Handlers render every expected error; this is a bug. Log it with the request id, tell
            # the client nothing about the internals.
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if status == 0:
                await _send_json(
                    send_with_id,
                    500,
                    error_body("The server had an error while processing your request.", "server_error"),
                )
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            route_label = getattr(route, "path", None) or "unmatched"
            observe(route_label, scope["method"], status, elapsed)
            log_access(scope["method"], scope["path"], status, elapsed)
            request_id_var.reset(token)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """The whole body, enforcing the limit; returns a receive that replays it, or None when a
        response (413) was already sent or the client left."""
        try:
            body = await read_body(scope, receive, self.max_body_bytes)
        except BodyTooLarge as exc:
            await _send_too_large(send, exc.limit)
            return None
        if body is None:
            return None

        pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            # After the body, the app's next receive waits for http.disconnect, as with the raw server.
            if pending:
                return pending.pop()
            return await receive()

        return replay


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole request body; None when the client left first. Raises BodyTooLarge past ``limit``
    (declared in content-length, or counted while reading)."""
    length = scope_header(scope, b"content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            declared = 0
        if declared > limit:
            raise BodyTooLarge(limit)

    message = await receive()
    if message["type"] == "http.disconnect":
        return None
    body: bytes = message.get("body", b"")
    if len(body) > limit:
        raise BodyTooLarge(limit)
    if not message.get("more_body", False):
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(body)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large_body(limit: int) -> dict[str, object]:
    return error_body(
        f"Request body too large: the limit is {limit} bytes (R1SERVE_MAX_BODY_BYTES).",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def too_large_response(limit: int) -> Response:
    # The unread rest of the body makes the connection unusable for another request.
    return Response(
        json.dumps(_too_large_body(limit)), status_code=413, media_type="application/json", headers={"connection": "close"}
    )


async def _send_too_large(send: Send, limit: int) -> None:
    # The unread rest of the body makes the connection unusable for another request.
    await _send_json(send, 413, _too_large_body(limit), extra_headers=[(b"connection", b"close")])


async def _send_json(
    send: Send, status: int, payload: dict[str, object], extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": data, "more_body": False})
