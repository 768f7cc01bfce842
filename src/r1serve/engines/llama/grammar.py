"""Structured outputs on the embedded engine: a JSON schema compiled to GBNF, and decoding under
llama.cpp's grammar sampler once the answer starts.

``compile_response_format`` turns ``response_format`` into GBNF with llama-cpp-python's schema
converter (``llama_cpp.llama_grammar.SchemaConverter``, a port of llama.cpp's json-schema-to-grammar),
refusing under ``strict`` what the converter would silently not enforce. It runs on a worker thread
with the prompt's rendering.

``Grammar`` holds one sequence's grammar sampler (made on the scheduler thread at admission). It stays
inactive while the model reasons: the scheduler starts it when the reasoning parser says the answer
began (after ``</think>``, the engine's own close when a thinking budget ran out, or at once for a model
without reasoning). Then each token is chosen as llama.cpp's common sampler does: the request's own
choice first, checked against the grammar alone (one candidate, cheap); only when the grammar refuses it
is the whole vocabulary masked by the grammar and the choice made again from what is left. For plain
temperature sampling this is exactly sampling from the masked, renormalised distribution (accept t with
p(t) if allowed, else draw from the allowed mass: p(t) / P(allowed) either way).

A token the grammar refuses is never accepted into it: llama.cpp aborts the process on that.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp.llama_grammar import PRIMITIVE_RULES, STRING_FORMAT_RULES, SchemaConverter

from r1serve.engines.vocab import Vocab
from r1serve.errors import InvalidRequest, R1ServeError
from r1serve.protocol import ResponseFormat

__all__ = ["Grammar", "compile_response_format", "unenforced_keyword"]

# JSON strings may not hold raw control characters; the converter's "char" rule lets them through
# (llama.cpp's C++ converter excludes them, as here), and a raw newline in a string fails json.loads.
_CHAR_RULE = r'[^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})'

# Keywords the converter enforces (or that only annotate). Anything else among JSON Schema's validation
# keywords is ignored by it: refused under strict, named.
_ANNOTATIONS = {
    "$schema", "$id", "$comment", "$defs", "definitions", "$anchor", "title", "description", "default",
    "examples", "deprecated", "readOnly", "writeOnly",
}  # fmt: skip
_ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems",
    "maxItems", "enum", "const", "anyOf", "oneOf", "$ref", "pattern", "minLength", "maxLength", "format",
}  # fmt: skip
_UNENFORCED = {
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "not", "if", "then", "else",
    "allOf", "dependentRequired", "dependentSchemas", "dependencies", "patternProperties", "propertyNames",
    "minProperties", "maxProperties", "uniqueItems", "contains", "minContains", "maxContains",
    "unevaluatedProperties", "unevaluatedItems", "additionalItems", "contentEncoding", "contentMediaType",
    "contentSchema", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor",
}  # fmt: skip
_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
# Subschemas under these keys (a dict of schemas, a list of them, or one).
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties")

_SCHEMA_PARAM = "response_format.json_schema.schema"


def _refused(key: str, value: Any, schema: dict[str, Any]) -> str | None:
    """How to name ``key`` if the grammar would not enforce it in ``schema``, else None."""
    if key in _UNENFORCED:
        return key
    if key == "format" and value not in _FORMATS:
        return f"format: {value}"
    if key == "pattern" and not (isinstance(value, str) and value.startswith("^") and value.endswith("$")):
        return "pattern"  # the converter translates anchored patterns only
    if key in ("minLength", "maxLength") and schema.get("type") != "string":
        return key
    return None


def _subschemas(key: str, value: Any, where: str) -> list[tuple[Any, str, Any]]:
    """(subschema, its pointer, a setter's key) for each schema held under ``key``."""
    if key in _SCHEMA_MAPS and isinstance(value, dict):
        return [(sub, f"{where}/{name}", name) for name, sub in value.items()]
    if key in _SCHEMA_LISTS and isinstance(value, list):
        return [(sub, f"{where}/{i}", i) for i, sub in enumerate(value)]
    if key in _SCHEMA_ONE:
        return [(value, where, None)]
    return []


def unenforced_keyword(schema: Any, path: str = "") -> tuple[str, str] | None:
    """The first keyword (and its JSON pointer) in ``schema`` that the grammar would not enforce, or None."""
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        named = _refused(key, value, schema)
        if named:
            return named, f"{path}/{key}"
        for sub, where, _ in _subschemas(key, value, f"{path}/{key}"):
            found = unenforced_keyword(sub, where)
            if found:
                return found
    return None


def _enforceable(schema: Any) -> Any:
    """A copy of ``schema`` without what the grammar would not enforce (strict: false ignores it)."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if _refused(key, value, schema):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _enforceable(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_enforceable(sub) for sub in value]
        elif key in _SCHEMA_ONE:
            out[key] = _enforceable(value)
        else:
            out[key] = value
    return out


def compile_response_format(fmt: ResponseFormat | None) -> str | None:
    """The GBNF grammar for ``fmt`` (root rule ``root``), or None when it constrains nothing (``text``).

    Without ``strict``, what the grammar would not enforce is left out of it (the answer may break those
    keywords); with it, such a keyword is refused. ``json_object`` (and a ``json_schema`` without a
    schema) is any JSON object. Raises InvalidRequest naming the keyword that ``strict`` cannot have
    enforced, or what the converter could not compile."""
    if fmt is None or fmt.type == "text":
        return None
    schema: dict[str, Any] = {"type": "object"}
    strict = False
    if fmt.type == "json_schema" and fmt.json_schema is not None and fmt.json_schema.schema_ is not None:
        schema = fmt.json_schema.schema_
        strict = bool(fmt.json_schema.strict)
    if strict:
        found = unenforced_keyword(schema)
        if found:
            keyword, where = found
            raise InvalidRequest(
                f"response_format.json_schema.schema uses '{keyword}' (at {where}), which this server's "
                "grammar cannot enforce; with strict: true every keyword must be enforced. Drop it, or send "
                "strict: false to have it ignored.",
                param=_SCHEMA_PARAM,
                code="unsupported_value",
            )
    # The converter is untyped (Any): mypy would flag every call on a typed object.
    make: Any = SchemaConverter
    converter: Any = make(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        # The converter rewrites $refs in place: it gets its own copy.
        resolved = converter.resolve_refs(json.loads(json.dumps(_enforceable(schema))), "input")
        converter.visit(resolved, "")
    except (AssertionError, KeyError, ValueError, TypeError, IndexError, RecursionError) as exc:
        raise InvalidRequest(
            f"response_format.json_schema.schema cannot be compiled to a grammar: {exc or type(exc).__name__}",
            param=_SCHEMA_PARAM,
            code="unsupported_value",
        ) from None
    rules: dict[str, str] = converter._rules
    if "char" in rules:
        rules["char"] = _CHAR_RULE
    return str(converter.format_grammar())


# Keep the converter's built-in rule names in view: a schema property named like one gets a suffixed
# rule, so overriding "char" above can only hit the built-in.
assert "char" in PRIMITIVE_RULES and "char" not in STRING_FORMAT_RULES

# Masking the whole vocabulary with the grammar costs about 140 ms for a 152k vocabulary (every token's
# text against the grammar's stacks), a single token about 10 us: a refused choice is first retried
# cheaply. Greedy: the best of the top _TOP tokens that the grammar allows is the masked argmax. Sampling:
# up to _DRAWS fresh draws from the request's chain (rejection sampling, which draws from the allowed
# tokens in proportion to their probability, as masking does), then the masked vocabulary.
_TOP = 64
_DRAWS = 8

_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


@functools.cache
def _ids(n: int) -> np.ndarray[Any, Any]:
    return np.arange(n, dtype=np.int32)


class Grammar:
    """One sequence's grammar sampler; the scheduler thread's only."""

    def __init__(self, gbnf: str) -> None:
        self.gbnf = gbnf
        self.active = False
        self.full_masks = 0  # how often the whole vocabulary was masked (the slow path; for the benchmark)
        self._sampler: Any = None
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_array = llama_cpp.llama_token_data_array(self._one, 1, -1, False)
        self._all: np.ndarray[Any, Any] | None = None
        self._all_array: Any = None

    def start(self, vocab: Vocab) -> None:
        """Build the sampler (parses the GBNF against the vocabulary)."""
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab.handle, self.gbnf.encode(), b"root")
        if not self._sampler:
            raise R1ServeError("llama.cpp refused the grammar compiled from response_format")

    def free(self) -> None:
        if self._sampler:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None

    def begin(self, vocab: Vocab, content: str) -> str:
        """Start constraining: the answer began. ``content`` is the answer text that came with the token
        that closed the reasoning (it was sampled unconstrained); it is fed to the grammar as far as the
        grammar allows it, and what it refuses is dropped. Returns what was kept."""
        self.active = True
        if not content:
            return ""
        kept = b""
        for token in vocab.tokenize(content, add_special=False):
            if not self.allows(token):
                return kept.decode("utf-8", "ignore")
            self.accept(token)
            kept += vocab.piece(token)
        return content

    def accept(self, token: int) -> None:
        """Advance the grammar past ``token``, which it must allow (see the module docstring)."""
        llama_cpp.llama_sampler_accept(self._sampler, token)

    def allows(self, token: int) -> bool:
        one: Any = self._one[0]
        one.id, one.logit, one.p = token, 0.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._one_array))
        return not math.isinf(self._one[0].logit)

    def sample(self, ctx: Any, logits_at: int, chain: Any, greedy: bool, vocab: Vocab) -> int:
        """The next token under the grammar, accepted into it (and into ``chain``, the request's sampler
        chain, unless the sequence is greedy and samples by argmax)."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, logits_at), shape=(vocab.n_tokens,))
        if greedy:
            token = int(logits.argmax())
            if not self.allows(token):
                token = self._best_allowed(logits)
        else:
            for _ in range(_DRAWS):
                token = self._choose(chain, logits, masked=False)
                if self.allows(token):
                    break
            else:
                token = self._choose(chain, logits, masked=True)
        if token < 0:  # nothing allowed: a grammar with a dead end, which the converter does not make
            return int(llama_cpp.llama_vocab_eos(vocab.handle))
        if not greedy:
            llama_cpp.llama_sampler_accept(chain, token)
        if not vocab.is_eog(token):
            self.accept(token)
        return token

    def _best_allowed(self, logits: np.ndarray[Any, Any]) -> int:
        """The most likely token the grammar allows (the first one on a tie, as argmax takes): among the
        top few, checked one by one, else over the whole vocabulary masked."""
        top = np.argpartition(-logits, _TOP)[:_TOP]
        for token in top[np.lexsort((top, -logits[top]))]:
            if self.allows(int(token)):
                return int(token)
        self.full_masks += 1
        masked = self._fill(logits)["logit"]
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._all_array))
        token = int(masked.argmax())
        return -1 if math.isinf(float(masked[token])) else token

    def _choose(self, chain: Any, logits: np.ndarray[Any, Any], *, masked: bool) -> int:
        data = self._fill(logits)
        if masked:
            self.full_masks += 1
            llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._all_array))
            if not np.isfinite(data["logit"]).any():
                return -1
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(self._all_array))
        selected = self._all_array.selected
        return int(data["id"][selected]) if selected >= 0 else int(data["id"][data["logit"].argmax()])

    def _fill(self, logits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The candidates array (every token, its logit) as llama.cpp's samplers take it."""
        n = len(logits)
        if self._all is None or len(self._all) != n:
            self._all = np.zeros(n, dtype=_TOKEN_DATA)
            self._all_array = llama_cpp.llama_token_data_array(
                self._all.ctypes.data_as(llama_cpp.llama_token_data_p), n, -1, False
            )
        data = self._all
        data["id"] = _ids(n)  # samplers sort and truncate the array in place: reset it all
        data["logit"] = logits
        data["p"] = 0.0
        self._all_array.size, self._all_array.selected, self._all_array.sorted = n, -1, False
        return data
