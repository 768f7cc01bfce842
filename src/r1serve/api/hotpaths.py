"""The generation endpoints' short way through the app: ``POST /v1/chat/completions``, ``POST
/v1/completions``, ``POST /deepseek_chat`` and a deployment's endpoint URL
(``POST /deployments/{name}/v1/chat/completions`` and ``.../v1/completions``).

Where a request goes (api/app.py builds the stack)::

    RequestContextMiddleware and any middleware added with add_middleware (request id, body limit,
    access line, metrics, last-resort 500)
      -> HotPaths: a POST to a generation endpoint -> its handler in routes.py, called directly
      -> FastAPI's own stack (its error middlewares, exception handlers, router) for everything else

These requests are what a gateway spends its life on, and FastAPI's routing, dependency solving, its
inner middlewares and Starlette's per-response disconnect task group cost more CPU than the upstream
call itself. So HotPaths calls the very handler functions FastAPI has registered (one code path, and
the OpenAPI docs describe them), doing for them what FastAPI would: the routes' one dependency
(:func:`~r1serve.api.auth.authenticate`, checked when the table is built), error rendering through the
same :func:`~r1serve.api.errors.render_error` as FastAPI's handlers, and sending the response. It adds
the one disconnect mechanism (api/disconnect.py): a client that hangs up cancels its request, which
closes the engine stream and settles its meter as cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from r1serve.api.auth import authenticate
from r1serve.api.chunks import DONE_EVENT
from r1serve.api.context import context_of
from r1serve.api.disconnect import Watch
from r1serve.api.errors import render_error

Handler = Callable[[Request], Awaitable[Response]]

# The POST endpoints served here; their handlers live in routes.py.
HOT_PATHS = ("/v1/chat/completions", "/v1/completions", "/deepseek_chat")
# A deployment's endpoint URL (handlers in deployments_routes.py, which take the name as their one path
# parameter): through FastAPI's router these cost a parent about a third more CPU than /v1 does, which on
# a replica's answer, after the process has slept through its generation, was ~0.5 ms of the deployment
# URL's added latency (BENCHMARKS.md, Deployments).
DEPLOYMENT_PREFIX = "/deployments/"
DEPLOYMENT_SUFFIXES = ("/v1/chat/completions", "/v1/completions")
DEPLOYMENT_HOT_PATHS = tuple(DEPLOYMENT_PREFIX + "{name}" + suffix for suffix in DEPLOYMENT_SUFFIXES)

_DONE = DONE_EVENT.encode()


def hot_routes(routes: Iterable[BaseRoute]) -> dict[str, APIRoute]:
    """The registered POST routes of :data:`HOT_PATHS`, checked to need nothing from FastAPI but
    :func:`authenticate` (a dependency added later would otherwise be skipped without a word)."""
    found: dict[str, APIRoute] = {}
    for route in routes:
        if not (isinstance(route, APIRoute) and "POST" in (route.methods or ())):
            continue
        if route.path in HOT_PATHS:
            params: list[str] = []
        elif route.path in DEPLOYMENT_HOT_PATHS:
            params = ["name"]
        else:
            continue
        calls = [dep.call for dep in route.dependant.dependencies]
        if (
            calls != [authenticate]
            or [p.name for p in route.dependant.path_params] != params
            or route.dependant.query_params
        ):
            raise RuntimeError(
                f"POST {route.path} is served by api/hotpaths.py, which runs only the authenticate "
                f"dependency (and passes no parameter but a deployment's name); its route declares {calls}: "
                "serve it through FastAPI or extend HotPaths"
            )
        found[route.path] = route
    missing = set(HOT_PATHS + DEPLOYMENT_HOT_PATHS) - set(found)
    if missing:
        raise RuntimeError(f"hot paths without a registered route: {sorted(missing)}")
    return found


class HotPaths:
    """ASGI: the generation endpoints straight to their handlers, everything else to ``app``."""

    def __init__(self, app: ASGIApp, routes: dict[str, APIRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            root = scope.get("root_path")
            if root and path.startswith(root):
                path = path[len(root) :]
            route = self.routes.get(path)
            if route is not None:
                scope["route"] = route  # as FastAPI's router sets it: the metrics' route label
                await serve(route.endpoint, scope, receive, send)
                return
            if path.startswith(DEPLOYMENT_PREFIX):
                found = self._deployment(path)
                if found is not None:
                    route, name = found
                    scope["route"] = route
                    scope["path_params"] = {"name": name}  # as the router's match would (request.path_params)
                    endpoint = route.endpoint
                    await serve(lambda request: endpoint(request, name), scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _deployment(self, path: str) -> tuple[APIRoute, str] | None:
        """``/deployments/NAME/v1/...`` -> its route and NAME, matched as the router's ``{name}`` (one
        non-empty path segment); anything else is left to the router (and its 404)."""
        for suffix in DEPLOYMENT_SUFFIXES:
            if path.endswith(suffix):
                name = path[len(DEPLOYMENT_PREFIX) : len(path) - len(suffix)]
                if name and "/" not in name:
                    return self.routes[DEPLOYMENT_PREFIX + "{name}" + suffix], name
        return None


async def serve(handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    ctx = context_of(scope)
    if ctx is not None and ctx.body is not None:
        # The body RequestContextMiddleware read, where Request.body() caches it: its replay and
        # Starlette's stream generator cost this hot path more than its routing.
        request._body = ctx.body
    else:
        await request.body()
    # The body has been read (the watcher skips its replay): the next message can only be http.disconnect.
    watch = Watch(receive)
    try:
        try:
            await authenticate(request)
            response = await handler(request)
        except Exception as exc:
            response = await render_error(request, exc)  # re-raises what it does not render (a bug)
        if isinstance(response, StreamingResponse):
            await _send_stream(response, send, watch)
        else:
            watch.done = True  # all computed: a hang-up from here on has nothing left to cancel
            await _send_whole(response, send)
    except asyncio.CancelledError:
        if not watch.disconnected:
            raise  # the server is shutting down
        # The client hung up; the cancellation closed the engine stream on its way out.
        if watch.task is not None:
            watch.task.uncancel()
        meter = scope["state"].get("meter")
        if meter is not None:
            meter.finish("cancelled")  # idempotent: settles a reservation whose generation never started
        if ctx is not None and ctx.status == 0:
            ctx.status = 499  # nginx's "client closed request", for the access line and metrics
    finally:
        watch.stop()


async def _send_whole(response: Response, send: Send) -> None:
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": False})


async def _send_stream(response: StreamingResponse, send: Send, watch: Watch) -> None:
    """The SSE body, event by event as the engine produces them; the body iterator (and so the engine
    stream and its meter) is closed however this ends: finished, client gone, or cancelled."""
    iterator: Any = response.body_iterator
    try:
        await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
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
        await iterator.aclose()
