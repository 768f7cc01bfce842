"""Structured outputs without the model: what the grammar compiled from a schema admits (llama.cpp's grammar
sampler on the default model's real vocabulary, loaded without weights), the 400s for bad
``response_format`` through the real API, and ``response_format`` forwarded to an upstream as sent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_upstream import FakeUpstream
from test_gateway_api import gateway, serving

from r1serve.engines.llama.grammar import Grammar, compile_response_format, unenforced_keyword
from r1serve.engines.vocab import Vocab
from r1serve.errors import InvalidRequest
from r1serve.models.catalog import DEFAULT_MODEL_ID, find_entry
from r1serve.models.fetch import ensure_model
from r1serve.protocol import ResponseFormat
from r1serve.settings import Settings

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["planet", "star"]},
        "moons": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
    },
    "required": ["name", "kind"],
    "additionalProperties": False,
}


def fmt(
    schema: dict[str, Any] | None = None, *, strict: bool | None = True, kind: str = "json_schema"
) -> ResponseFormat:
    body: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        body["json_schema"] = {"name": "thing", "strict": strict, "schema": schema if schema is not None else SCHEMA}
    return ResponseFormat.model_validate(body)


@pytest.fixture(scope="module")
def vocab() -> Iterator[Vocab]:
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    v = Vocab.load(ensure_model(entry, Settings().models_dir, progress=False))
    yield v
    v.close()


def grammar(vocab: Vocab, response_format: ResponseFormat) -> Grammar:
    gbnf = compile_response_format(response_format)
    assert gbnf is not None
    g = Grammar(gbnf)
    g.start(vocab)
    g.begin(vocab, "")
    return g


def admits(vocab: Vocab, g: Grammar, text: str) -> bool:
    """Feed ``text`` token by token as the engine would; False at the first token the grammar refuses."""
    for token in vocab.tokenize(text, add_special=False):
        if not g.allows(token):
            return False
        g.accept(token)
    return True


def eog(vocab: Vocab) -> int:
    return next(t for t in range(vocab.n_tokens - 1, -1, -1) if vocab.is_eog(t))


# ----------------------------------------------------------------------------- the grammar


def test_text_constrains_nothing() -> None:
    assert compile_response_format(None) is None
    assert compile_response_format(ResponseFormat(type="text")) is None


def test_a_valid_answer_is_admitted_and_may_end_only_when_complete(vocab: Vocab) -> None:
    g = grammar(vocab, fmt())
    assert admits(vocab, g, '{"name": "Mars", "kind": "planet", "moons": [1, 2]')
    assert not g.allows(eog(vocab)), "the object is not closed yet"
    assert admits(vocab, g, "}")
    assert g.allows(eog(vocab))
    g.free()


@pytest.mark.parametrize(
    "answer",
    [
        '{"name": "Mars", "kind": "comet"',  # not in the enum
        '{"kind": "planet"',  # a required property skipped (properties come in the schema's order)
        '{"name": "Mars", "kind": "planet", "colour": "red"',  # additionalProperties: false
        '{"name": "Mars", "kind": "planet", "moons": [1, 2, 3, 4]',  # maxItems
        '{"name": "Mars", "kind": "planet", "moons": [1.5',  # integer items
        '{"name": "Ma\nrs"',  # a raw control character inside a string is not JSON
        ' {"name"',  # nothing before the object
    ],
)
def test_what_the_schema_refuses_is_refused(vocab: Vocab, answer: str) -> None:
    g = grammar(vocab, fmt())
    assert not admits(vocab, g, answer)
    g.free()


def test_escapes_inside_strings_are_admitted(vocab: Vocab) -> None:
    g = grammar(vocab, fmt())
    assert admits(vocab, g, '{"name": "Ma\\nrs \\"red\\" \\u00e9", "kind": "star"}')
    assert json.loads('{"name": "Ma\\nrs \\"red\\" \\u00e9", "kind": "star"}')["name"] == 'Ma\nrs "red" é'
    g.free()


def test_json_object_is_any_object(vocab: Vocab) -> None:
    g = grammar(vocab, fmt(kind="json_object"))
    assert admits(vocab, g, '{"a": [1, {"b": null}], "c": true}')
    assert g.allows(eog(vocab))
    g.free()
    g = grammar(vocab, fmt(kind="json_object"))
    assert not admits(vocab, g, "[1, 2]")
    g.free()


def test_begin_keeps_what_the_grammar_allows_and_drops_the_rest(vocab: Vocab) -> None:
    g = Grammar(compile_response_format(fmt()) or "")
    g.start(vocab)
    # Token by token: ' "' is allowed (a property name starts), "bogus" is not ("kind" must follow).
    assert g.begin(vocab, '{"name": "x", "bogus') == '{"name": "x", "'
    assert admits(vocab, g, 'kind": "star"}')
    g.free()


def test_refs_and_defs_as_pydantic_writes_them_compile(vocab: Vocab) -> None:
    schema = {
        "$defs": {
            "Moon": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
                "additionalProperties": False,
                "title": "Moon",
            }
        },
        "type": "object",
        "properties": {"moons": {"type": "array", "items": {"$ref": "#/$defs/Moon"}, "title": "Moons"}},
        "required": ["moons"],
        "additionalProperties": False,
        "title": "Planet",
    }
    g = grammar(vocab, fmt(schema))
    assert admits(vocab, g, '{"moons": [{"name": "Io"}, {"name": "Europa"}]}')
    g.free()
    assert schema["properties"]["moons"]["items"] == {"$ref": "#/$defs/Moon"}, "the request's schema is not rewritten"


# ----------------------------------------------------------------------------- strict


@pytest.mark.parametrize(
    ("schema", "keyword"),
    [
        ({"type": "integer", "minimum": 0}, "minimum"),
        (
            {
                "type": "object",
                "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
            },
            "uniqueItems",
        ),
        ({"type": "string", "format": "email"}, "format: email"),
        ({"type": "string", "pattern": "[a-z]+"}, "pattern"),
        ({"$defs": {"n": {"not": {"type": "null"}}}, "$ref": "#/$defs/n"}, "not"),
    ],
)
def test_strict_refuses_what_the_grammar_would_not_enforce_and_names_it(schema: dict[str, Any], keyword: str) -> None:
    found = unenforced_keyword(schema)
    assert found is not None and found[0] == keyword
    with pytest.raises(InvalidRequest) as caught:
        compile_response_format(fmt(schema, strict=True))
    assert caught.value.param == "response_format.json_schema.schema"
    assert f"'{keyword}'" in caught.value.message
    # Without strict the grammar enforces what it can.
    assert compile_response_format(fmt(schema, strict=False))


def test_enforced_keywords_pass_strict() -> None:
    assert unenforced_keyword(SCHEMA) is None
    assert compile_response_format(fmt(SCHEMA, strict=True))


# ----------------------------------------------------------------------------- the API


def single(up: FakeUpstream) -> str:
    return f"""
[gateway]
retries = 0

[providers.up]
base_url = "{up.base_url}"
model = "provider-model"
dialect = "none"

[[routes]]
name = "m"
default = true
targets = [{{ provider = "up" }}]
"""


BAD_FORMATS = [
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}},
        "response_format.json_schema.schema",
    ),
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": "name"}}},
        "response_format.json_schema.schema",
    ),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "xml"}, "response_format.type"),
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}},
        "response_format.json_schema.schema",
    ),
]


@pytest.mark.parametrize(("response_format", "param"), BAD_FORMATS)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_bad_response_format_is_a_400_naming_it(
    tmp_path: Path, response_format: dict[str, Any], param: str, path: str
) -> None:
    async with FakeUpstream() as up:
        async with serving(await gateway(tmp_path, single(up))) as url:
            body: dict[str, Any] = {"model": "m", "response_format": response_format, "max_tokens": 5}
            body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
            async with httpx.AsyncClient() as client:
                resp = await client.post(url + path, json=body)
        assert not up.requests, "refused before anything went upstream"
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


async def test_response_format_goes_upstream_as_sent(tmp_path: Path) -> None:
    sent = {"type": "json_schema", "json_schema": {"name": "thing", "strict": True, "schema": SCHEMA, "x-extra": 1}}
    async with FakeUpstream() as up:
        async with serving(await gateway(tmp_path, single(up))) as url, httpx.AsyncClient() as client:
            chat = await client.post(
                url + "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": sent},
            )
            completion = await client.post(
                url + "/v1/completions", json={"model": "m", "prompt": "hi", "response_format": {"type": "json_object"}}
            )
        assert chat.status_code == 200 and completion.status_code == 200, (chat.text, completion.text)
        assert up.requests[0]["body"]["response_format"] == sent
        assert up.requests[1]["body"]["response_format"] == {"type": "json_object"}
        assert "x-r1serve-unknown-fields" not in chat.headers
