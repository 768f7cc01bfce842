"""``r1serve serve --upstream`` end to end: real processes, a real model behind the upstream."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "Explain in detail why the sky is blue."}]
BODY = {"max_tokens": 40, "temperature": 0, "extra_body": {"max_reasoning_tokens": 6}}


def test_fronted_upstream_gives_the_same_split_and_usage(reasoning_server_url: str, fronting_server_url: str) -> None:
    direct = OpenAI(base_url=f"{reasoning_server_url}/v1", api_key="x", max_retries=0)
    fronted = OpenAI(base_url=f"{fronting_server_url}/v1", api_key="x", max_retries=0)
    want = direct.chat.completions.create(model="deepseek-reasoner", messages=QUESTION, **BODY)  # type: ignore[arg-type]
    got = fronted.chat.completions.create(model="deepseek-reasoner", messages=QUESTION, **BODY)  # type: ignore[arg-type]
    assert got.model == "deepseek-reasoner"
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.choices[0].message.reasoning_content == want.choices[0].message.reasoning_content  # type: ignore[attr-defined]
    assert got.usage is not None and want.usage is not None
    assert got.usage.completion_tokens == want.usage.completion_tokens
    assert got.usage.completion_tokens_details.reasoning_tokens == want.usage.completion_tokens_details.reasoning_tokens  # type: ignore[union-attr]

    stream = fronted.chat.completions.create(model="deepseek-reasoner", messages=QUESTION, stream=True, **BODY)  # type: ignore[arg-type]
    reasoning = content = ""
    for chunk in stream:
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    assert reasoning == want.choices[0].message.reasoning_content  # type: ignore[attr-defined]
    assert content == want.choices[0].message.content


def test_fronting_server_reports_its_upstream_and_hides_the_key(fronting_server_url: str) -> None:
    health = httpx.get(f"{fronting_server_url}/health", timeout=10).json()
    assert "sk-upstream-secret" not in str(health)
    models = httpx.get(f"{fronting_server_url}/v1/models", timeout=10).json()
    assert "deepseek-reasoner" in {m["id"] for m in models["data"]}
