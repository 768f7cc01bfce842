"""The HTTP routes. Thin: parse, resolve the model, hand over to serving.py.

Request bodies are parsed here rather than by FastAPI's body injection so that any content type
carrying JSON is accepted (``curl -d`` sends form-urlencoded by default) and every parse or
validation failure becomes an OpenAI 400 with the failing field in ``param``.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from r1serve.api.auth import authenticate
from r1serve.api.errors import validation_error
from r1serve.api.serving import serve_chat, serve_completion
from r1serve.errors import InvalidRequest, ModelNotFound
from r1serve.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from r1serve.router import Router
from r1serve.settings import Settings

M = TypeVar("M", bound=BaseModel)

_ERRORS: dict[int | str, dict[str, Any]] = {
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


_TOO_DEEP = "The request body nests arrays or objects too deeply."


def _json_from(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequest("The request has no body; send a JSON object.", code="missing_required_parameter")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}). Send a JSON object "
            "with Content-Type: application/json."
        ) from None
    except RecursionError:
        raise InvalidRequest(_TOO_DEEP) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    # The json module takes what pydantic's parser (the fast path) refuses and nothing downstream can
    # handle: "\ud800" escapes that pair with nothing (no UTF-8 for the tokenizer or an upstream), and
    # nesting deep enough to exhaust the stack when a message is copied. orjson refuses both.
    try:
        orjson.dumps(data)
    except orjson.JSONEncodeError as exc:
        if "surrogate" in str(exc):
            raise InvalidRequest(
                "The request body has a \\u escape of half a UTF-16 surrogate pair (e.g. \\ud800 alone); "
                "text must be valid Unicode."
            ) from None
        if "ecursion" in str(exc):  # orjson's "Recursion limit reached" (no more exact way to tell)
            raise InvalidRequest(_TOO_DEEP) from None
        # Anything else orjson refuses (integers past 64 bits) is the json module's to accept.
    return data


async def _json_object(request: Request) -> dict[str, Any]:
    return _json_from(await request.body())


def parse_raw(raw: bytes, model: type[M]) -> M:
    """A request body (bytes) as ``model``; any failure is an InvalidRequest (400) naming the field."""
    try:
        # pydantic parses and validates the bytes in one pass, a little more than twice as fast as
        # json.loads + model_validate; a body it refuses takes the path below, which words the error.
        return model.model_validate_json(raw)
    except ValidationError:
        pass
    data = _json_from(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


async def parse_body(request: Request, model: type[M]) -> M:
    return parse_raw(await request.body(), model)


def router_of(request: Request) -> Router:
    return request.app.state.router  # type: ignore[no-any-return]


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- OpenAI API

api = APIRouter(dependencies=[Depends(authenticate)], responses=_ERRORS)


@api.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    openapi_extra=_body_doc(ChatCompletionRequest),
    summary="Create a chat completion (stream: SSE of chat.completion.chunk)",
)
async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    router = router_of(request)
    route = router.resolve(body.model)
    return await serve_chat(request, body, route, settings_of(request), model_name=body.model or route.entry.id)


@api.post(
    "/v1/completions",
    response_model=Completion,
    openapi_extra=_body_doc(CompletionRequest),
    summary="Create a raw text completion (the prompt is not templated; reasoning is not split)",
)
async def completions(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    route = router_of(request).resolve(body.model)
    return await serve_completion(request, body, route, settings_of(request), model_name=body.model or route.entry.id)


@api.get(
    "/v1/models",
    response_model=ModelList,
    response_model_exclude_none=True,
    summary="Models and aliases served here",
)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=router_of(request).cards())


@api.get(
    "/v1/models/{model_id:path}",
    response_model=ModelCard,
    response_model_exclude_none=True,
    summary="One model or alias",
)
async def get_model(request: Request, model_id: str) -> ModelCard:
    cards = router_of(request).cards()
    for card in cards:
        if card.id == model_id:
            return card
    for card in cards:
        if card.id.lower() == model_id.lower():
            return card
    raise ModelNotFound(f"The model `{model_id}` does not exist or is not served here", param="model")


# ----------------------------------------------------------------------------- the R Plumber tutorial's API


async def _deepseek_prompt(request: Request) -> str:
    """``prompt`` from the query, a form, or a JSON object, the ways Plumber clients send it."""
    value: Any = request.query_params.get("prompt")
    raw = (await request.body()).strip()  # read first: form() then replays it from the cache
    if value is None:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            form = await request.form()
            value = form.get("prompt")
            # `curl -d '{"prompt": ...}'` labels JSON as a form.
            if value is None and content_type == "application/x-www-form-urlencoded" and raw.startswith(b"{"):
                value = (await _json_object(request)).get("prompt")
        elif raw:
            value = (await _json_object(request)).get("prompt")
    # R's jsonlite without auto_unbox sends a scalar as a one-element array, and an empty one as [].
    if isinstance(value, list) and len(value) <= 1:
        value = value[0] if value else None
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(
            f"Invalid type for 'prompt': expected a string, got {_json_type(value)}.",
            param="prompt",
            code="invalid_type",
        )
    if value is None or not value.strip():
        raise InvalidRequest(
            'Missing prompt: send {"prompt": "..."} as JSON, or prompt as a query or form field.',
            param="prompt",
            code="missing_required_parameter",
        )
    return value


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, as a client wrote it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a file"  # the only other thing a form field holds


# What the tutorial asked its upstream for: the alias finds the R1 model served here, or the default.
_PLUMBER_MODEL = "deepseek-ai/DeepSeek-R1"

plumber = APIRouter(dependencies=[Depends(authenticate)], responses=_ERRORS)


@plumber.post(
    "/deepseek_chat",
    summary="One prompt in, {choices: [...]} out (the R Plumber DeepSeek-R1 tutorial's endpoint)",
    openapi_extra={
        "parameters": [{"name": "prompt", "in": "query", "required": False, "schema": {"type": "string"}}],
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {"schema": {"type": "object", "properties": {"prompt": {"type": "string"}}}},
                "application/x-www-form-urlencoded": {
                    "schema": {"type": "object", "properties": {"prompt": {"type": "string"}}}
                },
            },
        },
    },
)
async def deepseek_chat(request: Request) -> Response:
    prompt = await _deepseek_prompt(request)
    router = router_of(request)
    name = _PLUMBER_MODEL
    try:
        route = router.resolve(name)
    except ModelNotFound:
        route = router.resolve(None)
        name = route.entry.id
    body = ChatCompletionRequest(model=name, messages=[ChatMessage(role="user", content=prompt)])
    return await serve_chat(request, body, route, settings_of(request), model_name=name)


# ----------------------------------------------------------------------------- operations

ops = APIRouter()


# HEAD too (load balancers and uptime checkers probe with it), kept out of the OpenAPI schema, where a
# second method on one function would repeat its operation id.
@ops.head("/health", include_in_schema=False)
@ops.get("/health", summary="Liveness and the engines' state")
async def health(request: Request) -> JSONResponse:
    router = router_of(request)
    engines = [engine.health() for engine in router.engines()]
    ok = all(e.get("status") == "ok" for e in engines)
    return JSONResponse(
        {"status": "ok" if ok else "degraded", "model": router.default, "engines": engines},
        status_code=200 if ok else 503,
    )
