"""Accounts over HTTP: ``GET /v1/usage`` for any key, and the admin API (keys CRUD, usage by key).

Thin: each route authenticates (the same dependency as the OpenAI routes), checks admin rights and
calls r1serve.accounts in a worker thread (these are database reads and writes, off the event loop).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from r1serve.accounts import Accounts, Principal
from r1serve.accounts.store import LIMIT_BOUNDS, Period
from r1serve.api.auth import authenticate
from r1serve.api.billing import AccountsAuth, accounts_of, principal_of
from r1serve.api.errors import validation_error
from r1serve.api.requests import json_object
from r1serve.errors import InvalidRequest, NotFound, R1ServeError
from r1serve.settings import Settings

log = logging.getLogger("r1serve.accounts")


def open_accounts(settings: Settings) -> Accounts:
    """Open, migrate (embedded default) and start the accounts layer for a server (blocking)."""
    accounts = Accounts.open(settings)
    accounts.start()
    key = accounts.ensure_admin_key(settings.host)
    if key is not None:
        # Printed once to the terminal, never logged: the key exists nowhere else in plain text.
        print(
            f"\nr1serve listens on {settings.host}, beyond loopback, and no API key existed: created an admin key.\n"
            f"  {key}\nIt is shown only this once. Create more with `r1serve keys create`.\n",
            file=sys.stderr,
            flush=True,
        )
    if accounts.auth_required(settings.host):
        log.info("auth: on (every request needs an API key)")
    else:
        log.info("auth: off: listening on loopback and no API key exists (`r1serve keys create` turns it on)")
    return accounts


def use_accounts(app: FastAPI, accounts: Accounts) -> None:
    app.state.accounts = accounts
    app.state.authenticator = AccountsAuth(accounts)


class NotEnabled(R1ServeError):
    status = 404
    type = "invalid_request_error"
    code = "accounts_disabled"


def _accounts(request: Request) -> tuple[Accounts, Principal]:
    accounts, principal = accounts_of(request), principal_of(request)
    if accounts is None or principal is None:
        raise NotEnabled("Accounts are not enabled on this server.")
    return accounts, principal


def _admin(request: Request) -> Accounts:
    accounts, principal = _accounts(request)
    accounts.require_admin(principal)
    return accounts


def _since(value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        raise InvalidRequest("since must be a date (YYYY-MM-DD)", param="since", code="invalid_value") from None


def _usage_body(rows: list[dict[str, Any]]) -> dict[str, Any]:
    totals: dict[str, Any] = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "reasoning_tokens": 0}
    cost = 0.0
    for r in rows:
        for k in totals:
            totals[k] += r[k]
        cost += r["cost_usd"]
    return {"object": "list", "data": rows, "totals": {**totals, "cost_usd": round(cost, 9)}}


accounts_api = APIRouter(dependencies=[Depends(authenticate)], tags=["accounts"])


@accounts_api.get("/v1/usage", summary="Usage of the calling key: totals by day and model")
async def own_usage(request: Request, since: str | None = None) -> dict[str, Any]:
    accounts, principal = _accounts(request)
    rows = await asyncio.to_thread(accounts.usage, key_ids=[principal.key_id], since=_since(since))
    return {**_usage_body(rows), "key": principal.prefix and f"r1-{principal.prefix}…", "key_name": principal.name}


@accounts_api.get("/v1/usage/series", summary="Usage per day by key or by model, for charts")
async def usage_series(request: Request, by: str = "model", since: str | None = None) -> dict[str, Any]:
    """One grouped query over every row (never a page of them). A key sees its own usage; an admin key
    every key's. On an open server every request is the open caller's, so that is everything."""
    accounts, principal = _accounts(request)
    if by not in ("key", "model"):
        raise InvalidRequest("by must be key or model", param="by", code="invalid_value")
    key_ids = None if principal.admin else [principal.key_id]
    rows = await asyncio.to_thread(
        accounts.usage_series,
        by="key" if by == "key" else "model",
        key_ids=key_ids,
        since=_since(since),
    )
    return {"object": "list", "by": by, "data": rows}


_RPM = Field(default=None, ge=0, le=LIMIT_BOUNDS["rpm"])
_TPM = Field(default=None, ge=0, le=LIMIT_BOUNDS["tpm"])
_BUDGET = Field(default=None, ge=0, le=LIMIT_BOUNDS["budget_usd"], allow_inf_nan=False)
_MODELS = Field(default=None, min_length=1, description="Model names or aliases; absent or null: all models")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    models: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = _MODELS
    rpm: int | None = _RPM
    tpm: int | None = _TPM
    budget_usd: float | None = _BUDGET
    budget_period: Period = "total"
    expires_at: dt.datetime | None = None
    admin: bool = False


class KeyUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    models: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = _MODELS
    rpm: int | None = _RPM
    tpm: int | None = _TPM
    budget_usd: float | None = _BUDGET
    budget_period: Period | None = None
    expires_at: dt.datetime | None = None
    admin: bool | None = None


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(json_object(await request.body()))
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def _not_found(ident: str) -> R1ServeError:
    return NotFound(f"No API key `{ident}`.", code="key_not_found")


@accounts_api.get("/v1/admin/keys", summary="List API keys (admin)")
async def admin_list_keys(request: Request) -> dict[str, Any]:
    accounts = _admin(request)
    keys = await asyncio.to_thread(accounts.store.list)
    return {"object": "list", "data": [k.as_dict() for k in keys]}


@accounts_api.post("/v1/admin/keys", summary="Create an API key (admin); the key is in the response only")
async def admin_create_key(request: Request) -> dict[str, Any]:
    accounts = _admin(request)
    body: KeyCreate = await _body(request, KeyCreate)
    key, info = await asyncio.to_thread(
        lambda: accounts.store.create(
            body.name,
            models=body.models,
            rpm=body.rpm,
            tpm=body.tpm,
            budget_usd=body.budget_usd,
            budget_period=body.budget_period,
            expires_at=body.expires_at,
            admin=body.admin,
        )
    )
    return {**info.as_dict(), "key": key}


@accounts_api.get("/v1/admin/keys/{ident}", summary="One API key (admin)")
async def admin_get_key(request: Request, ident: str) -> dict[str, Any]:
    accounts = _admin(request)
    info = await asyncio.to_thread(accounts.store.get, ident)
    if info is None:
        raise _not_found(ident)
    return info.as_dict()


@accounts_api.patch("/v1/admin/keys/{ident}", summary="Change a key's limits, scope, name or expiry (admin)")
async def admin_update_key(request: Request, ident: str) -> dict[str, Any]:
    accounts = _admin(request)
    body: KeyUpdate = await _body(request, KeyUpdate)
    changes = body.model_dump(exclude_unset=True)
    info = await asyncio.to_thread(lambda: accounts.store.update(ident, **changes))
    if info is None:
        raise _not_found(ident)
    return info.as_dict()


@accounts_api.delete("/v1/admin/keys/{ident}", summary="Revoke an API key (admin)")
async def admin_revoke_key(request: Request, ident: str) -> dict[str, Any]:
    accounts = _admin(request)
    info = await asyncio.to_thread(accounts.store.revoke, ident)
    if info is None:
        raise _not_found(ident)
    return info.as_dict()


@accounts_api.get("/v1/admin/usage", summary="Usage by key, day and model (admin)")
async def admin_usage(request: Request, key: str | None = None, since: str | None = None) -> dict[str, Any]:
    accounts = _admin(request)
    key_ids = None
    if key is not None:
        info = await asyncio.to_thread(accounts.store.get, key)
        key_ids = [info.id if info is not None else key]  # static-N, admin-env, open: by id
    rows = await asyncio.to_thread(accounts.usage, key_ids=key_ids, since=_since(since), by_key=True)
    return _usage_body(rows)
