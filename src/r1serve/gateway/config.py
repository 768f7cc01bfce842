"""Gateway configuration: what the gateway runs, from the providers file (gateway/providers_file.py,
where its format is documented), the ``serve`` flags, and the environment.

``r1serve serve --provider huggingface`` (comma-separate several for a fallback chain) needs no file at
all; ``--upstream URL`` makes a one-off provider ``upstream``.

Keys are read from the process environment, then from ``.env`` in the working directory (the Plumber
tutorial's ``HUGGINGFACE_ACCESS_TOKEN="..."`` file works as is). ``os.environ`` is not modified.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from r1serve.engines.upstream import Timeouts, UpstreamConfig
from r1serve.engines.upstream.config import DIALECTS
from r1serve.gateway.presets import PRESETS, find_preset
from r1serve.gateway.providers_file import (
    DEFAULT_CONTEXT,
    GatewayConfigError,
    GatewaySettings,
    GroupConfig,
    ProvidersFile,
    ProviderTable,
    TargetConfig,
    config_error,
    place,
    url_problem,
)
from r1serve.models.catalog import R1_ALIASES, Prices, find_entry

DEFAULT_GROUP = "deepseek-r1"


# ----------------------------------------------------------------------------- what the gateway runs


@dataclass(frozen=True)
class ProviderConfig:
    """A provider resolved (preset, environment, defaults): the engine's connection settings, and what the
    gateway itself needs about it (whether a key is required, billing, model-group names, token counts)."""

    upstream: UpstreamConfig
    requires_key: bool = False
    prices: Prices = field(default_factory=Prices)
    context_length: int = DEFAULT_CONTEXT
    tokenizer: Path | None = None
    models: dict[str, str] = field(default_factory=dict)  # model group name -> upstream model id


@dataclass(frozen=True)
class GatewayConfig:
    providers: dict[str, ProviderConfig]
    groups: tuple[GroupConfig, ...]
    # [gateway] as read (with --health-interval applied); its timeouts are already in each provider's.
    settings: GatewaySettings = field(default_factory=GatewaySettings)

    @property
    def uses_embedded(self) -> bool:
        return any(t.provider is None for g in self.groups for t in g.targets)


@dataclass(frozen=True)
class GatewayOptions:
    """What ``serve`` and Settings say about the gateway (see :func:`options_from_settings`)."""

    providers_file: Path | None = None
    provider: tuple[str, ...] = ()
    upstream: str | None = None
    upstream_key_env: str | None = None
    upstream_model: str | None = None
    reasoning_dialect: str = "auto"
    timeouts: Timeouts | None = None  # None: the file's [gateway] values, else Timeouts()
    served_name: str | None = None  # the default model name (settings.model), an alias of a one-off group
    env_file: Path | None = Path(".env")
    health_interval: float | None = None

    @property
    def configured(self) -> bool:
        return bool(self.providers_file or self.provider or self.upstream)


def options_from_settings(settings: Any) -> GatewayOptions:
    """Settings fields, read with defaults so this works before every field exists."""
    provider = getattr(settings, "provider", None) or ()
    if isinstance(provider, str):
        provider = tuple(p.strip() for p in provider.split(",") if p.strip())
    timeouts = None
    fields = ("upstream_connect_timeout", "upstream_first_byte_timeout", "upstream_idle_timeout")
    if any(getattr(settings, f, None) is not None for f in fields):
        d = Timeouts()
        timeouts = Timeouts(
            connect=getattr(settings, fields[0], None) or d.connect,
            first_byte=getattr(settings, fields[1], None) or d.first_byte,
            idle=getattr(settings, fields[2], None) or d.idle,
        )
    env_file = settings.model_config.get("env_file") if hasattr(settings, "model_config") else ".env"
    return GatewayOptions(
        providers_file=getattr(settings, "providers_file", None),
        provider=tuple(provider),
        upstream=getattr(settings, "upstream", None),
        upstream_key_env=getattr(settings, "upstream_key_env", None),
        upstream_model=getattr(settings, "upstream_model", None),
        reasoning_dialect=getattr(settings, "reasoning_dialect", None) or "auto",
        timeouts=timeouts,
        served_name=getattr(settings, "model", None),
        env_file=Path(env_file) if isinstance(env_file, (str, Path)) else None,
    )


# ----------------------------------------------------------------------------- environment


def load_environment(env_file: Path | None) -> dict[str, str]:
    """``.env`` values overlaid by the process environment (the process wins, as with pydantic-settings)."""
    values: dict[str, str] = {}
    if env_file is not None and env_file.is_file():
        # python-dotenv, imported only when there is a .env to read.
        from dotenv import dotenv_values

        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(os.environ)
    return values


def _resolve_key(env_names: tuple[str, ...], env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(value, the variable it came from); the first name set wins; (None, first name) when none is."""
    for name in env_names:
        value = env.get(name, "").strip()
        if value:
            return value, name
    return None, (env_names[0] if env_names else None)


# ----------------------------------------------------------------------------- loading


def read_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GatewayConfigError(f"cannot read providers file {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        kind = path.suffix[1:].upper() or "TOML"
        raise GatewayConfigError(f"providers file {path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise GatewayConfigError(f"providers file {path}: expected a table/object at the top level")
    return data


def _provider(name: str, table: ProviderTable, env: Mapping[str, str], timeouts: Timeouts) -> ProviderConfig:
    """``[providers.NAME]`` with its preset's values for what it leaves out, its key from ``env``."""
    preset = find_preset(table.preset or name)

    def pick(value: Any, attr: str, default: Any) -> Any:
        """The table's value, else the preset's, else ``default``."""
        if value is not None:
            return value
        return getattr(preset, attr) if preset else default

    base_url = table.base_url or pick(None, "base_url", None)
    if not base_url:
        raise GatewayConfigError(
            f'{place(("providers", name))}.base_url is required (or name a preset with preset = "...")'
        )
    env_names: tuple[str, ...] = pick(None, "api_key_env", ())
    if table.api_key_env is not None:  # "" means no key, even when the preset names some
        env_names = (table.api_key_env,) if table.api_key_env else ()
    key, key_env = _resolve_key(env_names, env)
    upstream = UpstreamConfig(
        name=name,
        base_url=base_url,
        model=table.model or pick(None, "model", None),
        api_key=key,
        api_key_env=key_env,
        headers={**pick(None, "headers", {}), **table.headers},
        dialect=pick(table.dialect, "dialect", "auto"),
        timeouts=table.timeouts(timeouts),
        include_usage=pick(table.include_usage, "include_usage", True),
        eos_markers=pick(table.eos_markers, "eos_markers", ()),
        drop_params=table.drop_params,
    )
    return ProviderConfig(
        upstream=upstream,
        requires_key=pick(table.requires_key, "requires_key", False),
        prices=table.prices.as_prices() if table.prices else Prices(),
        context_length=table.context_length,
        tokenizer=Path(table.tokenizer).expanduser() if table.tokenizer else None,
        models=dict(table.models),
    )


def load_gateway_config(options: GatewayOptions, env: Mapping[str, str] | None = None) -> GatewayConfig | None:
    """The gateway to build, or None when nothing asks for one (the embedded engine alone)."""
    if not options.configured:
        return None
    if env is None:
        env = load_environment(options.env_file)
    data: dict[str, Any] = read_file(Path(options.providers_file)) if options.providers_file else {}
    try:
        file = ProvidersFile.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, data) from None
    settings = file.gateway
    if options.health_interval is not None:
        settings = settings.model_copy(update={"health_interval": options.health_interval})
    timeouts = options.timeouts or settings.timeouts(Timeouts())
    providers = {name: _provider(name, table, env, timeouts) for name, table in file.providers.items()}
    groups = list(file.routes)

    # --provider NAME[,NAME...]: a preset or a provider from the file, as one fallback chain.
    chain: list[TargetConfig] = []
    for name in options.provider:
        if name not in providers:
            if find_preset(name) is None:
                raise GatewayConfigError(
                    f"unknown provider {name!r}: not in the providers file and not a preset "
                    f"(presets: {', '.join(sorted(PRESETS))})"
                )
            providers[name] = _provider(name, ProviderTable(), env, timeouts)
        chain.append(TargetConfig(provider=name, priority=len(chain)))

    # --upstream URL: a one-off provider.
    if options.upstream:
        if options.reasoning_dialect not in DIALECTS:
            raise GatewayConfigError(
                f"--reasoning-dialect must be one of {', '.join(DIALECTS)} (got {options.reasoning_dialect!r})"
            )
        problem = url_problem(options.upstream)
        if problem:
            raise GatewayConfigError(f"--upstream {problem}")
        table = ProviderTable.model_validate({
            "base_url": options.upstream,
            "dialect": options.reasoning_dialect,
            "api_key_env": options.upstream_key_env or "",
            "model": options.upstream_model or None,
        })  # fmt: skip
        up = _provider("upstream", table, env, timeouts)
        if options.upstream_key_env and not up.upstream.api_key:
            raise GatewayConfigError(f"--upstream-key-env {options.upstream_key_env}: that variable is not set")
        providers["upstream"] = up
        chain.append(TargetConfig(provider="upstream", priority=len(chain)))

    if chain:
        aliases = list(R1_ALIASES)
        if options.served_name:
            aliases.append(options.served_name)
            entry = find_entry(options.served_name)
            if entry is not None:
                aliases.extend([entry.id, *entry.aliases])
        for t in chain:
            model = providers[t.provider or ""].upstream.model
            if model:
                aliases.append(model)
        name = _chain_name(chain, providers)
        # The flags' group is the default: a file group marked default would otherwise win without a word.
        file_groups = [g.model_copy(update={"default": False}) for g in groups]
        groups = [GroupConfig(name=name, targets=tuple(chain), aliases=_unique(aliases), default=True), *file_groups]
    elif not groups and providers:
        groups = [
            GroupConfig(
                name=DEFAULT_GROUP,
                targets=tuple(TargetConfig(provider=n, priority=i) for i, n in enumerate(providers)),
                aliases=_unique([*R1_ALIASES, *(p.upstream.model for p in providers.values() if p.upstream.model)]),
                default=True,
            )
        ]
    if not groups:
        raise GatewayConfigError("the providers file defines no providers and no routes")

    used = _unique([t.provider for g in groups for t in g.targets if t.provider is not None])
    missing: list[str] = []  # every provider without its key, not only the first
    for name in used:
        if name not in providers:
            raise GatewayConfigError(f"a route names provider {name!r}, which is not defined")
        p = providers[name]
        if p.requires_key and not p.upstream.api_key:
            preset = find_preset(name)
            key_env = p.upstream.api_key_env
            in_preset = preset is not None and key_env in preset.api_key_env
            names: tuple[str | None, ...] = preset.api_key_env if preset and in_preset else (key_env,)
            missing.append(f"provider {name!r} needs an API key: set {' or '.join(n for n in names if n)}")
    if missing:
        raise GatewayConfigError("; ".join(missing) + " (in the environment or in .env)")
    return GatewayConfig(providers=providers, groups=tuple(groups), settings=settings)


def _chain_name(chain: list[TargetConfig], providers: Mapping[str, ProviderConfig]) -> str:
    first = providers[chain[0].provider or ""].upstream
    if len(chain) == 1 and first.model:
        return f"{first.model}@{first.name}"
    return DEFAULT_GROUP if any(p.upstream.model for p in providers.values()) else first.name


def _unique(items: list[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return tuple(seen)
