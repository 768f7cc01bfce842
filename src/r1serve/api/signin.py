"""The console's sign-in routes (``/console/session``); how sessions work is in api/sessions.py."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from r1serve.api.auth import Authenticator, api_is_open, bearer_token, live_session
from r1serve.api.sessions import SessionStore, check_state_change, cookie_value, set_cookie
from r1serve.errors import InvalidRequest

signin_api = APIRouter(include_in_schema=False)

_NOBODY = {"signed_in": False, "admin": False, "name": None, "key": None}


@signin_api.get("/console/session")
async def who(request: Request) -> JSONResponse:
    session = await live_session(request)
    if session is not None:
        body = {"signed_in": True, "admin": session.caller.admin, "name": session.name, "key": session.key}
        return JSONResponse({"open": False, **body})
    return JSONResponse({"open": await api_is_open(request), **_NOBODY})


@signin_api.post("/console/session")
async def sign_in(request: Request) -> JSONResponse:
    check_state_change(request)
    if bearer_token(request) is None:
        raise InvalidRequest("Sign in with an API key: send it as Authorization: Bearer KEY.", param="key")
    authenticator: Authenticator = request.app.state.authenticator
    caller = await authenticator(request)  # a wrong, revoked or expired key: the API's own 401
    if caller.key_id is None:
        raise InvalidRequest("This server's API is open: the console needs no sign-in.", code="auth_off")
    principal = getattr(request.state, "principal", None)
    name = str(getattr(principal, "name", None) or caller.key_id)
    prefix = getattr(principal, "prefix", None)
    store: SessionStore = request.app.state.sessions
    old = cookie_value(request)
    if old:
        store.end(old)  # a new sign-in replaces the session this browser had
    session_id = store.create(caller, name=name, key=f"r1-{prefix}…" if prefix else None)
    response = JSONResponse({"signed_in": True, "admin": caller.admin, "name": name})
    set_cookie(request, response, session_id, int(store.ttl))
    return response


@signin_api.delete("/console/session")
async def sign_out(request: Request) -> JSONResponse:
    check_state_change(request)
    store: SessionStore = request.app.state.sessions
    value = cookie_value(request)
    ended = store.end(value) if value else False
    response = JSONResponse({"signed_in": False, "ended": ended})
    set_cookie(request, response, "", 0)
    return response
