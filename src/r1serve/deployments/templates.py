"""Templates: what a deployment runs, found from the names users already type, and the ``command``
engine's command lines.

A template is a catalog entry (model, reasoning format, sampling defaults, prices): by id or alias
(``deepseek-r1-distill-qwen-1.5b``, ``deepseek-r1:7b``), by its Hugging Face repo
(``unsloth/DeepSeek-R1-Distill-Qwen-1.5B-GGUF``), by the names of Ollama and LiteLLM configs
(``deepseek-r1``, ``deepseek-r1:7b-qwen-distill-q4_K_M``, ``ollama/deepseek-r1:1.5b``,
``huggingface/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B``), or a GGUF file. The generic R1 names
(``deepseek-r1``, ``deepseek-reasoner``, ...) mean the smallest real R1, ``deepseek-r1-distill-qwen-1.5b``:
a deployment is a machine of its own, so "the R1 being served" (what those names mean on /v1) is no
answer here.

The ``command`` engine runs any OpenAI-compatible server: its command line has ``{port}`` (required),
``{model}`` (the template's GGUF on this machine if it is here, else the template as given, e.g. a hub
id for vLLM), ``{host}``, ``{threads}`` and ``{python}`` (r1serve's own interpreter) placeholders.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

from r1serve.errors import InvalidRequest
from r1serve.models.catalog import CATALOG, R1_ALIASES, HubSource, ModelEntry, entry_for_path, find_entry
from r1serve.models.catalog import detect_reasoning_format as _detect
from r1serve.models.fetch import local_path

GENERIC_R1 = "deepseek-r1-distill-qwen-1.5b"
_GENERIC_R1_NAMES = frozenset(
    n.lower() for n in ("deepseek-r1", "deepseek-r1:latest", "deepseek-r1-distill", *R1_ALIASES)
)
# LiteLLM's provider prefixes (``provider/model``) that may stand before a model name in a config.
_PREFIXES = (
    "ollama/", "ollama_chat/", "huggingface/", "hosted_vllm/", "openai/", "together_ai/", "deepinfra/",
    "openrouter/", "fireworks_ai/", "groq/", "deepseek/", "llamacpp/", "lm_studio/",
)  # fmt: skip

PLACEHOLDERS = ("port", "model", "host", "threads", "python")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
DEFAULT_READINESS = {"embedded": "/health", "command": "/v1/models"}


def _candidates(name: str) -> list[str]:
    out = [name]
    lowered = name.lower()
    for prefix in _PREFIXES:
        if lowered.startswith(prefix) and len(name) > len(prefix):
            name = name[len(prefix) :]
            out.append(name)
            break
    # Ollama's longer tags name the quantisation too: deepseek-r1:7b-qwen-distill-q4_K_M is deepseek-r1:7b.
    if ":" in name:
        base, tag = name.split(":", 1)
        out.append(f"{base}:{tag.split('-')[0]}")
    return out


def find_template(spec: str) -> ModelEntry | None:
    """The catalog entry a template name means, or None."""
    for name in _candidates(spec.strip()):
        entry = find_entry(name) or _by_repo(name)
        if entry is not None:
            return entry
        if name.lower() in _GENERIC_R1_NAMES:
            return find_entry(GENERIC_R1)
    return None


def _by_repo(name: str) -> ModelEntry | None:
    wanted = name.lower()
    for entry in CATALOG:
        if isinstance(entry.source, HubSource) and entry.source.repo_id.lower() == wanted:
            return entry
    return None


def resolve_template(spec: str, engine: str = "embedded") -> ModelEntry:
    """A template's catalog entry, a GGUF file's, or (``command`` engine only) an entry for a model the
    command itself knows how to get (a hub id for vLLM or SGLang)."""
    entry = find_template(spec)
    if entry is not None:
        return entry
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return entry_for_path(path)
    if engine == "command" and spec.strip() and not spec.lower().endswith(".gguf"):
        return ModelEntry(
            id=spec.strip(),
            source=HubSource(repo_id=spec.strip(), filename=""),
            reasoning_format=_detect(None, spec),
            description=f"{spec}, run by the deployment's own command",
        )
    raise InvalidRequest(
        f"Unknown template `{spec}`: not a catalog id or alias (see `r1serve models`), a name such as "
        "`deepseek-r1`, `deepseek-r1:7b` or `ollama/deepseek-r1:1.5b`, nor a GGUF file.",
        param="template",
        code="template_not_found",
    )


def model_argument(spec: str, entry: ModelEntry, engine: str, models_dir: Path) -> str:
    """What the replica is told to serve: ``r1serve serve --model`` takes a catalog id (the canonical one:
    the child knows no Ollama names) or a path; a command gets a path when the weights are here."""
    catalog = find_template(spec) is not None
    if engine == "command":
        if isinstance(entry.source, HubSource) and not entry.source.filename:
            return entry.id  # the command's own model name
        path = local_path(entry, models_dir)
        return str(path) if path is not None else (entry.id if catalog else spec)
    return entry.id if catalog else spec


def template_price(entry: ModelEntry, prices: dict[str, float]) -> float | None:
    """The operator's price per replica-hour for this template (``R1SERVE_DEPLOYMENT_TEMPLATE_PRICES``),
    whichever of its names the setting uses; None when it names none of them."""
    for name, price in prices.items():
        if name == entry.id or (found := find_template(name)) is not None and found.id == entry.id:
            return float(price)
    return None


def parse_command(command: str | None) -> list[str]:
    """The ``command`` engine's command line as argv (placeholders unexpanded); 400s name ``command``."""
    if not command or not command.strip():
        raise _invalid("the command engine needs a command (with a {port} placeholder)", "command")
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise _invalid(f"command cannot be split into arguments: {exc}", "command") from None
    found = {m.group(1) for arg in argv for m in _PLACEHOLDER.finditer(arg)}
    unknown = sorted(found - set(PLACEHOLDERS))
    if unknown:
        raise _invalid(
            f"unknown placeholder {{{unknown[0]}}} in command: one of {', '.join('{' + p + '}' for p in PLACEHOLDERS)}",
            "command",
        )
    if "port" not in found:
        raise _invalid("command must contain {port}: the replica's port is chosen when it starts", "command")
    return argv


def expand(argv: list[str], *, port: int, model: str, threads: int, host: str = "127.0.0.1") -> list[str]:
    values = {"port": str(port), "model": model, "threads": str(threads), "host": host, "python": sys.executable}
    # Only the known names are replaced: any other brace in an argument (a JSON flag) is left alone.
    return [_PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), arg) for arg in argv]


def check_readiness_path(path: str | None, engine: str) -> str:
    if path is None:
        return DEFAULT_READINESS[engine]
    if not path.startswith("/") or any(c.isspace() for c in path) or len(path) > 200:
        raise _invalid(
            "readiness_path must be a URL path starting with /, such as /v1/models or /health", "readiness_path"
        )
    return path


def launch_of(record: dict[str, Any]) -> tuple[str | None, str]:
    """(command, readiness path) of a stored deployment. They are kept in its CREATED event (the
    deployments table has no columns for them), so a restored deployment runs the same command."""
    engine = str(record.get("engine") or "embedded")
    command, readiness = record.get("command"), record.get("readiness_path")
    if command is None:
        for ev in record.get("events") or ():
            if ev.get("reason") == "CREATED":
                command, readiness = ev.get("command"), ev.get("readiness_path")
                break
    return command, readiness or DEFAULT_READINESS.get(engine, "/health")


def _invalid(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_value")


def catalog_templates(models_dir: Path, default_price: float) -> list[dict[str, Any]]:
    """The templates a deployment can be created from (the console's picker): every catalog entry, the
    names that resolve to it, and whether its weights are on this machine already (a replica of one
    that is not must fetch it first, from the internet)."""
    out = []
    for entry in CATALOG:
        price = entry.price_per_replica_hour
        out.append(
            {
                "id": entry.id,
                "object": "deployment.template",
                "aliases": list(entry.aliases),
                "engine": "embedded",
                "reasoning_format": entry.reasoning_format,
                "context_length": entry.context_length,
                "price_per_hour": float(price) if price is not None else default_price,
                "local": local_path(entry, models_dir) is not None,
                "description": entry.description,
            }
        )
    return out
