"""The providers file (``R1SERVE_PROVIDERS_FILE``, TOML or JSON): its tables as pydantic models, and its
mistakes in words. :mod:`r1serve.gateway.config` turns a checked file into what the gateway runs.

::

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
    models = { "deepseek-r1-32b" = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B" }  # model group -> upstream id
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

With providers but no ``[[routes]]``: one model group ``deepseek-r1`` (plus R1's aliases) over every
provider in file order, priority policy. ``r1serve serve --provider huggingface`` (comma-separate several
for a fallback chain) needs no file at all; ``--upstream URL`` makes a one-off provider ``upstream``.

Each ``[[routes]]`` table defines a *model group*: one model name (and its aliases) that clients ask for,
served by several targets under a policy (:class:`~r1serve.gateway.group.GroupEngine`). The key keeps
its name so existing files work; in the code, "route" is left to HTTP routes.

The file is checked once, at start-up, by the pydantic models below (:class:`ProvidersFile` and the
tables in it): misspelt keys are named, types are strict (an integer may stand for a number with a
fraction, nothing else is converted), non-finite numbers are refused, and a JSON ``null`` means the
default. A mistake is a :class:`GatewayConfigError` that names its place (``providers.gpu.base_url``).
Nothing here runs per request: the engines get plain frozen dataclasses (gateway/config.py).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from r1serve.engines.upstream import Dialect, Timeouts
from r1serve.gateway.group import Policy
from r1serve.gateway.presets import PRESETS, find_preset
from r1serve.models.catalog import Prices

# DeepSeek-R1's context window at the hosted providers (64K at DeepSeek, up to 160K elsewhere).
DEFAULT_CONTEXT = 65536


class GatewayConfigError(ValueError):
    """A providers file or flag that cannot work; the message says what to change."""


# ----------------------------------------------------------------------------- the file's tables


def _integral(value: Any) -> Any:
    """``2.0`` where a whole number is expected is 2; anything else is left to the strict check."""
    return int(value) if type(value) is float and value.is_integer() else value


def _strings(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and all(type(item) is str for item in value):
        return tuple(value)
    raise PydanticCustomError(
        "config_type", 'must be a list of strings, like ["a", "b"] (got {got})', {"got": repr(value)}
    )


def _gguf_path(value: Any) -> Any:
    if type(value) is str:
        return value
    raise PydanticCustomError("config_type", "must be the path of a GGUF file (got {got})", {"got": repr(value)})


Whole = Annotated[int, BeforeValidator(_integral)]
Strings = Annotated[tuple[str, ...], BeforeValidator(_strings)]
Seconds = Annotated[float, Field(gt=0)]  # a timeout
Amount = Annotated[float, Field(ge=0)]  # a wait, an interval, a price


class _Table(BaseModel):
    """A table of the providers file."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        if isinstance(data, cls):
            return data  # built and checked already
        data = cls._shorthand(data)
        if not isinstance(data, dict):
            return data  # pydantic says it must be a table
        # Every unknown key in one message, with the known ones (extra="forbid" would name them one by one).
        known = sorted(name for name in cls.model_fields)
        unknown = sorted(str(key) for key in data if key not in cls.model_fields)
        if unknown:
            raise PydanticCustomError(
                "unknown_key",
                "unknown key {names} (known: {known})",
                {"names": ", ".join(map(repr, unknown)), "known": ", ".join(known)},
            )
        # A JSON null means the default, as if the key were absent.
        return {key: value for key, value in data.items() if value is not None}

    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        """A table's shorter spelling (a string for a target), as the table it stands for."""
        return data


class _Timeouts(_Table):
    """The timeout keys, in ``[gateway]`` (the defaults) and in a provider (its own)."""

    connect_timeout: Seconds | None = None
    first_byte_timeout: Seconds | None = None
    idle_timeout: Seconds | None = None
    whole_timeout: Seconds | None = None

    def timeouts(self, defaults: Timeouts) -> Timeouts:
        """These timeouts, ``defaults`` for the ones not set."""
        return Timeouts(
            connect=float(defaults.connect if self.connect_timeout is None else self.connect_timeout),
            first_byte=float(defaults.first_byte if self.first_byte_timeout is None else self.first_byte_timeout),
            idle=float(defaults.idle if self.idle_timeout is None else self.idle_timeout),
            whole=float(defaults.whole if self.whole_timeout is None else self.whole_timeout),
        )


class GatewaySettings(_Timeouts):
    """``[gateway]``: retries, circuit breakers, health checks, the connection pool, default timeouts
    (the timeouts end up in each provider's :class:`~r1serve.engines.upstream.Timeouts`)."""

    retries: Annotated[Whole, Field(ge=0)] = 1
    backoff: Amount = 0.1  # seconds, doubled per retry, with jitter
    max_backoff: Amount = 2.0
    max_retry_wait: Amount = 5.0
    breaker_threshold: Annotated[Whole, Field(ge=1)] = 5
    breaker_cooldown: Amount = 15.0
    health_interval: Amount = 15.0
    max_connections: Annotated[Whole, Field(ge=0)] = 0  # 0: unlimited


class PricesTable(_Table):
    """``prices = { input = ..., output = ... }``: dollars per million tokens."""

    input: Amount = 0.0
    output: Amount = 0.0
    cached_input: Amount | None = None

    def as_prices(self) -> Prices:
        return Prices(input=self.input, output=self.output, cached_input=self.cached_input)


class ProviderTable(_Timeouts):
    """``[providers.NAME]`` as written. Unset keys are None: they come from the preset, if any, when the
    provider is resolved (:func:`_provider`), because the preset is only known with the table's name."""

    preset: str | None = None
    base_url: str | None = None
    # Never accepted (the validator refuses any value); listed so that the message can say what to do.
    api_key: Any = None
    api_key_env: str | None = None  # "" for no key, even when the preset names one
    model: str | None = None
    dialect: Dialect | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    eos_markers: Strings | None = None
    drop_params: Strings = ()
    include_usage: bool | None = None
    requires_key: bool | None = None
    prices: PricesTable | None = None
    context_length: Annotated[Whole, Field(ge=1)] = DEFAULT_CONTEXT
    tokenizer: Annotated[str, BeforeValidator(_gguf_path)] | None = None
    models: dict[str, str] = Field(default_factory=dict)  # model group name -> upstream model id

    @field_validator("api_key", mode="before")
    @classmethod
    def _no_inline_key(cls, value: Any) -> Any:
        raise PydanticCustomError(
            "inline_key", "put the key in an environment variable and name it with api_key_env, not api_key"
        )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if find_preset(value) is None:
            raise PydanticCustomError(
                "unknown_preset", "unknown preset {name} (presets: {presets})",
                {"name": repr(value), "presets": ", ".join(sorted(PRESETS))},
            )  # fmt: skip
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        problem = url_problem(value) if value else None  # "": the preset's, as if absent
        if problem:
            raise PydanticCustomError("base_url", problem)
        return value


class TargetConfig(_Table):
    """One target of a model group: ``{ provider = "NAME" }`` or ``{ embedded = true }``, or the provider's
    name alone (``"embedded"`` for the embedded engine)."""

    provider: str | None = None  # None: the embedded engine
    embedded: bool = False
    model: str | None = None  # the name the target knows the model by; None: the provider's
    weight: Annotated[float, Field(gt=0)] = 1.0
    priority: Annotated[Whole, Field(ge=-(2**31))] = 0

    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"embedded": True} if data == "embedded" else {"provider": data}
        if not isinstance(data, dict):
            raise PydanticCustomError(
                "target",
                'must be a provider name or a table like { provider = "NAME" } (got {got})',
                {"got": repr(data)},
            )
        if data.get("embedded") is True and data.get("provider") == "":
            return {key: value for key, value in data.items() if key != "provider"}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> TargetConfig:
        if self.embedded == bool(self.provider):
            raise PydanticCustomError("target", 'a target has either provider = "NAME" or embedded = true')
        return self


class GroupConfig(_Table):
    """A model group: one ``[[routes]]`` table. One model name (and its aliases) served by ``targets``,
    chosen by ``policy``; the ``default`` group answers requests that name no model (or an unknown one)."""

    name: Annotated[str, Field(min_length=1)]
    # strict=False for the tuples only: the file has lists (each target is still checked strictly).
    targets: Annotated[tuple[TargetConfig, ...], Field(min_length=1, strict=False)]
    aliases: Strings = ()
    policy: Policy = "priority"
    default: bool = False
    prices: PricesTable | None = None
    context_length: Annotated[Whole, Field(ge=1)] | None = None


class ProvidersFile(_Table):
    """The whole providers file."""

    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    providers: dict[str, ProviderTable] = Field(default_factory=dict)
    routes: Annotated[tuple[GroupConfig, ...], Field(strict=False)] = ()  # [[routes]]: the model groups

    @field_validator("routes")
    @classmethod
    def _one_default(cls, groups: tuple[GroupConfig, ...]) -> tuple[GroupConfig, ...]:
        defaults = [g.name for g in groups if g.default]
        if len(defaults) > 1:
            raise PydanticCustomError(
                "default", "more than one route is the default: {names}", {"names": ", ".join(defaults)}
            )
        return groups


def url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a base URL, in words that never repeat its user:password part."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.hostname:
        return None
    shown = url.split("@", 1)[-1] if "@" in parts.netloc else url
    return f"must be an http:// or https:// URL, like http://HOST:PORT/v1 (got {shown!r})"


# ----------------------------------------------------------------------------- errors in words

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def place(loc: tuple[int | str, ...]) -> str:
    """``("providers", "gpu", "base_url")`` as ``providers.gpu.base_url``; ``("routes", 0)`` as ``routes[0]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
            out += f".{key}" if out else key
    return out


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _say(err: Any) -> str:
    """One pydantic error as the end of a sentence that starts with the place."""
    kind, loc, value = err["type"], err["loc"], err.get("input")
    ctx = err.get("ctx") or {}
    got = f" (got {value!r})"
    if kind == "missing":
        return "is required"
    if kind == "int_type" and isinstance(value, float) and math.isfinite(value):
        return "must be a whole number" + got
    if kind in ("int_type", "float_type", "finite_number"):
        return "must be a number" + got
    if kind == "bool_type":
        return "must be true or false" + got
    if kind == "string_type":
        return "must be a string" + got
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "greater_than_equal":
        return f"must be at least {_number(ctx['ge'])}" + got
    if kind == "greater_than":
        return f"must be above {_number(ctx['gt'])}" + got
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}" + got
    if kind in ("model_type", "dict_type"):
        # Without the value: a string where a table belongs is often a URL, maybe with a password in it.
        if len(loc) == 2 and loc[0] == "providers":
            return f'must be a table, like [providers.{loc[1]}] base_url = "..."'
        return "must be a table"
    if kind == "tuple_type":
        return "must be a list of tables ([[routes]] in TOML)" if loc == ("routes",) else "must be a list" + got
    if kind == "too_short":
        return "must be a non-empty list"
    return str(err["msg"])


def config_error(exc: ValidationError, data: Any) -> GatewayConfigError:
    """``exc`` as one message: every mistake, each with its place (and the route it is in)."""
    errors = exc.errors(include_url=False)
    # A list with a bad item also reports "too short" for the items that failed: the item's error says it.
    inner = {e["loc"][:-1] for e in errors}
    lines: list[str] = []
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "too_short" and any(other[: len(loc)] == loc for other in inner if len(other) >= len(loc)):
            continue
        said = _say(err)
        where = place(loc) or "providers file"
        line = f"{where} {said}" if said.startswith(("must ", "is ")) else f"{where}: {said}"
        if len(loc) > 2 and loc[0] == "routes" and isinstance(loc[1], int):
            routes = data.get("routes") if isinstance(data, dict) else None
            table = routes[loc[1]] if isinstance(routes, list) and loc[1] < len(routes) else None
            if isinstance(table, dict) and isinstance(table.get("name"), str):
                line += f" (in route {table['name']!r})"
        if line not in lines:
            lines.append(line)
    return GatewayConfigError("; ".join(lines))
