"""From configuration to a running :class:`~r1serve.routing.ModelRegistry` of gateway model groups."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1serve.engines.base import Engine
from r1serve.engines.upstream import HttpClient, UpstreamEngine
from r1serve.gateway.config import (
    GatewayConfig,
    GatewayOptions,
    load_gateway_config,
    options_from_settings,
)
from r1serve.gateway.group import (
    CircuitBreaker,
    GroupEngine,
    Member,
    RetryPolicy,
    Target,
)
from r1serve.gateway.providers_file import GroupConfig
from r1serve.gateway.tokens import token_counter
from r1serve.models.catalog import ModelEntry, Prices
from r1serve.routing.registry import ModelRegistry, ServedModel

log = logging.getLogger("r1serve.gateway")

# DeepSeek's usage recommendation for R1, applied when the client leaves them out (as on the embedded path).
R1_SAMPLING: dict[str, float] = {"temperature": 0.6, "top_p": 0.95}

EmbeddedFactory = Callable[[], Awaitable[Engine]]


@dataclass(frozen=True)
class UpstreamSource:
    """Where a model group's model lives: not on this machine (``ModelEntry.source`` for a group)."""

    description: str


def gateway_plan(settings: Any, options: GatewayOptions | None = None) -> GatewayConfig | None:
    """The gateway ``settings`` ask for, validated (raises GatewayConfigError), or None for none."""
    return load_gateway_config(options or options_from_settings(settings))


async def build_gateway_registry(
    settings: Any,
    *,
    options: GatewayOptions | None = None,
    config: GatewayConfig | None = None,
    embedded: EmbeddedFactory | None = None,
    registry: ModelRegistry | None = None,
) -> ModelRegistry | None:
    """A registry serving the configured model groups, engines started; None when none is configured.

    ``embedded`` starts the local engine; it is called (once) only when a group has an embedded target.
    The registry's engines are :class:`GroupEngine` s: closing them (``close_registry``) closes everything,
    the shared HTTP session included.
    """
    if config is None:
        config = gateway_plan(settings, options)
    if config is None:
        return None
    return await build_from_config(
        config, embedded=embedded, models_dir=getattr(settings, "models_dir", None), registry=registry
    )


async def build_from_config(
    config: GatewayConfig,
    *,
    embedded: EmbeddedFactory | None = None,
    models_dir: Path | None = None,
    registry: ModelRegistry | None = None,
    client: HttpClient | None = None,
) -> ModelRegistry:
    registry = registry if registry is not None else ModelRegistry()
    tuning = config.settings
    connect = max((p.upstream.timeouts.connect for p in config.providers.values()), default=10.0)
    client = client or HttpClient(limit=tuning.max_connections, connect_timeout=connect)
    targets: dict[str | None, Target] = {}
    started: list[GroupEngine] = []

    async def target_for(provider: str | None) -> Target:
        if provider in targets:
            return targets[provider]
        breaker = CircuitBreaker(tuning.breaker_threshold, tuning.breaker_cooldown)
        if provider is None:
            if embedded is None:
                raise ValueError("a model group has an embedded target but no embedded engine was provided")
            engine = await embedded()
            target = Target("embedded", engine, breaker=breaker, health_interval=0)
        else:
            p = config.providers[provider]
            tokens = await asyncio.to_thread(token_counter, p.tokenizer, models_dir=models_dir)
            engine = UpstreamEngine(p.upstream, client, tokens=tokens)
            target = Target(provider, engine, breaker=breaker, health_interval=tuning.health_interval)
        targets[provider] = target
        return target

    retry = RetryPolicy(
        retries=tuning.retries,
        backoff=tuning.backoff,
        max_backoff=tuning.max_backoff,
        max_retry_wait=tuning.max_retry_wait,
    )
    try:
        for group in config.groups:
            members = []
            for tc in group.targets:
                target = await target_for(tc.provider)
                model = tc.model
                if model is None and tc.provider is not None:
                    model = config.providers[tc.provider].models.get(group.name)
                members.append(Member(target, model=model, weight=tc.weight, priority=tc.priority))
            engine = GroupEngine(group.name, members, policy=group.policy, retry=retry)
            await engine.start()
            started.append(engine)
            await _discover_models(members)
            entry = _group_entry(group, members, config)
            registry.add(ServedModel(entry=entry, engine=engine), default=group.default)
            for m in members:  # a discovered upstream model id is a name clients may send too
                if isinstance(m.target.engine, UpstreamEngine) and m.target.engine.config.model:
                    name = m.target.engine.config.model
                    if name != entry.id and name not in entry.aliases:
                        registry.alias(name, entry.id)
            log.info("model group %s -> %s (%s)", entry.id, ", ".join(m.target.name for m in members), group.policy)
    except BaseException:
        for engine in started:
            await engine.close()
        raise
    registry.add_r1_aliases()
    return registry


async def _discover_models(members: list[Member]) -> None:
    """Upstreams configured without a model (``--upstream`` to a vLLM box): ask ``/models`` once."""
    for m in members:
        engine = m.target.engine
        if isinstance(engine, UpstreamEngine) and engine.config.model is None and m.model is None:
            try:
                models = await engine.list_models()
            except Exception as exc:  # noqa: BLE001 - start-up goes on without a model name
                log.warning(
                    "%s: could not list models (%s); requests go without a model name",
                    engine.config.name,
                    getattr(exc, "message", type(exc).__name__),
                )
                continue
            if models:
                engine.set_model(models[0])
                log.info("%s serves %s", engine.config.name, models[0])


def _group_entry(group: GroupConfig, members: list[Member], config: GatewayConfig) -> ModelEntry:
    prices: Prices | None = group.prices.as_prices() if group.prices else None
    context = group.context_length
    fmt = "none"
    for m in members:
        engine = m.target.engine
        if isinstance(engine, UpstreamEngine):
            p = config.providers[m.target.name]
            prices = prices or p.prices
            context = context or p.context_length
            if engine.dialect != "none":
                fmt = "deepseek_r1"
        else:
            own = getattr(engine, "entry", None)
            if isinstance(own, ModelEntry):
                prices = prices or own.prices
                context = context or own.context_length
                if own.reasoning_format == "deepseek_r1":
                    fmt = "deepseek_r1"
    where = ", ".join(f"{m.target.name}" + (f" ({m.model})" if m.model else "") for m in members)
    return ModelEntry(
        id=group.name,
        source=UpstreamSource(where),  # type: ignore[arg-type]
        aliases=tuple(a for a in group.aliases if a != group.name),
        reasoning_format=fmt,  # type: ignore[arg-type]
        sampling_defaults=dict(R1_SAMPLING) if fmt == "deepseek_r1" else {},
        context_length=context or 65536,
        prices=prices or Prices(),
        description=f"gateway model group ({group.policy}): {where}",
    )
