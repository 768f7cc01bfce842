"""Tests for r1serve.reasoning: splitting R1 output into reasoning and content."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1serve.protocol import ChatMessage, TextPart
from r1serve.reasoning import (
    THINK_CLOSE,
    THINK_OPEN,
    ReasoningFormat,
    ReasoningParser,
    prompt_opens_reasoning,
    split_reasoning,
    strip_reasoning_from_history,
)

FORMATS: list[ReasoningFormat] = ["deepseek_r1", "none"]


def stream(
    chunks: list[str], fmt: ReasoningFormat = "deepseek_r1", *, starts_in_reasoning: bool = False
) -> tuple[ReasoningParser, str, str]:
    """Feed ``chunks`` then finish; return the parser and the joined raw outputs."""
    parser = ReasoningParser(fmt, starts_in_reasoning=starts_in_reasoning)
    reasoning, content = [], []
    for chunk in [*chunks, None]:
        r, c = parser.finish() if chunk is None else parser.feed(chunk)
        reasoning.append(r)
        content.append(c)
    return parser, "".join(reasoning), "".join(content)


def oracle(text: str, fmt: ReasoningFormat, starts_in_reasoning: bool) -> tuple[str, str]:
    """The documented semantics, restated on the whole text without any state machine."""
    if fmt == "none":
        return "", text
    head = text.lstrip()
    if head.startswith(THINK_OPEN):
        body = head[len(THINK_OPEN) :]
    elif starts_in_reasoning:
        body = head
    else:
        return "", text
    reasoning, sep, content = body.lstrip().partition(THINK_CLOSE)
    return reasoning, content.lstrip() if sep else ""


# --- table

CASES = [
    # (id, text, fmt, starts_in_reasoning, expected)
    ("open-tag", "<think>\nLet me think.\n</think>\n\nHello!", "deepseek_r1", False, ("Let me think.\n", "Hello!")),
    ("prompt-opened", "Let me think.\n</think>\n\nHello!", "deepseek_r1", True, ("Let me think.\n", "Hello!")),
    (
        "no-tag-content-only",
        "Let me think.\n</think>\n\nHello!",
        "deepseek_r1",
        False,
        (None, "Let me think.\n</think>\n\nHello!"),
    ),
    ("ws-before-open", "  \n<think>abc</think>x", "deepseek_r1", False, ("abc", "x")),
    ("unclosed", "<think>abc", "deepseek_r1", False, ("abc", None)),
    ("unclosed-prompt-opened", "abc", "deepseek_r1", True, ("abc", None)),
    ("unclosed-partial-close", "<think>a</th", "deepseek_r1", False, ("a</th", None)),
    ("trim-after-tags", "<think>   \n\n  abc</think> \n\t x y ", "deepseek_r1", False, ("abc", "x y ")),
    ("trailing-ws-kept", "<think>abc \n</think>x\n", "deepseek_r1", False, ("abc \n", "x\n")),
    ("none-untouched", " <think> a </think> b ", "none", False, (None, " <think> a </think> b ")),
    ("none-ignores-starts", "a</think>b", "none", True, (None, "a</think>b")),
    ("empty", "", "deepseek_r1", False, (None, None)),
    ("empty-prompt-opened", "", "deepseek_r1", True, (None, None)),
    ("empty-none", "", "none", False, (None, None)),
    ("only-open", "<think>", "deepseek_r1", False, (None, None)),
    ("only-open-prompt-opened", "<think>", "deepseek_r1", True, (None, None)),
    ("only-open-close", "<think></think>", "deepseek_r1", False, (None, None)),
    ("empty-reasoning", "<think>\n\n</think>\n\nanswer", "deepseek_r1", False, (None, "answer")),
    ("closed-no-content", "<think>a</think>  \n ", "deepseek_r1", False, ("a", None)),
    ("only-whitespace", " \n ", "deepseek_r1", False, (None, " \n ")),
    ("text-before-open", "Hi <think>x</think>y", "deepseek_r1", False, (None, "Hi <think>x</think>y")),
    ("stray-close", "abc</think>def", "deepseek_r1", False, (None, "abc</think>def")),
    (
        "second-think-in-content",
        "<think>a</think>b<think>c</think>d",
        "deepseek_r1",
        False,
        ("a", "b<think>c</think>d"),
    ),
    ("redundant-open-dropped", " <think>\nx</think>y", "deepseek_r1", True, ("x", "y")),
    ("only-first-redundant-open-dropped", "<think><think>x</think>y", "deepseek_r1", True, ("<think>x", "y")),
    ("open-inside-reasoning", "a<think>b</think>c", "deepseek_r1", True, ("a<think>b", "c")),
    ("close-right-away", "</think>x", "deepseek_r1", True, (None, "x")),
    ("lookalike-tag", "<thinking>x</think>", "deepseek_r1", False, (None, "<thinking>x</think>")),
    ("lookalike-close", "<think>a</thinking>b", "deepseek_r1", False, ("a</thinking>b", None)),
    ("partial-open-only", "<th", "deepseek_r1", False, (None, "<th")),
    ("partial-open-prompt-opened", "<th", "deepseek_r1", True, ("<th", None)),
    ("unicode", "<think>思考🤔 é</think>\u3000答案😀", "deepseek_r1", False, ("思考🤔 é", "答案😀")),
    ("unicode-before-open", "思考<think>x</think>", "deepseek_r1", False, (None, "思考<think>x</think>")),
]


@pytest.mark.parametrize(("text", "fmt", "starts", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_split_table(text: str, fmt: ReasoningFormat, starts: bool, expected: tuple[str | None, str | None]) -> None:
    assert split_reasoning(text, fmt, starts_in_reasoning=starts) == expected
    # One character at a time must agree too.
    parser, _, _ = stream(list(text), fmt, starts_in_reasoning=starts)
    assert parser.result() == expected


@pytest.mark.parametrize(("text", "fmt", "starts"), [c[1:4] for c in CASES], ids=[c[0] for c in CASES])
def test_every_two_and_three_way_split(text: str, fmt: ReasoningFormat, starts: bool) -> None:
    whole = split_reasoning(text, fmt, starts_in_reasoning=starts)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            parser, _, _ = stream([text[:i], text[i:j], text[j:]], fmt, starts_in_reasoning=starts)
            assert parser.result() == whole, (text[:i], text[i:j], text[j:])


# --- streaming details


def test_feed_returns_both_parts_from_one_chunk() -> None:
    parser = ReasoningParser()
    assert parser.feed("<think>abc</think>xyz") == ("abc", "xyz")
    assert parser.finish() == ("", "")


def test_split_close_tag_is_held_then_consumed() -> None:
    parser = ReasoningParser()
    assert parser.feed("<think>abc</th") == ("abc", "")
    assert parser.feed("ink>xyz") == ("", "xyz")


def test_only_possible_tag_prefix_is_held_back() -> None:
    parser = ReasoningParser()
    assert parser.feed("<think>a<") == ("a", "")
    assert parser.feed("b") == ("<b", "")  # "<b" cannot start "</think>"
    assert parser.feed("</x") == ("</x", "")
    assert parser.feed("<</") == ("<", "")  # only the last "</" could begin a tag
    assert parser.feed("think") == ("", "")
    assert parser.finish() == ("</think", "")


def test_undecided_prefix_is_held_then_released_as_content() -> None:
    parser = ReasoningParser()
    assert parser.feed(" \n<thi") == ("", "")
    assert not parser.in_reasoning and not parser.saw_reasoning and not parser.reasoning_closed
    assert parser.feed("s") == ("", " \n<this")
    assert parser.reasoning_closed and not parser.saw_reasoning


def test_undecided_text_is_content_at_finish() -> None:
    parser = ReasoningParser()
    assert parser.feed("  <th") == ("", "")
    assert parser.finish() == ("", "  <th")


def test_whitespace_after_tags_trimmed_across_chunks() -> None:
    parser, reasoning, content = stream(["<think>", " ", "\n", "", " a", "</think>", "\n", " \t", "b", " "])
    assert (reasoning, content) == ("a", "b ")
    parser = ReasoningParser()
    assert parser.feed("<think>") == ("", "")
    assert parser.feed("  \n") == ("", "")
    assert parser.feed(" x ") == ("x ", "")
    assert parser.feed("</think>\n\n") == ("", "")
    assert parser.feed("\n y") == ("", "y")
    assert parser.feed(" z") == ("", " z")


def test_none_format_passes_chunks_through() -> None:
    parser = ReasoningParser("none")
    for chunk in [" ", "<think>", " a ", "</think>", "\n"]:
        assert parser.feed(chunk) == ("", chunk)
        assert not parser.in_reasoning
    assert parser.finish() == ("", "")
    assert parser.result() == (None, " <think> a </think>\n")


def test_result_accumulates_fed_text() -> None:
    parser = ReasoningParser()
    parser.feed("<think>a")
    assert parser.result() == ("a", None)
    parser.feed("b</think>c")
    parser.feed("d")
    parser.finish()
    assert parser.result() == ("ab", "cd")


# --- in_reasoning / reasoning_closed / saw_reasoning


def _flags(parser: ReasoningParser) -> tuple[bool, bool, bool]:
    return parser.in_reasoning, parser.reasoning_closed, parser.saw_reasoning


def test_flags_one_token_at_a_time() -> None:
    parser = ReasoningParser()
    assert _flags(parser) == (False, False, False)
    steps = [
        ("\n", (False, False, False)),
        ("<", (False, False, False)),
        ("think", (False, False, False)),
        (">", (True, False, True)),
        ("\n", (True, False, True)),
        ("Hmm", (True, False, True)),
        ("</", (True, False, True)),
        ("think>", (False, True, True)),
        ("\n\n", (False, True, True)),
        ("<think>", (False, True, True)),
        ("Hi", (False, True, True)),
    ]
    for token, expected in steps:
        parser.feed(token)
        assert _flags(parser) == expected, token
    parser.finish()
    assert _flags(parser) == (False, True, True)


def test_flags_when_prompt_opened_reasoning() -> None:
    parser = ReasoningParser(starts_in_reasoning=True)
    assert _flags(parser) == (True, False, True)
    for token in ["<think>", "\n", "x"]:
        parser.feed(token)
        assert _flags(parser) == (True, False, True)
    parser.feed("</think>")
    assert _flags(parser) == (False, True, True)


def test_flags_without_reasoning() -> None:
    parser = ReasoningParser()
    parser.feed("Hello")
    assert _flags(parser) == (False, True, False)
    parser.feed("</think>")
    assert _flags(parser) == (False, True, False)
    assert _flags(ReasoningParser("none")) == (False, True, False)


def test_unclosed_reasoning_stays_in_reasoning_after_finish() -> None:
    parser, reasoning, content = stream(["<think>", "abc"])
    assert (reasoning, content) == ("abc", "")
    assert _flags(parser) == (True, False, True)


# --- property tests

ALPHABET = ["<", "/", "think", ">", THINK_OPEN, THINK_CLOSE, "\n", " ", "a", "é", "</th", "ink>"]
texts = st.lists(st.sampled_from(ALPHABET), max_size=30).map("".join)


@st.composite
def chunked(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(texts)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in itertools.pairwise(bounds)]


def _nows(text: str) -> str:
    return "".join(text.split())


@settings(max_examples=400)
@given(chunked(), st.sampled_from(FORMATS), st.booleans())
def test_any_chunking_matches_whole(sample: tuple[str, list[str]], fmt: ReasoningFormat, starts: bool) -> None:
    text, chunks = sample
    assert "".join(chunks) == text
    parser, reasoning, content = stream(chunks, fmt, starts_in_reasoning=starts)
    whole = split_reasoning(text, fmt, starts_in_reasoning=starts)
    assert parser.result() == whole
    assert (reasoning or None, content or None) == whole
    assert (reasoning, content) == oracle(text, fmt, starts)


@settings(max_examples=400)
@given(texts, st.sampled_from(FORMATS), st.booleans())
def test_nothing_but_tags_and_whitespace_is_lost(text: str, fmt: ReasoningFormat, starts: bool) -> None:
    parser, reasoning, content = stream(list(text), fmt, starts_in_reasoning=starts)
    opened = parser.saw_reasoning and text.lstrip().startswith(THINK_OPEN)
    closed = parser.saw_reasoning and parser.reasoning_closed
    rebuilt = (THINK_OPEN if opened else "") + reasoning + (THINK_CLOSE if closed else "") + content
    assert _nows(rebuilt) == _nows(text)
    if not parser.saw_reasoning:
        assert (reasoning, content) == ("", text)
    assert THINK_CLOSE not in reasoning
    assert reasoning == reasoning.lstrip() and (not parser.saw_reasoning or content == content.lstrip())


@settings(max_examples=200)
@given(texts, st.booleans())
def test_reasoning_is_entered_at_most_once(text: str, starts: bool) -> None:
    parser = ReasoningParser(starts_in_reasoning=starts)
    history = [parser.in_reasoning]
    for char in text:
        parser.feed(char)
        history.append(parser.in_reasoning)
        if parser.reasoning_closed:
            assert not parser.in_reasoning
    parser.finish()
    history.append(parser.in_reasoning)
    transitions = sum(a != b for a, b in itertools.pairwise(history))
    assert transitions <= (1 if starts else 2)
    assert parser.in_reasoning == (parser.saw_reasoning and not parser.reasoning_closed)


# --- prompt_opens_reasoning

BOS, USER, ASSISTANT, EOS = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
HISTORY = f"{BOS}{USER}Hi{ASSISTANT}<think>\nhmm\n</think>\n\nHello!{EOS}{USER}Again"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (f"{BOS}{USER}Hi{ASSISTANT}<think>\n", True),
        (f"{BOS}{USER}Hi{ASSISTANT}<think>", True),
        (f"{BOS}{USER}Hi{ASSISTANT}<think>\n \t\n", True),
        (f"{BOS}{USER}Hi{ASSISTANT}", False),
        (f"{HISTORY}{ASSISTANT}", False),
        (f"{BOS}{USER}Hi{ASSISTANT}<think>\nhmm\n</think>\n\n", False),
        (f"{HISTORY}{ASSISTANT}<think>\n", True),
        (f"{BOS}{USER}Hi{ASSISTANT}<think>\nalready started", False),
        ("", False),
        ("<think", False),
    ],
)
def test_prompt_opens_reasoning(prompt: str, expected: bool) -> None:
    assert prompt_opens_reasoning(prompt) is expected


# --- strip_reasoning_from_history


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("<think>\nabc\n</think>\n\nHello", "Hello"),
        ("abc\n</think>\n Hello", "Hello"),
        ("Hello", "Hello"),
        ("A <think>x</think> B", "A B"),
        ("<think>x</think>", ""),
        ("<think>a</think>b<think>c</think>\nd", "bd"),
        ("a</think><think>b</think>c", "c"),
        ("思考</think>\n答案😀", "答案😀"),
        (None, None),
    ],
)
def test_strip_assistant_text(content: str | None, expected: str | None) -> None:
    message = ChatMessage(role="assistant", content=content, reasoning_content="r", reasoning="r")
    (stripped,) = strip_reasoning_from_history([message])
    assert stripped.content == expected
    assert stripped.reasoning_content is None and stripped.reasoning is None
    assert message.content == content and message.reasoning_content == "r" and message.reasoning == "r"


def test_strip_text_parts() -> None:
    parts = [
        TextPart(type="text", text="<think>x"),
        TextPart(type="text", text="</think>\n"),
        TextPart(type="text", text="Hi"),
    ]
    message = ChatMessage(role="assistant", content=parts)
    (stripped,) = strip_reasoning_from_history([message])
    assert stripped.text() == "Hi"
    assert isinstance(stripped.content, list) and all(isinstance(p, TextPart) for p in stripped.content)
    assert [p.text for p in parts] == ["<think>x", "</think>\n", "Hi"]


def test_strip_text_parts_without_reasoning_are_kept_as_copies() -> None:
    parts = [TextPart(type="text", text="Hello "), TextPart(type="text", text="there")]
    message = ChatMessage(role="assistant", content=parts, reasoning_content="r")
    (stripped,) = strip_reasoning_from_history([message])
    assert stripped.content == parts and stripped.content is not parts
    assert stripped.reasoning_content is None
    assert isinstance(stripped.content, list)
    stripped.content[0].text = "changed"
    assert parts[0].text == "Hello "


def test_strip_leaves_other_roles_and_does_not_mutate() -> None:
    messages = [
        ChatMessage(role="system", content="<think>sys</think>keep"),
        ChatMessage(role="user", content="<think>u</think> keep", reasoning_content="client sent"),
        ChatMessage(role="assistant", content="<think>r</think>\n\nA1", name="bot"),
        ChatMessage(role="tool", content="</think>tool"),
    ]
    before = [m.model_dump() for m in messages]
    out = strip_reasoning_from_history(messages)
    assert [m.model_dump() for m in messages] == before
    assert all(o is not m for o, m in zip(out, messages, strict=False))
    assert out[0].model_dump() == before[0]
    assert out[1].model_dump() == before[1]
    assert out[3].model_dump() == before[3]
    assert out[2].content == "A1" and out[2].name == "bot" and out[2].role == "assistant"
    assert strip_reasoning_from_history([]) == []
