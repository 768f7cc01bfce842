"""Rendering chat messages into a prompt with the model's own Jinja chat template.

Templates come from the GGUF (``tokenizer.chat_template``) or a catalog override. They run in a
sandbox: a GGUF is untrusted input.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from r1serve.errors import InvalidRequest
from r1serve.protocol import ChatMessage

# Used when a GGUF carries no template at all (old conversions): ChatML, the Qwen family's format.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _raise(message: str) -> None:
    raise InvalidRequest(f"chat template: {message}", param="messages")


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token

    def render(self, messages: list[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        # Templates index messages as dicts; "developer" is OpenAI's newer name for "system".
        payload: list[dict[str, Any]] = []
        for m in messages:
            role = "system" if m.role == "developer" else m.role
            payload.append({"role": role, "content": m.text()})
        try:
            return self._template.render(
                messages=payload,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except InvalidRequest:
            raise
        except TemplateError as exc:
            raise InvalidRequest(f"chat template failed: {exc}", param="messages") from exc
