"""Gateway configuration: a providers file (TOML or JSON), the ``serve`` flags, and the environment.

The providers file (``R1SERVE_PROVIDERS_FILE``)::

    [gateway]                      # all optional
    retries = 1                    # extra tries on the same target (connect error, 5xx; a timeout fails over)
    health_interval = 15           # seconds between GET {base}/models checks; 0: off
    breaker_threshold = 5          # consecutive failures that open a target's circuit
    breaker_cooldown = 15          # seconds before a half-open trial
    max_retry_wait = 5             # longest Retry-After honoured by waiting (else fail over / 429)
    connect_timeout = 10
    first_byte_timeout = 120
    idle_timeout = 60
    whole_timeout = 600            # a non-streaming answer (JSON client), all of it

    [providers.deepinfra]          # a preset's name: everything has a default
    prices = { input = 0.7, output = 2.4 }

    [providers.gpu]                # anything else: base_url required, a preset optional
    preset = "vllm"
    base_url = "http://10.0.0.5:8000/v1"
    model = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    api_key_env = "GPU_BOX_KEY"    # the NAME of the variable; the key never goes in this file
    dialect = "think_in_content"   # auto | think_in_content | think_tags | reasoning_content | reasoning | none
    headers = { "X-Team" = "ml" }
    models = { "deepseek-r1-32b" = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B" }  # route name -> upstream id
    tokenizer = "/models/r1-vocab.gguf"  # for local token counts when upstream sends no usage

    [[routes]]
    name = "deepseek-r1"
    aliases = ["deepseek-reasoner", "deepseek/deepseek-r1", "deepseek-ai/DeepSeek-R1"]
    policy = "priority"            # priority | weighted | least_outstanding
    default = true
    targets = [
      { provider = "gpu" },
      { provider = "deepinfra", priority = 1 },
      { embedded = true, priority = 2 },   # the local llama.cpp model as the last resort
    ]

With providers but no ``[[routes]]``: one route ``deepseek-r1`` (plus R1's aliases) over every provider
in file order, priority policy. ``r1serve serve --provider huggingface`` (comma-separate several for a
fallback chain) needs no file at all; ``--upstream URL`` makes a one-off provider ``upstream``.

Keys are read from the process environment, then from ``.env`` in the working directory (the Plumber
tutorial's ``HUGGINGFACE_ACCESS_TOKEN="..."`` file works as is). ``os.environ`` is not modified.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from r1serve.engines.upstream import Timeouts
from r1serve.engines.upstream.config import DIALECTS
from r1serve.gateway.presets import find_preset
from r1serve.models.catalog import R1_ALIASES, Prices

POLICIES = ("priority", "weighted", "least_outstanding")
DEFAULT_ROUTE = "deepseek-r1"
# DeepSeek-R1's context window at the hosted providers (64K at DeepSeek, up to 160K elsewhere).
DEFAULT_CONTEXT = 65536


class GatewayConfigError(ValueError):
    """A providers file or flag that cannot work; the message says what to change."""


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    base_url: str
    model: str | None = None
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    requires_key: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    dialect: str = "auto"
    timeouts: Timeouts = Timeouts()
    include_usage: bool = True
    eos_markers: tuple[str, ...] = ()
    drop_params: tuple[str, ...] = ()
    prices: Prices = Prices()
    context_length: int = DEFAULT_CONTEXT
    tokenizer: Path | None = None
    models: dict[str, str] = field(default_factory=dict)  # route name -> upstream model id


@dataclass(frozen=True)
class TargetConfig:
    provider: str | None  # None: the embedded engine
    model: str | None = None
    weight: float = 1.0
    priority: int = 0


@dataclass(frozen=True)
class RouteConfig:
    name: str
    targets: tuple[TargetConfig, ...]
    aliases: tuple[str, ...] = ()
    policy: str = "priority"
    default: bool = False
    prices: Prices | None = None
    context_length: int | None = None


@dataclass(frozen=True)
class GatewayConfig:
    providers: dict[str, ProviderConfig]
    routes: tuple[RouteConfig, ...]
    retries: int = 1
    backoff: float = 0.1  # seconds, doubled per retry, with jitter
    max_backoff: float = 2.0
    max_retry_wait: float = 5.0
    breaker_threshold: int = 5
    breaker_cooldown: float = 15.0
    health_interval: float = 15.0
    max_connections: int = 0  # 0: unlimited

    @property
    def uses_embedded(self) -> bool:
        return any(t.provider is None for r in self.routes for t in r.targets)


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
    served_name: str | None = None  # the default model name (settings.model), an alias of a one-off route
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
        from dotenv import dotenv_values  # python-dotenv: a dependency of pydantic-settings

        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(os.environ)
    return values


# ----------------------------------------------------------------------------- parsing


def read_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GatewayConfigError(f"cannot read providers file {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayConfigError(f"providers file {path} is not valid {path.suffix[1:].upper() or 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise GatewayConfigError(f"providers file {path}: expected a table/object at the top level")
    return data


def _prices(raw: Any, where: str) -> Prices | None:
    """Dollars per million tokens."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise GatewayConfigError(f"{where}: prices must be a table like {{ input = 0.5, output = 2.0 }}")
    where = f"{where}: prices"
    _check_keys(raw, frozenset({"input", "output", "cached_input"}), where)
    return Prices(
        input=_number(raw, "input", 0.0, where),
        output=_number(raw, "output", 0.0, where),
        cached_input=_number(raw, "cached_input", 0.0, where) if raw.get("cached_input") is not None else None,
    )


def _str_map(raw: Any, where: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise GatewayConfigError(f"{where} must be a table of strings")
    return {str(k): str(v) for k, v in raw.items()}


def _check_keys(raw: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    """A misspelt key would otherwise be ignored without a word."""
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        names, known_names = ", ".join(map(repr, unknown)), ", ".join(sorted(known))
        raise GatewayConfigError(f"{where}: unknown key {names} (known: {known_names})")


def _number(
    raw: Mapping[str, Any], key: str, default: float, where: str, *, least: float = 0.0, above: bool = False
) -> float:
    """``raw[key]`` as a number >= ``least`` (> when ``above``), ``default`` when absent."""
    value = raw.get(key)
    if value is None:  # absent, or null in a JSON file
        return float(default)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise GatewayConfigError(f"{where}: {key} must be a number (got {value!r})") from None
    if number < least or (above and number == least):
        raise GatewayConfigError(f"{where}: {key} must be {'above' if above else 'at least'} {least:g} (got {value!r})")
    return number


def _flag(raw: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    """``raw[key]`` as true / false; a string such as "false" is refused rather than read as true."""
    value = raw.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise GatewayConfigError(f"{where}: {key} must be true or false (got {value!r})")
    return value


def _integer(raw: Mapping[str, Any], key: str, default: int, where: str, *, least: int = 0) -> int:
    number = _number(raw, key, default, where, least=least)
    if not number.is_integer():
        raise GatewayConfigError(f"{where}: {key} must be a whole number (got {raw.get(key)!r})")
    return int(number)


def _str_list(raw: Mapping[str, Any], key: str, where: str, default: Any = ()) -> tuple[str, ...]:
    value = raw.get(key)
    if value is None:
        value = default
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise GatewayConfigError(f'{where}: {key} must be a list of strings, like ["a", "b"] (got {value!r})')
    return tuple(value)


def _timeouts(raw: Mapping[str, Any], defaults: Timeouts, where: str) -> Timeouts:
    return Timeouts(
        connect=_number(raw, "connect_timeout", defaults.connect, where, above=True),
        first_byte=_number(raw, "first_byte_timeout", defaults.first_byte, where, above=True),
        idle=_number(raw, "idle_timeout", defaults.idle, where, above=True),
        whole=_number(raw, "whole_timeout", defaults.whole, where, above=True),
    )


_TIMEOUT_KEYS = frozenset({"connect_timeout", "first_byte_timeout", "idle_timeout", "whole_timeout"})
_GATEWAY_KEYS = _TIMEOUT_KEYS | {
    "retries", "backoff", "max_backoff", "max_retry_wait", "breaker_threshold", "breaker_cooldown",
    "health_interval", "max_connections",
}  # fmt: skip
_PROVIDER_KEYS = _TIMEOUT_KEYS | {
    "preset", "base_url", "api_key", "api_key_env", "dialect", "headers", "eos_markers", "tokenizer", "model",
    "requires_key", "include_usage", "drop_params", "prices", "context_length", "models",
}  # fmt: skip
_ROUTE_KEYS = frozenset({"name", "targets", "policy", "context_length", "aliases", "default", "prices"})
_TARGET_KEYS = frozenset({"provider", "embedded", "model", "weight", "priority"})
_TOP_KEYS = frozenset({"gateway", "providers", "routes"})


def _resolve_key(env_names: tuple[str, ...], env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(value, the variable it came from); the first name set wins; (None, first name) when none is."""
    for name in env_names:
        value = env.get(name, "").strip()
        if value:
            return value, name
    return None, (env_names[0] if env_names else None)


def provider_config(
    name: str, raw: Mapping[str, Any], env: Mapping[str, str], timeouts: Timeouts
) -> ProviderConfig:
    where = f"provider {name!r}"
    if not isinstance(raw, Mapping):
        raise GatewayConfigError(f'{where} must be a table, like [providers.{name}] base_url = "..."')
    _check_keys(raw, _PROVIDER_KEYS, where)
    preset = find_preset(str(raw.get("preset", name)))
    if "preset" in raw and preset is None:
        raise GatewayConfigError(f"{where}: unknown preset {raw['preset']!r}")
    base_url = raw.get("base_url") or (preset.base_url if preset else None)
    if not base_url:
        raise GatewayConfigError(f"{where}: base_url is required (or name a preset with preset = \"...\")")
    url = urlsplit(str(base_url))
    if url.scheme not in ("http", "https") or not url.hostname:
        # Without any user:password part: this message is printed.
        shown = str(base_url).split("@", 1)[-1] if "@" in url.netloc else str(base_url)
        raise GatewayConfigError(
            f"{where}: base_url must be an http:// or https:// URL, like http://HOST:PORT/v1 (got {shown!r})"
        )
    if raw.get("api_key") is not None:
        raise GatewayConfigError(
            f"{where}: put the key in an environment variable and name it with api_key_env, not api_key"
        )
    if "api_key_env" in raw:
        env_names: tuple[str, ...] = (str(raw["api_key_env"]),) if raw["api_key_env"] else ()
    else:
        env_names = preset.api_key_env if preset else ()
    key, key_env = _resolve_key(env_names, env)
    dialect = str(raw.get("dialect") or (preset.dialect if preset else "auto"))
    if dialect not in DIALECTS:
        raise GatewayConfigError(f"{where}: dialect must be one of {', '.join(DIALECTS)} (got {dialect!r})")
    headers = dict(preset.headers) if preset else {}
    headers.update(_str_map(raw.get("headers"), f"{where}: headers"))
    t = _timeouts(raw, timeouts, where)
    eos = _str_list(raw, "eos_markers", where, preset.eos_markers if preset else ())
    tokenizer = raw.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise GatewayConfigError(f"{where}: tokenizer must be the path of a GGUF file (got {tokenizer!r})")
    return ProviderConfig(
        name=name,
        base_url=str(base_url),
        model=raw.get("model") or (preset.model if preset else None),
        api_key_env=key_env,
        api_key=key,
        requires_key=_flag(raw, "requires_key", preset.requires_key if preset else False, where),
        headers=headers,
        dialect=dialect,
        timeouts=t,
        include_usage=_flag(raw, "include_usage", preset.include_usage if preset else True, where),
        eos_markers=eos,
        drop_params=_str_list(raw, "drop_params", where),
        prices=_prices(raw.get("prices"), where) or Prices(),
        context_length=_integer(raw, "context_length", DEFAULT_CONTEXT, where, least=1),
        tokenizer=Path(tokenizer).expanduser() if tokenizer else None,
        models=_str_map(raw.get("models"), f"{where}: models"),
    )


def _target(raw: Any, where: str) -> TargetConfig:
    if isinstance(raw, str):
        return TargetConfig(provider=None if raw == "embedded" else raw)
    if not isinstance(raw, Mapping):
        raise GatewayConfigError(f"{where}: a target is a provider name or a table {{ provider = \"...\" }}")
    _check_keys(raw, _TARGET_KEYS, f"{where}: target")
    embedded = _flag(raw, "embedded", False, f"{where}: target")
    provider = raw.get("provider")
    if embedded == bool(provider):
        raise GatewayConfigError(f"{where}: a target has either provider = \"NAME\" or embedded = true")
    return TargetConfig(
        provider=None if embedded else str(provider),
        model=raw.get("model"),
        weight=_number(raw, "weight", 1.0, f"{where}: target", above=True),
        priority=_integer(raw, "priority", 0, f"{where}: target", least=-(2**31)),
    )


def _route(raw: Any, index: int) -> RouteConfig:
    if not isinstance(raw, Mapping) or not raw.get("name"):
        raise GatewayConfigError(f"routes[{index}]: a route needs a name")
    where = f"route {raw['name']!r}"
    _check_keys(raw, _ROUTE_KEYS, where)
    targets = raw.get("targets")
    if not isinstance(targets, list) or not targets:
        raise GatewayConfigError(f"{where}: targets must be a non-empty list")
    policy = str(raw.get("policy", "priority"))
    if policy not in POLICIES:
        raise GatewayConfigError(f"{where}: policy must be one of {', '.join(POLICIES)} (got {policy!r})")
    return RouteConfig(
        name=str(raw["name"]),
        targets=tuple(_target(t, where) for t in targets),
        aliases=_str_list(raw, "aliases", where),
        policy=policy,
        default=_flag(raw, "default", False, where),
        prices=_prices(raw.get("prices"), where),
        context_length=(
            _integer(raw, "context_length", 0, where, least=1) if raw.get("context_length") is not None else None
        ),
    )


def load_gateway_config(options: GatewayOptions, env: Mapping[str, str] | None = None) -> GatewayConfig | None:
    """The gateway to build, or None when nothing asks for one (the embedded engine alone)."""
    if not options.configured:
        return None
    if env is None:
        env = load_environment(options.env_file)
    data: dict[str, Any] = read_file(Path(options.providers_file)) if options.providers_file else {}
    _check_keys(data, _TOP_KEYS, "providers file")
    gw = data.get("gateway", {}) or {}
    if not isinstance(gw, Mapping):
        raise GatewayConfigError("[gateway] must be a table")
    _check_keys(gw, _GATEWAY_KEYS, "[gateway]")
    timeouts = options.timeouts or _timeouts(gw, Timeouts(), "[gateway]")
    tuning: dict[str, Any] = dict(
        retries=_integer(gw, "retries", 1, "[gateway]"),
        backoff=_number(gw, "backoff", 0.1, "[gateway]"),
        max_backoff=_number(gw, "max_backoff", 2.0, "[gateway]"),
        max_retry_wait=_number(gw, "max_retry_wait", 5.0, "[gateway]"),
        breaker_threshold=_integer(gw, "breaker_threshold", 5, "[gateway]", least=1),
        breaker_cooldown=_number(gw, "breaker_cooldown", 15.0, "[gateway]"),
        health_interval=(
            options.health_interval
            if options.health_interval is not None
            else _number(gw, "health_interval", 15.0, "[gateway]")
        ),
        max_connections=_integer(gw, "max_connections", 0, "[gateway]"),
    )
    raw_providers = data.get("providers", {}) or {}
    if not isinstance(raw_providers, Mapping):
        raise GatewayConfigError("[providers] must be a table of providers")
    providers: dict[str, ProviderConfig] = {
        str(name): provider_config(str(name), raw or {}, env, timeouts) for name, raw in raw_providers.items()
    }
    raw_routes = data.get("routes", []) or []
    if not isinstance(raw_routes, list):
        raise GatewayConfigError("routes must be a list of tables ([[routes]] in TOML)")
    routes = [_route(r, i) for i, r in enumerate(raw_routes)]
    defaults = [r.name for r in routes if r.default]
    if len(defaults) > 1:
        raise GatewayConfigError(f"more than one route is the default: {', '.join(defaults)}")

    # --provider NAME[,NAME...]: a preset or a provider from the file, as one fallback chain.
    chain: list[TargetConfig] = []
    for name in options.provider:
        if name not in providers:
            if find_preset(name) is None:
                raise GatewayConfigError(
                    f"unknown provider {name!r}: not in the providers file and not a preset "
                    f"(presets: {', '.join(sorted(_preset_names()))})"
                )
            providers[name] = provider_config(name, {}, env, timeouts)
        chain.append(TargetConfig(provider=name, priority=len(chain)))

    # --upstream URL: a one-off provider.
    if options.upstream:
        if options.reasoning_dialect not in DIALECTS:
            raise GatewayConfigError(
                f"--reasoning-dialect must be one of {', '.join(DIALECTS)} (got {options.reasoning_dialect!r})"
            )
        raw_up: dict[str, Any] = {"base_url": options.upstream, "dialect": options.reasoning_dialect}
        raw_up["api_key_env"] = options.upstream_key_env or ""
        if options.upstream_model:
            raw_up["model"] = options.upstream_model
        up = provider_config("upstream", raw_up, env, timeouts)
        if options.upstream_key_env and not up.api_key:
            raise GatewayConfigError(f"--upstream-key-env {options.upstream_key_env}: that variable is not set")
        providers["upstream"] = replace_requires(up)
        chain.append(TargetConfig(provider="upstream", priority=len(chain)))

    if chain:
        aliases = list(R1_ALIASES)
        if options.served_name:
            aliases.append(options.served_name)
            from r1serve.models.catalog import find_entry

            entry = find_entry(options.served_name)
            if entry is not None:
                aliases.extend([entry.id, *entry.aliases])
        for t in chain:
            model = providers[t.provider or ""].model
            if model:
                aliases.append(model)
        name = _chain_name(chain, providers)
        # The flags' route is the default: a file route marked default would otherwise win without a word.
        file_routes = [replace(r, default=False) for r in routes]
        routes = [RouteConfig(name=name, targets=tuple(chain), aliases=_unique(aliases), default=True), *file_routes]
    elif not routes and providers:
        names = list(providers)
        routes = [
            RouteConfig(
                name=DEFAULT_ROUTE,
                targets=tuple(TargetConfig(provider=n, priority=i) for i, n in enumerate(names)),
                aliases=_unique([*R1_ALIASES, *(p.model for p in providers.values() if p.model)]),
                default=True,
            )
        ]
    if not routes:
        raise GatewayConfigError("the providers file defines no providers and no routes")

    used = _unique([t.provider for r in routes for t in r.targets if t.provider is not None])
    missing: list[str] = []  # every provider without its key, not only the first
    for name in used:
        if name not in providers:
            raise GatewayConfigError(f"a route names provider {name!r}, which is not defined")
        p = providers[name]
        if p.requires_key and not p.api_key:
            preset = find_preset(name)
            names = preset.api_key_env if preset and p.api_key_env in preset.api_key_env else (p.api_key_env,)
            missing.append(f"provider {name!r} needs an API key: set {' or '.join(n for n in names if n)}")
    if missing:
        raise GatewayConfigError("; ".join(missing) + " (in the environment or in .env)")
    return GatewayConfig(
        providers=providers,
        routes=tuple(routes),
        **tuning,
    )


def replace_requires(p: ProviderConfig) -> ProviderConfig:
    return replace(p, requires_key=False)


def _chain_name(chain: list[TargetConfig], providers: Mapping[str, ProviderConfig]) -> str:
    first = providers[chain[0].provider or ""]
    if len(chain) == 1 and first.model:
        return f"{first.model}@{first.name}"
    return DEFAULT_ROUTE if any(p.model for p in providers.values()) else first.name


def _unique(items: list[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return tuple(seen)


def _preset_names() -> list[str]:
    from r1serve.gateway.presets import PRESETS

    return list(PRESETS)
