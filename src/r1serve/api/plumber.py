"""``POST /deepseek_chat``: the R Plumber DeepSeek-R1 tutorial's endpoint, one prompt in and a chat
completion out. Served by the hot paths (api/hotpaths.py), which authenticate first.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from r1serve.api.auth import authenticate
from r1serve.api.requests import json_object
from r1serve.api.routes import ERRORS, registry_of, settings_of
from r1serve.api.serving import serve_chat
from r1serve.errors import InvalidRequest, ModelNotFound
from r1serve.protocol import ChatCompletionRequest, ChatMessage


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
                value = json_object(raw).get("prompt")
        elif raw:
            value = json_object(raw).get("prompt")
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

plumber = APIRouter(dependencies=[Depends(authenticate)], responses=ERRORS)


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
    registry = registry_of(request)
    name = _PLUMBER_MODEL
    try:
        served = registry.resolve(name)
    except ModelNotFound:
        served = registry.resolve(None)
        name = served.entry.id
    body = ChatCompletionRequest(model=name, messages=[ChatMessage(role="user", content=prompt)])
    return await serve_chat(request, body, served, settings_of(request), model_name=name)


