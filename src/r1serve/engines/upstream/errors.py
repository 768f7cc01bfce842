"""How an upstream's failures are reported, and the key kept out of every report.

The rule (see :mod:`r1serve.engines.upstream`): a failure before the first delta is an
:class:`AttemptFailed`, which says whether the gateway may retry the target or fail over; a failure after
it is a plain :class:`~r1serve.errors.UpstreamError`. An HTTP error status is mapped onto one of those
(or onto :class:`~r1serve.errors.InvalidRequest` when the request itself was refused) by
:func:`raise_for_status`.

What an upstream says about its own failure (a 5xx body, an error event) can hold a traceback, internal
paths or a database URL: it goes to the log, scrubbed, and the client's message names only the target and
the status. Only a refusal of the request itself (400, 404, 413, 422) passes its message on, scrubbed of
the API key, because the client needs it to fix the request.
"""

from __future__ import annotations

import json
import logging
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp

from r1serve.engines.upstream.config import UpstreamConfig
from r1serve.errors import InvalidRequest, UpstreamError

log = logging.getLogger("r1serve.upstream")


class AttemptFailed(UpstreamError):
    """One attempt failed before anything was yielded: the gateway may retry or fail over.

    ``retryable``: worth another try on the same target (connect error, timeout, 5xx, 429).
    ``failover``: worth trying another target (everything except a bad request).
    ``breaker``: counts against the target's circuit breaker.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        retryable: bool,
        failover: bool = True,
        breaker: bool = True,
        retry_after: float | None = None,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(message, code=kind)
        self.kind = kind
        self.retryable = retryable
        self.failover = failover
        self.breaker = breaker
        self.retry_after = retry_after
        self.upstream_status = upstream_status


def failure(message: str, kind: str, yielded: bool, *, retryable: bool = True) -> UpstreamError:
    """The error for a failure during an attempt: retryable by the gateway only while nothing was yielded."""
    if yielded:
        return UpstreamError(message, code=kind)
    return AttemptFailed(message, kind=kind, retryable=retryable)


# ----------------------------------------------------------------------------- secrets

_WORD = re.compile(r"[A-Za-z0-9_\-.]{8,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
# user:password@ in any URL (database URLs in tracebacks are the usual carrier).
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/@]+@")
MAX_ERROR_TEXT = 500


def scrub_secret(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` and any 8+ character piece of it replaced, and Bearer tokens cut.

    Providers echo keys in 401 bodies, whole or partly masked ("sk-abcd****wxyz"); every word of the
    text that is a long-enough substring of the key goes.
    """
    text = _BEARER.sub(r"\1[redacted]", text)
    text = _URL_CREDENTIALS.sub(r"\1[redacted]@", text)
    if not secret:
        return text
    # Case-blind: a body may echo the key upper-cased.
    text = re.sub(re.escape(secret), "[redacted]", text, flags=re.IGNORECASE)
    folded = secret.casefold()
    return _WORD.sub(lambda m: "[redacted]" if m.group(0).casefold() in folded else m.group(0), text)


def scrub(text: str, config: UpstreamConfig) -> str:
    """Upstream text made fit for a message: without ``config``'s key, and at most MAX_ERROR_TEXT long."""
    return scrub_secret(text, config.api_key)[:MAX_ERROR_TEXT]


def log_detail(config: UpstreamConfig, what: str, detail: str) -> None:
    """The upstream's own words about a failure, for the operator only (scrubbed)."""
    if detail:
        log.warning("upstream %s %s: %s", config.name, what, scrub(detail, config))


def error_text(err: Any) -> str:
    """The message of an ``error`` member in an upstream's event (an object with a message, or a string)."""
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


# ----------------------------------------------------------------------------- HTTP status


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


async def raise_for_status(resp: aiohttp.ClientResponse, config: UpstreamConfig) -> None:
    """Raise the error for ``resp``'s status (300 or more), its body's message scrubbed into the text."""
    status = resp.status
    if status < 400:
        # Redirects are never followed (engine.py): a failover, the Location for the operator's log only.
        log_detail(config, f"redirected (HTTP {status}) to", resp.headers.get("Location", ""))
        raise AttemptFailed(
            f"upstream {config.name} answered with a redirect (HTTP {status}); r1serve does not follow "
            "redirects: set its base_url to the final address",
            kind="upstream_redirect",
            retryable=False,
            upstream_status=status,
        )
    try:
        raw = await resp.content.read(16384)
    except (aiohttp.ClientError, TimeoutError):
        raw = b""
    text = raw.decode("utf-8", "replace")
    param: str | None = None  # the request field the upstream named (a 400 passes it on)
    try:
        data = json.loads(text)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            text = str(err.get("message") or err)
            named = err.get("param")
            if isinstance(named, str) and len(named) <= 100 and named.isprintable():
                param = named
        elif isinstance(err, str):
            text = err
        elif isinstance(data, dict) and "message" in data:
            text = str(data["message"])
    except ValueError:
        pass
    detail = scrub(text.strip(), config) or resp.reason or ""
    name = config.name
    if status >= 500 or status in (408, 429):
        log_detail(config, f"answered HTTP {status}", detail)
    if status == 429:
        raise AttemptFailed(
            f"upstream {name} is rate limiting (HTTP 429)",
            kind="rate_limited",
            retryable=True,
            breaker=False,
            retry_after=retry_after_seconds(resp.headers.get("Retry-After")),
            upstream_status=status,
        )
    if status >= 500 or status == 408:
        raise AttemptFailed(
            f"upstream {name} failed (HTTP {status})",
            kind="upstream_unavailable",
            retryable=True,
            retry_after=retry_after_seconds(resp.headers.get("Retry-After")),
            upstream_status=status,
        )
    if status in (401, 403):
        # The body is not forwarded at all: it is about r1serve's credentials, not the client's request.
        where = f" (the key comes from ${config.api_key_env})" if config.api_key_env else ""
        raise AttemptFailed(
            f"upstream {name} rejected r1serve's credentials (HTTP {status}){where}",
            kind="upstream_auth",
            retryable=False,
            upstream_status=status,
        )
    if status == 404:
        raise AttemptFailed(
            f"upstream {name} answered 404 for model {config.model!r}: {detail}",
            kind="upstream_not_found",
            retryable=False,
            upstream_status=status,
        )
    if status in (400, 413, 422):
        # The request itself was refused: the client's to fix; no retry, no failover.
        raise InvalidRequest(
            f"upstream {name} rejected the request (HTTP {status}): {detail}", param=param, code="upstream_rejected"
        )
    # Any other 4xx (402 billing, 405, 409, 451...) is about the upstream's account or set-up, not the
    # request: its words go to the log, and another target may do better.
    log_detail(config, f"answered HTTP {status}", detail)
    raise AttemptFailed(
        f"upstream {name} refused the request (HTTP {status})",
        kind="upstream_refused",
        retryable=False,
        upstream_status=status,
    )
