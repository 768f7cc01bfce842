"""A request's llama.cpp sequence, as the scheduler carries it from the queue to its last delta."""

from __future__ import annotations

import asyncio
import codecs
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from r1serve.engines.base import Delta, GenerationRequest
from r1serve.engines.llama.grammar import Grammar
from r1serve.engines.llama.placement import Slot
from r1serve.engines.stops import StopMatcher
from r1serve.protocol import PromptLogprob
from r1serve.reasoning import ReasoningParser


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    prompt: list[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Delta | BaseException]
    parser: ReasoningParser
    stops: StopMatcher
    sampler: Any = None
    slot: Slot | None = None
    pending: list[int] = field(default_factory=list)  # tokens to feed before the next sample
    n_past: int = 0
    generated: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    reasoning_truncated: bool = False
    cancelled: bool = False
    stopped_by_string: bool = False
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    greedy: bool = False  # temperature 0 and no penalties: the sampler chain is a bare argmax
    submitted: float = field(default_factory=time.monotonic)
    last_token_at: float = 0.0
    answered: bool = False
    # The prompt's scored tokens while it is processed, when the request asks for them; sent (and set to
    # None) with the first sample.
    prompt_scores: list[PromptLogprob] | None = None
    prompt_texts: list[str] = field(default_factory=list)  # per prompt token, when scored
    # The response_format's grammar, when there is one: it constrains the answer once it starts.
    grammar: Grammar | None = None


class Feed(NamedTuple):
    """What one sequence put in a step's batch: ``fed`` tokens from batch index ``start``; ``logits_at`` is
    where the logits to sample from are, -1 when the step only advanced a prompt."""

    seq: Sequence
    start: int
    fed: int
    logits_at: int
