"""Engine deltas out as SSE: ``chat.completion.chunk`` and ``text_completion`` events, and the whole
event stream of one response (:func:`sse_events`). Pure (no I/O), so the SSE assembly is unit-tested
with plain Delta sequences.

Conventions, chosen once:

* The first chat chunk is ``{"role": "assistant", "content": ""}``, as OpenAI sends it.
* A reasoning chunk is ``{"reasoning_content": "...", "content": null}``, an answer chunk
  ``{"content": "..."}``. A Delta holding both becomes two chunks, reasoning first: clients that
  concatenate ``content`` must never see reasoning text in it, nor the reverse.
* A delta's tool calls are one chunk ``{"tool_calls": [...]}`` after its text: a call's first piece
  with ``index``, ``id``, ``type`` and ``function.name`` (arguments ``""``), later ones ``index`` and
  ``function.arguments`` only, as OpenAI streams them.
* The finish chunk has an empty delta and the finish_reason (plus ``reasoning_truncated: true`` when
  the engine closed the reasoning early). With ``stream_options.include_usage`` every chunk carries
  ``"usage": null`` and one more chunk with ``"choices": []`` carries the usage, as OpenAI does.
* A queued request's heartbeats (empty deltas) become ``: keep-alive`` SSE comments.
* An error once the stream has started: ``data: {"error": {...}}`` then ``data: [DONE]``.
* Chunks are written with string templates and the json module's C string encoder for the text, not
  pydantic: this runs once per token per stream.
* Raw completions (``/v1/completions``) pass the model's text through as written: the engine does
  not split reasoning for a raw prompt, so ``<think>`` tags, if any, stay in ``text``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from json.encoder import encode_basestring_ascii as json_str  # what json.dumps(a_str) returns, without its dispatch
from typing import Any

from r1serve.api.bodies import hidden_reasoning_only, legacy_logprobs, logprobs_json, usage_json
from r1serve.api.errors import INTERNAL_ERROR
from r1serve.engines.base import Delta
from r1serve.errors import R1ServeError
from r1serve.models.catalog import Prices
from r1serve.protocol import PromptLogprob, TokenLogprob
from r1serve.toolcalls import ToolCallPiece

log = logging.getLogger("r1serve.api")

DONE_EVENT = "data: [DONE]\n\n"
KEEPALIVE_EVENT = ": keep-alive\n\n"


def _event(payload: str) -> str:
    return f"data: {payload}\n\n"


def error_event(exc: BaseException) -> str:
    if isinstance(exc, R1ServeError):
        body = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
    else:
        body = {"message": INTERNAL_ERROR, "type": "server_error", "param": None, "code": None}
    return _event(json.dumps({"error": body}))


def _tool_call_delta(piece: ToolCallPiece) -> dict[str, Any]:
    """OpenAI's shape: the call's first piece has its id, type and name; later ones only arguments."""
    if piece.id is not None:
        function = {"name": piece.name or "", "arguments": piece.arguments}
        return {"index": piece.index, "id": piece.id, "type": "function", "function": function}
    return {"index": piece.index, "function": {"arguments": piece.arguments}}


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
        lp = json.dumps({"content": logprobs_json(logprobs)}) if logprobs else "null"
        fr = f'"{finish}"' if finish else "null"
        return _event(f'{self._head}{delta},"logprobs":{lp},"finish_reason":{fr}{extra}}}]{self._tail}')

    def start(self) -> list[str]:
        return [self._chunk('{"role":"assistant","content":""}')]

    def delta(self, d: Delta) -> list[str]:
        """Text chunks for one delta (none for an empty one); never the finish chunk."""
        reasoning = d.reasoning if self._include_reasoning else ""
        # A token with no text yet (half a character) has its logprob wait for the next chunk; the
        # tokens of hidden reasoning are dropped, they would show it.
        if d.logprobs and not hidden_reasoning_only(d, self._include_reasoning):
            self._pending_logprobs.extend(d.logprobs)
        texts: list[str] = []
        if reasoning:
            texts.append(f'{{"reasoning_content":{json_str(reasoning)},"content":null}}')
        if d.content:
            texts.append(f'{{"content":{json_str(d.content)}}}')
        if d.tool_calls:
            texts.append(json.dumps({"tool_calls": [_tool_call_delta(p) for p in d.tool_calls]}, ensure_ascii=False))
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
            out.append(_event(f"{self._usage_head}{usage_json(d.usage, self._prices)}}}"))
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
            out.append(_event(f'{self._head}[],"usage":{usage_json(d.usage, self._prices)}}}'))
        return out


Encoder = ChatChunkEncoder | CompletionChunkEncoder


async def sse_events(first: Delta, rest: AsyncGenerator[Delta, None], encoder: Encoder) -> AsyncIterator[str]:
    """The whole SSE body. ``first`` was already awaited (so errors before it became HTTP errors).

    One item per delta, holding all of its events (one write to the socket instead of several); the last
    item ends with ``data: [DONE]``, which the sender (api/hotpaths.py) takes as the end of the body."""
    events = encoder.start()
    try:
        async with aclosing(rest):
            delta: Delta | None = first
            while delta is not None:
                new = encoder.delta(delta)
                if not new and delta.finish_reason is None and not (delta.reasoning or delta.content):
                    # A heartbeat from a queued request: an SSE comment keeps proxies and clients waiting.
                    new = [KEEPALIVE_EVENT]
                events += new
                if delta.finish_reason is not None:
                    events += encoder.finish(delta)
                    events.append(DONE_EVENT)
                    yield "".join(events)
                    return
                if events:
                    yield "".join(events)
                    events = []
                delta = await anext(rest, None)
        raise R1ServeError("the engine ended the stream without a finish reason")
    except Exception as exc:
        if not isinstance(exc, R1ServeError) or exc.status >= 500:
            log.error("stream failed: %s", exc, exc_info=not isinstance(exc, R1ServeError))
        yield "".join(events) + error_event(exc) + DONE_EVENT
