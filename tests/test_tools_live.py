"""Function calling on the real server with the real default model, through real clients (the openai SDK,
LangChain's ChatOpenAI): a round trip (the model calls, the client sends the result, the model answers),
streamed deltas that reassemble to the non-streamed calls, required and named choices that always give a
valid call, parallel calls, and the SDK's parse with pydantic tools."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow

WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": WEATHER_PARAMS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = ["What is the weather in Paris?", "Is it raining in Oslo right now?", "What time is it in Tokyo?",
           "Tell me the weather in Lima in fahrenheit.", "How hot is it in Cairo?"]  # fmt: skip
MAX_TOKENS = 120
MODEL = "deepseek-reasoner"  # resolves to the model served (the default one)


def _sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def _valid_calls(message: Any, names: set[str] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The message's calls as (name, arguments), each checked: a known function, JSON arguments that
    validate against its parameters, an id and type."""
    assert message.tool_calls, message
    out = []
    for call in message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        name = call.function.name
        assert name in (names or SCHEMAS), name
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[name])
        out.append((name, args))
    return out


def test_round_trip_the_model_calls_the_client_answers_the_model_replies(server_url: str) -> None:
    client = _sdk(server_url)
    messages: list[Any] = [
        {"role": "system", "content": "You are a helpful assistant. Use the tool results to answer in one sentence."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    first = client.chat.completions.create(
        model="deepseek-reasoner", messages=messages, tools=TOOLS, temperature=0, max_tokens=MAX_TOKENS
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    [(name, args)] = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
    assert name == "get_weather" and args["city"] == "Paris"
    call = (choice.message.tool_calls or [])[0]
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'})
    second = client.chat.completions.create(
        model="deepseek-reasoner", messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=60
    )
    answer = second.choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert answer.message.content and "18" in answer.message.content, answer.message.content


def _reassembled(stream: Any) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """A stream's content, its calls rebuilt from the deltas (index, then id and name, then arguments in
    pieces, as OpenAI streams them) and its finish reason."""
    content = ""
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                if piece.id is not None:
                    assert piece.index not in calls and piece.type == "function"
                    assert piece.function is not None and piece.function.name
                    calls[piece.index] = [piece.function.name, piece.function.arguments or ""]
                else:
                    assert piece.index in calls and piece.function is not None and piece.function.name is None
                    calls[piece.index][1] += piece.function.arguments or ""
            finish = choice.finish_reason or finish
    assert list(calls) == list(range(len(calls)))
    return content or None, [(n, a) for n, a in calls.values()], finish


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_streamed_deltas_reassemble_to_the_whole_answer(server_url: str, tool_choice: str) -> None:
    client = _sdk(server_url)
    kw: dict[str, Any] = {"model": MODEL, "tools": TOOLS, "tool_choice": tool_choice, "temperature": 0, "seed": 7,
                          "max_tokens": MAX_TOKENS}  # fmt: skip
    prompt = _user("What is the weather in Paris and the time in Tokyo?")
    whole = client.chat.completions.create(messages=prompt, **kw).choices[0]
    streamed = _reassembled(client.chat.completions.create(messages=prompt, stream=True, **kw))
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert streamed == (whole.message.content, calls, whole.finish_reason)
    assert calls and whole.finish_reason == "tool_calls"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_always_gives_a_valid_call(server_url: str, temperature: float) -> None:
    client = _sdk(server_url)

    def ask(i: int) -> Any:
        return client.chat.completions.create(
            model=MODEL, messages=_user(PROMPTS[i]), tools=TOOLS, tool_choice="required",
            temperature=temperature, seed=i, max_tokens=MAX_TOKENS,
        ).choices[0]  # fmt: skip

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        choices = list(pool.map(ask, range(len(PROMPTS))))
    for choice in choices:
        assert choice.finish_reason == "tool_calls", choice
        _valid_calls(choice.message)


def test_a_named_function_is_always_the_one_called(server_url: str) -> None:
    client = _sdk(server_url)
    named: Any = {"type": "function", "function": {"name": "get_time"}}
    for i, prompt in enumerate(PROMPTS):  # weather questions included: the choice overrides the prompt
        choice = client.chat.completions.create(
            model=MODEL, messages=_user(prompt), tools=TOOLS, tool_choice=named, temperature=0.8, seed=i,
            max_tokens=MAX_TOKENS, parallel_tool_calls=False,
        ).choices[0]  # fmt: skip
        assert [name for name, _ in _valid_calls(choice.message, {"get_time"})] == ["get_time"]
        assert choice.finish_reason == "tool_calls"


def test_parallel_calls_and_parallel_tool_calls_false(server_url: str) -> None:
    client = _sdk(server_url)
    prompt = _user("Get the weather in Paris, then get the time in Tokyo.")
    both = client.chat.completions.create(
        model=MODEL, messages=prompt, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=MAX_TOKENS
    ).choices[0]
    calls = _valid_calls(both.message)
    assert [name for name, _ in calls] == ["get_weather", "get_time"], calls
    assert len({c.id for c in both.message.tool_calls or []}) == 2
    one = client.chat.completions.create(
        model=MODEL, messages=prompt, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=MAX_TOKENS,
        parallel_tool_calls=False,
    ).choices[0]  # fmt: skip
    assert len(_valid_calls(one.message)) == 1


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=40)
    unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})


def test_sdk_parse_with_a_pydantic_tool(server_url: str) -> None:
    client = _sdk(server_url)
    completion = client.chat.completions.parse(
        model=MODEL, messages=_user("What is the weather in Paris?"), tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice="required", temperature=0, max_tokens=MAX_TOKENS,
    )  # fmt: skip
    [call] = completion.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, GetWeather)
    assert call.function.parsed_arguments.city == "Paris"


def test_langchain_bind_tools_and_with_structured_output(server_url: str) -> None:
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{server_url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=MAX_TOKENS)
    asked = HumanMessage("What is the weather in Paris?")
    reply = llm.bind_tools([GetWeather], tool_choice="required").invoke([asked])
    assert isinstance(reply, AIMessage)
    [call] = reply.tool_calls
    assert call["name"] == "GetWeather" and call["args"]["city"] == "Paris"
    # The result back through LangChain's messages: the history renders and the model answers.
    result = ToolMessage('{"temperature": 18}', tool_call_id=call["id"])
    answer = llm.bind_tools([GetWeather], tool_choice="none").invoke([asked, reply, result])
    assert isinstance(answer.content, str) and answer.content and not answer.tool_calls

    structured = llm.with_structured_output(GetWeather).invoke("Weather in Oslo, in celsius, please.")
    assert isinstance(structured, GetWeather) and structured.city == "Oslo"
    by_tool = llm.with_structured_output(GetWeather, method="function_calling").invoke("Weather in Rome?")
    assert isinstance(by_tool, GetWeather) and by_tool.city == "Rome"


def test_reasoning_stays_free_and_the_call_follows_it(reasoning_server_url: str) -> None:
    # The reasoning-template server: the model thinks (free text, under a thinking budget), then the
    # answer is decoded under the call grammar; its template has no tools, so they are described in
    # the system prompt.
    client = _sdk(reasoning_server_url)
    for i, prompt in enumerate(PROMPTS[:3]):
        choice = client.chat.completions.create(
            model=MODEL, messages=_user(prompt), tools=TOOLS, tool_choice="required", temperature=0.7, seed=i,
            max_tokens=MAX_TOKENS + 40, extra_body={"max_reasoning_tokens": 30},
        ).choices[0]  # fmt: skip
        assert getattr(choice.message, "reasoning_content", None), choice
        assert choice.message.content is None and choice.finish_reason == "tool_calls"
        _valid_calls(choice.message)
