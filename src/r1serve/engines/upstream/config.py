"""An upstream's connection settings: where it is, how to authenticate, how it writes R1's reasoning, how
long to wait for it, and the quirks to smooth over.

One type for every caller: :class:`~r1serve.engines.upstream.engine.UpstreamEngine` reads it, the
gateway's providers file resolves into it (its billing and model-group fields sit beside it, in
:class:`r1serve.gateway.config.ProviderConfig`), and a one-off engine is built from one directly. It lives
here, below the gateway, because the engine layer never imports the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

from r1serve.models.catalog import detect_reasoning_format

Dialect = Literal["auto", "think_in_content", "think_tags", "reasoning_content", "reasoning", "none"]
"""How an upstream returns R1's reasoning.

Every dialect accepts the ``reasoning_content`` and ``reasoning`` fields (vLLM renamed one to the other;
Ollama and OpenRouter send ``reasoning``): when one arrives before any answer text, the answer text is
taken as plain answer. The dialects differ in how ``content`` is read when no such field comes:

* ``reasoning_content`` / ``reasoning``: content is the answer (its leading whitespace trimmed, as after
  ``</think>`` on the embedded path). AIML API, DeepSeek, OpenRouter, llama-server
  ``--reasoning-format deepseek``, vLLM / SGLang started with a reasoning parser.
* ``think_in_content``: content holds ``…</think>answer``; the opening tag may be missing because the
  chat template already opened it (vLLM without a reasoning parser, as in Nosana's R1 template). A
  leading ``<think>`` is dropped. Output that never closes the tag is all reasoning (content null),
  exactly as on the embedded path.
* ``think_tags``: reasoning only when content *starts* with ``<think>``; otherwise content is passed
  through untouched (DeepInfra's documented shape: plain content, no tags).
* ``none``: content is passed through untouched; reasoning fields, if any, still become reasoning.
* ``auto``: ``think_in_content`` when the upstream model's name looks like R1 (the catalog's
  :func:`~r1serve.models.catalog.detect_reasoning_format`), else ``think_tags``.
"""

# The same names as a tuple, for membership tests and messages: derived, so the two cannot drift apart.
DIALECTS: tuple[Dialect, ...] = get_args(Dialect)


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``first_byte``: from sending the request to the first body bytes (headers included);
    ``idle``: the longest gap between two reads of the body; ``whole``: a non-streaming answer, all of it."""

    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 60.0
    # A non-streaming request (the client wants one JSON answer): the whole answer, from sending the
    # request; upstreams send nothing until the generation is done, so first_byte cannot apply.
    whole: float = 600.0

    def first_deadline(self, stream: bool) -> float:
        """Seconds allowed before the response headers."""
        return self.first_byte if stream else max(self.first_byte, self.whole)


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    base_url: str
    model: str | None = None
    # The key itself is never printed (repr=False); api_key_env names where it came from, for messages.
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    dialect: Dialect = "auto"
    timeouts: Timeouts = Timeouts()
    include_usage: bool = True
    # Literal end-of-sequence text some providers leak into content (DeepInfra's stream sends "</s>").
    eos_markers: tuple[str, ...] = ()
    # Request fields this upstream rejects; removed before sending.
    drop_params: tuple[str, ...] = ()

    @property
    def effective_dialect(self) -> Dialect:
        if self.dialect != "auto":
            return self.dialect
        if self.model and detect_reasoning_format(None, self.model) == "deepseek_r1":
            return "think_in_content"
        return "think_tags"
