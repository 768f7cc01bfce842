"""Model names to engines: the registry a request resolves its ``model`` against, and how it is built
from Settings (the embedded engine, the gateway's model groups, aliases)."""

from r1serve.routing.registry import ModelRegistry, ServedModel

__all__ = ["ModelRegistry", "ServedModel"]
