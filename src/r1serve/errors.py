"""Errors every layer may raise; the API renders them as OpenAI error bodies with the right status."""

from __future__ import annotations


class R1ServeError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}


class InvalidRequest(R1ServeError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthenticationError(R1ServeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(R1ServeError):
    status = 403
    type = "permission_error"


class NotFound(R1ServeError):
    status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RateLimited(R1ServeError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Overloaded(R1ServeError):
    """The engine's queue is full; the client should retry after ``Retry-After`` seconds."""

    status = 503
    type = "server_error"
    code = "overloaded"


class UpstreamError(R1ServeError):
    status = 502
    type = "upstream_error"
