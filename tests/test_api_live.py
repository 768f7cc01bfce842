"""The real server with the real default model, driven by the openai SDK and by raw HTTP."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from r1serve.models.catalog import DEFAULT_MODEL_ID as DEFAULT_MODEL

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]
COUNT = [{"role": "user", "content": "Count from 1 to 20, numbers separated by single spaces, nothing else."}]


def _sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _async_sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _sse(resp: httpx.Response) -> list[Any]:
    """Parse an SSE body into JSON payloads, with "[DONE]" kept as a string."""
    events = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def _usage_numbers(usage: Any) -> tuple[int, int, int, int]:
    # cached_tokens is left out on purpose: it depends on what the prefix cache held at the time.
    details = usage.completion_tokens_details
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, details.reasoning_tokens


# ----------------------------------------------------------------------------- openai SDK


def test_sdk_sync_chat(server_url: str) -> None:
    raw = _sdk(server_url).chat.completions.with_raw_response.create(
        model="deepseek-reasoner", messages=HELLO, max_tokens=40
    )
    completion = raw.parse()
    assert raw.headers["x-r1serve-model"] == DEFAULT_MODEL
    assert raw.headers["x-request-id"]
    assert completion.model == "deepseek-reasoner"  # the name the client asked for
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.completion_tokens_details is not None and usage.completion_tokens_details.reasoning_tokens == 0
    assert (usage.model_extra or {}).get("estimated_cost") == 0.0  # a self-hosted model costs nothing per token
    # The default model is not a reasoning model: no reasoning text.
    assert (choice.message.model_extra or {}).get("reasoning_content") is None


def test_sdk_sync_stream(server_url: str) -> None:
    stream = _sdk(server_url).chat.completions.create(
        model=DEFAULT_MODEL, messages=HELLO, max_tokens=40, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.model == DEFAULT_MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1


async def test_sdk_async_chat_and_stream(server_url: str) -> None:
    client = _async_sdk(server_url)
    completion = await client.chat.completions.create(messages=HELLO, max_tokens=30, model=DEFAULT_MODEL)
    assert completion.choices[0].message.content
    stream = await client.chat.completions.create(messages=HELLO, max_tokens=30, model=DEFAULT_MODEL, stream=True)
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts).strip()
    await client.close()


async def test_concurrent_requests_all_answer(server_url: str) -> None:
    import asyncio

    client = _async_sdk(server_url)
    results = await asyncio.gather(
        *(client.chat.completions.create(messages=HELLO, max_tokens=16, model=DEFAULT_MODEL) for _ in range(4))
    )
    assert all(r.choices[0].message.content for r in results)
    await client.close()


def test_stream_usage_equals_non_stream_usage(server_url: str) -> None:
    client = _sdk(server_url)
    args: dict[str, Any] = dict(model=DEFAULT_MODEL, messages=HELLO, max_tokens=24, temperature=0, seed=7)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and whole.usage is not None
    assert _usage_numbers(chunks[-1].usage) == _usage_numbers(whole.usage)
    assert streamed == whole.choices[0].message.content


def test_temperature_zero_with_seed_is_repeatable(server_url: str) -> None:
    client = _sdk(server_url)
    answers = [
        client.chat.completions.create(model=DEFAULT_MODEL, messages=HELLO, max_tokens=32, temperature=0, seed=1234)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert answers[0] and answers[0] == answers[1]


def test_max_tokens_5_stops_at_length(server_url: str) -> None:
    completion = _sdk(server_url).chat.completions.create(model=DEFAULT_MODEL, messages=COUNT, max_tokens=5)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_max_completion_tokens(server_url: str) -> None:
    completion = _sdk(server_url).chat.completions.create(
        model=DEFAULT_MODEL, messages=COUNT, max_tokens=50, max_completion_tokens=3
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_stop_string(server_url: str) -> None:
    client = _sdk(server_url)
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=COUNT, max_tokens=60, temperature=0, stop=[" 7"]
    )
    content = completion.choices[0].message.content or ""
    assert completion.choices[0].finish_reason == "stop"
    assert content.startswith("1") and " 7" not in content and "8" not in content
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=COUNT, max_tokens=60, temperature=0, stop=" 7", stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert " 7" not in streamed and streamed.startswith("1")


def test_multi_turn_with_reasoning_sent_back(server_url: str) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "2 plus 2 is 4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    completion = _sdk(server_url).chat.completions.create(model=DEFAULT_MODEL, messages=messages, max_tokens=20)  # type: ignore[arg-type]
    assert completion.choices[0].message.content


def test_logprobs(server_url: str) -> None:
    completion = _sdk(server_url).chat.completions.create(
        model=DEFAULT_MODEL, messages=HELLO, max_tokens=4, logprobs=True, top_logprobs=2
    )
    lps = completion.choices[0].logprobs
    assert lps is not None and lps.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lps.content)


def test_raw_completion(server_url: str) -> None:
    client = _sdk(server_url)
    completion = client.completions.create(model=DEFAULT_MODEL, prompt="def add(a, b):\n    return", max_tokens=8)
    assert completion.object == "text_completion" and completion.choices[0].text
    assert completion.usage is not None
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    chunks = list(client.completions.create(model=DEFAULT_MODEL, prompt=["1, 2, 3,"], max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)


def test_completion_echo_with_logprobs_scores_the_prompt(server_url: str) -> None:
    # How lm-evaluation-harness asks an OpenAI-style server for loglikelihoods.
    prompt = "The capital of France is Paris. The capital of Italy is"
    client = _sdk(server_url)
    whole = client.completions.create(
        model=DEFAULT_MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0
    )
    choice = whole.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.text_offset and lp.top_logprobs
    assert whole.usage is not None
    n_prompt = whole.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + whole.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text and choice.text.startswith(prompt)
    assert "".join(lp.tokens[:n_prompt]) == prompt
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    # "Paris" follows "The capital of France is" far more surely than "The" starts a text.
    paris = lp.tokens.index(" Paris")
    assert lp.token_logprobs[paris] > -3

    body = {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server_url}/v1/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        events = _sse(resp)
    assert events[-1] == "[DONE]"
    first = events[0]["choices"][0]
    assert first["text"] == prompt and "".join(first["logprobs"]["tokens"]) == prompt
    assert first["logprobs"]["token_logprobs"] == lp.token_logprobs[:n_prompt]
    streamed = [t for e in events[:-1] for t in e["choices"][0]["logprobs"]["tokens"]]
    offsets = [o for e in events[:-1] for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert streamed == lp.tokens and offsets == lp.text_offset


# ----------------------------------------------------------------------------- raw HTTP


def test_raw_sse_shape(server_url: str) -> None:
    body = {"messages": HELLO, "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server_url}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-r1serve-model"] == DEFAULT_MODEL
        assert resp.headers["x-request-id"]
        events = _sse(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        for choice in chunk["choices"]:
            delta = choice["delta"]
            assert not (delta.get("content") and delta.get("reasoning_content"))
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    # No model in the request: the default's id (Nosana's examples send none).
    assert chunks[0]["model"] == DEFAULT_MODEL


def test_raw_non_stream_message_keys(server_url: str) -> None:
    resp = httpx.post(f"{server_url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 8}, timeout=120)
    assert resp.status_code == 200
    message = resp.json()["choices"][0]["message"]
    assert set(message) == {"role", "content", "reasoning_content"}


def test_unknown_fields_are_named_in_a_header(server_url: str) -> None:
    body = {"messages": HELLO, "max_tokens": 4, "frobnicate": True, "top_a": 0.1}
    resp = httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200
    assert resp.headers["x-r1serve-unknown-fields"] == "frobnicate,top_a"
    known = httpx.post(f"{server_url}/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4}, timeout=120)
    assert "x-r1serve-unknown-fields" not in known.headers


def test_curl_style_form_content_type_with_json_body_is_refused(server_url: str) -> None:
    # `curl -d '{...}'` labels JSON as application/x-www-form-urlencoded: refused with a message saying
    # what to send, because a web page's cross-site form posts look the same (test_attacks.py, 4.).
    resp = httpx.post(
        f"{server_url}/v1/chat/completions",
        content=json.dumps({"messages": HELLO, "max_tokens": 4}),
        headers={"content-type": "application/x-www-form-urlencoded"},
        timeout=120,
    )
    assert resp.status_code == 415, resp.text
    assert "Content-Type: application/json" in resp.json()["error"]["message"]


# ----------------------------------------------------------------------------- /deepseek_chat (R Plumber tutorial)


def _assert_plumber_answer(resp: httpx.Response) -> None:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["message"]["content"]
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert resp.headers["x-r1serve-model"] == DEFAULT_MODEL


def test_deepseek_chat_json(server_url: str) -> None:
    _assert_plumber_answer(httpx.post(f"{server_url}/deepseek_chat", json={"prompt": "Say hi."}, timeout=300))


def test_deepseek_chat_query(server_url: str) -> None:
    _assert_plumber_answer(httpx.post(f"{server_url}/deepseek_chat", params={"prompt": "Say hi."}, timeout=300))


def test_deepseek_chat_form(server_url: str) -> None:
    _assert_plumber_answer(httpx.post(f"{server_url}/deepseek_chat", data={"prompt": "Say hi."}, timeout=300))
    _assert_plumber_answer(httpx.post(f"{server_url}/deepseek_chat", files={"prompt": (None, "Say hi.")}, timeout=300))


def test_deepseek_chat_without_prompt_is_400(server_url: str) -> None:
    for kwargs in ({}, {"json": {}}, {"json": {"prompt": ""}}, {"json": {"prompt": []}}, {"json": {"prompt": [""]}},
                   {"json": {"prompt": None}}, {"data": {"other": "x"}}):  # fmt: skip
        resp = httpx.post(f"{server_url}/deepseek_chat", timeout=30, **kwargs)  # type: ignore[arg-type]
        assert resp.status_code == 400, kwargs
        assert resp.json()["error"]["param"] == "prompt"
        assert resp.json()["error"]["code"] == "missing_required_parameter", kwargs


def test_deepseek_chat_prompt_in_a_one_element_array(server_url: str) -> None:
    # R's jsonlite without auto_unbox: {"prompt": ["Say hi."]}
    _assert_plumber_answer(httpx.post(f"{server_url}/deepseek_chat", json={"prompt": ["Say hi."]}, timeout=300))


def test_deepseek_chat_prompt_of_wrong_type_is_400(server_url: str) -> None:
    cases = [
        ({"json": {"prompt": 42}}, "got a number"),
        ({"json": {"prompt": True}}, "got a boolean"),
        ({"json": {"prompt": ["a", "b"]}}, "got an array"),
        ({"json": {"prompt": [42]}}, "got a number"),
        ({"json": {"prompt": {"text": "hi"}}}, "got an object"),
        ({"files": {"prompt": ("prompt.txt", b"hi")}}, "got a file"),
    ]
    for kwargs, says in cases:
        resp = httpx.post(f"{server_url}/deepseek_chat", timeout=30, **kwargs)  # type: ignore[arg-type]
        assert resp.status_code == 400, kwargs
        error = resp.json()["error"]
        assert error["param"] == "prompt" and error["code"] == "invalid_type", error
        assert "expected a string" in error["message"] and says in error["message"], error


# ----------------------------------------------------------------------------- models, docs, health, metrics


def test_models_list_has_aliases_with_root(server_url: str) -> None:
    models = {m.id: m for m in _sdk(server_url).models.list()}
    assert DEFAULT_MODEL in models
    for alias in ("deepseek-reasoner", "deepseek/deepseek-r1", "deepseek-ai/DeepSeek-R1"):
        assert (models[alias].model_extra or {})["root"] == DEFAULT_MODEL
    assert (models[DEFAULT_MODEL].model_extra or {})["root"] == DEFAULT_MODEL


def test_model_by_id_including_slashes(server_url: str) -> None:
    client = _sdk(server_url)
    assert (client.models.retrieve("deepseek-reasoner").model_extra or {})["root"] == DEFAULT_MODEL
    assert client.models.retrieve("deepseek/deepseek-r1").id == "deepseek/deepseek-r1"
    resp = httpx.get(f"{server_url}/v1/models/deepseek-ai/DeepSeek-R1", timeout=10)
    assert resp.status_code == 200 and resp.json()["root"] == DEFAULT_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_docs_and_openapi(server_url: str) -> None:
    assert httpx.get(f"{server_url}/docs", timeout=10).status_code == 200
    schema = httpx.get(f"{server_url}/openapi.json", timeout=10).json()
    expected = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/deepseek_chat", "/health"}
    assert expected <= set(schema["paths"])
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)), "operation ids must be unique for client generators"


def test_health_and_metrics(server_url: str) -> None:
    health = httpx.get(f"{server_url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == DEFAULT_MODEL
    head = httpx.head(f"{server_url}/health", timeout=10)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"] == "application/json"
    metrics = httpx.get(f"{server_url}/metrics", timeout=10)
    assert metrics.status_code == 200 and "r1serve_http_requests_total" in metrics.text


# ----------------------------------------------------------------------------- disconnects


def _wait_idle(server_url: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    engine: dict[str, Any] = {}
    while time.monotonic() < deadline:
        engine = httpx.get(f"{server_url}/health", timeout=10).json()["engines"][0]
        if engine.get("running") == 0 and engine.get("queued") == 0:
            return engine
        time.sleep(0.1)
    raise AssertionError(f"the engine is still busy after the client left: {engine}")


# Keeps the model busy for the whole max_tokens: minutes, unless the disconnect cancels it.
ENDLESS = [{"role": "user", "content": "Count from 1 to 5000, numbers separated by commas, nothing else."}]


def test_client_disconnect_mid_stream_frees_the_engine(server_url: str) -> None:
    body = {"messages": ENDLESS, "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", f"{server_url}/v1/chat/completions", json=body, timeout=120) as resp:
        seen = 0
        for line in resp.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen == 2:
                    break
    # 3000 tokens take minutes on a CPU; a freed sequence shows within moments.
    _wait_idle(server_url)
    quick = _sdk(server_url).chat.completions.create(model=DEFAULT_MODEL, messages=HELLO, max_tokens=8)
    assert quick.choices[0].message.content


def test_client_disconnect_while_waiting_for_a_whole_response(server_url: str) -> None:
    body = {"messages": ENDLESS, "max_tokens": 3000}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=1.5)
    _wait_idle(server_url)
