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
from r1serve.protocol.openai import MAX_COUNT


async def _plumber_fields(request: Request) -> dict[str, Any]:
    """The fields from the query, a form, or a JSON object, the ways Plumber clients send them."""
    fields: dict[str, Any] = dict(request.query_params)
    raw = (await request.body()).strip()  # read first: form() then replays it from the cache
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body: Any = {}
    if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        # `curl -d '{"prompt": ...}'` labels JSON as a form.
        if content_type == "application/x-www-form-urlencoded" and raw.startswith(b"{"):
            body = json_object(raw)
        else:
            body = dict(await request.form())
    elif raw:
        body = json_object(raw)
    for name, value in body.items():
        fields.setdefault(name, value)  # the query wins, as before
    # R's jsonlite without auto_unbox sends a scalar as a one-element array, and an empty one as [].
    for name, value in fields.items():
        if isinstance(value, list) and len(value) <= 1:
            fields[name] = value[0] if value else None
    return fields


def _prompt(fields: dict[str, Any]) -> str:
    value = fields.get("prompt")
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


def _max_tokens(fields: dict[str, Any]) -> int | None:
    """``max_tokens`` as JSON sends it (a number) or a query or form does (digits)."""
    value = fields.get("max_tokens")
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 10:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise InvalidRequest(
            f"max_tokens must be a whole number from 1 to {MAX_COUNT}.", param="max_tokens", code="invalid_value"
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

_PLUMBER_BODY = {
    "type": "object",
    "properties": {"prompt": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1}},
}

plumber = APIRouter(dependencies=[Depends(authenticate)], responses=ERRORS)


@plumber.post(
    "/deepseek_chat",
    summary="One prompt in, {choices: [...]} out (the R Plumber DeepSeek-R1 tutorial's endpoint)",
    openapi_extra={
        "parameters": [{"name": "prompt", "in": "query", "required": False, "schema": {"type": "string"}}],
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {"schema": _PLUMBER_BODY},
                "application/x-www-form-urlencoded": {"schema": _PLUMBER_BODY},
            },
        },
    },
)
async def deepseek_chat(request: Request) -> Response:
    fields = await _plumber_fields(request)
    prompt = _prompt(fields)
    max_tokens = _max_tokens(fields)
    registry = registry_of(request)
    name = _PLUMBER_MODEL
    try:
        served = registry.resolve(name)
    except ModelNotFound:
        served = registry.resolve(None)
        name = served.entry.id
    body = ChatCompletionRequest(model=name, messages=[ChatMessage(role="user", content=prompt)], max_tokens=max_tokens)
    return await serve_chat(request, body, served, settings_of(request), model_name=name)
