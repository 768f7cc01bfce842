"""The hot path: ``POST /v1/chat/completions`` and ``POST /v1/completions`` served as raw ASGI, in front of
FastAPI.

These two requests are what a gateway spends its life on, and FastAPI's machinery (routing, dependency
solving, its own middlewares, three ``send`` wrappers, an exception middleware, a two-task disconnect
watch per request) cost more CPU than the upstream call itself. This module does the same work directly:

* request id (``x-request-id`` echoed or minted, in the log context), body limit (413), access log line
  and HTTP metrics with the same route label, exactly as :class:`~r1serve.api.middleware.RequestContextMiddleware`;
* auth through the same :func:`~r1serve.api.auth.authenticate` (whatever ``app.state.authenticator``
  is: static keys or the accounts layer), before the body is parsed, as the route's dependency did;
* body parsing and validation, routing, serving, metering: the same functions the FastAPI routes call
  (routes.py, serving.py, billing.py), so bodies, headers and error bodies are identical;
* client disconnects: one watcher task per request still running after ``WATCH_AFTER`` seconds, which
  cancels the request's own task when the client hangs up, whether it is waiting for a whole answer,
  for a stream's first delta, or mid-stream. The cancellation closes the engine stream (and so the
  generation) and settles the meter as cancelled.

The FastAPI routes stay registered: they describe the endpoints in ``/openapi.json`` and ``/docs``, and
serve any request the fast path does not take (other methods, which FastAPI answers 405).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from r1serve.api.auth import authenticate
from r1serve.api.context import log_access, request_id_from, request_id_var
from r1serve.api.errors import _http_error, error_body, r1serve_error_response, validation_error
from r1serve.api.metrics import observe
from r1serve.api.middleware import BodyTooLarge, read_body, too_large_response
from r1serve.api.routes import parse_raw
from r1serve.api.serving import DONE_EVENT, ClientDisconnected, serve_chat, serve_completion
from r1serve.errors import R1ServeError
from r1serve.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("r1serve.api")

Serve = Callable[..., Awaitable[Response]]

# path -> (body model, serving function); the paths are also the metrics' route labels.
FAST_ROUTES: dict[str, tuple[type[BaseModel], Serve]] = {
    "/v1/chat/completions": (ChatCompletionRequest, serve_chat),
    "/v1/completions": (CompletionRequest, serve_completion),
}

_INTERNAL_ERROR = "The server had an error while processing your request."
_DONE = DONE_EVENT.encode()


def fast_route(scope: Scope) -> tuple[str, tuple[type[BaseModel], Serve]] | None:
    """The fast route for this request, or None for FastAPI to handle it."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path: str = scope["path"]
    root = scope.get("root_path")
    if root and path.startswith(root):
        path = path[len(root) :]
    handler = FAST_ROUTES.get(path)
    return None if handler is None else (path, handler)


# A request still running this long (up to twice this long) gets its disconnect watcher.
WATCH_AFTER = 0.1


class _Watch:
    """Cancels ``task`` when the client disconnects before ``done`` is set.

    The watcher (a task waiting on ``receive``, cancelled at the end) costs a request more CPU than its
    routing and metering together, and most gateway requests are over within milliseconds, before a
    hang-up could save anything. So it starts only for requests still running after ``WATCH_AFTER`` seconds
    (see :class:`_Pending`); one that has already disconnected by then is seen at once."""

    __slots__ = ("disconnected", "done", "task", "watcher", "receive", "pending")

    def __init__(self, receive: Receive) -> None:
        self.disconnected = False
        self.done = False
        self.task = asyncio.current_task()
        self.receive = receive
        self.watcher: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        pending = _pending.get(loop)
        if pending is None:
            pending = _pending[loop] = _Pending()
        self.pending = pending
        pending.add(self)

    def start(self) -> None:
        if not self.done and self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch(self.receive))

    async def _watch(self, receive: Receive) -> None:
        # The body has been read: the next message can only be http.disconnect (servers also send it
        # once the response is complete, which is what ``done`` is for: it is set before the last
        # message of the response is sent).
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.done and self.task is not None:
            self.disconnected = True
            self.task.cancel()

    def stop(self) -> None:
        self.done = True
        self.pending.discard(self)
        if self.watcher is not None:
            self.watcher.cancel()
            # The cancelled watcher keeps its CancelledError, whose traceback holds the watcher's frame,
            # which holds this object: without these lines every watched request would leave a reference
            # cycle through both tasks and everything their frames reference, for the garbage collector
            # to find (it was ~10% of a busy server's CPU).
            self.watcher = None
        self.task = None


class _Pending:
    """An event loop's watches whose watcher has not started, in two generations: every ``WATCH_AFTER``
    seconds the older one gets its watchers and the younger one becomes the older. One timer per loop,
    running while any request is pending, instead of one per request."""

    def __init__(self) -> None:
        # No reference to the loop: it is this object's key in the weak dictionary below.
        self.timer: asyncio.TimerHandle | None = None
        self.young: set[_Watch] = set()
        self.old: set[_Watch] = set()

    def add(self, watch: _Watch) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._tick)
        self.young.add(watch)

    def discard(self, watch: _Watch) -> None:
        self.young.discard(watch)
        self.old.discard(watch)

    def _tick(self) -> None:
        due, self.old, self.young = self.old, self.young, set()
        for watch in due:
            watch.start()
        self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._tick) if self.old else None


# Per event loop (tests run apps on several, a TestClient in a thread of its own).
_pending: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pending] = weakref.WeakKeyDictionary()


async def serve_fast(
    app: Any, route_path: str, handler: tuple[type[BaseModel], Serve], scope: Scope, receive: Receive, send: Send
) -> None:
    settings = app.state.settings
    request_id = request_id_from(scope)
    token = request_id_var.set(request_id)
    state = scope.get("state")
    if state is None:
        state = scope["state"] = {}
    state["request_id"] = request_id
    id_header = (b"x-request-id", request_id.encode("latin-1"))
    started = time.perf_counter()
    status = 0
    watch: _Watch | None = None
    request: Request | None = None
    try:
        try:
            raw = await read_body(scope, receive, settings.max_body_bytes)
        except BodyTooLarge as exc:
            status = await _send_response(too_large_response(exc.limit), send, id_header)
            return
        if raw is None:  # the client left while sending the body
            return
        watch = _Watch(receive)
        request = Request(scope, receive)
        try:
            await authenticate(request)
            model, serve = handler
            body: Any = parse_raw(raw, model)
            route = app.state.router.resolve(body.model)
            response = await serve(
                request, body, route, settings, model_name=body.model or route.entry.id, watch=False
            )
            if isinstance(response, StreamingResponse):
                status = response.status_code
                await _send_stream(response, send, id_header, watch)
            else:
                watch.done = True  # all computed: a hang-up from here on has nothing left to cancel
                status = await _send_response(response, send, id_header)
        except asyncio.CancelledError:
            if not watch.disconnected:
                raise  # the server is shutting down
            # The client hung up; the cancellation closed the engine stream on its way out.
            if watch.task is not None:
                watch.task.uncancel()
            _settle_cancelled(request)
            if status == 0:
                status = 499  # nginx's "client closed request", as the FastAPI path logs it
        except Exception as exc:
            response = await _error_response(request, exc)
            watch.done = True
            if status == 0:  # nothing sent yet
                status = await _send_response(response, send, id_header)
    finally:
        if watch is not None:
            watch.stop()
        elapsed = time.perf_counter() - started
        observe(route_path, "POST", status, elapsed)
        log_access("POST", scope["path"], status, elapsed)
        request_id_var.reset(token)


def _settle_cancelled(request: Request | None) -> None:
    meter = None if request is None else request.scope["state"].get("meter")
    if meter is not None:
        meter.finish("cancelled")  # idempotent: settles a reservation whose generation never started


async def _error_response(request: Request | None, exc: Exception) -> Response:
    """The response the FastAPI app's exception handlers would render for ``exc``."""
    if isinstance(exc, R1ServeError):
        if exc.status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return r1serve_error_response(exc)
    if isinstance(exc, ValidationError):
        return r1serve_error_response(validation_error(exc.errors()))
    if isinstance(exc, ClientDisconnected):
        _settle_cancelled(request)
        return Response(status_code=499)
    if isinstance(exc, StarletteHTTPException) and request is not None:
        return await _http_error(request, exc)
    # Handlers render every expected error; this is a bug. Log it with the request id, tell the client
    # nothing about the internals.
    log.error("unhandled error in POST %s", request.url.path if request else "?", exc_info=exc)
    return Response(
        json.dumps(error_body(_INTERNAL_ERROR, "server_error")), status_code=500, media_type="application/json"
    )


async def _send_response(response: Response, send: Send, id_header: tuple[bytes, bytes]) -> int:
    headers = response.raw_headers
    headers.append(id_header)
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})
    return response.status_code


async def _send_stream(
    response: StreamingResponse, send: Send, id_header: tuple[bytes, bytes], watch: _Watch
) -> None:
    """The SSE body, event by event as the engine produces them; the body iterator (and so the engine
    stream and its meter) is closed however this ends: finished, client gone, or cancelled."""
    iterator: Any = response.body_iterator
    headers = response.raw_headers
    headers.append(id_header)
    try:
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        async for chunk in iterator:
            body = chunk.encode() if isinstance(chunk, str) else chunk
            if body.endswith(_DONE):
                # The last event (sse_events ends every stream with it): it closes the response in the
                # same write, and the iterator has nothing more to give (closing it, below, cleans up).
                watch.done = True  # servers report http.disconnect once the response is complete
                await send({"type": "http.response.body", "body": body, "more_body": False})
                return
            message: Message = {"type": "http.response.body", "body": body, "more_body": True}
            await send(message)
        watch.done = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        pass  # the connection is gone (a server that reports it on send rather than with http.disconnect)
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()
