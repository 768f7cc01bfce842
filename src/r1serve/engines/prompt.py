"""Rendering chat messages into a prompt with the model's own Jinja chat template.

Templates come from the GGUF (``tokenizer.chat_template``) or a catalog override. They run in a
sandbox: a GGUF is untrusted input.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from r1serve.errors import InvalidRequest
from r1serve.protocol import ChatMessage, Tool
from r1serve.toolcalls import (
    QWEN_CLOSE,
    QWEN_OPEN,
    R1_CALL_BEGIN,
    R1_CALL_END,
    R1_CALLS_BEGIN,
    R1_CALLS_END,
    R1_SEP,
)

# Used when a GGUF carries no template at all (old conversions): ChatML, the Qwen family's format.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _raise(message: str) -> None:
    raise InvalidRequest(f"chat template: {message}", param="messages")


class Arguments(dict[str, Any]):
    """A tool call's arguments as templates take them: Qwen's writes ``arguments | tojson`` (an object),
    DeepSeek-R1's concatenates ``'```json\\n' + arguments`` (a string, as OpenAI sends it). This is the
    parsed object, and adds to strings (and prints) as the JSON text the client sent."""

    def __init__(self, text: str) -> None:
        try:
            parsed = json.loads(text)
        except ValueError:  # the API refuses such arguments; a direct caller gets an empty object
            parsed = {}
        super().__init__(parsed if isinstance(parsed, dict) else {})
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __add__(self, other: object) -> str:
        return self.text + str(other)

    def __radd__(self, other: object) -> str:
        return str(other) + self.text


def _tojson(value: Any, indent: int | None = None, **kwargs: Any) -> str:
    # As Hugging Face's templates expect (and llama.cpp's minja does): no HTML escaping, UTF-8 kept.
    return json.dumps(value, ensure_ascii=False, indent=indent, **kwargs)


def _message(m: ChatMessage) -> dict[str, Any]:
    # "developer" is OpenAI's newer name for "system".
    role = "system" if m.role == "developer" else m.role
    out: dict[str, Any] = {"role": role, "content": m.text()}
    if m.tool_calls:
        # Templates tell a calling turn by its content being none (R1's) or by tool_calls (Qwen's).
        out["content"] = m.text() or None
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": c.type,
                "function": {"name": c.function.name, "arguments": Arguments(c.function.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def tools_note(tools: list[Tool], fmt: Literal["qwen", "r1"]) -> str:
    """The tools described in the system prompt, for a template that does not render them itself
    (DeepSeek-R1's shows calls and results but not the functions): the signatures, and the call format
    the template's own turns use (R1's markers if it has them, else Qwen's ``<tool_call>`` blocks)."""
    listed = "\n".join(_tojson(t.model_dump(exclude_none=True)) for t in tools)
    if fmt == "r1":
        call = (
            f"{R1_CALLS_BEGIN}{R1_CALL_BEGIN}function{R1_SEP}FUNCTION_NAME\n```json\nARGUMENTS_AS_JSON\n```"
            f"{R1_CALL_END}{R1_CALLS_END}"
        )
    else:
        call = f'{QWEN_OPEN}\n{{"name": FUNCTION_NAME, "arguments": ARGUMENTS_AS_JSON}}\n{QWEN_CLOSE}'
    return (
        "You may call one or more functions to assist with the user query. The functions, as JSON:\n"
        f"{listed}\n"
        f"To call functions, answer with nothing but the calls, in this format:\n{call}"
    )


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        self.source = source
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token
        # Whether the template renders the tools' definitions itself (Qwen's does, R1's does not).
        self.renders_tools = "tools" in source
        self.tool_format: Literal["qwen", "r1"] = "r1" if R1_CALLS_BEGIN in source else "qwen"

    def render(
        self, messages: list[ChatMessage], *, add_generation_prompt: bool = True, tools: list[Tool] | None = None
    ) -> str:
        """The prompt; ``tools`` go to the template (or, if it ignores them, into the system prompt)."""
        payload = [_message(m) for m in messages]
        tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
        if tools and not self.renders_tools:
            note = tools_note(tools, self.tool_format)
            if payload and payload[0]["role"] == "system":
                payload[0]["content"] = f"{payload[0]['content']}\n\n{note}"
            else:
                payload.insert(0, {"role": "system", "content": note})
        try:
            return self._template.render(
                messages=payload,
                tools=tool_dicts,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except InvalidRequest:
            raise
        except TemplateError as exc:
            raise InvalidRequest(f"chat template failed: {exc}", param="messages") from exc
