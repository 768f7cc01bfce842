"""Model names to engines: ids, aliases and the default model.

The name a client asks for is kept for the response body; the model actually served is always
reported too (``root`` in /v1/models, the ``x-r1serve-model`` response header).
"""

from __future__ import annotations

from dataclasses import dataclass

from r1serve.engines.base import Engine
from r1serve.errors import ModelNotFound
from r1serve.models.catalog import R1_ALIASES, ModelEntry
from r1serve.protocol import ModelCard


@dataclass
class ServedModel:
    entry: ModelEntry  # the model actually served: prices, defaults, reasoning format
    engine: Engine
    # The name the engine knows the model by (a provider's model id); None: the engine's own model.
    engine_model: str | None = None


class ModelRegistry:
    def __init__(self) -> None:
        self._served: dict[str, ServedModel] = {}
        self._aliases: dict[str, str] = {}
        self._default: str | None = None

    def add(self, served: ServedModel, *, default: bool = False) -> None:
        self._served[served.entry.id] = served
        for alias in served.entry.aliases:
            self._aliases[alias] = served.entry.id
        if default or self._default is None:
            self._default = served.entry.id

    def alias(self, name: str, target: str) -> None:
        if target not in self._served:
            raise ValueError(f"alias {name!r} points at unknown model {target!r}")
        self._aliases[name] = target

    def add_r1_aliases(self) -> None:
        """Point DeepSeek's API names at the R1 model served, or at the default when there is none."""
        r1 = [mid for mid, r in self._served.items() if r.entry.reasoning_format == "deepseek_r1"]
        target = r1[0] if r1 else self._default
        if target is None:
            return
        for name in R1_ALIASES:
            self._aliases.setdefault(name, target)

    @property
    def default(self) -> str | None:
        return self._default

    def resolve(self, name: str | None) -> ServedModel:
        """The served model for a client's model name; no name means the default model (as Nosana's examples send)."""
        key = name or self._default
        if key is None:
            raise ModelNotFound("no model is being served", param="model")
        target = self._aliases.get(key, key)
        served = self._served.get(target)
        if served is None:
            lowered = {k.lower(): v for k, v in {**{m: m for m in self._served}, **self._aliases}.items()}
            target = lowered.get(key.lower(), "")
            served = self._served.get(target)
        if served is None:
            raise ModelNotFound(f"The model `{name}` does not exist or is not served here", param="model")
        return served

    def engines(self) -> list[Engine]:
        seen: dict[int, Engine] = {}
        for served in self._served.values():
            seen.setdefault(id(served.engine), served.engine)
        return list(seen.values())

    def cards(self) -> list[ModelCard]:
        cards = [
            ModelCard(
                id=mid,
                root=mid,
                context_length=served.entry.context_length,
                reasoning_format=served.entry.reasoning_format,
            )
            for mid, served in self._served.items()
        ]
        for alias, target in sorted(self._aliases.items()):
            entry = self._served[target].entry
            cards.append(
                ModelCard(
                    id=alias,
                    root=target,
                    parent=target,
                    context_length=entry.context_length,
                    reasoning_format=entry.reasoning_format,
                )
            )
        return cards
