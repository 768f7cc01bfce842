"""Which deployments a key may use and see: a key's ``models`` scope names deployments too.

A key limited to models (``r1serve keys create --models r1,other``) may call a deployment only if its
name is in that list, through the endpoint URL or as ``model`` on ``/v1``; naming the deployment's
underlying model is not enough (a deployment is a private endpoint, not a model). Such a key sees
only those deployments in ``GET /v1/deployments``; the others answer 404, as if they did not exist.
Admin keys see every deployment; unrestricted keys and a server without keys use them all.
"""

from __future__ import annotations

from starlette.requests import Request

from r1serve.api.billing import principal_of
from r1serve.errors import PermissionDenied


def may_call(request: Request, name: str) -> bool:
    principal = principal_of(request)
    return principal is None or principal.may_use(name)


def may_see(request: Request, name: str) -> bool:
    principal = principal_of(request)
    return principal is None or principal.admin or principal.may_use(name)


def check_call(request: Request, name: str) -> None:
    """403 ``model_not_allowed`` unless the caller's key may use the deployment ``name``."""
    if not may_call(request, name):
        raise PermissionDenied(
            f"This API key may not use the deployment `{name}`.", param="model", code="model_not_allowed"
        )
