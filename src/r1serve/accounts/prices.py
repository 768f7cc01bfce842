"""Prices per model, versioned, from configuration; the catalog's prices when configuration has none.

Configuration is ``R1SERVE_PRICES`` (JSON) or ``R1SERVE_PRICES_FILE`` (a JSON or TOML file), mapping a
model id or alias to one price or to a list of versions::

    {"deepseek-r1-distill-qwen-7b": [
        {"since": "2026-01-01", "input": 0.10, "cached_input": 0.02, "output": 0.40},
        {"since": "2026-06-01", "input": 0.08, "output": 0.30}]}

Dollars per million tokens. A version applies from its ``since`` (UTC; omitted: always) until the
next one. Reasoning tokens are completion tokens and billed at the output price. Cached input
tokens cost ``cached_input`` (the input price when not given). The ledger records which version
priced each request (``price_version``).
"""

from __future__ import annotations

import datetime as dt
import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1serve.engines.base import EngineUsage
from r1serve.models.catalog import Prices

from .models import nanos_to_usd


@dataclass(frozen=True)
class PriceVersion:
    prices: Prices
    version: str  # "catalog" or the ``since`` date of a configured version
    since: dt.datetime | None = None


def cost_nanos(usage: EngineUsage, prices: Prices) -> int:
    """Nano-dollars for ``usage``: $/M tokens is exactly 1000 nano-dollars per token per dollar."""
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    cached_price = prices.input if prices.cached_input is None else prices.cached_input
    return round(
        (
            (usage.prompt_tokens - cached) * prices.input
            + cached * cached_price
            + usage.completion_tokens * prices.output
        )
        * 1000
    )


def cost_usd(usage: EngineUsage, prices: Prices) -> float:
    """Dollars for ``usage``: :func:`cost_nanos` as dollars (in every response's usage)."""
    return round(nanos_to_usd(cost_nanos(usage, prices)), 10)


def worst_case_nanos(prompt_tokens: int, max_tokens: int, prices: Prices) -> int:
    """What a request can cost at most: its whole prompt uncached and every allowed token generated."""
    return cost_nanos(EngineUsage(prompt_tokens=prompt_tokens, completion_tokens=max_tokens), prices)


def _parse_since(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, dt.date):
        when = dt.datetime.combine(value, dt.time())
    else:
        when = dt.datetime.fromisoformat(str(value))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _version(raw: Mapping[str, Any]) -> PriceVersion:
    unknown = set(raw) - {"since", "input", "output", "cached_input"}
    if unknown:
        raise ValueError(f"unknown price fields {sorted(unknown)}")
    since = _parse_since(raw.get("since"))
    cached = raw.get("cached_input")
    prices = Prices(
        input=float(raw.get("input", 0.0)),
        output=float(raw.get("output", 0.0)),
        cached_input=None if cached is None else float(cached),
    )
    if min(prices.input, prices.output, prices.cached_input or 0.0) < 0:
        raise ValueError("prices cannot be negative")
    return PriceVersion(prices=prices, version=since.date().isoformat() if since else "configured", since=since)


_FREE = Prices()


class PriceBook:
    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self._versions: dict[str, list[PriceVersion]] = {}
        self._catalog: dict[Prices, PriceVersion] = {}
        for model, value in (config or {}).items():
            items = value if isinstance(value, list) else [value]
            try:
                versions = [_version(v) for v in items]
            except (TypeError, ValueError) as exc:
                raise ValueError(f"prices for {model!r}: {exc}") from None
            floor = dt.datetime.min.replace(tzinfo=dt.UTC)
            versions.sort(key=lambda v: v.since or floor)
            self._versions[model.lower()] = versions

    @classmethod
    def from_settings(cls, settings: Any) -> PriceBook:
        config: dict[str, Any] = {}
        path: Path | None = getattr(settings, "prices_file", None)
        if path is not None:
            text = Path(path).expanduser().read_text()
            config.update(tomllib.loads(text) if str(path).endswith(".toml") else json.loads(text))
        inline = getattr(settings, "prices", None)
        if inline:
            config.update(json.loads(inline) if isinstance(inline, str) else inline)
        return cls(config)

    def lookup(
        self,
        model: str,
        catalog: Prices | None = None,
        *,
        requested: str | None = None,
        when: dt.datetime | None = None,
    ) -> PriceVersion:
        """The price in force at ``when`` (default now) for the served ``model``; a price configured
        for the name the client asked for (an alias) counts when the served id has none."""
        for name in (model, requested):
            versions = self._versions.get(name.lower()) if name and self._versions else None
            if not versions:
                continue
            when = when or dt.datetime.now(dt.UTC)
            current = None
            for v in versions:
                if v.since is None or v.since <= when:
                    current = v
            if current is not None:
                return current
        catalog = catalog or _FREE
        found = self._catalog.get(catalog)
        if found is None:  # one per catalog price, not one per request
            found = self._catalog[catalog] = PriceVersion(prices=catalog, version="catalog")
        return found
