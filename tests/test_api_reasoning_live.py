"""Reasoning over HTTP with a real model: reasoning_content / content, streaming and not, the
thinking budget, include_reasoning, and reasoning tokens in usage."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Explain in detail why the sky is blue."}]


@pytest.fixture(scope="module")
def client(reasoning_server_url: str) -> OpenAI:
    return OpenAI(base_url=f"{reasoning_server_url}/v1", api_key="unused", max_retries=0)


def test_budget_splits_reasoning_and_answer(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="deepseek-reasoner",
        messages=QUESTION,
        max_tokens=48,
        temperature=0,
        extra_body={"max_reasoning_tokens": 8},
    )
    choice = reply.choices[0]
    reasoning = choice.message.reasoning_content  # type: ignore[attr-defined]
    assert reasoning and "<think>" not in reasoning and "</think>" not in reasoning
    assert choice.message.content and "</think>" not in choice.message.content
    assert choice.reasoning_truncated is True  # type: ignore[attr-defined]
    usage = reply.usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert 8 <= usage.completion_tokens_details.reasoning_tokens < usage.completion_tokens
    assert reply.model == "deepseek-reasoner"


def test_stream_matches_whole_response(client: OpenAI, reasoning_server_url: str) -> None:
    body = {
        "model": "deepseek-reasoner",
        "messages": QUESTION,
        "max_tokens": 40,
        "temperature": 0,
        "max_reasoning_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reasoning, content, usage, order = "", "", None, []
    with httpx.stream("POST", f"{reasoning_server_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk["choices"]:
                delta = choice["delta"]
                assert not (delta.get("reasoning_content") and delta.get("content"))
                if delta.get("reasoning_content"):
                    assert delta["content"] is None
                    reasoning += delta["reasoning_content"]
                    order.append("r")
                elif delta.get("content"):
                    content += delta["content"]
                    order.append("c")
    whole = client.chat.completions.create(
        model="deepseek-reasoner", messages=QUESTION, max_tokens=40, temperature=0,
        extra_body={"max_reasoning_tokens": 6},
    )  # fmt: skip
    assert reasoning == whole.choices[0].message.reasoning_content  # type: ignore[attr-defined]
    assert content == whole.choices[0].message.content
    assert order == sorted(order, key=lambda k: k != "r"), "all reasoning comes before the answer"
    assert usage is not None and usage["completion_tokens_details"]["reasoning_tokens"] >= 6


def test_include_reasoning_false_hides_text_but_counts_tokens(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="deepseek-reasoner", messages=QUESTION, max_tokens=30, temperature=0,
        extra_body={"max_reasoning_tokens": 6, "include_reasoning": False},
    )  # fmt: skip
    assert getattr(reply.choices[0].message, "reasoning_content", None) is None
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens >= 6


def test_unclosed_reasoning_has_null_content(client: OpenAI) -> None:
    reply = client.chat.completions.create(model="deepseek-reasoner", messages=QUESTION, max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert choice.message.content is None
    assert choice.message.reasoning_content  # type: ignore[attr-defined]
    assert choice.finish_reason == "length"
    assert choice.reasoning_truncated is True  # type: ignore[attr-defined]


def test_reasoning_effort_low_applies_the_configured_budget(client: OpenAI) -> None:
    reply = client.chat.completions.create(
        model="deepseek-reasoner", messages=QUESTION, max_tokens=600, temperature=0, reasoning_effort="low",
    )  # fmt: skip
    usage = reply.usage
    assert usage is not None and usage.completion_tokens_details is not None
    # Low is 256 reasoning tokens by default: the model stops thinking there, or earlier on its own.
    assert usage.completion_tokens_details.reasoning_tokens <= 256 + 4
