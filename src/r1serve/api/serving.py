"""OpenAI requests in, engine requests out; engine deltas in, OpenAI responses and SSE chunks out.

Routes (routes.py) stay thin: they parse, authenticate and resolve the model, then call
:func:`serve_chat` / :func:`serve_completion`. The encoders here are pure (no I/O) so the SSE
assembly is unit-tested with plain Delta sequences.

Conventions, chosen once:

* The first stream chunk is ``{"role": "assistant", "content": ""}``, as OpenAI sends it.
* A reasoning chunk is ``{"reasoning_content": "...", "content": null}``, an answer chunk
  ``{"content": "..."}``. A Delta holding both becomes two chunks, reasoning first: clients that
  concatenate ``content`` must never see reasoning text in it, nor the reverse.
* The finish chunk has an empty delta and the finish_reason (plus ``reasoning_truncated: true`` when
  the engine closed the reasoning early). With ``stream_options.include_usage`` every chunk carries
  ``"usage": null`` and one more chunk with ``"choices": []`` carries the usage, as OpenAI does.
* A queued request's heartbeats (empty deltas) become ``: keep-alive`` SSE comments.
* An error once the stream has started: ``data: {"error": {...}}`` then ``data: [DONE]``.
* Chunks are written with string templates and the json module's C string encoder for the text, not
  pydantic: this runs once per token per stream. Whole bodies go out through orjson
  (:mod:`r1serve.protocol.jsonfast`).
* Raw completions (``/v1/completions``) pass the model's text through as written: the engine does
  not split reasoning for a raw prompt, so ``<think>`` tags, if any, stay in ``text``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from json.encoder import encode_basestring_ascii as json_str  # what json.dumps(a_str) returns, without its dispatch
from typing import Any, TypeVar
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from r1serve.api.billing import Meter, open_meter
from r1serve.engines.base import Delta, EngineUsage, GenerationRequest, SamplingParams
from r1serve.errors import InvalidRequest, R1ServeError
from r1serve.models.catalog import Prices
from r1serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    PromptLogprob,
    TokenLogprob,
    jsonfast,
)
from r1serve.reasoning import strip_reasoning_from_history
from r1serve.router import Route
from r1serve.settings import Settings

log = logging.getLogger("r1serve.api")

T = TypeVar("T")

DONE_EVENT = "data: [DONE]\n\n"
KEEPALIVE_EVENT = ": keep-alive\n\n"
_INTERNAL_ERROR = "The server had an error while processing your request."
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ",%")  # visible ASCII


def new_id(prefix: str) -> str:
    return prefix + os.urandom(16).hex()  # uuid4().hex's 32 hex digits, without building a UUID


# ----------------------------------------------------------------------------- requests


def _sampling(req: ChatCompletionRequest | CompletionRequest, defaults: dict[str, float]) -> SamplingParams:
    # The model's recommended values (R1: temperature 0.6, top_p 0.95) fill what the client omitted.
    top_k = req.top_k
    if top_k is None and "top_k" in defaults:
        top_k = int(defaults["top_k"])
    return SamplingParams(
        temperature=req.temperature if req.temperature is not None else defaults.get("temperature"),
        top_p=req.top_p if req.top_p is not None else defaults.get("top_p"),
        top_k=top_k,
        min_p=req.min_p if req.min_p is not None else defaults.get("min_p"),
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
    )


def _check_n(n: int) -> None:
    if n != 1:
        raise InvalidRequest(
            f"n={n} is not supported: r1serve generates one choice per request; send n parallel requests instead.",
            param="n",
            code="unsupported_value",
        )


def reasoning_budget(req: ChatCompletionRequest, settings: Settings) -> int | None:
    """``max_reasoning_tokens`` if given, else the budget for ``reasoning_effort``, else unlimited."""
    if req.max_reasoning_tokens is not None:
        return req.max_reasoning_tokens
    if req.reasoning_effort is None:
        return None
    return {
        "low": settings.reasoning_budget_low,
        "medium": settings.reasoning_budget_medium,
        "high": settings.reasoning_budget_high,
    }[req.reasoning_effort]


def chat_generation_request(
    req: ChatCompletionRequest, route: Route, settings: Settings, request_id: str
) -> GenerationRequest:
    _check_n(req.n)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs: true.", param="top_logprobs", code="invalid_value")
    return GenerationRequest(
        request_id=request_id,
        messages=_history(req.messages),
        # None: the engine uses settings.default_max_tokens, capped to what the context has left.
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        sampling=_sampling(req, route.entry.sampling_defaults),
        stop=req.stop_list(),
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        reasoning_budget=reasoning_budget(req, settings),
        reasoning_effort=req.reasoning_effort,
        model=route.engine_model,
        extra=dict(req.model_extra or {}),
        stream=req.stream,
    )


def _history(messages: list[ChatMessage]) -> list[ChatMessage]:
    """R1's multi-turn rule: earlier answers go back without their reasoning. Without an earlier answer
    there is nothing to strip, and the request's own messages go as they are (nothing downstream
    changes them; the copies cost more than the rest of the request's mapping)."""
    for message in messages:
        if message.role == "assistant":
            return strip_reasoning_from_history(messages)
    return messages


def completion_prompt(req: CompletionRequest) -> str:
    if isinstance(req.prompt, str):
        return req.prompt
    if len(req.prompt) != 1:
        raise InvalidRequest(
            f"prompt must be a string or a list of one string (got {len(req.prompt)}); send one request per prompt.",
            param="prompt",
            code="unsupported_value",
        )
    return req.prompt[0]


def completion_generation_request(
    req: CompletionRequest, route: Route, settings: Settings, request_id: str
) -> GenerationRequest:
    _check_n(req.n)
    # Echo with logprobs scores the prompt too (lm-evaluation-harness computes loglikelihoods this way).
    score_prompt = req.echo and req.logprobs is not None
    if score_prompt and not route.engine.scores_prompts:
        raise InvalidRequest(
            f"echo with logprobs needs the prompt's logprobs, which {route.engine.name} does not give; "
            "send echo or logprobs, not both.",
            param="echo",
            code="unsupported_value",
        )
    return GenerationRequest(
        request_id=request_id,
        prompt=completion_prompt(req),
        max_tokens=req.max_tokens,
        sampling=_sampling(req, route.entry.sampling_defaults),
        stop=req.stop_list(),
        logprobs=req.logprobs,
        prompt_logprobs=score_prompt,
        model=route.engine_model,
        extra=dict(req.model_extra or {}),
        stream=req.stream,
    )


# ----------------------------------------------------------------------------- usage and cost


def estimate_cost(usage: EngineUsage, prices: Prices) -> float:
    """Dollars: uncached prompt tokens at the input price, cached ones at the cached-input price when
    the model has one, completion tokens (reasoning included) at the output price."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_price = prices.input if prices.cached_input is None else prices.cached_input
    dollars = (
        (usage.prompt_tokens - cached) * prices.input + cached * cached_price + usage.completion_tokens * prices.output
    ) / 1_000_000
    return round(dollars, 10)


def _usage_json(usage: EngineUsage | None, prices: Prices) -> str:
    return jsonfast.dumps(_usage_dict(usage, prices)).decode()


_NO_USAGE = EngineUsage()


def _usage_dict(usage: EngineUsage | None, prices: Prices) -> dict[str, Any]:
    """The wire shape of :class:`r1serve.protocol.Usage` (``None`` fields left out), built directly: once
    per response, the pydantic models cost more than the rest of the body."""
    u = usage or _NO_USAGE
    out: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "estimated_cost": estimate_cost(u, prices),
    }
    if u.estimated:
        out["estimated"] = True
    return out


def _logprobs_json(items: list[TokenLogprob]) -> list[dict[str, Any]]:
    return [lp.model_dump(mode="json") for lp in items]


def legacy_logprobs(items: list[TokenLogprob] | list[PromptLogprob], offset: int) -> dict[str, Any]:
    """The Completions API's logprobs shape: parallel lists, text offsets counted from ``offset``."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for lp in items:
        tokens.append(lp.token)
        token_logprobs.append(lp.logprob)
        top.append(None if lp.top_logprobs is None else {t.token: t.logprob for t in lp.top_logprobs})
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


# ----------------------------------------------------------------------------- stream encoders


def _hidden_reasoning_only(d: Delta, include_reasoning: bool) -> bool:
    return not include_reasoning and bool(d.reasoning) and not d.content


def _event(payload: str) -> str:
    return f"data: {payload}\n\n"


def error_event(exc: BaseException) -> str:
    if isinstance(exc, R1ServeError):
        body = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    else:
        body = {"message": _INTERNAL_ERROR, "type": "server_error", "param": None, "code": None}
    return _event(json.dumps({"error": body}))


class ChatChunkEncoder:
    """Delta -> ``chat.completion.chunk`` SSE events for one stream."""

    def __init__(
        self,
        *,
        completion_id: str,
        created: int,
        model: str,
        prices: Prices,
        include_usage: bool = False,
        include_reasoning: bool = True,
    ) -> None:
        head = (
            f'{{"id":{json_str(completion_id)},"object":"chat.completion.chunk","created":{created},'
            f'"model":{json_str(model)},'
        )
        self._head = head + '"choices":[{"index":0,"delta":'
        self._usage_head = head + '"choices":[],"usage":'
        self._tail = ',"usage":null}' if include_usage else "}"
        self._prices = prices
        self._include_usage = include_usage
        self._include_reasoning = include_reasoning
        self._pending_logprobs: list[TokenLogprob] = []

    def _chunk(
        self, delta: str, logprobs: list[TokenLogprob] | None = None, finish: str | None = None, extra: str = ""
    ) -> str:
        lp = json.dumps({"content": _logprobs_json(logprobs)}) if logprobs else "null"
        fr = f'"{finish}"' if finish else "null"
        return _event(f'{self._head}{delta},"logprobs":{lp},"finish_reason":{fr}{extra}}}]{self._tail}')

    def start(self) -> list[str]:
        return [self._chunk('{"role":"assistant","content":""}')]

    def delta(self, d: Delta) -> list[str]:
        """Text chunks for one delta (none for an empty one); never the finish chunk."""
        reasoning = d.reasoning if self._include_reasoning else ""
        # A token with no text yet (half a character) has its logprob wait for the next chunk; the
        # tokens of hidden reasoning are dropped, they would show it.
        if d.logprobs and not _hidden_reasoning_only(d, self._include_reasoning):
            self._pending_logprobs.extend(d.logprobs)
        texts: list[str] = []
        if reasoning:
            texts.append(f'{{"reasoning_content":{json_str(reasoning)},"content":null}}')
        if d.content:
            texts.append(f'{{"content":{json_str(d.content)}}}')
        out = []
        for i, text in enumerate(texts):
            # Logprobs ride on the last chunk of the delta they belong to.
            last = i == len(texts) - 1
            out.append(self._chunk(text, self._take_logprobs() if last else None))
        return out

    def _take_logprobs(self) -> list[TokenLogprob] | None:
        if not self._pending_logprobs:
            return None
        taken, self._pending_logprobs = self._pending_logprobs, []
        return taken

    def finish(self, d: Delta) -> list[str]:
        """The finish chunk, then the usage chunk when asked for. ``d`` is the final delta."""
        extra = ',"reasoning_truncated":true' if d.reasoning_truncated else ""
        out = [self._chunk("{}", self._take_logprobs(), d.finish_reason or "stop", extra)]
        if self._include_usage:
            out.append(_event(f"{self._usage_head}{_usage_json(d.usage, self._prices)}}}"))
        return out


class CompletionChunkEncoder:
    """Delta -> ``text_completion`` SSE events. Reasoning, if an engine reported any, is passed through
    as text in order: a raw completion shows the model's output as written."""

    def __init__(
        self,
        *,
        completion_id: str,
        created: int,
        model: str,
        prices: Prices,
        include_usage: bool = False,
        echo: str | None = None,
        want_logprobs: bool = False,
    ) -> None:
        """With both ``echo`` and ``want_logprobs`` the echo chunk waits for the engine's delta that
        carries the prompt's logprobs, and holds them."""
        self._head = (
            f'{{"id":{json_str(completion_id)},"object":"text_completion","created":{created},'
            f'"model":{json_str(model)},"choices":'
        )
        self._tail = ',"usage":null}' if include_usage else "}"
        self._prices = prices
        self._include_usage = include_usage
        self._echo = echo
        self._want_logprobs = want_logprobs
        self._offset = 0

    def _chunk(
        self, text: str, logprobs: list[TokenLogprob] | list[PromptLogprob] | None = None, finish: str | None = None
    ) -> str:
        lp = "null"
        if self._want_logprobs:
            lp = json.dumps(legacy_logprobs(logprobs or [], self._offset))
        self._offset += len(text)
        fr = f'"{finish}"' if finish else "null"
        return _event(
            f'{self._head}[{{"index":0,"text":{json_str(text)},"logprobs":{lp},"finish_reason":{fr}}}]{self._tail}'
        )

    def start(self) -> list[str]:
        return [self._chunk(self._echo)] if self._echo and not self._want_logprobs else []

    def delta(self, d: Delta) -> list[str]:
        if d.prompt_logprobs:  # the echo, held back by start() for these
            return [self._chunk(self._echo or "", d.prompt_logprobs)]
        text = d.reasoning + d.content
        if not text and not (self._want_logprobs and d.logprobs):
            return []
        return [self._chunk(text, d.logprobs)]

    def finish(self, d: Delta) -> list[str]:
        out = [self._chunk("", None, d.finish_reason or "stop")]
        if self._include_usage:
            out.append(_event(f'{self._head}[],"usage":{_usage_json(d.usage, self._prices)}}}'))
        return out


Encoder = ChatChunkEncoder | CompletionChunkEncoder


async def sse_events(
    first: Delta, rest: AsyncIterator[Delta], encoder: Encoder, *, batch: bool = False
) -> AsyncIterator[str]:
    """The whole SSE body. ``first`` was already awaited (so errors before it became HTTP errors).

    One event per item; with ``batch`` the events of one delta come as one item (one write to the
    socket instead of several; the bytes on the wire are the same)."""
    done_sent = False
    try:
        start = encoder.start()
        if not batch:
            for event in start:
                yield event
            start = []
        delta: Delta | None = first
        while delta is not None:
            events = encoder.delta(delta)
            if not events and delta.finish_reason is None and not (delta.reasoning or delta.content):
                # A heartbeat from a queued request: an SSE comment keeps proxies and clients waiting.
                events = [KEEPALIVE_EVENT]
            if start:
                events = start + events
                start = []
            if delta.finish_reason is not None:
                events += encoder.finish(delta)
                if batch:
                    events.append(DONE_EVENT)
                    done_sent = True
                    yield "".join(events)
                else:
                    for event in events:
                        yield event
                break
            if batch:
                if events:
                    yield "".join(events)
            else:
                for event in events:
                    yield event
            delta = await anext(rest, None)
        else:
            raise R1ServeError("the engine ended the stream without a finish reason")
    except Exception as exc:
        if not isinstance(exc, R1ServeError) or exc.status >= 500:
            log.error("stream failed: %s", exc, exc_info=not isinstance(exc, R1ServeError))
        yield error_event(exc)
    finally:
        await _close(rest)
    if not done_sent:
        yield DONE_EVENT


async def _close(it: AsyncIterator[Delta]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


# ----------------------------------------------------------------------------- whole responses


class Collected:
    """The deltas of one generation joined (non-streaming responses)."""

    def __init__(self, *, include_reasoning: bool = True) -> None:
        self.include_reasoning = include_reasoning
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[PromptLogprob] = []
        self.final = Delta()

    def add(self, d: Delta) -> None:
        if d.reasoning:
            self.reasoning.append(d.reasoning)
        if d.content:
            self.content.append(d.content)
        if d.logprobs and not _hidden_reasoning_only(d, self.include_reasoning):
            self.logprobs.extend(d.logprobs)
        if d.prompt_logprobs:
            self.prompt_logprobs = d.prompt_logprobs
        if d.finish_reason is not None:
            self.final = d


async def collect(first: Delta, rest: AsyncIterator[Delta], *, include_reasoning: bool = True) -> Collected:
    out = Collected(include_reasoning=include_reasoning)
    try:
        delta: Delta | None = first
        while delta is not None:
            out.add(delta)
            if delta.finish_reason is not None:
                return out
            delta = await anext(rest, None)
        raise R1ServeError("the engine ended the stream without a finish reason")
    finally:
        await _close(rest)


def chat_completion_body(
    c: Collected, *, completion_id: str, created: int, model: str, prices: Prices
) -> dict[str, Any]:
    # The reasoning module's rule: a part is null exactly when its text is empty.
    reasoning = "".join(c.reasoning) or None
    choice: dict[str, Any] = {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": "".join(c.content) or None,
            "reasoning_content": reasoning if c.include_reasoning else None,
        },
        "logprobs": {"content": _logprobs_json(c.logprobs)} if c.logprobs else None,
        "finish_reason": c.final.finish_reason,
    }
    if c.final.reasoning_truncated:
        choice["reasoning_truncated"] = True
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage_dict(c.final.usage, prices),
    }


def completion_body(
    c: Collected, *, completion_id: str, created: int, model: str, prices: Prices, echo: str | None, want_logprobs: bool
) -> dict[str, Any]:
    prefix = echo or ""
    text = prefix + "".join(c.reasoning) + "".join(c.content)
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": _completion_logprobs(c, len(prefix)) if want_logprobs else None,
                "finish_reason": c.final.finish_reason,
            }
        ],
        "usage": _usage_dict(c.final.usage, prices),
    }


def _completion_logprobs(c: Collected, offset: int) -> dict[str, Any]:
    generated = legacy_logprobs(c.logprobs, offset)
    if not c.prompt_logprobs:
        return generated
    scored = legacy_logprobs(c.prompt_logprobs, 0)
    return {key: scored[key] + generated[key] for key in generated}


# ----------------------------------------------------------------------------- HTTP glue


class JSONBody(Response):
    """A 200 JSON response from an encoded body and raw headers (starlette's ``Response`` would render the
    body and encode a header dict again, once per request)."""

    media_type = "application/json"

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.body = body
        self.background = None
        length = (b"content-length", str(len(body)).encode())
        self.raw_headers = [*headers, length, (b"content-type", b"application/json")]


class SSEResponse(StreamingResponse):
    """Closes the body iterator (and so the engine generation) however the response ends.

    Starlette cancels the sending task when the client disconnects; a generator suspended at a
    ``yield`` would otherwise wait for garbage collection to be closed.

    Built from raw headers (``headers`` plus the SSE ones), as :class:`JSONBody` is.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: list[tuple[bytes, bytes]]) -> None:
        self.body_iterator = content
        self.status_code = 200
        self.background = None
        self.raw_headers = [*headers, *_SSE_RAW_HEADERS]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


_SSE_RAW_HEADERS = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
)


class ClientDisconnected(Exception):
    pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` unless the client hangs up first; then cancel it (which stops the generation).

    The request body has been read already, so the next ASGI message can only be ``http.disconnect``.
    Used for whole responses and for the wait before a stream's first delta; once streaming,
    Starlette's own disconnect listener takes over.
    """
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we were cancelled ourselves (server shutdown)
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})  # let it close the generation; its outcome no longer matters
    raise ClientDisconnected()


async def _guarded(request: Request, work: Awaitable[T], watch: bool) -> T:
    """``work`` under :func:`until_disconnect`, or awaited directly when the caller (the API's fast path,
    api/fastpath.py) already watches for the client hanging up and cancels the whole request itself."""
    if watch:
        return await until_disconnect(request, work)
    return await work


def _headers(route: Route, unknown: list[str]) -> list[tuple[bytes, bytes]]:
    """The response headers both shapes share, as ASGI's raw pairs."""
    headers = [(b"x-r1serve-model", route.entry.id.encode("latin-1"))]
    if unknown:
        # Field names are the client's text: percent-encoded where they hold what a header value may not
        # (control characters, non-ASCII) or what would change the list's meaning (",", "%").
        names = ",".join(quote(name, safe=_HEADER_SAFE) for name in unknown)
        headers.append((b"x-r1serve-unknown-fields", names.encode("ascii")))
    return headers


async def _start(route: Route, gen: GenerationRequest, meter: Meter | None = None) -> tuple[Delta, AsyncIterator[Delta]]:
    """Begin generating and wait for the first delta, so that bad input (context too long, queue full)
    becomes an HTTP error status rather than an error inside a 200 stream. The meter (accounts) sees
    every delta and settles the request however the stream ends."""
    stream = route.engine.generate(gen)
    if meter is not None:
        stream = meter.wrap(stream)
    try:
        first = await anext(stream)
    except BaseException:
        await _close(stream)
        raise
    return first, stream


async def serve_chat(
    request: Request,
    req: ChatCompletionRequest,
    route: Route,
    settings: Settings,
    *,
    model_name: str,
    watch: bool = True,
) -> Response:
    gen = chat_generation_request(req, route, settings, request.state.request_id)
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
        request, req, route, gen, completion_id, model_name, watch,
        encoder=encoder, body=body, include_reasoning=req.include_reasoning,
    )  # fmt: skip


async def serve_completion(
    request: Request,
    req: CompletionRequest,
    route: Route,
    settings: Settings,
    *,
    model_name: str,
    watch: bool = True,
) -> Response:
    gen = completion_generation_request(req, route, settings, request.state.request_id)
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

    return await _serve(request, req, route, gen, completion_id, model_name, watch, encoder=encoder, body=body)


async def _serve(
    request: Request,
    req: ChatCompletionRequest | CompletionRequest,
    route: Route,
    gen: GenerationRequest,
    completion_id: str,
    model_name: str,
    watch: bool,
    *,
    encoder: Callable[[Prices], Encoder],
    body: Callable[[Collected, Prices], dict[str, Any]],
    include_reasoning: bool = True,
) -> Response:
    """What chat and raw completions share: metering, then an SSE stream or one JSON body."""
    headers = _headers(route, req.unknown_fields())
    # None without accounts (or for an open caller): nothing to check, count or settle.
    meter = open_meter(request, route, gen, model_name=model_name, response_id=completion_id)
    prices = route.entry.prices
    if meter is not None:
        await meter.admit()  # scope and limits (429) before any generation
        prices = meter.prices(prices)
    if req.stream:
        first, rest = await _guarded(request, _start(route, gen, meter), watch)
        events = sse_events(first, rest, encoder(prices), batch=not watch)
        return SSEResponse(events, headers)
    collected = await _guarded(request, _generate_all(route, gen, meter, include_reasoning), watch)
    return JSONBody(jsonfast.dumps(body(collected, prices)), headers)


async def _generate_all(route: Route, gen: GenerationRequest, meter: Meter | None, include_reasoning: bool) -> Collected:
    first, rest = await _start(route, gen, meter)
    return await collect(first, rest, include_reasoning=include_reasoning)
