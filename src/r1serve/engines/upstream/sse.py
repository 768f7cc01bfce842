"""Reading an upstream's server-sent events: the JSON of the complete ``data:`` lines in what has
arrived, and what to do with the response once the stream is over.

The body is read as it arrives (``readany``) and split into lines here, once per read; nothing waits
for more than one read (see :meth:`~r1serve.engines.upstream.engine.UpstreamEngine.generate`).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import orjson

from r1serve.protocol import jsonfast

# An SSE data line's value, from its first non-blank character to the end of the line. The trailing
# blanks (and the \r of a CRLF line end) are kept: JSON allows them, and a lazy match that left them
# out cost 20 times as much here.
_DATA_LINE = re.compile(rb"^data:[ \t]*(.*)$", re.MULTILINE)


def read_events(buf: bytes, cut: int) -> tuple[list[Any] | None, bool]:
    """The events of the data lines in ``buf[:cut]`` (complete lines) up to a ``[DONE]``, and whether
    the ``[DONE]`` came; the events are None when one of them is not JSON."""
    # Blank separators, ": keep-alive" comments and event: names are not data lines; the data of the
    # rest is found in one pass of C code.
    payloads = _DATA_LINE.findall(buf, 0, cut)
    done = False
    if buf.find(b"[DONE]", 0, cut) >= 0:
        ends = [payload.rstrip() for payload in payloads]
        if b"[DONE]" in ends:
            payloads = payloads[: ends.index(b"[DONE]")]
            done = True
    try:
        return [orjson.loads(payload) for payload in payloads], done
    except orjson.JSONDecodeError:
        return _parse_leniently(payloads), done


def _parse_leniently(payloads: list[bytes]) -> list[Any] | None:
    """The events orjson refused, through the json module's extensions (NaN, huge integers): None when
    one of them is not JSON at all."""
    try:
        return [jsonfast.loads(payload) for payload in payloads]
    except ValueError:
        return None


# ----------------------------------------------------------------------------- after the stream

_background: set[asyncio.Task[None]] = set()


def finish_response(resp: aiohttp.ClientResponse, *, complete: bool) -> None:
    """A finished response goes back to the pool (after reading the chunked terminator, which usually
    arrived with [DONE]); a half-read one is closed, dropping the connection: that is how a client that
    went away stops the upstream generation."""
    if complete and resp.content.at_eof():
        resp.release()
    elif complete:
        # The terminator is usually one more TCP segment away: read it in the background rather than
        # make the client wait for it (a whole JSON answer is sent only after this runs).
        task = asyncio.get_running_loop().create_task(_drain_and_release(resp))
        _background.add(task)
        task.add_done_callback(_background.discard)
    else:
        resp.close()


async def _drain_and_release(resp: aiohttp.ClientResponse) -> None:
    """Read what is left of a finished response (the chunked terminator) so its connection is reused."""
    try:
        async with asyncio.timeout(1.0):
            while await resp.content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        resp.close()
        return
    resp.release()
