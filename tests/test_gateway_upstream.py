"""The upstream engine against real HTTP servers on loopback: every dialect, the providers' documented
response shapes, and broken upstreams. Normalised output must equal the embedded path's split of the
same text (``split_reasoning``)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from fake_upstream import (
    AIML_JSON,
    DEEPINFRA_JSON,
    DEEPINFRA_STREAM_LINES,
    NOSANA_JSON,
    FakeUpstream,
    Reply,
    think_content,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from r1serve.engines.base import Delta, GenerationRequest, SamplingParams
from r1serve.engines.upstream import AttemptFailed, Timeouts, UpstreamConfig, UpstreamEngine
from r1serve.engines.upstream.errors import scrub_secret
from r1serve.engines.upstream.normalise import Normaliser
from r1serve.engines.upstream.usage import ApproxTokenCounter
from r1serve.errors import InvalidRequest, UpstreamError
from r1serve.gateway import GatewayOptions, load_gateway_config
from r1serve.protocol import ChatMessage
from r1serve.reasoning import split_reasoning

REASONING = "Let me think. The user says hi; <b>greet</b> back.\nSo: 2 < 3 and 5 > 4."
ANSWER = "Hello! How can I help?\n\nBye."
FAST = Timeouts(connect=2.0, first_byte=3.0, idle=2.0)


def chat(*messages: tuple[str, str], **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id="req_test",
        messages=[ChatMessage(role=r, content=c) for r, c in messages] or [ChatMessage(role="user", content="hi")],
        **kw,
    )


def engine_for(up: FakeUpstream, **kw: Any) -> UpstreamEngine:
    cfg = dict(name="fake", base_url=up.base_url, model="fake-r1", timeouts=FAST)
    cfg.update(kw)
    return UpstreamEngine(UpstreamConfig(**cfg))


async def run(
    engine: UpstreamEngine, request: GenerationRequest | None = None
) -> tuple[str | None, str | None, Delta, list[Delta]]:
    await engine.start()
    try:
        deltas = [d async for d in engine.generate(request or chat())]
    finally:
        await engine.close()
    final = deltas[-1]
    assert final.finish_reason is not None and final.usage is not None
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert all(d.reasoning or d.content or d.logprobs for d in deltas[:-1]), "no empty deltas before the last"
    reasoning = "".join(d.reasoning for d in deltas) or None
    content = "".join(d.content for d in deltas) or None
    return reasoning, content, final, deltas


# ----------------------------------------------------------------------------- dialects


@pytest.mark.parametrize("chunk", [1, 3, 8, 1000])
@pytest.mark.parametrize("open_tag", [False, True])
async def test_think_in_content_matches_embedded_split(chunk: int, open_tag: bool) -> None:
    fields = think_content(REASONING, ANSWER, open_tag=open_tag)
    async with FakeUpstream(default=Reply(fields=fields, chunk=chunk)) as up:
        reasoning, content, final, _ = await run(engine_for(up, dialect="think_in_content"))
    assert (reasoning, content) == split_reasoning(fields[0][1], starts_in_reasoning=True)
    assert reasoning is not None and reasoning.rstrip() == REASONING and content == ANSWER
    assert final.usage is not None and not final.usage.estimated


@pytest.mark.parametrize("field_name", ["reasoning_content", "reasoning"])
@pytest.mark.parametrize("dialect", ["reasoning_content", "reasoning", "think_in_content", "auto", "think_tags"])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
async def test_reasoning_fields_in_every_dialect(field_name: str, dialect: str, chunk: int) -> None:
    reply = Reply(fields=[(field_name, "\n" + REASONING + "\n"), ("content", "\n\n" + ANSWER)], chunk=chunk)
    async with FakeUpstream(default=reply) as up:
        reasoning, content, _, _ = await run(engine_for(up, dialect=dialect))
    embedded = split_reasoning("<think>\n" + REASONING + "\n</think>\n\n" + ANSWER)
    assert (reasoning, content) == embedded
    assert content == ANSWER


async def test_think_tags_without_tags_passes_content_untouched() -> None:
    async with FakeUpstream(default=Reply(fields=[("content", "  plain answer </think> stays")], chunk=2)) as up:
        reasoning, content, _, _ = await run(engine_for(up, dialect="think_tags"))
    assert (reasoning, content) == split_reasoning("  plain answer </think> stays")
    assert reasoning is None and content == "  plain answer </think> stays"


async def test_dialect_none_is_untouched() -> None:
    text = "<think>not reasoning here</think> ok"
    async with FakeUpstream(default=Reply(fields=[("content", text)], chunk=3)) as up:
        reasoning, content, _, _ = await run(engine_for(up, dialect="none"))
    assert (reasoning, content) == (None, text)


async def test_auto_dialect_follows_the_model_name() -> None:
    assert (
        UpstreamConfig(name="a", base_url="x", model="DeepSeek-R1-Distill-Qwen-1.5B").effective_dialect
        == "think_in_content"
    )
    assert UpstreamConfig(name="a", base_url="x", model="qwen2.5-coder").effective_dialect == "think_tags"


async def test_unclosed_reasoning_is_all_reasoning_and_length() -> None:
    reply = Reply(fields=[("content", "thinking and thinking")], finish_reason="length")
    async with FakeUpstream(default=reply) as up:
        reasoning, content, final, _ = await run(engine_for(up, dialect="think_in_content"))
    assert (reasoning, content) == ("thinking and thinking", None)
    assert final.finish_reason == "length"


# ----------------------------------------------------------------------------- documented shapes


async def test_nosana_vllm_shape() -> None:
    """Nosana's R1 template answer, served as plain JSON even to a streaming request."""
    async with FakeUpstream(default=Reply(kind="json", body=NOSANA_JSON)) as up:
        engine = engine_for(up, model=None, dialect="think_in_content")
        reasoning, content, final, deltas = await run(engine)
    text = json.loads(NOSANA_JSON)["choices"][0]["message"]["content"]
    assert (reasoning, content) == split_reasoning(text, starts_in_reasoning=True)
    assert reasoning is not None and reasoning.startswith("Okay, so I need to come up with a short fun fact")
    assert reasoning.endswith("so I'll go with this.\n")  # trailing whitespace is kept, as embedded
    assert content is not None and content.startswith("The Roman Empire's remarkable ability")
    assert "</think>" not in content
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.estimated) == (21, 477, False)
    assert 0 < final.usage.reasoning_tokens < 477  # counted locally: Nosana gives no split
    assert len(deltas) == 1 and final.finish_reason == "stop"
    assert "model" not in up.requests[0]["body"]  # Nosana's example sends none


async def test_nosana_shape_through_the_vllm_preset() -> None:
    async with FakeUpstream(default=Reply(kind="json", body=NOSANA_JSON)) as up:
        config = load_gateway_config(GatewayOptions(providers_file=None, provider=("vllm",), env_file=None), env={})
        assert config is not None
        p = config.providers["vllm"].upstream
        assert p.dialect == "think_in_content" and p.model is None
        from dataclasses import replace

        engine = UpstreamEngine(replace(p, base_url=up.base_url, timeouts=FAST))
        reasoning, content, _, _ = await run(engine)
    assert content is not None and content.startswith("The Roman Empire") and reasoning is not None


async def test_aiml_shape() -> None:
    async with FakeUpstream(default=Reply(kind="json", body=AIML_JSON)) as up:
        reasoning, content, final, _ = await run(
            engine_for(up, dialect="reasoning_content", model="deepseek/deepseek-r1")
        )
    # reasoning_content '' and a leading newline: the embedded path's "<think></think>\nHello!..." split.
    assert (reasoning, content) == split_reasoning("<think></think>\nHello! How can I assist you today? \U0001f60a")
    assert content == "Hello! How can I assist you today? \U0001f60a" and reasoning is None
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.estimated) == (5, 74, False)


async def test_deepinfra_json_shape() -> None:
    async with FakeUpstream(default=Reply(kind="json", body=DEEPINFRA_JSON)) as up:
        reasoning, content, final, _ = await run(engine_for(up, dialect="think_tags", eos_markers=("</s>",)))
    text = " Hello! It's nice to meet you. Is there something I can help you with or would you like to chat for a bit?"
    assert (reasoning, content) == split_reasoning(text) == (None, text)
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.estimated) == (15, 16, False)


async def test_deepinfra_stream_shape() -> None:
    """Role in every delta, a leaked ``</s>``, no usage, then [DONE]."""
    lines = (*DEEPINFRA_STREAM_LINES, "data: [DONE]")
    async with FakeUpstream(default=Reply(kind="sse", lines=lines)) as up:
        config = load_gateway_config(
            GatewayOptions(provider=("deepinfra",), env_file=None), env={"DEEPINFRA_TOKEN": "di-secret-token-123"}
        )
        assert config is not None
        from dataclasses import replace

        p = replace(config.providers["deepinfra"].upstream, base_url=up.base_url, timeouts=FAST)
        reasoning, content, final, _ = await run(UpstreamEngine(p))
        assert up.requests[0]["headers"]["Authorization"] == "Bearer di-secret-token-123"
        assert up.requests[0]["body"]["model"] == "deepseek-ai/DeepSeek-R1"
    assert (reasoning, content) == (None, "  Hi!")
    assert final.usage is not None and final.usage.estimated
    assert final.usage.completion_tokens == ApproxTokenCounter().count("  Hi!")


async def test_sse_framing_variants_are_read_like_plain_lines() -> None:
    """CRLF line ends, ``data:`` without its space, blanks around the value, ``event:`` / ``id:`` /
    comment lines, and events after ``[DONE]`` (ignored)."""
    head = '{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": '
    lines = (
        ": keep-alive",
        "event: message\r\nid: 1\r\ndata:" + head + '[{"index": 0, "delta": {"reasoning_content": "Hm. "}}]}\r',
        "data:   " + head + '[{"index": 0, "delta": {"content": "Hi"}}]}  \r',
        "data: " + head + '[{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop"}]}\r',
        'data: {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}',
        # [DONE] and an event after it in one write (so most likely one read): the event is ignored.
        "data:  [DONE] \r\n\ndata: " + head + '[{"index": 0, "delta": {"content": " after done"}}]}',
    )
    async with FakeUpstream(default=Reply(kind="sse", lines=lines)) as up:
        reasoning, content, final, _ = await run(engine_for(up, dialect="reasoning_content"))
    assert (reasoning, content) == ("Hm. ", "Hi there")
    assert final.usage is not None and (final.usage.prompt_tokens, final.usage.completion_tokens) == (3, 4)
    assert final.finish_reason == "stop"


@pytest.mark.parametrize(
    "line",
    [
        "data: [1, 2]",  # JSON, not an event
        'data: {"choices": []}, {"choices": []}',  # two values on one line
        "data: {this is not json}",
    ],
)
async def test_a_data_line_that_is_not_one_json_object_is_invalid(line: str) -> None:
    exc = await expect_failure(Reply(kind="sse", lines=(line, "data: [DONE]")))
    assert isinstance(exc, AttemptFailed) and exc.kind == "invalid_response", exc


_CHUNK = '{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": '


@pytest.mark.parametrize(
    "body",
    [
        '{"choices": [{"message": "hi"}]}',  # a message that is not an object
        '{"choices": [{"message": {"content": ["a"]}}]}',  # content that is not a string
        '{"choices": [{"message": {"content": 5}}]}',
        '{"choices": [{"message": {"content": "hi", "reasoning_content": 3}}]}',
        '{"choices": "x"}',
        '{"choices": {"0": {}}}',
        "[1, 2]",
    ],
)
async def test_a_json_answer_of_the_wrong_shape_is_invalid(body: str) -> None:
    """Valid JSON that is not a completion: a retryable invalid_response (so failover), not a crash."""
    exc = await expect_failure(Reply(kind="json", body=body))
    assert isinstance(exc, AttemptFailed) and exc.kind == "invalid_response" and exc.retryable, exc


@pytest.mark.parametrize(
    "event",
    [
        _CHUNK + '[{"delta": "hi"}]}',
        _CHUNK + '{"0": {}}}',
        _CHUNK + '["x"]}',
        _CHUNK + '[{"delta": {"content": 5}}]}',
        _CHUNK + '[{"delta": {"reasoning_content": ["x"]}}]}',
    ],
)
async def test_a_stream_event_of_the_wrong_shape_is_invalid(event: str) -> None:
    exc = await expect_failure(Reply(kind="sse", lines=(f"data: {event}", "data: [DONE]")))
    assert isinstance(exc, AttemptFailed) and exc.kind == "invalid_response", exc
    # After output has gone to the client the same event is an error in the stream, not a retry.
    first = f'data: {_CHUNK}[{{"delta": {{"content": "Hi"}}}}]}}'
    async with FakeUpstream(
        default=Reply(kind="sse", lines=(first, f"data: {event}", "data: [DONE]"), chunk_delay=0.2)
    ) as up:
        engine = engine_for(up)
        await engine.start()
        got: list[Delta] = []
        try:
            with pytest.raises(UpstreamError) as info:
                async for delta in engine.generate(chat()):
                    got.append(delta)
        finally:
            await engine.close()
    assert [d.content for d in got] == ["Hi"]
    assert not isinstance(info.value, AttemptFailed) and info.value.code == "invalid_response"


# ----------------------------------------------------------------------------- usage


async def test_no_usage_is_counted_with_the_r1_tokenizer() -> None:
    from r1_vocab import cached_r1_vocab_gguf

    from r1serve.gateway.tokens import token_counter

    counter = token_counter(cached_r1_vocab_gguf())
    assert counter.exact
    fields = think_content(REASONING, ANSWER)
    async with FakeUpstream(default=Reply(fields=fields, usage=False, chunk=4)) as up:
        engine = UpstreamEngine(
            UpstreamConfig(
                name="fake", base_url=up.base_url, model="fake-r1", dialect="think_in_content", timeouts=FAST
            ),
            tokens=counter,
        )
        reasoning, content, final, _ = await run(engine, chat(("user", "What is 2+2?")))
    usage = final.usage
    assert usage is not None and usage.estimated
    assert usage.reasoning_tokens == counter.count(REASONING)
    assert usage.completion_tokens == counter.count(REASONING) + counter.count(ANSWER) + 1
    assert usage.prompt_tokens == counter.count("What is 2+2?") + 4


async def test_upstream_usage_details_are_kept() -> None:
    class Up(FakeUpstream):
        def _usage(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
            return {
                "prompt_tokens": 11, "completion_tokens": 40, "total_tokens": 51,
                "completion_tokens_details": {"reasoning_tokens": 30}, "prompt_cache_hit_tokens": 8,
            }  # fmt: skip

    async with Up() as up:
        _, _, final, _ = await run(engine_for(up, dialect="reasoning_content"))
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.reasoning_tokens) == (11, 40, 30)
    assert final.usage.cached_tokens == 8 and not final.usage.estimated


# ----------------------------------------------------------------------------- the request


async def test_request_body_history_and_options() -> None:
    async with FakeUpstream() as up:
        messages = [
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", content="Hello.", reasoning_content="secret thoughts", reasoning="more"),
            ChatMessage(role="user", content="again"),
        ]
        request = GenerationRequest(
            request_id="r",
            messages=messages,
            max_tokens=50,
            sampling=SamplingParams(temperature=0.6, top_p=0.95, seed=7),
            stop=["END"],
            model="provider/model-x",
            extra={"custom_field": {"a": 1}},
        )
        engine = engine_for(up, headers={"X-Team": "ml"}, api_key="sk-abc", dialect="reasoning_content")
        await run(engine, request)
        sent = up.requests[0]
    body = sent["body"]
    assert body["model"] == "provider/model-x"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 50 and body["temperature"] == 0.6 and body["top_p"] == 0.95 and body["seed"] == 7
    assert body["stop"] == ["END"] and body["custom_field"] == {"a": 1}
    assert "top_k" not in body and "min_p" not in body
    assert body["messages"][2] == {"role": "assistant", "content": "Hello."}
    assert "secret" not in json.dumps(body) and "reasoning" not in json.dumps(body["messages"])
    assert sent["headers"]["X-Team"] == "ml" and sent["headers"]["Authorization"] == "Bearer sk-abc"


@pytest.mark.parametrize(
    ("effort", "budget", "expected"),
    [
        ("low", 256, {"reasoning_effort": "low"}),
        (None, 64, {"max_reasoning_tokens": 64}),
        (None, None, {}),
    ],
)
async def test_thinking_budget_is_passed_on(
    effort: str | None, budget: int | None, expected: dict[str, object]
) -> None:
    async with FakeUpstream() as up:
        request = GenerationRequest(
            request_id="r", messages=[ChatMessage(role="user", content="hi")],
            reasoning_effort=effort, reasoning_budget=budget,
        )  # fmt: skip
        await run(engine_for(up, dialect="reasoning_content"), request)
        body = up.requests[0]["body"]
    assert {k: body[k] for k in ("reasoning_effort", "max_reasoning_tokens") if k in body} == expected


async def test_raw_completion_passes_text_through() -> None:
    async with FakeUpstream(default=Reply(fields=[("content", "<think>x</think> y")])) as up:
        request = GenerationRequest(request_id="r", prompt="Once upon", max_tokens=5)
        reasoning, content, _, _ = await run(engine_for(up, dialect="think_in_content"), request)
        assert up.requests[0]["path"] == "/v1/completions" and up.requests[0]["body"]["prompt"] == "Once upon"
    assert (reasoning, content) == (None, "<think>x</think> y")


async def test_stream_is_not_buffered() -> None:
    reply = Reply(fields=[("reasoning_content", "abcdefghij"), ("content", "klmnopqrst")], chunk=2, chunk_delay=0.15)
    async with FakeUpstream(default=reply) as up:
        engine = engine_for(up, dialect="reasoning_content")
        await engine.start()
        started = time.perf_counter()
        arrivals = []
        async for _ in engine.generate(chat()):
            arrivals.append(time.perf_counter() - started)
        await engine.close()
    assert arrivals[0] < 0.5, arrivals  # the whole stream takes ~1.5 s
    assert arrivals[-1] > 1.2
    assert len(arrivals) >= 8


# ----------------------------------------------------------------------------- broken upstreams


async def expect_failure(reply: Reply, **engine_kw: Any) -> BaseException:
    async with FakeUpstream(default=reply) as up:
        engine = engine_for(up, **engine_kw)
        await engine.start()
        try:
            with pytest.raises(Exception) as info:
                async for _ in engine.generate(chat()):
                    pass
        finally:
            await engine.close()
    return info.value


async def test_500_is_retryable(caplog: pytest.LogCaptureFixture) -> None:
    exc = await expect_failure(Reply(kind="status", status=500, body='{"error": {"message": "boom"}}'))
    assert isinstance(exc, AttemptFailed) and exc.retryable and exc.breaker and exc.upstream_status == 500
    # The upstream's own words go to the operator's log, not into the client's message.
    assert exc.message == "upstream fake failed (HTTP 500)"
    assert "boom" in caplog.text


async def test_429_carries_retry_after() -> None:
    exc = await expect_failure(Reply(kind="status", status=429, headers={"Retry-After": "7"}, body="{}"))
    assert isinstance(exc, AttemptFailed) and exc.kind == "rate_limited" and exc.retry_after == 7.0
    assert not exc.breaker


async def test_401_never_echoes_the_key() -> None:
    key = "sk-live-0123456789abcdefSECRET"
    async with FakeUpstream(api_key="the-right-one") as up:
        engine = engine_for(up, api_key=key, api_key_env="FAKE_KEY")
        await engine.start()
        with pytest.raises(AttemptFailed) as info:
            async for _ in engine.generate(chat()):
                pass
        await engine.close()
    exc = info.value
    assert exc.kind == "upstream_auth" and not exc.retryable and exc.failover
    assert key not in exc.message and "0123456789" not in exc.message
    assert "$FAKE_KEY" in exc.message
    assert key not in repr(engine) and key not in repr(engine.config)


async def test_400_is_the_clients_error_and_scrubbed() -> None:
    key = "sk-live-0123456789abcdefSECRET"
    body = json.dumps({"error": {"message": f"bad max_tokens (key {key[:12]}****{key[-8:]}, Bearer {key})"}})
    exc = await expect_failure(Reply(kind="status", status=400, body=body), api_key=key)
    assert isinstance(exc, InvalidRequest) and exc.status == 400
    assert "bad max_tokens" in exc.message
    assert "0123456789" not in exc.message and key[-8:] not in exc.message and key not in exc.message


def test_scrub_secret() -> None:
    key = "hf_AbCdEfGhIjKlMnOpQrStUv"
    text = f"Invalid token {key}; did you mean hf_AbCdEfGh…? Authorization: Bearer whatever-token"
    out = scrub_secret(text, key)
    assert key not in out and "AbCdEfGh" not in out and "whatever-token" not in out
    assert out.startswith("Invalid token [redacted]")
    # Echoed in another case, whole or in part.
    shouted = scrub_secret(f"x-api-key {key.upper()} (prefix {key[:10].lower()})", key)
    assert key.upper() not in shouted and key[:10].lower() not in shouted, shouted


@pytest.mark.parametrize("kind", ["truncated", "cut", "drop", "invalid_json"])
async def test_broken_stream_before_any_text_is_retryable(kind: str) -> None:
    exc = await expect_failure(Reply(kind=kind, drop_after=0))
    assert isinstance(exc, AttemptFailed) and exc.retryable, exc


@pytest.mark.parametrize("kind", ["truncated", "cut", "drop", "invalid_json"])
async def test_broken_stream_after_text_is_a_clean_upstream_error(kind: str) -> None:
    reply = Reply(kind=kind, drop_after=3, chunk=2, chunk_delay=0.05)
    async with FakeUpstream(default=reply) as up:
        engine = engine_for(up, dialect="reasoning_content")
        await engine.start()
        got: list[Delta] = []
        with pytest.raises(UpstreamError) as info:
            async for d in engine.generate(chat()):
                got.append(d)
        await engine.close()
    assert got and not isinstance(info.value, AttemptFailed)
    assert info.value.status == 502


async def test_slow_first_byte_times_out() -> None:
    async with FakeUpstream(default=Reply(first_byte_delay=2)) as up:
        engine = engine_for(up, timeouts=Timeouts(connect=1, first_byte=0.5, idle=1))
        await engine.start()
        started = time.perf_counter()
        with pytest.raises(AttemptFailed) as info:
            async for _ in engine.generate(chat()):
                pass
        elapsed = time.perf_counter() - started
        await engine.close()
    assert info.value.kind == "timeout" and not info.value.retryable  # fails over, is not retried
    assert 0.4 < elapsed < 1.5


async def test_idle_timeout_between_chunks() -> None:
    reply = Reply(chunk=3, chunk_delay=1.0)
    async with FakeUpstream(default=reply) as up:
        engine = engine_for(up, timeouts=Timeouts(connect=1, first_byte=2, idle=0.3), dialect="reasoning_content")
        await engine.start()
        with pytest.raises(UpstreamError) as info:
            async for _ in engine.generate(chat()):
                pass
        await engine.close()
    assert "idle" in info.value.message


async def test_connect_error() -> None:
    engine = UpstreamEngine(UpstreamConfig(name="nowhere", base_url="http://127.0.0.1:9/v1", timeouts=FAST))
    await engine.start()
    with pytest.raises(AttemptFailed) as info:
        async for _ in engine.generate(chat()):
            pass
    await engine.close()
    assert info.value.kind == "connect_error" and info.value.retryable


async def test_error_event_inside_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    lines = ('data: {"error": {"message": "provider overloaded"}}',)
    exc = await expect_failure(Reply(kind="sse", lines=lines))
    assert isinstance(exc, AttemptFailed) and exc.message == "upstream fake reported an error in its stream"
    assert "provider overloaded" in caplog.text


async def test_client_going_away_closes_the_upstream_connection() -> None:
    reply = Reply(chunk=1, chunk_delay=0.05, fields=[("content", "x" * 200)])
    async with FakeUpstream(default=reply) as up:
        engine = engine_for(up, dialect="none")
        await engine.start()
        stream = engine.generate(chat())
        await anext(stream)
        await stream.aclose()  # what the API does when the client disconnects
        await asyncio.sleep(0.3)
        # The fake's handler is still writing; a closed socket makes its writes fail, ending the handler.
        await engine.close()
    # Nothing hangs, and the session is closed with the last user.
    assert engine._client._session is None


async def test_connections_are_kept_alive_and_pooled() -> None:
    async with FakeUpstream() as up:
        engine = engine_for(up, dialect="reasoning_content")
        await engine.start()
        for _ in range(5):
            async for _ in engine.generate(chat()):
                pass
            await asyncio.sleep(0.01)  # the chunked terminator is read in the background
        await engine.close()
        assert len({r["peer"] for r in up.requests}) == 1, [r["peer"] for r in up.requests]


# ----------------------------------------------------------------------------- JSON clients: JSON upstream


@pytest.mark.parametrize(
    ("dialect", "fields"),
    [
        ("reasoning_content", [("reasoning_content", REASONING), ("content", "\n\n" + ANSWER)]),
        ("reasoning", [("reasoning", REASONING), ("content", ANSWER)]),
        ("think_in_content", think_content(REASONING, ANSWER)),
        ("think_in_content", think_content(REASONING, ANSWER, open_tag=True)),
        ("think_tags", think_content(REASONING, ANSWER, open_tag=True)),
        ("none", [("content", ANSWER)]),
    ],
)
async def test_json_client_asks_upstream_for_json_and_normalises_identically(
    dialect: str, fields: list[tuple[str, str]]
) -> None:
    async with FakeUpstream(default=Reply(fields=fields, chunk=4)) as up:
        streamed = await run(engine_for(up, dialect=dialect), chat(stream=True))
        whole = await run(engine_for(up, dialect=dialect), chat(stream=False))
        sent_stream, sent_json = up.requests[0]["body"], up.requests[1]["body"]
    assert sent_stream["stream"] is True and sent_stream["stream_options"] == {"include_usage": True}
    assert sent_json["stream"] is False and "stream_options" not in sent_json
    # Same reasoning split, same answer, same usage (upstream's), whichever way upstream answered.
    assert whole[:2] == streamed[:2]
    assert whole[2].usage == streamed[2].usage and whole[2].finish_reason == streamed[2].finish_reason
    assert len(whole[3]) == 1  # one whole answer: one delta


async def test_json_request_without_upstream_usage_is_estimated_like_a_stream() -> None:
    reply = Reply(fields=[("reasoning_content", REASONING), ("content", ANSWER)], usage=False)
    async with FakeUpstream(default=reply) as up:
        _, _, streamed, _ = await run(engine_for(up, dialect="reasoning_content"), chat(stream=True))
        _, _, whole, _ = await run(engine_for(up, dialect="reasoning_content"), chat(stream=False))
    assert whole.usage is not None and whole.usage.estimated
    assert whole.usage == streamed.usage


async def test_json_request_waits_for_the_whole_timeout_not_the_first_byte_one() -> None:
    # Upstreams answer a non-streaming request only when the generation is done: first_byte cannot apply.
    async with FakeUpstream(default=Reply(first_byte_delay=0.6)) as up:
        slow_ok = engine_for(up, timeouts=Timeouts(connect=1, first_byte=0.2, idle=0.2, whole=3))
        reasoning, content, _, _ = await run(slow_ok, chat(stream=False))
        assert reasoning == "Thinking." and content == "Answer."
        too_slow = engine_for(up, timeouts=Timeouts(connect=1, first_byte=0.1, idle=0.1, whole=0.3))
        await too_slow.start()
        started = time.perf_counter()
        with pytest.raises(AttemptFailed) as info:
            async for _ in too_slow.generate(chat(stream=False)):
                pass
        elapsed = time.perf_counter() - started
        await too_slow.close()
    assert info.value.kind == "timeout" and not info.value.retryable
    assert 0.25 < elapsed < 0.6


def test_whole_timeout_is_configurable(tmp_path: Any) -> None:
    path = tmp_path / "providers.toml"
    path.write_text(
        '[gateway]\nwhole_timeout = 900\n[providers.a]\nbase_url = "http://127.0.0.1:1/v1"\nmodel = "m"\n'
        '[providers.b]\nbase_url = "http://127.0.0.1:2/v1"\nmodel = "m"\nwhole_timeout = 30\n'
    )
    config = load_gateway_config(GatewayOptions(providers_file=path, env_file=None), env={})
    assert config is not None
    assert config.providers["a"].upstream.timeouts.whole == 900 and config.providers["b"].upstream.timeouts.whole == 30


# ----------------------------------------------------------------------------- whole answers

_PIECES = ["<think>", "</think>", "</th", "ink>", "<", "\n", " ", "a", "é", "</s>"]
_texts = st.one_of(st.none(), st.lists(st.sampled_from(_PIECES), max_size=12).map("".join))


@settings(max_examples=600)
@given(
    st.sampled_from(["think_in_content", "think_tags", "reasoning_content", "reasoning", "none"]),
    st.booleans(),
    st.booleans(),
    _texts,
    _texts,
)
def test_whole_answer_split_equals_the_incremental_one(
    dialect: Any, chat: bool, eos: bool, content: str | None, reasoning: str | None
) -> None:
    """A JSON answer takes Normaliser.whole; it must give what add() and finish() give, parts included."""
    markers = ("</s>",) if eos else ()
    fast = Normaliser(dialect, chat=chat, eos_markers=markers)
    slow = Normaliser(dialect, chat=chat, eos_markers=markers)
    r1, c1 = slow.add(content, reasoning)
    r2, c2 = slow.finish()
    assert fast.whole(content, reasoning) == (r1 + r2, c1 + c2)
    assert ("".join(fast.reasoning_parts), "".join(fast.content_parts)) == (
        "".join(slow.reasoning_parts),
        "".join(slow.content_parts),
    )
