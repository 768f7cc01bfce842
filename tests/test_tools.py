"""Function calling without the model: the grammar for required / named calls (llama.cpp's grammar sampler
on the default model's real vocabulary and R1's, loaded without weights), the 400s through the real API,
and the gateway: tools forwarded, every provider's tool_calls shape (and R1's tokens inside content)
normalised to OpenAI's, JSON and streaming, and an upstream's 400 passed to the client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_upstream import FakeUpstream, Reply
from r1_vocab import cached_r1_vocab_gguf
from test_gateway_api import gateway, serving
from test_structured import admits, eog, single

from r1serve.engines.llama.grammar import Grammar
from r1serve.engines.llama.toolgrammar import compile_tool_choice
from r1serve.engines.vocab import Vocab
from r1serve.models.catalog import DEFAULT_MODEL_ID, find_entry
from r1serve.models.fetch import ensure_model
from r1serve.protocol import NamedToolChoice, Tool
from r1serve.settings import Settings
from r1serve.toolcalls import R1_CALL_BEGIN, R1_CALL_END, R1_CALLS_BEGIN, R1_CALLS_END, R1_SEP

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME: dict[str, Any] = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
TOOLS = [Tool.model_validate(WEATHER), Tool.model_validate(TIME)]
NAMED = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}})


@pytest.fixture(scope="module")
def qwen_vocab() -> Iterator[Vocab]:
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    v = Vocab.load(ensure_model(entry, Settings().models_dir, progress=False))
    yield v
    v.close()


@pytest.fixture(scope="module")
def r1_vocab() -> Iterator[Vocab]:
    v = Vocab.load(cached_r1_vocab_gguf())
    yield v
    v.close()


def started(vocab: Vocab, gbnf: str | None) -> Grammar:
    assert gbnf is not None
    g = Grammar(gbnf)
    g.start(vocab)
    g.begin(vocab, "")
    return g


def qwen_call(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def r1_call(name: str, args: str) -> str:
    return f"{R1_CALL_BEGIN}function{R1_SEP}{name}\n```json\n{args}\n```{R1_CALL_END}"


# ----------------------------------------------------------------------------- the grammar


def test_auto_and_none_constrain_nothing() -> None:
    assert compile_tool_choice(TOOLS, "auto", parallel=True, fmt="qwen") is None
    assert compile_tool_choice(TOOLS, "none", parallel=True, fmt="qwen") is None
    assert compile_tool_choice(TOOLS, None, parallel=True, fmt="qwen") is None


def test_required_admits_calls_of_any_tool_and_nothing_else(qwen_vocab: Vocab) -> None:
    gbnf = compile_tool_choice(TOOLS, "required", parallel=True, fmt="qwen")
    good = qwen_call("get_weather", '{"city": "Paris", "unit": "c"}') + "\n" + qwen_call("get_time", "{}")
    g = started(qwen_vocab, gbnf)
    assert admits(qwen_vocab, g, good)
    assert g.allows(eog(qwen_vocab))  # complete: the answer may end
    for bad in ("Sure, " + good, qwen_call("get_news", "{}"), qwen_call("get_weather", '{"city": "Paris"}}')):
        assert not admits(qwen_vocab, started(qwen_vocab, gbnf), bad), bad
    half = started(qwen_vocab, gbnf)
    assert admits(qwen_vocab, half, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert not half.allows(eog(qwen_vocab))  # a call cannot stop half-way


def test_named_admits_only_that_function_and_one_call_without_parallel(qwen_vocab: Vocab) -> None:
    gbnf = compile_tool_choice(TOOLS, NAMED, parallel=False, fmt="qwen")
    one = qwen_call("get_weather", '{"city": "Oslo", "unit": "f"}')
    g = started(qwen_vocab, gbnf)
    assert admits(qwen_vocab, g, one) and g.allows(eog(qwen_vocab))
    assert not g.allows(qwen_vocab.tokenize("\n", add_special=False)[0])  # no second call
    assert not admits(qwen_vocab, started(qwen_vocab, gbnf), qwen_call("get_time", "{}"))


def test_r1_format_grammar_on_r1_vocabulary(r1_vocab: Vocab) -> None:
    gbnf = compile_tool_choice(TOOLS, "required", parallel=True, fmt="r1")
    text = R1_CALLS_BEGIN + r1_call("get_weather", '{"city": "Rome", "unit": "c"}') + R1_CALLS_END
    g = started(r1_vocab, gbnf)
    assert admits(r1_vocab, g, text) and g.allows(eog(r1_vocab))
    assert not admits(r1_vocab, started(r1_vocab, gbnf), "I will call " + text)


# ----------------------------------------------------------------------------- the API's 400s

BAD: list[tuple[dict[str, Any], str]] = [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}]},
        "tools[0].function.parameters",
    ),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "18 C"}]},
        "messages[1].tool_call_id",
    ),
    (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]},
        "messages[1].tool_call_id",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "x"},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param"), BAD)
async def test_bad_tool_fields_are_a_400_naming_them(tmp_path: Path, fields: dict[str, Any], param: str) -> None:
    async with FakeUpstream() as up:
        async with serving(await gateway(tmp_path, single(up))) as url, httpx.AsyncClient() as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
            resp = await client.post(url + "/v1/chat/completions", json=body)
        assert not up.requests, "refused before anything went upstream"
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert set(error) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------- the gateway

HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "18 C"},
]


async def test_tools_and_tool_turns_go_upstream_as_sent(tmp_path: Path) -> None:
    async with FakeUpstream() as up:
        async with serving(await gateway(tmp_path, single(up))) as url, httpx.AsyncClient() as client:
            resp = await client.post(
                url + "/v1/chat/completions",
                json={"model": "m", "messages": HISTORY, "tools": [WEATHER], "tool_choice": "required",
                      "parallel_tool_calls": False},
            )  # fmt: skip
        assert resp.status_code == 200, resp.text
        sent = up.requests[0]["body"]
    assert sent["tools"] == [WEATHER]
    assert sent["tool_choice"] == "required" and sent["parallel_tool_calls"] is False
    assert sent["messages"][1] == HISTORY[1]
    assert sent["messages"][2] == HISTORY[2]


def event(delta: dict[str, Any], finish: str | None = None) -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return "data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "p",
                                  "choices": [choice]})  # fmt: skip


ARGS = '{"city": "Paris", "unit": "c"}'
# The same two calls in the shapes providers stream them.
OPENAI_SHAPE = [
    event({"role": "assistant", "content": None}),
    event({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                           "function": {"name": "get_weather", "arguments": ""}}]}),
    event({"tool_calls": [{"index": 0, "function": {"arguments": ARGS[:10]}}]}),
    event({"tool_calls": [{"index": 0, "function": {"arguments": ARGS[10:]}}]}),
    event({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                           "function": {"name": "get_time", "arguments": "{}"}}]}),
    event({}, "tool_calls"),
    "data: [DONE]",
]  # fmt: skip
# Every call at index 0, told apart by id; names and ids repeated on every piece.
SAME_INDEX_SHAPE = [
    event({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "get_weather", "arguments": ARGS[:7]}}]}),
    event({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "get_weather", "arguments": ARGS[7:]}}]}),
    event({"tool_calls": [{"index": 0, "id": "c2", "function": {"name": "get_time", "arguments": "{}"}}]}),
    event({}, "stop"),
    "data: [DONE]",
]
# Arguments as an object, no index, no id (Ollama's).
OBJECT_SHAPE = [
    event({"tool_calls": [{"function": {"name": "get_weather", "arguments": json.loads(ARGS)}}]}),
    event({"tool_calls": [{"function": {"name": "get_time", "arguments": {}}}]}),
    event({}, "tool_calls"),
    "data: [DONE]",
]
R1_TEXT = (
    "Let me look.\n\n" + R1_CALLS_BEGIN + r1_call("get_weather", ARGS) + "\n" + r1_call("get_time", "{}") + R1_CALLS_END
)


async def ask(url: str, stream: bool) -> dict[str, Any]:
    """The answer's message (a stream's chunks reassembled as the openai SDK does) and finish reason."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME], "stream": stream}
    async with httpx.AsyncClient(timeout=30) as client:
        resp = await client.post(url + "/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    if not stream:
        choice = resp.json()["choices"][0]
        return {"content": choice["message"]["content"], "tool_calls": choice["message"].get("tool_calls"),
                "finish": choice["finish_reason"]}  # fmt: skip
    content = ""
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for line in resp.text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            assert not ("content" in delta and delta.get("content") and delta.get("tool_calls"))
            for piece in delta.get("tool_calls") or []:
                if "id" in piece:
                    assert piece["index"] not in calls and piece["type"] == "function"
                    calls[piece["index"]] = {"id": piece["id"], "type": "function",
                                             "function": {"name": piece["function"]["name"], "arguments": ""}}  # fmt: skip
                calls[piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
            finish = choice["finish_reason"] or finish
    return {"content": content or None, "tool_calls": [calls[i] for i in sorted(calls)] or None, "finish": finish}


def check(answer: dict[str, Any], content: str | None = None) -> None:
    assert answer["content"] == content
    assert answer["finish"] == "tool_calls"
    calls = answer["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", json.loads(ARGS)),
        ("get_time", {}),
    ]
    assert all(c["id"] and c["type"] == "function" for c in calls)
    assert calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize(
    "lines", [OPENAI_SHAPE, SAME_INDEX_SHAPE, OBJECT_SHAPE], ids=["openai", "same_index", "object"]
)
async def test_streamed_provider_shapes_are_normalised(tmp_path: Path, lines: list[str]) -> None:
    async with (
        FakeUpstream(default=Reply(kind="sse", lines=tuple(lines))) as up,
        serving(await gateway(tmp_path, single(up))) as url,
    ):
        check(await ask(url, stream=True))


async def test_whole_answer_tool_calls_are_normalised(tmp_path: Path) -> None:
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}},
        {"type": "function", "function": {"name": "get_time", "arguments": {}}},
    ]}  # fmt: skip
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "p",
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}  # fmt: skip
    async with (
        FakeUpstream(default=Reply(kind="json", body=json.dumps(body))) as up,
        serving(await gateway(tmp_path, single(up))) as url,
    ):
        answer = await ask(url, stream=False)
    check(answer)
    assert answer["tool_calls"][0]["id"] == "call_1"


@pytest.mark.parametrize("stream", [False, True])
async def test_r1_tool_tokens_inside_content_become_tool_calls(tmp_path: Path, stream: bool) -> None:
    async with (
        FakeUpstream(default=Reply(fields=[("content", R1_TEXT)], chunk=3)) as up,
        serving(await gateway(tmp_path, single(up))) as url,
    ):
        check(await ask(url, stream=stream), content="Let me look.")


async def test_an_upstream_refusing_tools_gives_the_client_its_400(tmp_path: Path) -> None:
    error = {"error": {"message": "tools are not supported by this model", "type": "invalid_request_error",
                       "param": "tools", "code": None}}  # fmt: skip
    async with (
        FakeUpstream(default=Reply(kind="status", status=400, body=json.dumps(error))) as up,
        serving(await gateway(tmp_path, single(up))) as url,
        httpx.AsyncClient() as client,
    ):
        resp = await client.post(
            url + "/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]},
        )
    assert resp.status_code == 400, resp.text
    got = resp.json()["error"]
    assert "tools are not supported" in got["message"] and got["param"] == "tools"


# ----------------------------------------------------------------------------- the wire shapes


async def test_tool_call_bodies_and_chunks_have_openais_shapes() -> None:
    from r1serve.api.bodies import Collected, chat_completion_body
    from r1serve.api.chunks import ChatChunkEncoder
    from r1serve.engines.base import Delta, EngineUsage
    from r1serve.models.catalog import Prices
    from r1serve.protocol import ChatCompletion, ChatCompletionChunk
    from r1serve.toolcalls import ToolCallPiece

    deltas = [
        Delta(content="Checking."),
        Delta(tool_calls=[ToolCallPiece(index=0, id="call_x", name="get_weather"), ToolCallPiece(0, '{"city": ')]),
        Delta(tool_calls=[ToolCallPiece(0, '"Paris"}'), ToolCallPiece(index=1, id="call_y", name="get_time")]),
        Delta(tool_calls=[ToolCallPiece(1, "{}")], finish_reason="tool_calls", usage=EngineUsage(5, 9)),
    ]
    collected = Collected()
    for d in deltas:
        collected.add(d)
    body = ChatCompletion.model_validate(
        chat_completion_body(collected, completion_id="c", created=1, model="m", prices=Prices())
    )
    message = body.choices[0].message
    assert body.choices[0].finish_reason == "tool_calls" and message.content == "Checking."
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or []] == [
        ("call_x", "get_weather", '{"city": "Paris"}'),
        ("call_y", "get_time", "{}"),
    ]
    encoder = ChatChunkEncoder(completion_id="c", created=1, model="m", prices=Prices())
    events = encoder.start() + [e for d in deltas for e in encoder.delta(d)] + encoder.finish(deltas[-1])
    chunks = [ChatCompletionChunk.model_validate_json(e.removeprefix("data: ").strip()) for e in events]
    pieces = [p for c in chunks for p in c.choices[0].delta.tool_calls or []]
    assert [(p.index, p.id, p.type, p.function and p.function.name) for p in pieces if p.id] == [
        (0, "call_x", "function", "get_weather"),
        (1, "call_y", "function", "get_time"),
    ]
    assert all(p.id is None and p.type is None and p.function and p.function.name is None for p in pieces if not p.id)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_with_tool_calls_sends_the_first_delta_at_once_and_always_the_finish() -> None:
    from collections.abc import AsyncGenerator

    from r1serve.engines.base import Delta
    from r1serve.engines.tools import with_tool_calls

    async def engine() -> AsyncGenerator[Delta, None]:
        for text in ["<tool_", 'call>\n{"name": "get_time", ', '"arguments": {}}\n</tool_call>', "  "]:
            yield Delta(content=text)
        yield Delta(content=" ", finish_reason="stop")

    out = [d async for d in with_tool_calls(engine(), frozenset({"get_time"}))]
    assert out[0].content == "" and not out[0].tool_calls  # held, but it starts the response
    assert out[-1].finish_reason == "tool_calls" and out[-1].content == ""
    assert all(d.content == "" for d in out)
    pieces = [p for d in out for p in d.tool_calls]
    assert [(p.name, p.arguments) for p in pieces] == [("get_time", ""), (None, "{}")]
    assert len(out) == 3  # the first; the call (its head completes with its arguments); the finish
