"""The tool-call parser (r1serve/toolcalls.py): Qwen2.5's and DeepSeek-R1's formats, the same result for
any chunking (every split point, and hypothesis's chunkings), no marker ever in the content."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1serve.toolcalls import (
    QWEN_CLOSE,
    QWEN_OPEN,
    R1_CALL_BEGIN,
    R1_CALL_END,
    R1_CALLS_BEGIN,
    R1_CALLS_END,
    R1_SEP,
    ToolCallParser,
    parse_tool_calls,
)

NAMES = frozenset({"get_weather", "a", "b.c", "f", "g", "search"})
MARKER_BITS = ("<tool_call", "</tool_call", "<｜tool▁", "tool▁sep", "｜>")


def ids() -> object:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def run(chunks: list[str]) -> tuple[str, list[tuple[str | None, str | None, str]]]:
    """Feed ``chunks``; the content and the calls reassembled from the streamed pieces (as a client does)."""
    parser = ToolCallParser(new_id=ids(), names=NAMES)  # type: ignore[arg-type]
    content: list[str] = []
    calls: dict[int, list[str | None]] = {}
    for piece_source in [*(parser.feed(c) for c in chunks), parser.finish()]:
        text, pieces = piece_source
        content.append(text)
        for p in pieces:
            if p.id is not None:
                assert p.index not in calls, "a call's id comes once, on its first piece"
                assert p.arguments == ""
                calls[p.index] = [p.id, p.name, ""]
            else:
                assert p.index in calls, "arguments before the call's first piece"
                calls[p.index][2] = str(calls[p.index][2]) + p.arguments
    joined = "".join(content)
    assert list(calls) == list(range(len(calls)))
    return joined, [(c[0], c[1], str(c[2])) for c in calls.values()]


def qwen(name: str, args: str) -> str:
    return f'{QWEN_OPEN}\n{{"name": "{name}", "arguments": {args}}}\n{QWEN_CLOSE}'


def r1(*calls: tuple[str, str]) -> str:
    body = "\n".join(f"{R1_CALL_BEGIN}function{R1_SEP}{n}\n```json\n{a}\n```{R1_CALL_END}" for n, a in calls)
    return R1_CALLS_BEGIN + body + R1_CALLS_END


CASES: list[tuple[str, str, list[tuple[str, str]]]] = [
    (qwen("get_weather", '{"city": "Paris"}'), "", [("get_weather", '{"city": "Paris"}')]),
    (
        "Let me check.\n" + qwen("a", '{"x": {"y": [1, 2]}}') + "\n" + qwen("b.c", "{}"),
        "Let me check.",
        [("a", '{"x": {"y": [1, 2]}}'), ("b.c", "{}")],
    ),
    (qwen("f", '{"s": "}</tool"}'), "", [("f", '{"s": "}</tool"}')]),
    # arguments first: read whole at the close, re-encoded
    (f'{QWEN_OPEN}{{"arguments": {{"q": 1}}, "name": "search"}}{QWEN_CLOSE} done', "done", [("search", '{"q": 1}')]),
    (r1(("get_weather", '{"city": "Paris"}')), "", [("get_weather", '{"city": "Paris"}')]),
    (
        "Calling two." + r1(("a", '{"n": 1}'), ("b", '{"s": "``x``"}')),
        "Calling two.",
        [("a", '{"n": 1}'), ("b", '{"s": "``x``"}')],
    ),
    # R1 without the fence, and without the block markers
    (f'{R1_CALL_BEGIN}function{R1_SEP}f\n{{"a": 2}}{R1_CALL_END}', "", [("f", '{"a": 2}')]),
    # not calls: text
    ("a < b and <tool>x</tool> <｜User｜>", "a < b and <tool>x</tool> <｜User｜>", []),
    ("plain answer  \n", "plain answer  \n", []),
    (f"{QWEN_OPEN}not json{QWEN_CLOSE}", f"{QWEN_OPEN}not json{QWEN_CLOSE}", []),
    (f"x {QWEN_OPEN}unclosed", f"x {QWEN_OPEN}unclosed", []),
    # the call's JSON in a Markdown fence (the default model writes that), and fences that are not calls
    (
        'Calling.\n```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Paris"\n  }\n}\n```',
        "Calling.",
        [("get_weather", '{\n    "city": "Paris"\n  }')],
    ),
    ("Here:\n```python\nprint(1)\n```\nDone.", "Here:\n```python\nprint(1)\n```\nDone.", []),
    ('```json\n{"name": "John", "age": 3}\n```', '```json\n{"name": "John", "age": 3}\n```', []),
    ('```json\n{"name": "rm_rf", "arguments": {}}\n```', '```json\n{"name": "rm_rf", "arguments": {}}\n```', []),
    ('```\n{"name": "f", "arguments": {"a": [1]}}\n```\n', "", [("f", '{"a": [1]}')]),
    # bare JSON calls at the start of the answer (and after a call); a JSON answer that is not a call
    (
        ' {"name": "f", "arguments": {"s": "}{\\"", "n": [1, {}]}}\n{"name": "g", "arguments": {}} ok',
        "ok",
        [("f", '{"s": "}{\\"", "n": [1, {}]}'), ("g", "{}")],
    ),
    ('{"name": "John", "arguments": 1}', '{"name": "John", "arguments": 1}', []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('Text first {"name": "f", "arguments": {}}', 'Text first {"name": "f", "arguments": {}}', []),
    ('{"name": "f", "arguments": {"a": "cut', "", [("f", '{"a": "cut')]),
    # an unclosed call (cut by max_tokens): its arguments so far
    (f'{QWEN_OPEN}{{"name": "f", "arguments": {{"a": ', "", [("f", '{"a": ')]),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_whole_text(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    got_content, got = parse_tool_calls(text, new_id=ids(), names=NAMES)  # type: ignore[arg-type]
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert [c.id for c in got] == [f"call_{i}" for i in range(len(calls))]
    for _, args in calls:
        if not args.endswith((" ", "cut")):  # the unclosed cases
            json.loads(args)


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_every_split_point_gives_the_same_result(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    expected = run([text])
    assert expected[0] == content
    for i in range(len(text) + 1):
        assert run([text[:i], text[i:]]) == expected, i
    # one character at a time, and every pair of split points for the shorter texts
    assert run(list(text)) == expected
    if len(text) <= 80:
        for i, j in itertools.combinations(range(len(text) + 1), 2):
            assert run([text[:i], text[i:j], text[j:]]) == expected


def test_no_half_marker_reaches_content_while_streaming() -> None:
    text = "Sure. " + qwen("f", '{"a": 1}') + r1(("g", "{}"))
    for i in range(len(text) + 1):
        parser = ToolCallParser(new_id=ids())  # type: ignore[arg-type]
        for chunk in (text[:i], text[i:]):
            out, _ = parser.feed(chunk)
            assert not any(bit in out for bit in MARKER_BITS), (i, out)
        assert "<" not in parser.finish()[0]


_ALPHABET = st.sampled_from(
    ["a", " ", "\n", "{", "}", '"', ":", ",", "`", "<", QWEN_OPEN, QWEN_CLOSE, R1_CALLS_BEGIN, R1_CALL_BEGIN,
     R1_CALL_END, R1_CALLS_END, R1_SEP, '{"name": "f", "arguments": ', "function", "```json\n", "```", "```\n",
     '"name"', '"f"', '"arguments"', "\\"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(_ALPHABET, max_size=24), st.data())
def test_any_text_any_chunking(parts: list[str], data: st.DataObject) -> None:
    text = "".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert run(chunks) == run([text])
