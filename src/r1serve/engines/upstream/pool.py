"""The HTTP connection pool every upstream engine shares: one ``aiohttp.ClientSession`` per process, so
keep-alive connections are reused across targets and model groups."""

from __future__ import annotations

import aiohttp

import r1serve


class HttpClient:
    """The process's one pooled ``aiohttp.ClientSession`` (keep-alive), shared by every upstream engine.

    Reference counted: every engine ``acquire``s it in ``start`` and ``release``s it in ``close``; the
    session is created on first use (inside the running loop) and closed with the last user.
    """

    def __init__(self, *, limit: int = 0, keepalive_timeout: float = 30.0, connect_timeout: float = 10.0) -> None:
        self._limit = limit
        self._keepalive = keepalive_timeout
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._users = 0

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limit, limit_per_host=0, keepalive_timeout=self._keepalive, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Only the connect phase here; first byte and idle are enforced per request (see
                # UpstreamEngine._generate).
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout, sock_read=None),
                headers={"User-Agent": f"r1serve/{r1serve.__version__}"},
                auto_decompress=True,
            )
        return self._session

    def acquire(self) -> None:
        self._users += 1

    async def release(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._session is not None:
            session, self._session = self._session, None
            await session.close()
