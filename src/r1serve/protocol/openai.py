"""Pydantic types for OpenAI's Chat Completions / Completions / Models wire format.

Requests accept unknown fields (as vLLM and llama-server do) so clients written for other servers keep
working; the API layer reports their names back in a response header rather than dropping them silently.
Known fields take JSON's own types only (strict), as OpenAI does: ``"max_tokens": "4"``, ``true`` or
``2.0`` and ``"temperature": "0.5"`` are refused, not converted.
Responses carry r1serve's additions: ``reasoning_content``, ``reasoning_tokens`` and ``estimated_cost``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "TextPart",
    "FunctionCall",
    "ToolCall",
    "ChatMessage",
    "FunctionDefinition",
    "Tool",
    "NamedFunction",
    "NamedToolChoice",
    "ToolChoice",
    "ToolCallFunctionDelta",
    "ToolCallDelta",
    "StreamOptions",
    "ReasoningEffort",
    "JsonSchemaFormat",
    "ResponseFormat",
    "ChatCompletionRequest",
    "CompletionRequest",
    "TopLogprob",
    "TokenLogprob",
    "PromptLogprob",
    "ChoiceLogprobs",
    "ResponseMessage",
    "ChatChoice",
    "CompletionTokensDetails",
    "PromptTokensDetails",
    "Usage",
    "ChatCompletion",
    "DeltaMessage",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "CompletionChoice",
    "Completion",
    "ModelCard",
    "ModelList",
    "ErrorBody",
    "ErrorResponse",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str
    # A JSON object as a string, as OpenAI sends it (the API layer checks that it parses).
    arguments: str


class ToolCall(BaseModel):
    """A call the model made: in an assistant message of the history, and in a response's message."""

    model_config = ConfigDict(extra="allow", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # Unknown fields are tolerated; reasoning sent back by clients is accepted and dropped.
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # a tool turn: which call this is the result of

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


ReasoningEffort = Literal["low", "medium", "high"]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema (the API layer checks it)
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the answer must follow (Structured Outputs)."""

    # populate_by_name: "schema" would shadow BaseModel.schema, so the field is schema_ on the Python side.
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def _null_means(default: Any) -> BeforeValidator:
    """For a field OpenAI documents as nullable whose null means its default (clients send it so)."""
    return BeforeValidator(lambda value: default if value is None else value)


# Token counts past 2**31 mean nothing to any model, and would overflow counters downstream.
MAX_COUNT = 2**31 - 1
_Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
_Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
_Probability = Annotated[float, Field(ge=0.0, le=1.0)]
_Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _SamplingFields(_Request):
    model: str | None = None
    max_tokens: _Count | None = None
    temperature: _Temperature | None = None
    top_p: _Probability | None = None
    top_k: Annotated[int, Field(ge=0, le=MAX_COUNT)] | None = None
    min_p: _Probability | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    presence_penalty: _Penalty | None = None
    frequency_penalty: _Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | None = None
    n: Annotated[int, Field(ge=1), _null_means(1)] = 1
    stream: Annotated[bool, _null_means(False)] = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's: prefixes cached for requests with another salt (or none) are not reused, which keeps callers
    # who share a key from learning about each other's prompts (callers of different keys never share).
    cache_salt: Annotated[str, Field(min_length=1)] | None = None
    response_format: ResponseFormat | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: _Count | None = None
    logprobs: Annotated[bool, _null_means(False)] = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # r1serve extensions
    include_reasoning: Annotated[bool, _null_means(True)] = True
    max_reasoning_tokens: Annotated[int, Field(ge=0, le=MAX_COUNT)] | None = None
    reasoning_effort: ReasoningEffort | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: Annotated[bool, _null_means(True)] = True


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: Annotated[bool, _null_means(False)] = False


# --- responses


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """A prompt token scored by the model (Completions ``echo`` with ``logprobs``). The prompt's first
    token has nothing before it to be scored against: its logprob and alternatives are null."""

    token: str
    logprob: float | None = None
    top_logprobs: list[TopLogprob] | None = None


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    # True when the engine closed the reasoning early (thinking budget or length inside the reasoning).
    reasoning_truncated: bool | None = None


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)
    estimated_cost: float | None = None
    # True when upstream reported no usage and r1serve counted the tokens itself.
    estimated: bool | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallFunctionDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed piece of a tool call: the first for a call has its id, type and name, the later ones
    more of its arguments; ``index`` says which call."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallFunctionDelta | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    reasoning_truncated: bool | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "r1serve"
    # The model actually served under this name (an alias shows its target here).
    root: str
    parent: str | None = None
    context_length: int | None = None
    reasoning_format: str | None = None
    present: bool | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
