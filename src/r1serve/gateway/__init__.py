"""The gateway: upstream OpenAI-compatible providers behind r1serve's API, with failover.

* :mod:`r1serve.engines.upstream`: one upstream target as an Engine (HTTP, streaming, normalisation).
* :mod:`.presets`: known providers; :mod:`.config`: the providers file, flags and environment.
* :mod:`.group`: a route over several targets (policy, retries, circuit breaker, health checks).
* :mod:`.build`: configuration to a running ModelRegistry.
"""

from r1serve.gateway.build import build_from_config, build_gateway_registry, gateway_plan
from r1serve.gateway.config import GatewayConfig, GatewayConfigError, GatewayOptions, load_gateway_config
from r1serve.gateway.group import CircuitBreaker, Member, RetryPolicy, RouteEngine, Target
from r1serve.gateway.presets import PRESETS, find_preset

__all__ = [
    "PRESETS",
    "CircuitBreaker",
    "GatewayConfig",
    "GatewayConfigError",
    "GatewayOptions",
    "Member",
    "RetryPolicy",
    "RouteEngine",
    "Target",
    "build_from_config",
    "build_gateway_registry",
    "find_preset",
    "gateway_plan",
    "load_gateway_config",
]
