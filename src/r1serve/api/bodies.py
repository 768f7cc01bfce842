"""Whole responses: the deltas of one generation joined into a ``chat.completion`` or
``text_completion`` body, and the parts stream chunks carry too (usage, logprobs).

Built as plain dicts and encoded by orjson (:mod:`r1serve.protocol.jsonfast`), not through the pydantic
response models: once per response, the models cost more than the rest of the body. The shapes are
those models' (tests/test_protocol_bodies.py validates real bodies against them).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from r1serve.accounts.prices import cost_usd
from r1serve.engines.base import Delta, EngineUsage
from r1serve.errors import R1ServeError
from r1serve.models.catalog import Prices
from r1serve.protocol import PromptLogprob, TokenLogprob, jsonfast

_NO_USAGE = EngineUsage()


def usage_dict(usage: EngineUsage | None, prices: Prices) -> dict[str, Any]:
    """The wire shape of :class:`r1serve.protocol.Usage` (``None`` fields left out)."""
    u = usage or _NO_USAGE
    out: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "estimated_cost": cost_usd(u, prices),
    }
    if u.estimated:
        out["estimated"] = True
    return out


def usage_json(usage: EngineUsage | None, prices: Prices) -> str:
    return jsonfast.dumps(usage_dict(usage, prices)).decode()


def logprobs_json(items: list[TokenLogprob]) -> list[dict[str, Any]]:
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


def hidden_reasoning_only(d: Delta, include_reasoning: bool) -> bool:
    """A delta whose only text is reasoning the client asked not to see (its logprobs would show it)."""
    return not include_reasoning and bool(d.reasoning) and not d.content


class Collected:
    """The deltas of one generation joined (non-streaming responses)."""

    def __init__(self, *, include_reasoning: bool = True) -> None:
        self.include_reasoning = include_reasoning
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[PromptLogprob] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}  # by index, in the wire shape
        self.final = Delta()

    def add(self, d: Delta) -> None:
        if d.reasoning:
            self.reasoning.append(d.reasoning)
        if d.content:
            self.content.append(d.content)
        if d.logprobs and not hidden_reasoning_only(d, self.include_reasoning):
            self.logprobs.extend(d.logprobs)
        if d.prompt_logprobs:
            self.prompt_logprobs = d.prompt_logprobs
        for piece in d.tool_calls:
            call = self.tool_calls.get(piece.index)
            if call is None:
                call = self.tool_calls[piece.index] = {
                    "id": piece.id or "", "type": "function", "function": {"name": piece.name or "", "arguments": ""},
                }  # fmt: skip
            call["function"]["arguments"] += piece.arguments
        if d.finish_reason is not None:
            self.final = d


async def collect(first: Delta, rest: AsyncGenerator[Delta, None], *, include_reasoning: bool = True) -> Collected:
    out = Collected(include_reasoning=include_reasoning)
    try:  # not contextlib.aclosing: once per request, its context manager costs more than this
        delta: Delta | None = first
        while delta is not None:
            out.add(delta)
            if delta.finish_reason is not None:
                return out
            delta = await anext(rest, None)
        raise R1ServeError("the engine ended the stream without a finish reason")
    finally:
        await rest.aclose()


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
        "logprobs": {"content": logprobs_json(c.logprobs)} if c.logprobs else None,
        "finish_reason": c.final.finish_reason,
    }
    if c.tool_calls:
        choice["message"]["tool_calls"] = [c.tool_calls[i] for i in sorted(c.tool_calls)]
    if c.final.reasoning_truncated:
        choice["reasoning_truncated"] = True
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_dict(c.final.usage, prices),
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
        "usage": usage_dict(c.final.usage, prices),
    }


def _completion_logprobs(c: Collected, offset: int) -> dict[str, Any]:
    generated = legacy_logprobs(c.logprobs, offset)
    if not c.prompt_logprobs:
        return generated
    scored = legacy_logprobs(c.prompt_logprobs, 0)
    return {key: scored[key] + generated[key] for key in generated}
