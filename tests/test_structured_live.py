"""Structured outputs on the real server with the real default model: every answer parses and validates
against its schema (jsonschema), on the plain server and on the reasoning-template server (where the
reasoning stays free text and only the answer is JSON), through the openai SDK's ``parse`` too."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

# Nested, with an enum, an array and required fields; bounded (string lengths, item counts), so that an
# answer always fits in max_tokens and must end with "stop".
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "kind": {"type": "string", "enum": ["planet", "star", "moon", "comet"]},
        "facts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "fact": {"type": "string", "maxLength": 60},
                    "confidence": {"type": "number"},
                    "sources": {
                        "type": "array",
                        "items": {"type": "string", "enum": ["book", "web", "memory"]},
                        "maxItems": 2,
                    },
                },
                "required": ["fact", "confidence", "sources"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 2,
        },
        "visited": {"type": "boolean"},
    },
    "required": ["name", "kind", "facts", "visited"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "body", "strict": True, "schema": SCHEMA}}
PROMPTS = ["Tell me about Mars.", "Describe the Sun.", "What is Europa?", "Tell me about Halley's comet.",
           "Describe Jupiter's moon Io."]  # fmt: skip
MAX_TOKENS = 400


def _sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def _ask(url: str, prompt: str, **kw: Any) -> Any:
    return _sdk(url).chat.completions.create(
        model="deepseek-reasoner",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        response_format=FORMAT,
        **kw,  # type: ignore[arg-type]
    )


def _valid(content: str | None) -> dict[str, Any]:
    assert content is not None
    answer = json.loads(content)
    jsonschema.validate(answer, SCHEMA)
    return answer  # type: ignore[no-any-return]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_every_answer_of_a_batch_validates(server_url: str, temperature: float) -> None:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        replies = list(pool.map(lambda p: _ask(server_url, p, temperature=temperature, seed=11), PROMPTS))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        _valid(choice.message.content)


def test_a_streamed_answer_validates(server_url: str) -> None:
    stream = _sdk(server_url).chat.completions.create(
        model="deepseek-reasoner",
        messages=[{"role": "user", "content": PROMPTS[0]}],
        max_tokens=MAX_TOKENS,
        response_format=FORMAT,
        stream=True,
        temperature=0.8,
        seed=5,  # type: ignore[arg-type]
    )
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    _valid("".join(pieces))


def test_on_the_reasoning_server_only_the_answer_is_json(reasoning_server_url: str) -> None:
    # The template opens <think>; the budget makes the engine close it, and the answer follows it.
    for prompt in PROMPTS[:3]:
        reply = _ask(reasoning_server_url, prompt, temperature=0.0, extra_body={"max_reasoning_tokens": 24})
        choice = reply.choices[0]
        reasoning = choice.message.model_extra.get("reasoning_content")
        assert reasoning, "the reasoning is there"
        # Had the grammar applied from the first token, the reasoning would have had to start with "{".
        assert not reasoning.lstrip().startswith("{"), reasoning
        assert choice.finish_reason == "stop", choice.message.content
        _valid(choice.message.content)
        assert reply.usage is not None and reply.usage.completion_tokens_details is not None
        assert reply.usage.completion_tokens_details.reasoning_tokens >= 24


class Source(BaseModel):
    title: str = Field(max_length=40)
    kind: Literal["book", "web"]


class Planet(BaseModel):
    name: str = Field(max_length=30)
    moons: int
    rings: bool
    sources: list[Source] = Field(max_length=2)


def test_openai_sdk_parse_with_a_pydantic_model(server_url: str) -> None:
    completion = _sdk(server_url).chat.completions.parse(
        model="deepseek-reasoner",
        messages=[{"role": "user", "content": "Describe Saturn as JSON."}],
        response_format=Planet,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Planet)
    assert Planet.model_validate_json(choice.message.content or "") == choice.message.parsed


def test_json_object_on_completions_and_chat(server_url: str) -> None:
    raw = httpx.post(f"{server_url}/v1/completions", json={
        "prompt": "A JSON object describing a cat:", "max_tokens": 120, "temperature": 0,
        "response_format": {"type": "json_object"}}, timeout=600)  # fmt: skip
    assert raw.status_code == 200, raw.text
    choice = raw.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)
    else:  # cut by max_tokens: still the start of an object
        assert choice["finish_reason"] == "length" and choice["text"].startswith("{")
    chat = _sdk(server_url).chat.completions.create(
        model="deepseek-reasoner",
        messages=[{"role": "user", "content": "Give me a JSON object with your name."}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(chat.choices[0].message.content or ""), dict)
    else:
        assert (chat.choices[0].message.content or "").startswith("{")


def test_strict_schema_with_an_unenforceable_keyword_is_a_400(server_url: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "strict": True, "schema": {
            "type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}, "required": ["age"]}}}}  # fmt: skip
    resp = httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "response_format.json_schema.schema"
    assert "'minimum'" in error["message"] and "/properties/age/minimum" in error["message"]
