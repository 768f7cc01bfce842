"""Serving one generation: the OpenAI request mapped to the engine's (api/requests.py), metered
(api/billing.py), generated, and answered as one JSON body (api/bodies.py) or an SSE stream
(api/chunks.py).

The handlers in routes.py parse the body and resolve the model, then call :func:`serve_chat` or
:func:`serve_completion`; the hot paths (api/hotpaths.py) call those handlers and send what they return.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from r1serve.api.billing import Meter, open_meter
from r1serve.api.bodies import Collected, chat_completion_body, collect, completion_body
from r1serve.api.chunks import ChatChunkEncoder, CompletionChunkEncoder, Encoder, sse_events
from r1serve.api.requests import chat_generation_request, check_json_schema, completion_generation_request
from r1serve.api.responses import JSONBody, SSEResponse, generation_headers
from r1serve.api.tools import check_tool_schemas
from r1serve.engines.base import Delta, GenerationRequest
from r1serve.engines.tools import with_tool_calls
from r1serve.models.catalog import Prices
from r1serve.protocol import ChatCompletionRequest, CompletionRequest, jsonfast
from r1serve.routing import ServedModel
from r1serve.settings import Settings


def new_id(prefix: str) -> str:
    """``prefix`` and 32 hex digits: the time in microseconds (13 digits), then 76 random bits. Ids that
    grow with time land at the end of the ledger's unique index, so a commit touches one index page
    instead of one per row: random ids made each ledger row cost 4x as much once the ledger held
    100,000 rows (bench/gateway/ledger_ids.py)."""
    return f"{prefix}{time.time_ns() // 1000:013x}{os.urandom(10).hex()[:19]}"


def cache_scope(request: Request) -> str | None:
    """The caller's key (its ledger id): requests reuse the prompts cached for their own key only. None on
    an open server, whose callers are one tenant."""
    caller = getattr(request.state, "caller", None)
    return None if caller is None else caller.key_id


async def serve_chat(
    request: Request, req: ChatCompletionRequest, served: ServedModel, settings: Settings, *, model_name: str
) -> Response:
    gen = chat_generation_request(req, served, settings, request.state.request_id)
    if gen.response_format is not None and gen.response_format.json_schema is not None:
        await asyncio.to_thread(check_json_schema, gen.response_format)
    if gen.tools:
        await asyncio.to_thread(check_tool_schemas, gen.tools)
    gen.cache_scope = cache_scope(request)
    completion_id, created = new_id("chatcmpl-"), int(time.time())

    def encoder(prices: Prices) -> Encoder:
        return ChatChunkEncoder(
            completion_id=completion_id,
            created=created,
            model=model_name,
            prices=prices,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            include_reasoning=req.include_reasoning,
        )

    def body(collected: Collected, prices: Prices) -> dict[str, Any]:
        return chat_completion_body(
            collected, completion_id=completion_id, created=created, model=model_name, prices=prices
        )

    return await _serve(
        request, req, served, gen, completion_id, model_name,
        encoder=encoder, body=body, include_reasoning=req.include_reasoning,
    )  # fmt: skip


async def serve_completion(
    request: Request, req: CompletionRequest, served: ServedModel, settings: Settings, *, model_name: str
) -> Response:
    gen = completion_generation_request(req, served, settings, request.state.request_id)
    if gen.response_format is not None and gen.response_format.json_schema is not None:
        await asyncio.to_thread(check_json_schema, gen.response_format)
    gen.cache_scope = cache_scope(request)
    completion_id, created = new_id("cmpl-"), int(time.time())
    echo = gen.prompt if req.echo else None
    want_logprobs = req.logprobs is not None

    def encoder(prices: Prices) -> Encoder:
        return CompletionChunkEncoder(
            completion_id=completion_id,
            created=created,
            model=model_name,
            prices=prices,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            echo=echo,
            want_logprobs=want_logprobs,
        )

    def body(collected: Collected, prices: Prices) -> dict[str, Any]:
        return completion_body(
            collected,
            completion_id=completion_id,
            created=created,
            model=model_name,
            prices=prices,
            echo=echo,
            want_logprobs=want_logprobs,
        )

    return await _serve(request, req, served, gen, completion_id, model_name, encoder=encoder, body=body)


async def _serve(
    request: Request,
    req: ChatCompletionRequest | CompletionRequest,
    served: ServedModel,
    gen: GenerationRequest,
    completion_id: str,
    model_name: str,
    *,
    encoder: Callable[[Prices], Encoder],
    body: Callable[[Collected, Prices], dict[str, Any]],
    include_reasoning: bool = True,
) -> Response:
    """What chat and raw completions share: metering, then an SSE stream or one JSON body."""
    headers = generation_headers(served, req.unknown_fields())
    # None without accounts (or for an open caller): nothing to check, count or settle.
    meter = open_meter(request, served, gen, model_name=model_name, response_id=completion_id)
    prices = served.entry.prices
    if meter is not None:
        await meter.admit()  # scope and limits (429) before any generation
        prices = meter.prices(prices)
    first, rest = await _start(served, gen, meter)
    if req.stream:
        return SSEResponse(sse_events(first, rest, encoder(prices)), headers)
    collected = await collect(first, rest, include_reasoning=include_reasoning)
    return JSONBody(jsonfast.dumps(body(collected, prices)), headers)


async def _start(
    served: ServedModel, gen: GenerationRequest, meter: Meter | None = None
) -> tuple[Delta, AsyncGenerator[Delta, None]]:
    """Begin generating and wait for the first delta, so that bad input (context too long, queue full)
    becomes an HTTP error status rather than an error inside a 200 stream. The meter (accounts) sees
    every delta and settles the request however the stream ends."""
    stream = served.engine.generate(gen)
    if gen.tools and gen.tool_choice != "none":
        stream = with_tool_calls(stream, frozenset(t.function.name for t in gen.tools))
    if meter is not None:
        stream = meter.wrap(stream)
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise
    return first, stream
