"""The HTTP server: uvicorn, with two limits it lacks so that slow clients cannot hold the server's sockets.

uvicorn times out idle keep-alive connections but not a request whose headers trickle in (a slow-loris
client keeps a socket, a file descriptor and a parser for as long as it likes), and it caps requests in
flight (``limit_concurrency``) but not open connections. The protocol below adds both: a connection must
send its request line and headers within ``R1SERVE_HEADER_TIMEOUT`` seconds of opening (or of the first
byte of its next request), and past ``R1SERVE_MAX_CONNECTIONS`` open connections a new one is answered 503
and closed at once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from r1serve.api.errors import error_body
from r1serve.settings import Settings

_FULL = json.dumps(
    error_body("The server has too many open connections; retry later.", "server_error", None, "overloaded")
).encode()
_FULL_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_FULL)).encode() + b"\r\n\r\n" + _FULL
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header-read deadline and a cap on open connections.

    The deadline is checked by one sweep a second over the open connections rather than a timer per
    request: arming and cancelling a timer for every request cost more than the rest of this class
    (bench/gateway/run.py --profile). A late connection is closed between ``header_timeout`` and
    ``header_timeout`` + 1 s after it began."""

    header_timeout: float = 10.0
    max_connections: int = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_since: float | None = None  # loop time the request line began, until its headers end

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_FULL_RESPONSE)
            transport.close()
            return
        self._headers_since = self.loop.time()
        _Sweeper.watch(self)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._headers_since is None:  # the next request on a kept-alive connection
            self._headers_since = self.loop.time()

    def on_headers_complete(self) -> None:
        self._headers_since = None
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_since = None
        _Sweeper.forget(self)
        super().connection_lost(exc)

    def headers_late(self, now: float) -> bool:
        return self._headers_since is not None and now - self._headers_since > self.header_timeout

    def close_late(self) -> None:
        self._headers_since = None
        if not self.transport.is_closing():
            self.transport.close()


class _Sweeper:
    """One per event loop: closes connections whose headers are late, once a second while any is open."""

    _by_loop: dict[asyncio.AbstractEventLoop, _Sweeper] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.open: set[GuardedHttpToolsProtocol] = set()
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def watch(cls, protocol: GuardedHttpToolsProtocol) -> None:
        sweeper = cls._by_loop.get(protocol.loop)
        if sweeper is None:
            sweeper = cls._by_loop[protocol.loop] = cls(protocol.loop)
        sweeper.open.add(protocol)
        if sweeper.timer is None:
            sweeper.timer = sweeper.loop.call_later(1.0, sweeper.sweep)

    @classmethod
    def forget(cls, protocol: GuardedHttpToolsProtocol) -> None:
        sweeper = cls._by_loop.get(protocol.loop)
        if sweeper is not None:
            sweeper.open.discard(protocol)

    def sweep(self) -> None:
        now = self.loop.time()
        for protocol in [p for p in self.open if p.headers_late(now)]:
            protocol.close_late()
        if self.open:
            self.timer = self.loop.call_later(1.0, self.sweep)
        else:
            self.timer = None
            del self._by_loop[self.loop]  # a closed loop leaves nothing behind


def protocol_for(settings: Settings) -> type[GuardedHttpToolsProtocol]:
    return type(
        "R1ServeHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout": settings.header_timeout, "max_connections": settings.max_connections},
    )


def serve_http(app: Any, settings: Settings) -> None:
    """Run ``app`` on ``settings.host:port`` until interrupted."""
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        # uvloop when installed (uvicorn[standard]), asyncio's loop otherwise.
        loop="auto",
        http=protocol_for(settings),
        log_config=None,  # configure_logging set up the handlers, request ids included
        access_log=False,  # the request middleware writes the access log with the request id
        # r1serve never reads the client's address (keys identify callers): uvicorn's X-Forwarded-For
        # rewriting would be work for nothing on every request.
        proxy_headers=False,
        timeout_graceful_shutdown=5,  # open streams must not hold Ctrl-C hostage
    )
