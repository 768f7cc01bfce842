"""The request id: one per HTTP request, echoed in ``x-request-id`` and stamped on every log line."""

from __future__ import annotations

import logging
import os
import re
from contextvars import ContextVar

request_id_var: ContextVar[str] = ContextVar("r1serve_request_id", default="-")

# A client's own id is echoed only when it is safe to put in a log line and a header.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def new_request_id() -> str:
    return "req_" + os.urandom(16).hex()  # uuid4().hex's 32 hex digits, without building a UUID


def accept_request_id(client_value: str | None) -> str:
    if client_value and _SAFE_ID.fullmatch(client_value):
        return client_value
    return new_request_id()


class RequestIdFilter(logging.Filter):
    """Adds ``%(request_id)s`` to every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str = "info") -> None:
    """Console logging for the server, request id included; uvicorn's loggers share the handler."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
