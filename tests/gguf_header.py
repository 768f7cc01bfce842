"""Read the key-value (metadata) section at the start of a GGUF file.

Only the header is read, sequentially, from any binary file object: the tensor data is never
touched. That makes it cheap (the server reads ``tokenizer.chat_template`` and ``general.name``
before loading a model) and lets it work on truncated files, such as the first part of a split
upload, which ``gguf.GGUFReader`` and llama.cpp reject because they map the tensor data too.

Layout (GGUF v2 and v3; v1 used 32-bit lengths and is not supported)::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64 | kv_count x (key, type u32, value)

Strings are a u64 byte length followed by UTF-8 bytes. Arrays are an element type u32, a u64 count
and the elements, with no per-element type tags.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import IO, Any

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# Guards against reading garbage as a length and allocating gigabytes. The largest real values are
# vocabularies (~260k tokens, merges a little more) and chat templates (tens of kB).
_MAX_STRING_BYTES = 64 * 1024 * 1024
_MAX_ARRAY_LEN = 64 * 1024 * 1024
_MAX_KV_COUNT = 1 << 20


class GGUFFormatError(ValueError):
    """The bytes are not a (readable) GGUF header."""


class ValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# struct format characters of the fixed-size types.
_SCALAR_FORMATS: dict[ValueType, str] = {
    ValueType.UINT8: "B",
    ValueType.INT8: "b",
    ValueType.UINT16: "H",
    ValueType.INT16: "h",
    ValueType.UINT32: "I",
    ValueType.INT32: "i",
    ValueType.FLOAT32: "f",
    ValueType.BOOL: "?",
    ValueType.UINT64: "Q",
    ValueType.INT64: "q",
    ValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class Field:
    """One metadata entry, with its on-disk types so that it can be written back unchanged."""

    key: str
    type: ValueType
    value: Any  # scalars as int/float/bool/str, arrays as lists; None when skipped
    element_type: ValueType | None = None  # arrays only


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    tensor_count: int
    byte_order: str  # "<" or ">" (struct notation)
    fields: dict[str, Field]
    # Bytes consumed from the start of the GGUF: where the tensor infos begin after a full read.
    kv_end: int

    @property
    def metadata(self) -> dict[str, Any]:
        return {key: f.value for key, f in self.fields.items()}


class _Reader:
    """Sequential typed reads from a file object, with clear errors on truncation."""

    def __init__(self, stream: IO[bytes], byte_order: str = "<") -> None:
        self._stream = stream
        self.byte_order = byte_order
        self.offset = 0

    def exact(self, n: int) -> bytes:
        data = self._stream.read(n)
        if len(data) != n:
            raise GGUFFormatError(
                f"GGUF header is truncated at byte {self.offset + len(data)}: wanted {n} bytes, got {len(data)}"
            )
        self.offset += n
        return data

    def scalar(self, vtype: ValueType) -> Any:
        fmt = self.byte_order + _SCALAR_FORMATS[vtype]
        return struct.unpack(fmt, self.exact(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        return int(self.scalar(ValueType.UINT32))

    def u64(self) -> int:
        return int(self.scalar(ValueType.UINT64))

    def string_bytes(self) -> bytes:
        n = self.u64()
        if n > _MAX_STRING_BYTES:
            raise GGUFFormatError(f"GGUF string length {n} is implausible; the file is corrupt")
        return self.exact(n)

    def string(self) -> str | bytes:
        raw = self.string_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # A few vocabularies hold tokens that are not valid UTF-8; bytes keep them lossless.
            return raw

    def value_type(self) -> ValueType:
        code = self.u32()
        try:
            return ValueType(code)
        except ValueError:
            raise GGUFFormatError(f"unknown GGUF value type {code}") from None

    def value(self, vtype: ValueType, keep: bool) -> tuple[Any, ValueType | None]:
        """Read one value of ``vtype``; return (value, element type for arrays)."""
        if vtype == ValueType.STRING:
            if not keep:
                self.string_bytes()
                return None, None
            return self.string(), None
        if vtype != ValueType.ARRAY:
            v = self.scalar(vtype)
            return (v if keep else None), None
        etype = self.value_type()
        count = self.u64()
        if count > _MAX_ARRAY_LEN:
            raise GGUFFormatError(f"GGUF array length {count} is implausible; the file is corrupt")
        if etype == ValueType.ARRAY:
            # Nested arrays are legal but no model uses them; read them generically.
            items = [self.value(ValueType.ARRAY, keep)[0] for _ in range(count)]
            return (items if keep else None), etype
        if etype == ValueType.STRING:
            if not keep:
                for _ in range(count):
                    self.string_bytes()
                return None, etype
            return [self.string() for _ in range(count)], etype
        # Fixed-size elements: one read and one unpack for the whole array, not one per element.
        fmt = f"{self.byte_order}{count}{_SCALAR_FORMATS[etype]}"
        data = self.exact(struct.calcsize(fmt))
        return (list(struct.unpack(fmt, data)) if keep else None), etype


def read_header(stream: IO[bytes], *, keys: Iterable[str] | None = None) -> GGUFHeader:
    """Parse the GGUF header from the current position of ``stream``.

    With ``keys``, only those values are decoded; the others are stepped over (their ``Field`` has
    value None), which avoids building the 150k-entry vocabulary lists when only the name is wanted.
    Reading stops at the end of the key-value section (or, with ``keys``, as soon as all of them
    were seen); the tensor infos are not read.
    """
    wanted = None if keys is None else frozenset(keys)
    reader = _Reader(stream)
    magic = reader.exact(4)
    if magic != GGUF_MAGIC:
        raise GGUFFormatError(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")

    version_bytes = reader.exact(4)
    version = struct.unpack("<I", version_bytes)[0]
    if version not in SUPPORTED_VERSIONS:
        # Big-endian files (s390x builds) store the version byte-swapped; small versions tell us.
        swapped = struct.unpack(">I", version_bytes)[0]
        if swapped in SUPPORTED_VERSIONS:
            reader.byte_order = ">"
            version = swapped
        else:
            raise GGUFFormatError(f"unsupported GGUF version {version} (supported: {SUPPORTED_VERSIONS})")

    tensor_count = reader.u64()
    kv_count = reader.u64()
    if kv_count > _MAX_KV_COUNT:
        raise GGUFFormatError(f"GGUF key count {kv_count} is implausible; the file is corrupt")

    fields: dict[str, Field] = {}
    for _ in range(kv_count):
        key_raw = reader.string_bytes()
        try:
            key = key_raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"GGUF key is not UTF-8: {key_raw[:80]!r}") from None
        vtype = reader.value_type()
        keep = wanted is None or key in wanted
        value, etype = reader.value(vtype, keep)
        fields[key] = Field(key=key, type=vtype, value=value, element_type=etype)
        if wanted is not None and wanted.issubset(fields):
            break  # everything asked for is in hand; the rest of the section is not needed
    return GGUFHeader(
        version=version,
        tensor_count=tensor_count,
        byte_order=reader.byte_order,
        fields=fields,
        kv_end=reader.offset,
    )


def read_metadata(source: str | Path | IO[bytes], *, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """Return the GGUF metadata as a plain dict (arrays as lists, strings as str).

    ``source`` is a path or a binary file object positioned at the start of the GGUF. With
    ``keys``, only those keys are returned (missing ones are simply absent).
    """
    if isinstance(source, (str, Path)):
        # A generous buffer: the header is a few MB of small reads.
        with open(source, "rb", buffering=1024 * 1024) as f:
            header = read_header(f, keys=keys)
    else:
        header = read_header(source, keys=keys)
    if keys is None:
        return header.metadata
    wanted = set(keys)
    return {k: f.value for k, f in header.fields.items() if k in wanted}


def read_chat_info(path: str | Path) -> tuple[str | None, str | None]:
    """(general.name, tokenizer.chat_template) of a GGUF, or None for either when absent."""
    meta = read_metadata(path, keys=("general.name", "tokenizer.chat_template"))
    name = meta.get("general.name")
    template = meta.get("tokenizer.chat_template")
    return (name if isinstance(name, str) else None, template if isinstance(template, str) else None)
