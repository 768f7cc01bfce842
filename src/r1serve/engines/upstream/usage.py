"""Token usage of an upstream answer: the upstream's own when it reports one, otherwise counted locally
(with the configured :class:`TokenCounter`) and marked ``estimated``."""

from __future__ import annotations

import math
from typing import Any, Protocol

from r1serve.engines.base import EngineUsage, GenerationRequest
from r1serve.engines.upstream.normalise import Normaliser


class TokenCounter(Protocol):
    """Counts tokens of text; ``exact`` is False for approximations."""

    exact: bool

    def count(self, text: str) -> int: ...


class ApproxTokenCounter:
    """About 4 characters per token (OpenAI's rule of thumb for English; R1's BPE on English text gives
    3.5-4.5). Used when no tokenizer is configured for the model; usage is marked estimated either way."""

    exact = False

    def count(self, text: str) -> int:
        return math.ceil(len(text) / 4) if text else 0


# Tokens a chat template adds per message (role markers) and once per prompt (BOS, assistant prefix),
# for the local prompt-token estimate: R1's template adds 1 per turn plus BOS and "<｜Assistant｜><think>\n".
_PER_MESSAGE_TOKENS = 1
_PER_PROMPT_TOKENS = 3


def parse_usage(raw: Any) -> EngineUsage | None:
    if not isinstance(raw, dict):
        return None
    prompt = raw.get("prompt_tokens")
    completion = raw.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    usage = EngineUsage(prompt_tokens=prompt, completion_tokens=completion)
    details = raw.get("completion_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("reasoning_tokens"), int):
        usage.reasoning_tokens = details["reasoning_tokens"]
    else:
        usage.reasoning_tokens = -1  # unknown: filled in locally
    pdetails = raw.get("prompt_tokens_details")
    if isinstance(pdetails, dict) and isinstance(pdetails.get("cached_tokens"), int):
        usage.cached_tokens = pdetails["cached_tokens"]
    elif isinstance(raw.get("prompt_cache_hit_tokens"), int):  # DeepSeek's own API
        usage.cached_tokens = raw["prompt_cache_hit_tokens"]
    return usage


def final_usage(
    usage: EngineUsage | None, request: GenerationRequest, norm: Normaliser, tokens: TokenCounter
) -> EngineUsage:
    """The usage of a finished answer: ``usage`` from upstream (its reasoning split counted here when it
    gave none), or an estimate from the text ``norm`` produced and the request's prompt."""
    if usage is not None:
        if usage.reasoning_tokens < 0:  # upstream gave totals but no reasoning split
            reasoning = "".join(norm.reasoning_parts)
            usage.reasoning_tokens = min(usage.completion_tokens, tokens.count(reasoning)) if reasoning else 0
        return usage
    reasoning = "".join(norm.reasoning_parts)
    count = tokens.count
    r_tokens = count(reasoning) if reasoning else 0
    c_tokens = count("".join(norm.content_parts))
    # R1 spends a token each on <think>/</think> (and the template's own opening when present).
    tags = 1 if reasoning else 0
    if request.messages is not None:
        prompt = _PER_PROMPT_TOKENS + sum(_PER_MESSAGE_TOKENS + count(m.text()) for m in request.messages)
    else:
        prompt = count(request.prompt or "")
    return EngineUsage(
        prompt_tokens=prompt,
        completion_tokens=r_tokens + c_tokens + tags,
        reasoning_tokens=r_tokens,
        estimated=True,
    )
