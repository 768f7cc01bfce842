"""Every failure leaves the server as OpenAI's error body: ``{"error": {message, type, param, code}}``.

FastAPI's defaults (422 with a ``detail`` list, plain-text 500s) would break clients that parse
OpenAI's shape, so validation errors, HTTP errors and r1serve errors are all rendered here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from r1serve.errors import InvalidRequest, R1ServeError

log = logging.getLogger("r1serve.api")

INTERNAL_ERROR = "The server had an error while processing your request."

_HTTP_ERROR_TYPES = {
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        json.dumps(error_body(message, type_, param, code)),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def r1serve_error_body(exc: R1ServeError) -> dict[str, Any]:
    return error_body(exc.message, exc.type, exc.param, exc.code)


def r1serve_error_response(exc: R1ServeError) -> Response:
    return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


# --- pydantic errors -> one readable message with the field path as ``param``

# Pydantic puts union-member tags ("str", "list[str]", "TextPart", "function-after[...]") into error
# locations; they are not fields and must not show up in ``param``.
_TYPE_TAGS = {"str", "int", "float", "bool", "bytes", "list", "dict", "none", "literal"}


def _is_tag(part: str) -> bool:
    return part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper()


def param_path(loc: Sequence[int | str]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("body", "query", "path", "header") and not out:
            continue
        elif not _is_tag(part):
            out += f".{part}" if out else part
    return out or None


def _code_for(error_type: str) -> str:
    if error_type == "missing":
        return "missing_required_parameter"
    if error_type.endswith("_type") or error_type.endswith("_parsing") or error_type == "model_attributes_type":
        return "invalid_type"
    return "invalid_value"


def validation_error(errors: Sequence[Any]) -> InvalidRequest:
    """The first pydantic/FastAPI error as an InvalidRequest (one error, like OpenAI reports)."""
    if not errors:
        return InvalidRequest("Invalid request body.")
    first = errors[0]
    etype = str(first.get("type", ""))
    loc = tuple(first.get("loc", ()))
    if etype == "json_invalid":
        detail = (first.get("ctx") or {}).get("error")
        suffix = f" ({detail})" if detail else ""
        return InvalidRequest(
            "We could not parse the JSON body of your request" + suffix + ". Send a JSON object "
            "with Content-Type: application/json."
        )
    param = param_path(loc)
    if param is None:
        if etype == "missing":
            return InvalidRequest("The request has no body; send a JSON object.", code="missing_required_parameter")
        return InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    msg = str(first.get("msg", "invalid value"))
    if etype == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param, code=_code_for(etype))
    if etype == "too_short" and (first.get("ctx") or {}).get("min_length") == 1:
        return InvalidRequest(f"'{param}' must not be empty.", param=param, code="invalid_value")
    return InvalidRequest(
        f"Invalid value for '{param}': {msg} (got {_shown(first.get('input'))}).", param=param, code=_code_for(etype)
    )


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value, default=str)
    except ValueError:  # circular or otherwise odd input: its type is enough
        text = type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


# --- handlers


async def render_error(request: Request, exc: Exception) -> Response:
    """The response for an expected failure: r1serve's errors, pydantic validation and HTTP errors.
    FastAPI's exception handlers and the hot paths (api/hotpaths.py) both render through it; anything
    else is a bug, left to the middleware's last-resort 500."""
    if isinstance(exc, R1ServeError):
        if exc.status >= 500:
            log.warning("%s: %s", type(exc).__name__, exc.message)
        return r1serve_error_response(exc)
    if isinstance(exc, RequestValidationError | ValidationError):
        return r1serve_error_response(validation_error(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        return _http_error(request, exc)
    raise exc


def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    type_, code = _HTTP_ERROR_TYPES.get(exc.status_code, ("invalid_request_error", None))
    if exc.status_code >= 500:
        type_ = "server_error"
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, type_, None, code, dict(exc.headers or {}))


HANDLED: tuple[type[Exception], ...] = (R1ServeError, RequestValidationError, ValidationError, StarletteHTTPException)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette's ServerErrorMiddleware (inside RequestContextMiddleware, see app.py) renders a bug with
    # this, then re-raises it to RequestContextMiddleware, which logs it with the request id.
    return error_response(500, INTERNAL_ERROR, "server_error")


def install_error_handlers(app: FastAPI) -> None:
    for exc_type in HANDLED:
        app.add_exception_handler(exc_type, render_error)
    app.add_exception_handler(Exception, _internal_error)
