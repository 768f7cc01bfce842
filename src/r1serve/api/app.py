"""The FastAPI application: routes, error rendering, the middleware stack, and the engines' lifetime.

A request's way through it (:meth:`R1ServeApp.build_middleware_stack`)::

    middlewares added with add_middleware, outermost first: RequestContextMiddleware (request id,
    browser guard, body limit, access line, metrics, last-resort 500) and any added later
      -> HotPaths (api/hotpaths.py): POST /v1/chat/completions, /v1/completions, /deepseek_chat and
         /deployments/{name}/v1/chat/completions, .../v1/completions
         -> their handlers in routes.py / plumber.py / deployments_routes.py, called directly
      -> FastAPI's own stack and router: everything else
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

import r1serve
from r1serve.accounts import Accounts
from r1serve.api.accounts_routes import accounts_api, open_accounts, use_accounts
from r1serve.api.auth import StaticKeys
from r1serve.api.console import console_router
from r1serve.api.deployments_routes import deployments_api, running_deployments
from r1serve.api.errors import install_error_handlers
from r1serve.api.guard import BrowserGuard
from r1serve.api.hotpaths import HotPaths, hot_routes
from r1serve.api.metrics import metrics_endpoint
from r1serve.api.middleware import RequestContextMiddleware
from r1serve.api.plumber import plumber
from r1serve.api.routes import api, ops
from r1serve.api.sessions import SessionStore
from r1serve.api.signin import signin_api
from r1serve.protocol import ChatCompletionRequest, CompletionRequest
from r1serve.routing import ModelRegistry
from r1serve.routing.build import build_registry, close_registry
from r1serve.settings import Settings

# Bodies parsed by the handlers themselves, so FastAPI does not see their schemas.
_BODY_MODELS: tuple[type[BaseModel], ...] = (ChatCompletionRequest, CompletionRequest)


class R1ServeApp(FastAPI):
    """FastAPI, with the generation endpoints' hot paths between the middlewares and FastAPI's own stack."""

    # The routers holding the hot paths' routes (set by create_app, read when the stack is built).
    hot_routers: tuple[APIRouter, ...] = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)  # lifespan, websockets: FastAPI's as they are
            return
        # Starlette's __call__, without FastAPI's: that one looks up OpenTelemetry's providers on every
        # request (about 13 us each here, /tmp-free measure: bench/gateway/count.py), for a tracing
        # integration r1serve does not use (its metrics are Prometheus, /metrics).
        if self.root_path:
            scope["root_path"] = self.root_path
        scope["app"] = self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        await self.middleware_stack(scope, receive, send)

    def build_middleware_stack(self) -> ASGIApp:
        # FastAPI's stack without the user middlewares: its error middlewares, exception handlers, router.
        user, self.user_middleware = self.user_middleware, []
        try:
            inner = super().build_middleware_stack()
        finally:
            self.user_middleware = user
        app: ASGIApp = HotPaths(inner, hot_routes(r for router in self.hot_routers for r in router.routes))
        for cls, args, kwargs in reversed(user):
            app = cls(app, *args, **kwargs)
        return app


def create_app(settings: Settings, registry: ModelRegistry | None = None, accounts: Accounts | None = None) -> FastAPI:
    """The server for ``settings``.

    Without ``registry`` the app owns its engines: startup fetches ``settings.model`` if needed and loads
    it into the embedded engine, shutdown closes it. A given registry is used as it is: its engines must
    be running already and whoever built it closes them.

    Accounts (keys, limits, ledger): a given ``accounts`` is used as it is (its owner starts and closes
    it); without one, an app that owns its engines opens the accounts database at startup and closes
    it (flushing the ledger) at shutdown. An app with neither checks only ``R1SERVE_API_KEYS``.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if registry is not None:
            async with running_deployments(app, settings, accounts):
                _settle_heap()
                yield
            return
        owned = await asyncio.to_thread(open_accounts, settings)
        use_accounts(app, owned)
        try:
            built = await build_registry(settings)
            app.state.registry = built
            try:
                async with running_deployments(app, settings, owned):
                    _settle_heap()
                    yield
            finally:
                await close_registry(built)  # generations end and settle before the ledger's last flush
        finally:
            await asyncio.to_thread(owned.close)

    app = R1ServeApp(
        title="r1serve",
        version=r1serve.__version__,
        description="OpenAI-compatible API for DeepSeek-R1 family reasoning models.",
        lifespan=lifespan,
        docs_url=None,  # the console serves /docs from the package's own files (api/console.py)
        redoc_url=None,
    )
    app.state.settings = settings
    if registry is not None:
        app.state.registry = registry
    app.state.authenticator = StaticKeys(settings.api_keys)
    app.state.accounts = None  # set, so that per-request lookups find it without raising AttributeError
    app.state.deployments = None  # the Supervisor, while the app runs with an accounts database
    app.state.sessions = SessionStore(
        settings.console_session_ttl, settings.console_max_sessions, settings.console_session_idle
    )
    if accounts is not None:
        use_accounts(app, accounts)

    app.include_router(api)
    app.include_router(plumber)
    app.include_router(accounts_api)
    app.include_router(deployments_api)
    app.hot_routers = (api, plumber, deployments_api)
    app.include_router(ops)
    app.include_router(signin_api)
    app.include_router(console_router())
    app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)

    install_error_handlers(app)
    guard = BrowserGuard(settings.host, settings.allowed_hosts, settings.allowed_origins)
    app.add_middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, guard=guard)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


# Generation-0 collection threshold while serving (CPython's default is 700).
GC_GEN0_THRESHOLD = 20_000


def _settle_heap() -> None:
    """Move everything alive after startup (FastAPI, pydantic schemas, the catalog, the engines...) out of
    the garbage collector's view: they live as long as the server, and the collector would otherwise walk
    all of them in every full collection, which request garbage triggers every few thousand requests. It
    was several percent of a busy gateway's CPU.

    Then collect generation 0 less often. The collector runs when allocations outnumber deallocations by
    the threshold, and the objects of the requests in flight (some dozens each) are what keeps that count
    high: with 64 concurrent requests and the default 700 it ran every few requests, walked those same live
    objects each time and promoted them to older generations, to be walked again: about 10% of a busy
    gateway's CPU, for garbage that reference counting frees anyway. Cyclic garbage is still collected,
    after some thousands of requests instead of a few."""
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    if 0 < gen0 < GC_GEN0_THRESHOLD:  # 0: the collector was disabled on purpose
        gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        # Validation failures are 400s with OpenAI's error body here, never FastAPI's 422.
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        for model in _BODY_MODELS:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
    return app.openapi_schema
