"""One pure-ASGI middleware for what every request needs: request id, the browser guard (api/guard.py),
body limit, access log, metrics, and the last-resort 500. Every request passes through it, the hot
paths' included (see api/app.py for the order of the stack).

Pure ASGI rather than Starlette's BaseHTTPMiddleware: that one runs the app in a separate task and
hides ``http.disconnect`` from streaming responses, and a client that hangs up must stop its
generation promptly.
"""

from __future__ import annotations

import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from r1serve.api.context import RequestContext, scope_header
from r1serve.api.errors import INTERNAL_ERROR, error_body, r1serve_error_body
from r1serve.api.guard import BrowserGuard
from r1serve.errors import R1ServeError

log = logging.getLogger("r1serve.api")

_BODY_METHODS = {"POST", "PUT", "PATCH"}


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, guard: BrowserGuard | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        ctx = RequestContext(scope)
        id_header = ctx.id_header

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                ctx.status = message["status"]
                headers = message.get("headers")
                # Responses here build their headers as a fresh list: append in place, no copy.
                if isinstance(headers, list):
                    headers.append(id_header)
                else:
                    message["headers"] = [*(headers or ()), id_header]
            await send(message)

        try:
            if self.guard is not None and (refused := self.guard.refusal(scope)) is not None:
                await _send_error(send_with_id, refused)
                return
            if scope["method"] in _BODY_METHODS:
                replay = await self._read_body(scope, receive, send_with_id, ctx)
                if replay is None:
                    return
                receive = replay
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Handlers render every expected error; this is a bug. Log it with the request id, tell
            # the client nothing about the internals.
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if ctx.status == 0:
                await _send_json(send_with_id, 500, error_body(INTERNAL_ERROR, "server_error"))
        finally:
            ctx.close(scope)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send, ctx: RequestContext) -> Receive | None:
        """The whole body, enforcing the limit, kept in ``ctx``; returns a receive that replays it, or
        None when a response (413) was already sent or the client left."""
        try:
            body = await read_body(scope, receive, self.max_body_bytes)
        except BodyTooLarge as exc:
            # The unread rest of the body makes the connection unusable for another request.
            await _send_json(send, 413, too_large_body(exc.limit), extra_headers=[(b"connection", b"close")])
            return None
        if body is None:
            return None
        if self.guard is not None and (refused := self.guard.media_refusal(scope, body)) is not None:
            await _send_error(send, refused)
            return None
        ctx.body = body

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


def too_large_body(limit: int) -> dict[str, object]:
    return error_body(
        f"Request body too large: the limit is {limit} bytes (R1SERVE_MAX_BODY_BYTES).",
        "invalid_request_error",
        None,
        "request_too_large",
    )


async def _send_json(
    send: Send, status: int, payload: dict[str, object], extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": data, "more_body": False})


async def _send_error(send: Send, exc: R1ServeError) -> None:
    await _send_json(send, exc.status, r1serve_error_body(exc))
