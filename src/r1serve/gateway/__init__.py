"""The gateway: upstream OpenAI-compatible providers behind r1serve's API, with failover.

* :mod:`r1serve.engines.upstream`: one upstream target as an Engine (HTTP, streaming, normalisation).
* :mod:`.presets`: known providers; :mod:`.config`: the providers file, flags and environment.
* :mod:`.group`: a model group over several targets (policy, retries, circuit breaker, health checks).
* :mod:`.build`: configuration to a running ModelRegistry.

The names imported here are what the rest of r1serve needs (plan, build, report a bad file); the
gateway's parts are imported from their modules.
"""

from r1serve.gateway.build import build_from_config, build_gateway_registry, gateway_plan
from r1serve.gateway.config import GatewayConfig, GatewayOptions, load_gateway_config
from r1serve.gateway.providers_file import GatewayConfigError

__all__ = [
    "GatewayConfig",
    "GatewayConfigError",
    "GatewayOptions",
    "build_from_config",
    "build_gateway_registry",
    "gateway_plan",
    "load_gateway_config",
]
