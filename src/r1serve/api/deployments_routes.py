"""Deployments over HTTP: ``/v1/deployments`` (create, list, get, start, stop, logs) and each
deployment's endpoint URL, ``/deployments/{name}/v1/...``, served like ``/v1`` by its replicas.

Creating and changing a deployment needs an admin key, or a server with auth off (loopback and no key
exists, where every caller may do anything already). Reading needs any key the server accepts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.responses import Response, StreamingResponse

from r1serve.accounts import Accounts
from r1serve.api.auth import authenticate
from r1serve.api.billing import accounts_of, principal_of
from r1serve.api.deployment_scope import check_call, may_see
from r1serve.api.errors import validation_error
from r1serve.api.requests import check_messages, json_object, parse_raw, precheck_messages
from r1serve.api.serving import serve_chat, serve_completion
from r1serve.deployments import Deployment, DeploymentCreate, DeploymentStore, Supervisor
from r1serve.deployments.adoption import watch_lease
from r1serve.deployments.billing import AccountsBilling
from r1serve.deployments.spec import DeploymentExtend, DeploymentNotFound, DeploymentUpdate
from r1serve.deployments.templates import catalog_templates
from r1serve.errors import InvalidRequest, R1ServeError
from r1serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from r1serve.settings import Settings


class _Scale(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int


_Body = TypeVar("_Body", bound=BaseModel)


class DeploymentsDisabled(R1ServeError):
    status = 404
    type = "invalid_request_error"
    code = "deployments_disabled"


@asynccontextmanager
async def running_deployments(app: FastAPI, settings: Settings, accounts: Accounts | None) -> AsyncIterator[None]:
    """The supervisor for the app's lifetime (deployments live in the accounts database: none without).
    A replica of another r1serve (it set ``deployment_lease_file``) watches its supervisor's lease."""
    watcher: asyncio.Task[None] | None = None
    if settings.deployment_lease_file:
        lease = Path(settings.deployment_lease_file)
        expired = functools.partial(os.kill, os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
        watcher = asyncio.create_task(watch_lease(lease, settings.deployment_orphan_seconds, expired))
    try:
        async with _supervised(app, settings, accounts):
            yield
    finally:
        if watcher is not None:
            watcher.cancel()


@asynccontextmanager
async def _supervised(app: FastAPI, settings: Settings, accounts: Accounts | None) -> AsyncIterator[None]:
    if accounts is None:
        yield
        return
    billing = AccountsBilling(accounts, bill_seconds=settings.deployment_bill_seconds)
    supervisor = Supervisor(settings, DeploymentStore(accounts.engine), billing=billing)
    await supervisor.start()
    app.state.deployments = supervisor
    try:
        yield
    finally:
        app.state.deployments = None
        await supervisor.close()


def _supervisor(request: Request) -> Supervisor:
    supervisor: Supervisor | None = getattr(request.app.state, "deployments", None)
    if supervisor is None:
        raise DeploymentsDisabled("Deployments need the accounts database, which this server has not opened.")
    return supervisor


def _manager(request: Request) -> Supervisor:
    supervisor = _supervisor(request)
    accounts, principal = accounts_of(request), principal_of(request)
    if accounts is not None and principal is not None and principal.kind != "open":
        accounts.require_admin(principal)
    return supervisor


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


deployments_api = APIRouter(dependencies=[Depends(authenticate)], tags=["deployments"])


@deployments_api.post("/v1/deployments", summary="Create and start a deployment (admin)")
async def create_deployment(request: Request) -> dict[str, Any]:
    supervisor = _manager(request)
    try:
        body = DeploymentCreate.model_validate(json_object(await request.body()))
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    principal = principal_of(request)
    dep = await supervisor.create(body, owner=principal.key_id if principal else None)
    return dep.as_dict(_base_url(request))


@deployments_api.get("/v1/deployment-templates", summary="The templates a deployment can be created from")
async def list_templates(request: Request) -> dict[str, Any]:
    """Not under /v1/deployments/: any path segment there is a deployment's id or name."""
    settings: Settings = request.app.state.settings
    data = catalog_templates(Path(settings.models_dir), settings.deployment_price_per_hour)
    return {"object": "list", "data": data}


@deployments_api.get("/v1/deployments", summary="List deployments")
async def list_deployments(request: Request, archived: bool = False) -> dict[str, Any]:
    """Archived deployments are left out unless ``?archived=true`` (then only they are listed)."""
    supervisor = _supervisor(request)
    base = _base_url(request)
    data = [
        d.as_dict(base)
        for d in supervisor.deployments.values()
        if (d.status == "ARCHIVED") == archived and may_see(request, d.name)
    ]
    return {"object": "list", "data": data}


@deployments_api.get("/v1/deployments/{ident}", summary="One deployment (by id or name)")
async def get_deployment(request: Request, ident: str) -> dict[str, Any]:
    return _readable(request, ident).as_dict(_base_url(request))


def _readable(request: Request, ident: str) -> Deployment:
    """The deployment, unless the caller's key is limited to others (then it does not exist for it)."""
    supervisor = _supervisor(request)
    dep = supervisor.get(ident)
    if not may_see(request, dep.name):
        raise DeploymentNotFound(f"No deployment `{ident}`.", param="id")
    return dep


@deployments_api.post("/v1/deployments/{ident}/stop", summary="Stop a deployment (admin)")
async def stop_deployment(request: Request, ident: str) -> dict[str, Any]:
    dep = await _manager(request).stop(ident)
    return dep.as_dict(_base_url(request))


@deployments_api.post("/v1/deployments/{ident}/start", summary="Start a stopped deployment again (admin)")
async def start_deployment(request: Request, ident: str) -> dict[str, Any]:
    dep = await _manager(request).start_again(ident)
    return dep.as_dict(_base_url(request))


@deployments_api.post("/v1/deployments/{ident}/archive", summary="Archive a stopped deployment (admin)")
async def archive_deployment(request: Request, ident: str) -> dict[str, Any]:
    dep = await _manager(request).archive(ident)
    return dep.as_dict(_base_url(request))


def _body(raw: bytes, model: type[_Body]) -> _Body:
    try:
        return model.model_validate(json_object(raw))
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


@deployments_api.patch("/v1/deployments/{ident}", summary="Change timeout, replicas or schedule (admin)")
async def update_deployment(request: Request, ident: str) -> dict[str, Any]:
    supervisor = _manager(request)
    dep = await supervisor.update(ident, _body(await request.body(), DeploymentUpdate))
    return dep.as_dict(_base_url(request))


@deployments_api.post("/v1/deployments/{ident}/extend", summary="Add minutes to the timeout (admin)")
async def extend_deployment(request: Request, ident: str) -> dict[str, Any]:
    supervisor = _manager(request)
    dep = await supervisor.extend(ident, _body(await request.body(), DeploymentExtend))
    return dep.as_dict(_base_url(request))


@deployments_api.post("/v1/deployments/{ident}/scale", summary="Change the replica count (admin)")
async def scale_deployment(request: Request, ident: str) -> dict[str, Any]:
    supervisor = _manager(request)
    body = _body(await request.body(), _Scale)
    dep = await supervisor.update(ident, DeploymentUpdate(replicas=body.replicas))
    return dep.as_dict(_base_url(request))


def _since(value: str | None) -> dt.datetime | None:
    if value is None:
        return None
    try:
        if value.replace(".", "", 1).isdigit():
            return dt.datetime.fromtimestamp(float(value), dt.UTC)
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise InvalidRequest(
            "since must be an ISO 8601 time or unix seconds", param="since", code="invalid_value"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _source(replica: str | None) -> str | None:
    if replica is None:
        return None
    if replica.isdigit():
        return f"replica-{replica}"
    if replica == "supervisor" or replica.startswith("replica-"):
        return replica
    raise InvalidRequest("replica must be a replica's index or name, or `supervisor`", param="replica")


@deployments_api.get("/v1/deployments/{ident}/logs", summary="Recent log lines; follow=true streams them (SSE)")
async def deployment_logs(
    request: Request,
    ident: str,
    replica: str | None = None,
    since: str | None = None,
    tail: int | None = None,
    follow: bool = False,
) -> Response:
    dep = _readable(request, ident)
    source, after = _source(replica), _since(since)
    if tail is not None and tail < 1:
        raise InvalidRequest("tail must be at least 1", param="tail", code="invalid_value")
    if not follow:
        lines = dep.log.lines(source=source, since=after, limit=tail)
        body = {"object": "list", "deployment": dep.id, "data": [line.as_dict() for line in lines]}
        return Response(json.dumps(body), media_type="application/json")

    async def events() -> AsyncIterator[str]:
        async for line in dep.log.follow(source=source, since=after, tail=tail):
            yield f"data: {json.dumps(line.as_dict())}\n\n"

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


# ----------------------------------------------------------------------------- the endpoint URL


@deployments_api.post("/deployments/{name}/v1/chat/completions", summary="Chat with a deployment")
async def deployment_chat(request: Request, name: str) -> Response:
    supervisor = _supervisor(request)
    settings: Settings = request.app.state.settings
    raw = await request.body()
    precheck_messages(raw, settings)
    body = parse_raw(raw, ChatCompletionRequest)
    check_messages(body, settings)
    check_call(request, name)
    served = supervisor.served(name)
    # The body's model does not choose anything here (the URL does): the deployment's name is what the
    # answer reports, what the ledger records, and what a scoped key's check sees.
    return await serve_chat(request, body, served, settings, model_name=name)


@deployments_api.post("/deployments/{name}/v1/completions", summary="Text completion from a deployment")
async def deployment_completion(request: Request, name: str) -> Response:
    supervisor = _supervisor(request)
    body = parse_raw(await request.body(), CompletionRequest)
    check_call(request, name)
    served = supervisor.served(name)
    settings: Settings = request.app.state.settings
    return await serve_completion(request, body, served, settings, model_name=name)


@deployments_api.get("/deployments/{name}/v1/models", summary="The model a deployment serves")
async def deployment_models(request: Request, name: str) -> ModelList:
    check_call(request, name)
    served = _supervisor(request).served(name)
    entry = served.entry
    card = ModelCard(
        id=name, root=entry.id, context_length=entry.context_length, reasoning_format=entry.reasoning_format
    )
    return ModelList(data=[card])
