"""The one interface every engine implements.

An engine takes a :class:`GenerationRequest` and yields :class:`Delta` objects. Deltas are already split
into reasoning and answer text (engines own the reasoning parser because the thinking budget and the
reasoning-token count need it at token level), and the last delta carries ``finish_reason`` and ``usage``.
An empty delta (no text, no logprobs of any kind, no finish) is a heartbeat: the request is accepted but waiting.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal

from r1serve.protocol import ChatMessage, PromptLogprob, ResponseFormat, TokenLogprob, Tool, ToolChoice
from r1serve.toolcalls import ToolCallPiece

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass
class SamplingParams:
    """None means: use the model's recommended default. The field names are the request fields' (upstream
    engines forward the set ones under these names). Treat as read-only: not frozen because a frozen
    dataclass costs twice as much to build (1.2 us against 0.5), and one is built per request."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None


@dataclass
class GenerationRequest:
    request_id: str
    # Exactly one of messages (chat) and prompt (raw completion) is set.
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    # Number of top alternatives per token when logprobs are requested, None when they are not.
    logprobs: int | None = None
    # Score the prompt too (Completions ``echo`` with ``logprobs``): the engine recomputes the whole prompt
    # (no cached prefix has logits) and sends its tokens' logprobs in a delta before the first token's.
    prompt_logprobs: bool = False
    # Reasoning tokens allowed before the engine closes the reasoning itself; None: unlimited.
    reasoning_budget: int | None = None
    # What the client asked for, kept for engines that pass it on (upstreams) rather than enforce it.
    reasoning_effort: str | None = None
    # The engine-side model name (an upstream provider's id); None: the engine's own model.
    model: str | None = None
    # Extra request fields for an upstream engine to forward verbatim.
    extra: dict[str, Any] = field(default_factory=dict)
    # Structured output (json_object / json_schema; "text" is no constraint), its schema already checked
    # against the JSON Schema meta-schema. The embedded engine decodes the answer (after any reasoning)
    # under a grammar; an upstream engine forwards it as sent.
    response_format: ResponseFormat | None = None
    # Function calling, as the client sent it (checked: a named choice is among the tools). The embedded
    # engine renders the tools with the model's template (none for tool_choice "none") and constrains the
    # answer to a call for "required" or a named function; an upstream engine forwards them.
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None  # None: not sent (the default, parallel calls allowed)
    # Whether the client reads a stream; False (a whole JSON answer) lets an upstream engine ask for one too.
    # The engine interface streams deltas either way.
    stream: bool = True
    # Whose cached prompts this request may reuse: an engine with a prefix cache (the embedded one) reuses
    # a cached prefix only for a request of the same scope and salt, so a caller cannot learn from
    # usage.prompt_tokens_details.cached_tokens (or from timing) what another caller's prompts hold. The
    # API sets the scope from the caller's key; None, the open server's and direct callers', is one scope.
    cache_scope: str | None = None
    # The request's own partition within its scope (vLLM's cache_salt; upstreams are sent it).
    cache_salt: str | None = None
    # Engine-private: what an engine worked out about this request ahead of ``generate`` (the embedded
    # engine's rendered and tokenized prompt, from ``count_prompt_tokens``), so it is not worked out
    # twice. Callers leave it alone; an engine checks that what it finds there is its own and still fits.
    prepared: Any = field(default=None, repr=False, compare=False)


@dataclass
class EngineUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    # True when the numbers were counted locally because the engine reported none.
    estimated: bool = False


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)
    # Tool calls, streamed as OpenAI does (a call's first piece has its id and name, later ones more of
    # its arguments): from an upstream's tool_calls fields, or parsed out of the answer text by
    # r1serve.engines.tools (which also turns the finish reason into "tool_calls").
    tool_calls: list[ToolCallPiece] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    reasoning_truncated: bool = False
    usage: EngineUsage | None = None  # on the final delta only


class Engine(abc.ABC):
    """A source of completions for one or more models."""

    name: str
    # The completion length a request that sets no max_tokens gets; None: not known here (a provider's).
    default_max_tokens: int | None = None
    # Whether the engine honours GenerationRequest.prompt_logprobs.
    scores_prompts: bool = False

    async def start(self) -> None:  # an optional hook, not abstract
        """Load weights, open connections."""

    async def close(self) -> None:  # an optional hook, not abstract
        """Release everything; pending generations end."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        """Stream deltas. Raises an r1serve.errors.R1ServeError before the first delta on bad input.

        Closing the iterator early (client gone) cancels the generation.
        """

    async def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """The exact number of tokens of the request's prompt (as ``generate`` would feed it), or None
        when the engine cannot count them (the default): the caller then estimates. An engine that
        counts may keep what it computed in ``request.prepared`` for ``generate`` to reuse."""
        return None

    def count_tokens(self, text: str) -> int | None:
        """The number of tokens of a piece of generated text, or None when the engine cannot count them
        (the default)."""
        return None

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}
