"""The HTTP routes: the OpenAI API and operations. Thin: parse, resolve the model, hand over to
serving.py.

POST /v1/chat/completions and POST /v1/completions (and /deepseek_chat, in plumber.py) are called by
the hot paths (api/hotpaths.py), not by FastAPI's router: the handlers below are the code that serves
them, FastAPI's registration describes them in /openapi.json and /docs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.responses import Response

from r1serve.api.auth import authenticate, optional_caller
from r1serve.api.deployment_scope import check_call
from r1serve.api.requests import check_messages, parse_raw, precheck_messages
from r1serve.api.serving import serve_chat, serve_completion
from r1serve.errors import ModelNotFound
from r1serve.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from r1serve.routing import ModelRegistry, ServedModel
from r1serve.settings import Settings

if TYPE_CHECKING:
    from r1serve.deployments import Supervisor

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Body too large"},
    503: {"model": ErrorResponse, "description": "Overloaded; retry after Retry-After seconds"},
}


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    # The schema itself is added to components by app.py (see _openapi).
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


# From the scope: Request.app and app.state are properties and __getattr__ lookups, twice per request.
def registry_of(request: Request) -> ModelRegistry:
    return request.scope["app"].state.registry  # type: ignore[no-any-return]


def settings_of(request: Request) -> Settings:
    return request.scope["app"].state.settings  # type: ignore[no-any-return]


def resolve_served(request: Request, name: str | None) -> ServedModel:
    """The registry's model for ``name``, else the deployment of that name (its name is a model name on
    /v1 too, served by its replicas); the registry's names win, and cost nothing extra."""
    try:
        return registry_of(request).resolve(name)
    except ModelNotFound:
        supervisor: Supervisor | None = request.scope["app"].state.deployments
        if name and supervisor is not None and supervisor.by_name(name) is not None:
            check_call(request, name)  # a scoped key must name the deployment itself
            return supervisor.served(name)
        raise


# ----------------------------------------------------------------------------- OpenAI API

api = APIRouter(dependencies=[Depends(authenticate)], responses=ERRORS)


@api.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    openapi_extra=_body_doc(ChatCompletionRequest),
    summary="Create a chat completion (stream: SSE of chat.completion.chunk)",
)
async def chat_completions(request: Request) -> Response:
    """Served by the hot paths (api/hotpaths.py), which authenticate first."""
    raw, settings = await request.body(), settings_of(request)
    precheck_messages(raw, settings)
    body = parse_raw(raw, ChatCompletionRequest)
    check_messages(body, settings)
    served = resolve_served(request, body.model)
    return await serve_chat(request, body, served, settings, model_name=body.model or served.entry.id)


@api.post(
    "/v1/completions",
    response_model=Completion,
    openapi_extra=_body_doc(CompletionRequest),
    summary="Create a raw text completion (the prompt is not templated; reasoning is not split)",
)
async def completions(request: Request) -> Response:
    """Served by the hot paths (api/hotpaths.py), which authenticate first."""
    body = parse_raw(await request.body(), CompletionRequest)
    served = resolve_served(request, body.model)
    return await serve_completion(request, body, served, settings_of(request), model_name=body.model or served.entry.id)


@api.get(
    "/v1/models",
    response_model=ModelList,
    response_model_exclude_none=True,
    summary="Models and aliases served here",
)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=registry_of(request).cards())


@api.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    response_model_exclude_none=True,
    summary="One model or alias",
)
async def get_model(request: Request, model_id: str) -> ModelCard:
    cards = registry_of(request).cards()
    for card in cards:
        if card.id == model_id:
            return card
    for card in cards:
        if card.id.lower() == model_id.lower():
            return card
    raise ModelNotFound(f"The model `{model_id}` does not exist or is not served here", param="model")


# ----------------------------------------------------------------------------- operations

ops = APIRouter()


# HEAD too (load balancers and uptime checkers probe with it), kept out of the OpenAPI schema, where a
# second method on one function would repeat its operation id.
@ops.head("/health", include_in_schema=False)
@ops.get("/health", summary="Liveness and the engines' state")
async def health(request: Request) -> JSONResponse:
    """State for everyone; upstream addresses and error text only for an admin key (the page is public)."""
    registry = registry_of(request)
    engines = [engine.health() for engine in registry.engines()]
    caller = await optional_caller(request)
    if caller is None or not caller.admin:
        engines = [_without_detail(e) for e in engines]
    ok = all(e.get("status") == "ok" for e in engines)
    return JSONResponse(
        {"status": "ok" if ok else "degraded", "model": registry.default, "engines": engines},
        status_code=200 if ok else 503,
    )


# Keys of engines' health that are for operators: an upstream's error text can hold internal paths and
# credentials, and its address says where the capacity is.
_OPERATOR_DETAIL = frozenset({"last_error", "base_url"})


def _without_detail(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_detail(v) for k, v in value.items() if k not in _OPERATOR_DETAIL}
    if isinstance(value, list):
        return [_without_detail(v) for v in value]
    return value
