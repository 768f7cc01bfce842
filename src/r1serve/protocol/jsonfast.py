"""JSON for the request path (upstream bodies and events, response bodies): orjson, with the json module
as the fallback for what orjson refuses, so every input the json module handled is still handled.

orjson parses and writes several times faster; a gateway does it for every request and every streamed
event. Its output is compact UTF-8 (no spaces, non-ASCII characters unescaped), which is valid JSON
with the same content as ``json.dumps(..., ensure_ascii=False)``.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # NaN / Infinity literals and integers past 64 bits are the json module's extensions: still
        # accepted. Anything else fails here too, with the ValueError callers expect.
        return json.loads(data)


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:
        # Integers past 64 bits, non-string keys, types orjson does not know: the json module's rules.
        return json.dumps(obj, ensure_ascii=False).encode()
