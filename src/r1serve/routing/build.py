"""Building what the server serves from Settings: the model's weights, its engine, the registry.

One place for it because ``r1serve serve``, the app's lifespan and (later) the gateway all need the
same steps in the same order.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from r1serve.models.catalog import ModelEntry, entry_for_path, find_entry
from r1serve.models.fetch import ModelFetchError, ensure_model
from r1serve.routing.registry import ModelRegistry, ServedModel
from r1serve.settings import Settings

if TYPE_CHECKING:
    from r1serve.engines.llama import LlamaEngine

log = logging.getLogger("r1serve.api")


@dataclass(frozen=True)
class ResolvedModel:
    entry: ModelEntry
    path: Path


def model_entry(spec: str) -> ModelEntry:
    """A catalog id or alias, else a path to a GGUF. Raises ModelFetchError for neither."""
    entry = find_entry(spec)
    if entry is not None:
        return entry
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" or path.exists():
        return entry_for_path(path)
    raise ModelFetchError(
        f"unknown model {spec!r}: not a catalog id or alias (see `r1serve models`) and not a path to a GGUF file"
    )


def resolve_model(settings: Settings, *, progress: bool = False) -> ResolvedModel:
    """The served model's entry and local GGUF, fetched and verified first if needed (blocking)."""
    entry = model_entry(settings.model)
    return ResolvedModel(entry, ensure_model(entry, settings.models_dir, progress=progress))


async def start_embedded(settings: Settings, *, progress: bool = False) -> LlamaEngine:
    """Fetch the model if needed and start the embedded engine on it."""
    # Imported here: loading llama.cpp's shared library is only needed when serving a local model.
    from r1serve.engines.llama import LlamaEngine

    resolved = await asyncio.to_thread(resolve_model, settings, progress=progress)
    engine = LlamaEngine(resolved.path, resolved.entry, settings)
    await engine.start()
    log.info("serving %s from %s", engine.entry.id, resolved.path)
    return engine


async def build_registry(settings: Settings, *, progress: bool = False) -> ModelRegistry:
    """The gateway's routes when providers are configured (the embedded engine started only if a route
    uses it), else the embedded engine alone with the R1 aliases routed to it."""
    from r1serve.gateway import build_gateway_registry, gateway_plan

    plan = gateway_plan(settings)
    if plan is not None:
        gateway = await build_gateway_registry(
            settings, config=plan, embedded=lambda: start_embedded(settings, progress=progress)
        )
        assert gateway is not None
        return gateway
    engine = await start_embedded(settings, progress=progress)
    registry = ModelRegistry()
    # The engine's entry, not the catalog's: it carries the detected reasoning format and the real
    # per-sequence context length.
    registry.add(ServedModel(entry=engine.entry, engine=engine), default=True)
    registry.add_r1_aliases()
    return registry


async def close_registry(registry: ModelRegistry) -> None:
    for engine in registry.engines():
        try:
            await engine.close()
        except Exception:
            log.exception("closing engine %s failed", getattr(engine, "name", engine))
