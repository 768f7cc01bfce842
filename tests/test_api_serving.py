"""The serving layer's pure parts: request mapping, SSE chunk assembly, whole-response assembly,
usage and cost, error rendering. Real Delta sequences, no engine."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from openai.types import Completion as SDKCompletion
from openai.types.chat import ChatCompletion as SDKChatCompletion
from openai.types.chat import ChatCompletionChunk as SDKChatCompletionChunk

from r1serve.accounts.prices import cost_usd
from r1serve.api.bodies import Collected, chat_completion_body, completion_body, legacy_logprobs
from r1serve.api.chunks import ChatChunkEncoder, CompletionChunkEncoder, error_event, sse_events
from r1serve.api.errors import param_path, validation_error
from r1serve.api.requests import chat_generation_request, completion_generation_request
from r1serve.api.serving import new_id
from r1serve.engines.base import Delta, Engine, EngineUsage, GenerationRequest
from r1serve.errors import ContextLengthExceeded, InvalidRequest
from r1serve.models.catalog import LocalSource, ModelEntry, Prices
from r1serve.protocol import ChatCompletionRequest, CompletionRequest, PromptLogprob, TokenLogprob, TopLogprob
from r1serve.routing.registry import ServedModel
from r1serve.settings import Settings

USAGE = EngineUsage(prompt_tokens=12, completion_tokens=9, reasoning_tokens=5, cached_tokens=4)
PRICES = Prices(input=0.55, output=2.19, cached_input=0.14)

# An R1 generation as the engine delivers it: reasoning, a delta straddling </think>, the answer.
R1_DELTAS = [
    Delta(reasoning="Let me"),
    Delta(reasoning=" think."),
    Delta(reasoning=" Done", content="The answer"),
    Delta(content=" is 4."),
    Delta(finish_reason="stop", usage=USAGE),
]


class _NoEngine(Engine):
    name = "none"

    def generate(self, request: GenerationRequest) -> Any:  # pragma: no cover - never called
        raise AssertionError("the pure tests never generate")


def _route(**entry_fields: Any) -> ServedModel:
    entry = ModelEntry(id="m", source=LocalSource(path=__import__("pathlib").Path("m.gguf")), **entry_fields)
    return ServedModel(entry=entry, engine=_NoEngine())


def _chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def _split(items: list[str]) -> list[str]:
    """The SSE events in sse_events' items (each item holds all the events of one delta)."""
    return [event + "\n\n" for item in items for event in item.split("\n\n") if event]


def _events(chunks: list[str]) -> list[Any]:
    out = []
    for chunk in chunks:
        assert chunk.startswith("data: ") and chunk.endswith("\n\n")
        payload = chunk[len("data: ") : -2]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def _encoder(**kw: Any) -> ChatChunkEncoder:
    return ChatChunkEncoder(completion_id="chatcmpl-1", created=1, model="deepseek-reasoner", prices=PRICES, **kw)


def _encode_all(enc: ChatChunkEncoder | CompletionChunkEncoder, deltas: list[Delta]) -> list[Any]:
    chunks = enc.start()
    for d in deltas:
        chunks += enc.delta(d)
        if d.finish_reason:
            chunks += enc.finish(d)
    return _events(chunks)


async def _aiter(items: list[Delta]) -> Any:
    for item in items:
        yield item


# ----------------------------------------------------------------------------- request mapping


def test_sampling_defaults_fill_only_what_the_client_omitted() -> None:
    route = _route(sampling_defaults={"temperature": 0.6, "top_p": 0.95})
    gen = chat_generation_request(_chat(), route, Settings(), "r1")
    assert (gen.sampling.temperature, gen.sampling.top_p) == (0.6, 0.95)
    gen = chat_generation_request(_chat(temperature=0, top_p=0.5), route, Settings(), "r1")
    assert (gen.sampling.temperature, gen.sampling.top_p) == (0, 0.5)


def test_max_completion_tokens_wins_and_omitted_means_engine_default() -> None:
    route, settings = _route(), Settings()
    both = _chat(max_tokens=10, max_completion_tokens=20)
    assert chat_generation_request(both, route, settings, "r").max_tokens == 20
    assert chat_generation_request(_chat(max_tokens=10), route, settings, "r").max_tokens == 10
    assert chat_generation_request(_chat(), route, settings, "r").max_tokens is None


def test_n_other_than_one_is_a_400_on_n() -> None:
    with pytest.raises(InvalidRequest) as info:
        chat_generation_request(_chat(n=2), _route(), Settings(), "r")
    assert info.value.param == "n"


def test_logprobs_and_top_logprobs() -> None:
    route, settings = _route(), Settings()
    assert chat_generation_request(_chat(), route, settings, "r").logprobs is None
    assert chat_generation_request(_chat(logprobs=True), route, settings, "r").logprobs == 0
    assert chat_generation_request(_chat(logprobs=True, top_logprobs=3), route, settings, "r").logprobs == 3
    with pytest.raises(InvalidRequest):
        chat_generation_request(_chat(top_logprobs=3), route, settings, "r")


def test_reasoning_budget_from_effort_or_explicit_tokens() -> None:
    settings = Settings(reasoning_budget_low=11, reasoning_budget_medium=22, reasoning_budget_high=33)
    route = _route()
    assert chat_generation_request(_chat(), route, settings, "r").reasoning_budget is None
    for effort, budget in (("low", 11), ("medium", 22), ("high", 33)):
        assert chat_generation_request(_chat(reasoning_effort=effort), route, settings, "r").reasoning_budget == budget
    explicit = _chat(reasoning_effort="high", max_reasoning_tokens=7)
    assert chat_generation_request(explicit, route, settings, "r").reasoning_budget == 7


def test_history_goes_to_the_engine_without_reasoning() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>adding</think>\n\n4", "reasoning_content": "adding"},
                {"role": "user", "content": "and 3+3?"},
            ]
        }
    )
    gen = chat_generation_request(req, _route(), Settings(), "r")
    assert gen.messages is not None
    assistant = gen.messages[1]
    assert assistant.content == "4" and assistant.reasoning_content is None


def test_unknown_fields_are_kept_for_upstream_engines() -> None:
    req = _chat(foo=1, bar="x")
    assert req.unknown_fields() == ["bar", "foo"]
    assert chat_generation_request(req, _route(), Settings(), "r").extra == {"foo": 1, "bar": "x"}


def test_completion_prompt_list_of_one_ok_more_is_400() -> None:
    route, settings = _route(), Settings()
    one = CompletionRequest.model_validate({"prompt": ["hello"]})
    assert completion_generation_request(one, route, settings, "r").prompt == "hello"
    two = CompletionRequest.model_validate({"prompt": ["a", "b"]})
    with pytest.raises(InvalidRequest) as info:
        completion_generation_request(two, route, settings, "r")
    assert info.value.param == "prompt"


# ----------------------------------------------------------------------------- usage and cost


def test_cost_cached_tokens_at_cached_price() -> None:
    # 8 uncached input at 0.55, 4 cached at 0.14, 9 output at 2.19 ($ per million)
    expected = (8 * 0.55 + 4 * 0.14 + 9 * 2.19) / 1e6
    assert cost_usd(USAGE, PRICES) == pytest.approx(expected)


def test_cost_cached_tokens_at_input_price_without_cached_price() -> None:
    prices = Prices(input=1.0, output=3.0)
    assert cost_usd(USAGE, prices) == pytest.approx((12 * 1.0 + 9 * 3.0) / 1e6)
    assert cost_usd(USAGE, Prices()) == 0.0


# ----------------------------------------------------------------------------- chat streaming


def test_stream_role_first_then_reasoning_then_content_never_both() -> None:
    events = _encode_all(_encoder(), R1_DELTAS)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    for d in deltas[1:]:
        assert not (d.get("content") and d.get("reasoning_content"))
        if "reasoning_content" in d:
            assert d["content"] is None  # present and null, as clients of DeepSeek's API expect
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert reasoning == "Let me think. Done"
    assert content == "The answer is 4."
    # The straddling delta became two chunks, reasoning first.
    assert deltas[3] == {"reasoning_content": " Done", "content": None}
    assert deltas[4] == {"content": "The answer"}
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert deltas[-1] == {}


def test_stream_usage_chunk_only_when_asked() -> None:
    events = _encode_all(_encoder(), R1_DELTAS)
    assert all("usage" not in e for e in events)
    events = _encode_all(_encoder(include_usage=True), R1_DELTAS)
    *chunks, last = events
    assert all(e["usage"] is None for e in chunks)
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 12
    assert last["usage"]["completion_tokens"] == 9
    assert last["usage"]["total_tokens"] == 21
    assert last["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5
    assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == 4
    assert last["usage"]["estimated_cost"] == pytest.approx(cost_usd(USAGE, PRICES))


def test_stream_include_reasoning_false_drops_text_keeps_counts() -> None:
    events = _encode_all(_encoder(include_usage=True, include_reasoning=False), R1_DELTAS)
    text = json.dumps(events)
    assert "reasoning_content" not in text and "think" not in text
    assert events[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5


def test_stream_reasoning_truncated_on_finish_chunk() -> None:
    final = Delta(reasoning="still thinking", finish_reason="length", reasoning_truncated=True, usage=USAGE)
    events = _encode_all(_encoder(), [final])
    assert events[1]["choices"][0]["delta"] == {"reasoning_content": "still thinking", "content": None}
    finish = events[-1]["choices"][0]
    assert finish["finish_reason"] == "length" and finish["reasoning_truncated"] is True
    assert "reasoning_truncated" not in events[1]["choices"][0]


def test_stream_logprobs_ride_on_the_text_chunk_or_wait_for_the_next() -> None:
    lp = [TokenLogprob(token="Hi", logprob=-0.1, bytes=[72, 105], top_logprobs=[TopLogprob(token="Hi", logprob=-0.1)])]
    held = [TokenLogprob(token="\xe2", logprob=-0.5)]  # a partial character: no text yet
    events = _encode_all(
        _encoder(),
        [Delta(logprobs=held), Delta(content="Hi", logprobs=lp), Delta(finish_reason="stop", usage=USAGE)],
    )
    text_chunk = events[1]["choices"][0]
    assert [t["token"] for t in text_chunk["logprobs"]["content"]] == ["\xe2", "Hi"]
    assert events[-1]["choices"][0]["logprobs"] is None


def test_hidden_reasoning_hides_its_logprobs_too() -> None:
    think = [TokenLogprob(token="hmm", logprob=-1.0)]
    answer = [TokenLogprob(token="4", logprob=-0.1)]
    deltas = [
        Delta(reasoning="hmm", logprobs=think),
        Delta(content="4", logprobs=answer),
        Delta(finish_reason="stop", usage=USAGE),
    ]
    events = _encode_all(_encoder(include_reasoning=False), deltas)
    streamed = [t["token"] for e in events for t in ((e["choices"][0]["logprobs"] or {}).get("content") or [])]
    assert streamed == ["4"]
    body = _body(deltas, include_reasoning=False)
    assert [t["token"] for t in body["choices"][0]["logprobs"]["content"]] == ["4"]


def test_every_chunk_parses_with_the_openai_sdk() -> None:
    for event in _encode_all(_encoder(include_usage=True), R1_DELTAS):
        SDKChatCompletionChunk.model_validate(event)


def test_chunks_escape_json_text() -> None:
    nasty = 'quote " backslash \\ newline \n tab \t unicode é 中 \u2028'
    events = _encode_all(_encoder(), [Delta(content=nasty), Delta(finish_reason="stop", usage=USAGE)])
    assert events[1]["choices"][0]["delta"]["content"] == nasty


async def test_sse_events_end_with_done_and_close_the_engine_stream() -> None:
    closed = False

    async def rest() -> Any:
        nonlocal closed
        try:
            for d in R1_DELTAS[1:]:
                yield d
        finally:
            closed = True

    chunks = _split([c async for c in sse_events(R1_DELTAS[0], rest(), _encoder())])
    assert chunks[-1] == "data: [DONE]\n\n"
    assert closed


async def test_sse_heartbeats_become_keep_alive_comments() -> None:
    async def queued_then_served() -> Any:
        yield Delta()  # still queued
        yield Delta(content="hi")
        yield Delta(finish_reason="stop", usage=USAGE)

    chunks = _split([c async for c in sse_events(Delta(), queued_then_served(), _encoder())])
    assert chunks[1] == ": keep-alive\n\n" and chunks[2] == ": keep-alive\n\n"
    assert chunks[-1] == "data: [DONE]\n\n"
    assert sum(c.startswith(":") for c in chunks) == 2


async def test_sse_error_after_start_is_an_error_event_then_done() -> None:
    async def failing() -> Any:
        yield Delta(content="partial")
        raise ContextLengthExceeded("too long", param="messages")

    events = _events(_split([c async for c in sse_events(Delta(content="a"), failing(), _encoder())]))
    assert events[-1] == "[DONE]"
    assert events[-2]["error"] == {
        "message": "too long",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


async def test_sse_internal_error_hides_details() -> None:
    async def failing() -> Any:
        raise RuntimeError("secret internals at 0xdeadbeef")
        yield  # pragma: no cover

    chunks = _split([c async for c in sse_events(Delta(content="a"), failing(), _encoder())])
    assert "secret" not in "".join(chunks)
    assert _events(chunks)[-2]["error"]["type"] == "server_error"


async def test_sse_stream_ending_without_finish_is_an_error() -> None:
    chunks = _split([c async for c in sse_events(Delta(content="a"), _aiter([]), _encoder())])
    assert "error" in _events(chunks)[-2]


def test_error_event_shape() -> None:
    event = _events([error_event(InvalidRequest("bad", param="x"))])[0]
    assert set(event["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------- whole chat responses


def _collected(deltas: list[Delta], include_reasoning: bool = True) -> Collected:
    c = Collected(include_reasoning=include_reasoning)
    for d in deltas:
        c.add(d)
    return c


def _body(deltas: list[Delta], include_reasoning: bool = True) -> dict[str, Any]:
    return chat_completion_body(
        _collected(deltas, include_reasoning),
        completion_id="chatcmpl-1",
        created=1,
        model="deepseek-reasoner",
        prices=PRICES,
    )


def test_whole_response_matches_the_stream() -> None:
    body = _body(R1_DELTAS)
    SDKChatCompletion.model_validate(body)
    message = body["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "Let me think. Done"}
    assert body["choices"][0]["finish_reason"] == "stop"
    stream_usage = _encode_all(_encoder(include_usage=True), R1_DELTAS)[-1]["usage"]
    assert body["usage"] == stream_usage
    assert body["model"] == "deepseek-reasoner"
    assert body["id"].startswith("chatcmpl-")


def test_whole_response_reasoning_never_closed_content_is_null() -> None:
    body = _body([Delta(reasoning="hmm", finish_reason="length", reasoning_truncated=True, usage=USAGE)])
    choice = body["choices"][0]
    assert choice["message"]["content"] is None and choice["message"]["reasoning_content"] == "hmm"
    assert choice["reasoning_truncated"] is True
    assert "content" in choice["message"]  # null, not missing


def test_whole_response_include_reasoning_false() -> None:
    body = _body(R1_DELTAS, include_reasoning=False)
    assert body["choices"][0]["message"]["reasoning_content"] is None
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5


def test_non_reasoning_model_has_null_reasoning_content() -> None:
    body = _body([Delta(content="hello"), Delta(finish_reason="stop", usage=EngineUsage(3, 1))])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello", "reasoning_content": None}
    assert body["usage"]["total_tokens"] == 4


# ----------------------------------------------------------------------------- raw completions


def test_completion_stream_and_body_pass_text_through() -> None:
    deltas = [Delta(content="<think>x</think>"), Delta(content=" y"), Delta(finish_reason="stop", usage=USAGE)]
    enc = CompletionChunkEncoder(completion_id="cmpl-1", created=1, model="m", prices=PRICES, include_usage=True)
    events = _encode_all(enc, deltas)
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == "<think>x</think> y"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 21
    # (The SDK reads stream chunks without validation: OpenAI's own have finish_reason null until the end.)
    body = completion_body(
        _collected(deltas), completion_id="cmpl-1", created=1, model="m", prices=PRICES, echo=None, want_logprobs=False
    )
    SDKCompletion.model_validate(body)
    assert body["choices"][0]["text"] == text


def test_completion_echo() -> None:
    deltas = [Delta(content=" world"), Delta(finish_reason="stop", usage=USAGE)]
    body = completion_body(
        _collected(deltas), completion_id="c", created=1, model="m", prices=PRICES, echo="hello", want_logprobs=False
    )
    assert body["choices"][0]["text"] == "hello world"
    enc = CompletionChunkEncoder(completion_id="c", created=1, model="m", prices=PRICES, echo="hello")
    assert "".join(e["choices"][0]["text"] for e in _encode_all(enc, deltas)) == "hello world"


def test_completion_echo_with_prompt_logprobs_in_json_and_stream() -> None:
    prompt = [
        PromptLogprob(token="Hel"),
        PromptLogprob(token="lo", logprob=-1.5, top_logprobs=[TopLogprob(token="p", logprob=-0.2)]),
    ]
    deltas = [
        Delta(prompt_logprobs=prompt),
        Delta(content=" world", logprobs=[TokenLogprob(token=" world", logprob=-0.5)]),
        Delta(content="!", logprobs=[TokenLogprob(token="!", logprob=-0.1)], finish_reason="stop", usage=USAGE),
    ]
    expected = {
        "tokens": ["Hel", "lo", " world", "!"],
        "token_logprobs": [None, -1.5, -0.5, -0.1],
        "top_logprobs": [None, {"p": -0.2}, {}, {}],
        "text_offset": [0, 3, 5, 11],
    }
    body = completion_body(
        _collected(deltas), completion_id="c", created=1, model="m", prices=PRICES, echo="Hello", want_logprobs=True
    )
    # Not validated against the SDK's type, which types top_logprobs entries as dicts: the first prompt
    # token's is null, as OpenAI's echo and vLLM's give it (the SDK parses responses without validation).
    assert body["choices"][0]["text"] == "Hello world!"
    assert body["choices"][0]["logprobs"] == expected
    enc = CompletionChunkEncoder(
        completion_id="c", created=1, model="m", prices=PRICES, echo="Hello", want_logprobs=True
    )
    assert enc.start() == []  # the echo waits for the prompt's logprobs
    events = [e for e in _encode_all(enc, deltas) if e["choices"]]
    assert events[0]["choices"][0]["text"] == "Hello"
    assert "".join(e["choices"][0]["text"] for e in events) == "Hello world!"
    streamed = {k: [x for e in events for x in e["choices"][0]["logprobs"][k]] for k in expected}
    assert streamed == expected


def test_legacy_logprobs_shape() -> None:
    items = [
        TokenLogprob(token="He", logprob=-0.1, top_logprobs=[TopLogprob(token="He", logprob=-0.1)]),
        TokenLogprob(token="llo", logprob=-0.2),
    ]
    assert legacy_logprobs(items, 5) == {
        "tokens": ["He", "llo"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"He": -0.1}, {}],
        "text_offset": [5, 7],
    }


# ----------------------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        (("body", "messages", 0, "role"), "messages[0].role"),
        (("body", "stop", "str"), "stop"),
        (("body", "messages", 0, "content", "list[TextPart]", 0, "text"), "messages[0].content[0].text"),
        (("body", "temperature"), "temperature"),
        (("body",), None),
        (("messages", 2, "content", "str"), "messages[2].content"),
    ],
)
def test_param_path(loc: tuple[Any, ...], expected: str | None) -> None:
    assert param_path(loc) == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ],
)
def test_validation_errors_name_the_field(body: dict[str, Any], param: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(body)
    error = validation_error(info.value.errors())
    assert error.status == 400 and error.param == param
    assert param in error.message


async def test_meter_records_a_finished_generation_as_ok_even_when_closed_after_the_finish() -> None:
    # The API stops reading at the final delta and closes the stream; that is a finished request.
    from r1serve.api.billing import Meter

    statuses: list[str] = []

    class _Meter(Meter):
        def __init__(self) -> None:  # no request, route or accounts: only the wrapper is under test
            self.accounts = None
            self.principal = None
            self._started = 0.0
            self._ttft = None
            self._received = []
            self._usage = None

        def finish(self, status: str) -> None:
            statuses.append(status)

    async def finished() -> Any:
        yield Delta(content="a")
        yield Delta(finish_reason="stop", usage=USAGE)

    async def cut() -> Any:
        yield Delta(content="a")
        yield Delta(content="b")

    for source, stop_at_first, expected in ((finished, False, "ok"), (cut, True, "cancelled")):
        wrapped = _Meter().wrap(source())
        async for d in wrapped:
            if d.finish_reason is not None or stop_at_first:
                break
        await wrapped.aclose()
        assert statuses.pop() == expected


def test_response_ids_grow_with_time_and_stay_unique() -> None:
    # Ids in creation order keep the ledger's unique index appending (bench/gateway/ledger_ids.py): random
    # ones made every ledger row touch its own index page.
    ids = []
    for _ in range(2000):
        ids.append(new_id("chatcmpl-"))
        if len(ids) % 500 == 0:
            time.sleep(0.002)
    assert all(re.fullmatch(r"chatcmpl-[0-9a-f]{32}", i) for i in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    times = [int(i[9:22], 16) for i in ids]
    assert times == sorted(times) and times[-1] - times[0] >= 6000  # microseconds, across the sleeps
    assert abs(times[-1] / 1e6 - time.time()) < 60
