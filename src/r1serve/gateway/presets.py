"""Known upstreams: base URL, where the key lives, the R1 model id there, and the reasoning dialect.

Dialect choices (see :data:`r1serve.engines.upstream.config.Dialect`; every dialect also accepts the
``reasoning_content`` / ``reasoning`` fields, so a provider that switches to fields keeps working):

* DeepInfra: ``think_tags``. Its documented R1 answer (``/deepseek-ai/DeepSeek-R1/api``) is plain
  ``content`` with no tags and no reasoning field; R1 answers that do open with ``<think>`` are split.
  ``think_in_content`` would turn that documented answer into all-reasoning. Its stream also leaks a
  literal ``</s>`` content chunk before the finish chunk: dropped (``eos_markers``).
* Together: ``think_in_content`` (R1's ``<think>…</think>`` in content).
* Hugging Face router: ``think_tags``: the router forwards to whichever provider serves the model, some
  with a reasoning field, some with tags in content; a leading tag or a field is split either way.
* AIML API: ``reasoning_content`` (its documented answer carries ``reasoning_content`` and the answer in
  ``content`` with a leading newline, which is trimmed as after ``</think>``).
* DeepSeek: ``reasoning_content`` (``deepseek-reasoner``). OpenRouter: ``reasoning`` field.
* vLLM / SGLang: ``think_in_content``: right without a reasoning parser (the R1 template opens
  ``<think>`` in the prompt, so content is ``…</think>answer``, as in Nosana's R1 template), and still
  right with ``--reasoning-parser deepseek_r1`` because the fields then arrive first. Use dialect
  ``reasoning_content`` for a parser-enabled server if its answers may have no reasoning at all.
* llama-server: ``reasoning_content`` (``--reasoning-format deepseek``, its default in recent builds).
* Ollama: ``think_tags``: recent versions send a ``reasoning`` field on the OpenAI endpoint, older ones
  ``<think>`` in content; both are split.

Prices are left at zero: they change often; set ``prices = {input = ..., output = ...}`` (dollars per
million tokens) in the providers file to get ``estimated_cost``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r1serve.engines.upstream import Dialect


@dataclass(frozen=True)
class Preset:
    name: str
    base_url: str
    api_key_env: tuple[str, ...]  # first one set wins
    model: str | None
    dialect: Dialect
    headers: dict[str, str] = field(default_factory=dict)
    eos_markers: tuple[str, ...] = ()
    include_usage: bool = True
    requires_key: bool = True
    description: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "deepinfra",
            "https://api.deepinfra.com/v1/openai",
            ("DEEPINFRA_TOKEN", "DEEPINFRA_API_KEY"),
            "deepseek-ai/DeepSeek-R1",
            "think_tags",
            eos_markers=("</s>",),
            description="DeepInfra's OpenAI-compatible API",
        ),
        Preset(
            "together",
            "https://api.together.xyz/v1",
            ("TOGETHER_API_KEY",),
            "deepseek-ai/DeepSeek-R1",
            "think_in_content",
            description="Together AI",
        ),
        Preset(
            "huggingface",
            "https://router.huggingface.co/v1",
            ("HUGGINGFACE_ACCESS_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"),
            "deepseek-ai/DeepSeek-R1",
            "think_tags",
            description="Hugging Face inference router (the Plumber tutorial's .env works as is)",
        ),
        Preset(
            "aimlapi",
            "https://api.aimlapi.com/v1",
            ("AIML_API_KEY", "AIMLAPI_KEY"),
            "deepseek/deepseek-r1",
            "reasoning_content",
            description="AI/ML API",
        ),
        Preset(
            "deepseek",
            "https://api.deepseek.com",
            ("DEEPSEEK_API_KEY",),
            "deepseek-reasoner",
            "reasoning_content",
            description="DeepSeek's own API",
        ),
        Preset(
            "openrouter",
            "https://openrouter.ai/api/v1",
            ("OPENROUTER_API_KEY",),
            "deepseek/deepseek-r1",
            "reasoning",
            description="OpenRouter",
        ),
        Preset(
            "vllm",
            "http://127.0.0.1:8000/v1",
            ("VLLM_API_KEY",),
            None,
            "think_in_content",
            requires_key=False,
            description="vLLM (model discovered from /models when not set)",
        ),
        Preset(
            "sglang",
            "http://127.0.0.1:30000/v1",
            ("SGLANG_API_KEY",),
            None,
            "think_in_content",
            requires_key=False,
            description="SGLang",
        ),
        Preset(
            "llama-server",
            "http://127.0.0.1:8080/v1",
            ("LLAMA_API_KEY",),
            None,
            "reasoning_content",
            requires_key=False,
            description="llama.cpp's llama-server",
        ),
        Preset(
            "ollama",
            "http://127.0.0.1:11434/v1",
            ("OLLAMA_API_KEY",),
            "deepseek-r1",
            "think_tags",
            requires_key=False,
            description="Ollama's OpenAI-compatible endpoint",
        ),
    )
}

# Names people type for the same thing.
PRESET_ALIASES: dict[str, str] = {
    "hf": "huggingface",
    "hugging-face": "huggingface",
    "aiml": "aimlapi",
    "aiml-api": "aimlapi",
    "llamacpp": "llama-server",
    "llama.cpp": "llama-server",
    "nosana": "vllm",
}


def find_preset(name: str) -> Preset | None:
    key = name.strip().lower()
    return PRESETS.get(PRESET_ALIASES.get(key, key))
