"""What goes upstream: a :class:`~r1serve.engines.base.GenerationRequest` as an OpenAI-compatible
request body, its history without reasoning and without the fields the upstream rejects (the wire
choices are in :mod:`r1serve.engines.upstream`'s docstring)."""

from __future__ import annotations

from typing import Any

from r1serve.engines.base import GenerationRequest
from r1serve.engines.upstream.config import UpstreamConfig
from r1serve.protocol import ChatMessage, jsonfast


def request_body(request: GenerationRequest, config: UpstreamConfig) -> bytes:
    """The JSON body of ``request`` for the upstream ``config`` describes."""
    body: dict[str, Any] = dict(request.extra)
    model = request.model or config.model
    if model:
        body["model"] = model
    if request.messages is not None:
        body["messages"] = [message_dict(m) for m in request.messages]
    else:
        body["prompt"] = request.prompt or ""
    body["stream"] = request.stream
    if request.stream and config.include_usage:
        body["stream_options"] = {"include_usage": True}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    # Every sampling field has its OpenAI / vLLM name; the unset ones are left to the upstream.
    body.update({key: value for key, value in vars(request.sampling).items() if value is not None})
    if request.stop:
        body["stop"] = request.stop
    if request.cache_salt is not None:
        body["cache_salt"] = request.cache_salt  # vLLM's; it partitions the upstream's prefix cache too
    # The upstream enforces the thinking budget, if it can: OpenAI's reasoning_effort, or r1serve's
    # (and compatible servers') max_reasoning_tokens. Servers ignore what they do not know;
    # a strict one can be given drop_params.
    if request.reasoning_effort is not None:
        body["reasoning_effort"] = request.reasoning_effort
    elif request.reasoning_budget is not None:
        body["max_reasoning_tokens"] = request.reasoning_budget
    if request.response_format is not None:
        # As the client sent it: the upstream enforces (or refuses) it.
        body["response_format"] = request.response_format.model_dump(by_alias=True, exclude_unset=True)
    # Function calling as the client sent it: the upstream renders the tools and enforces the choice (or
    # refuses them with a 400, which reaches the client).
    if request.tools:
        body["tools"] = [tool.model_dump(exclude_unset=True) for tool in request.tools]
    if request.tool_choice is not None:
        choice = request.tool_choice
        body["tool_choice"] = choice if isinstance(choice, str) else choice.model_dump(exclude_unset=True)
    if request.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = request.parallel_tool_calls
    if request.logprobs is not None:
        if request.messages is not None:
            body["logprobs"] = True
            if request.logprobs:
                body["top_logprobs"] = request.logprobs
        else:
            body["logprobs"] = request.logprobs
    for key in config.drop_params:
        body.pop(key, None)
    return jsonfast.dumps(body)


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """One message for the upstream body: never its reasoning fields."""
    out: dict[str, Any] = {"role": message.role}
    content: Any = message.content
    if content is not None and not isinstance(content, str):
        content = [part.model_dump() for part in content]
    extra = message.model_extra
    if content is None and not message.tool_calls:
        content = ""
    out["content"] = content
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [call.model_dump(exclude_unset=False) for call in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if extra:
        for key, value in extra.items():
            if key not in ("reasoning_content", "reasoning"):
                out[key] = value
    return out
