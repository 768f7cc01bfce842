"""Tools and tool turns rendered by the models' own templates: DeepSeek-R1's real template and
vocabulary (the header-only 7B GGUF, tests/r1_vocab.py), and the default model's Qwen2.5 template from
its GGUF. The reference for each is the template rendered directly with jinja2, as Hugging Face's
``apply_chat_template`` renders it (messages as plain dicts, OpenAI's shapes)."""

from __future__ import annotations

import json
from typing import Any

import jinja2
import pytest
from gguf_header import read_chat_info
from r1_vocab import cached_r1_vocab_gguf, r1_chat_template

from r1serve.engines.prompt import ChatTemplate
from r1serve.engines.vocab import Vocab
from r1serve.models.catalog import DEFAULT_MODEL_ID, find_entry
from r1serve.models.fetch import ensure_model
from r1serve.protocol import ChatCompletionRequest, ChatMessage, Tool
from r1serve.reasoning import strip_reasoning_from_history
from r1serve.settings import Settings
from r1serve.toolcalls import R1_CALLS_BEGIN, parse_tool_calls

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "4 C, rain"},
    {"role": "assistant", "content": "<think>Both came back.</think>Paris 18 C, Oslo 4 C."},
    {"role": "user", "content": "Thanks. And Rome?"},
]


def reference(source: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, **kw: Any) -> str:
    """The template rendered as transformers' apply_chat_template does (its tojson: no HTML escaping)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    return env.from_string(source).render(messages=messages, tools=tools, add_generation_prompt=True, **kw)


def ours(template: ChatTemplate, tools: list[dict[str, Any]] | None = None) -> str:
    req = ChatCompletionRequest.model_validate({"messages": HISTORY, "tools": tools})
    return template.render(strip_reasoning_from_history(req.messages), tools=req.tools)


def without_reasoning(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [dict(m) for m in messages]
    out[5]["content"] = "Paris 18 C, Oslo 4 C."
    return out


# ------------------------------------------------------------------------------------------- DeepSeek-R1


@pytest.fixture(scope="module")
def r1_vocab() -> Vocab:
    v = Vocab.load(cached_r1_vocab_gguf())
    yield v
    v.close()


@pytest.fixture(scope="module")
def r1_template(r1_vocab: Vocab) -> ChatTemplate:
    return ChatTemplate(r1_chat_template(), bos_token=r1_vocab.bos_text, eos_token=r1_vocab.eos_text)


def test_r1_history_with_calls_and_results_renders_as_the_real_template(
    r1_vocab: Vocab, r1_template: ChatTemplate
) -> None:
    prompt = ours(r1_template)
    expected = reference(r1_chat_template(), without_reasoning(HISTORY), None, bos_token=r1_vocab.bos_text)
    assert prompt == expected
    assert r1_vocab.prompt_tokens(prompt) == r1_vocab.prompt_tokens(expected)
    # In the distilled models' vocabulary the tool markers are not special tokens (only BOS/EOS, the
    # roles and the think tags are): each is several ordinary tokens, which the model can still write and
    # the parser reads as text split anywhere.
    tokens = r1_vocab.prompt_tokens(prompt)
    assert len(r1_vocab.tokenize(R1_CALLS_BEGIN, add_special=False)) > 1
    assert tokens.count(r1_vocab.tokenize("<｜User｜>", add_special=False)[0]) == 2
    assert '```json\n{"city": "Paris"}\n```' in prompt  # the arguments as the client sent them
    assert "Both came back" not in prompt  # earlier reasoning is dropped


def test_r1_tools_go_into_the_system_prompt(r1_vocab: Vocab, r1_template: ChatTemplate) -> None:
    # R1's template shows calls and results but not the functions: they are described in the system prompt.
    prompt = ours(r1_template, [WEATHER])
    tool = Tool.model_validate(WEATHER)
    listed = json.dumps(tool.model_dump(exclude_none=True), ensure_ascii=False)
    assert prompt.startswith(r1_vocab.bos_text + "Be brief.\n\nYou may call one or more functions")
    assert listed in prompt
    messages = without_reasoning(HISTORY)
    messages[0]["content"] = prompt[len(r1_vocab.bos_text) : prompt.index("<｜User｜>")]
    assert prompt == reference(r1_chat_template(), messages, None, bos_token=r1_vocab.bos_text)


def test_r1_output_in_the_template_format_parses_back(r1_template: ChatTemplate) -> None:
    # What the template writes for a calling turn is what the parser reads as that turn's calls.
    prompt = ours(r1_template)
    turn = prompt[prompt.index(R1_CALLS_BEGIN) : prompt.index("<｜tool▁outputs▁begin｜>")]
    content, calls = parse_tool_calls(turn)
    assert content == "<｜end▁of▁sentence｜>"
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Oslo"}),
    ]


# ------------------------------------------------------------------------------------------- Qwen2.5


@pytest.fixture(scope="module")
def qwen_source() -> str:
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    _, source = read_chat_info(ensure_model(entry, Settings().models_dir, progress=False))
    assert source is not None
    return source


def qwen_reference_messages() -> list[dict[str, Any]]:
    # Qwen's template writes `arguments | tojson`: Hugging Face's callers pass the arguments as an object.
    messages = without_reasoning(HISTORY)
    messages[2] = {
        **messages[2],
        "tool_calls": [
            {**c, "function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in HISTORY[2]["tool_calls"]
        ],
    }
    return messages


def test_qwen_tools_and_history_render_as_the_real_template(qwen_source: str) -> None:
    template = ChatTemplate(qwen_source)
    assert template.renders_tools and template.tool_format == "qwen"
    tool = Tool.model_validate(WEATHER).model_dump(exclude_none=True)
    prompt = ours(template, [WEATHER])
    assert prompt == reference(qwen_source, qwen_reference_messages(), [tool])
    assert "<tools>\n" + json.dumps(tool, ensure_ascii=False) + "\n</tools>" in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n4 C, rain\n</tool_response>" in prompt
    # tool_choice "none" renders no tools: the plain system prompt
    assert "# Tools" not in template.render([ChatMessage(role="user", content="hi")], tools=None)
