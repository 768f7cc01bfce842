"""The two responses a generation ends in, a JSON body or an SSE stream, built from raw ASGI headers
(starlette's ``Response`` would render the body and encode a header dict again, once per request).

Both are sent by the hot paths (api/hotpaths.py), which also close the SSE body iterator however the
stream ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import quote

from starlette.responses import Response, StreamingResponse

from r1serve.routing import ServedModel

_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in ",%")  # visible ASCII

_SSE_RAW_HEADERS = (
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
)


class JSONBody(Response):
    """A 200 JSON response from an encoded body and raw headers."""

    media_type = "application/json"

    def __init__(self, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = 200
        self.body = body
        self.background = None
        length = (b"content-length", str(len(body)).encode())
        self.raw_headers = [*headers, length, (b"content-type", b"application/json")]


class SSEResponse(StreamingResponse):
    """A 200 ``text/event-stream`` of ``content``, with ``headers`` plus the SSE ones."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: list[tuple[bytes, bytes]]) -> None:
        self.body_iterator = content
        self.status_code = 200
        self.background = None
        self.raw_headers = [*headers, *_SSE_RAW_HEADERS]


def generation_headers(served: ServedModel, unknown: list[str]) -> list[tuple[bytes, bytes]]:
    """The headers both shapes carry: the model actually served, and the request fields ignored."""
    headers = [(b"x-r1serve-model", served.entry.id.encode("latin-1"))]
    if unknown:
        # Field names are the client's text: percent-encoded where they hold what a header value may not
        # (control characters, non-ASCII) or what would change the list's meaning (",", "%").
        names = ",".join(quote(name, safe=_HEADER_SAFE) for name in unknown)
        if len(names) > MAX_UNKNOWN_FIELDS_HEADER:
            # Clients and proxies refuse responses with huge headers (curl's cap is 100 kB): the first
            # names, then how many more.
            cut = names.rfind(",", 0, MAX_UNKNOWN_FIELDS_HEADER)
            shown = names[:cut] if cut > 0 else ""
            more = len(unknown) - (shown.count(",") + 1 if shown else 0)
            names = f"{shown},...{more} more" if shown else f"...{more} more"
        headers.append((b"x-r1serve-unknown-fields", names.encode("ascii")))
    return headers


MAX_UNKNOWN_FIELDS_HEADER = 2048  # bytes of field names in the header
