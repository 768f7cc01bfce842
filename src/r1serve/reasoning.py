"""Split DeepSeek-R1 output into reasoning (``<think>…</think>``) and answer (content).

Pure: no I/O, stdlib plus the protocol types. The streaming :class:`ReasoningParser` and the whole-text
:func:`split_reasoning` give identical results for any chunking of the same output.

Semantics
---------
* ``fmt="none"``: everything is content, passed through untouched; never in reasoning.
* ``fmt="deepseek_r1"``, ``starts_in_reasoning=True`` (the rendered prompt already opened ``<think>``,
  see :func:`prompt_opens_reasoning`): all text is reasoning until ``</think>``. A redundant ``<think>``
  at the very start of the output (after optional whitespace) is dropped.
* ``fmt="deepseek_r1"``, ``starts_in_reasoning=False``: a ``<think>`` as the output's first non-whitespace
  text opens the reasoning; otherwise the whole output is content, untouched (a later ``</think>`` stays
  in it). While the output so far is whitespace or a prefix of ``<think>`` it is held back (undecided);
  if the output ends undecided, what was held is content.
* After ``</think>`` everything is content; a second ``<think>`` there is plain text.
* Whitespace right after ``<think>`` and right after ``</think>`` is dropped (the leading whitespace of
  the reasoning and of the content), however it is chunked. Trailing whitespace is kept: dropping it
  would mean holding it back while streaming.
* Tags may be split across any chunk boundary; only a suffix that could still become the awaited tag is
  held back, so streaming latency stays one partial tag at most.
* No ``</think>`` at all: everything after the opening is reasoning and there is no content.

None rule (:func:`split_reasoning`, :meth:`ReasoningParser.result`): a part is ``None`` exactly when its
text is empty. This needs nothing but the joined text, so a layer that only sees the streamed pieces
(``"".join(pieces) or None``) reaches the same answer. It implies: no reasoning section -> reasoning
``None``; reasoning never closed -> content ``None``; an empty ``<think></think>`` -> reasoning ``None``.
"""

from __future__ import annotations

import re
from typing import Literal

from r1serve.protocol import ChatMessage, TextPart

__all__ = [
    "THINK_CLOSE",
    "THINK_OPEN",
    "ReasoningFormat",
    "ReasoningParser",
    "prompt_opens_reasoning",
    "split_reasoning",
    "strip_reasoning_from_history",
]

# How a model marks its thinking (the catalog's entries and the engines use this one definition).
ReasoningFormat = Literal["deepseek_r1", "none"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_State = Literal["undecided", "opening", "reasoning", "content", "plain"]


def prompt_opens_reasoning(rendered_prompt: str) -> bool:
    """True when the prompt's last tag is an unclosed ``<think>`` followed only by whitespace.

    Newer R1 chat templates end the prompt with ``<｜Assistant｜><think>\\n``, so the output has no
    opening tag and the parser must start inside the reasoning.
    """
    return rendered_prompt.rstrip().endswith(THINK_OPEN)


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    # Such a suffix starts with the tag's first character; most text has none near its end. This runs
    # once per token while streaming.
    if text.rfind(tag[0], max(0, len(text) - len(tag) + 1)) < 0:
        return 0
    for size in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ReasoningParser:
    """Incremental splitter: ``feed`` chunks as they arrive, then ``finish`` once."""

    def __init__(self, fmt: ReasoningFormat = "deepseek_r1", *, starts_in_reasoning: bool = False) -> None:
        self._state: _State
        if fmt == "none":
            self._state = "plain"
        else:
            self._state = "opening" if starts_in_reasoning else "undecided"
        self._buf = ""  # held back: undecided text, or a possible partial "</think>"
        self._trim = True  # drop leading whitespace of the current section (reasoning / content)
        self._reasoning: list[str] = []
        self._content: list[str] = []

    @property
    def in_reasoning(self) -> bool:
        return self._state in ("opening", "reasoning")

    @property
    def reasoning_closed(self) -> bool:
        """A ``</think>`` was seen, or the output turned out to have no reasoning (False while undecided)."""
        return self._state in ("content", "plain")

    @property
    def saw_reasoning(self) -> bool:
        return self._state in ("opening", "reasoning", "content")

    def feed(self, text: str) -> tuple[str, str]:
        """Return the ``(reasoning, content)`` text that is safe to emit now."""
        return self._record(*self._drain(text, final=False))

    def finish(self) -> tuple[str, str]:
        """Flush what was held back at the end of the output."""
        return self._record(*self._drain("", final=True))

    def result(self) -> tuple[str | None, str | None]:
        """Everything emitted so far, with the module's None rule applied."""
        return "".join(self._reasoning) or None, "".join(self._content) or None

    def _record(self, reasoning: str, content: str) -> tuple[str, str]:
        if reasoning:
            self._reasoning.append(reasoning)
        if content:
            self._content.append(content)
        return reasoning, content

    def _drain(self, text: str, *, final: bool) -> tuple[str, str]:
        state = self._state
        if state == "plain":
            return "", text
        # The two common cases, taken once per token or network read: answer text, and reasoning text
        # that cannot hold (part of) a tag. Nothing is held back in either; the general path below gives
        # the same result.
        if state == "content" or (state == "reasoning" and not self._buf and "<" not in text):
            if self._trim:
                text = text.lstrip()
                self._trim = not text
            return ("", text) if state == "content" else (text, "")
        buf = self._buf + text
        self._buf = ""
        reasoning = ""

        if self._state in ("undecided", "opening"):
            head = buf.lstrip()
            if not final and len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head):
                self._buf = buf
                return "", ""
            if head.startswith(THINK_OPEN):
                buf = head[len(THINK_OPEN) :]
            elif self._state == "opening":
                buf = head
            else:
                # Not a reasoning output: the held whitespace is part of the untouched content.
                self._state = "plain"
                return "", buf
            self._state = "reasoning"

        if self._state == "reasoning":
            if self._trim:
                buf = buf.lstrip()
                self._trim = not buf
            end = buf.find(THINK_CLOSE)
            if end < 0:
                keep = 0 if final else _partial_tag_suffix(buf, THINK_CLOSE)
                self._buf = buf[len(buf) - keep :]
                return buf[: len(buf) - keep], ""
            reasoning, buf = buf[:end], buf[end + len(THINK_CLOSE) :]
            self._state = "content"
            self._trim = True

        if self._trim:
            buf = buf.lstrip()
            self._trim = not buf
        return reasoning, buf


def split_reasoning(
    text: str, fmt: ReasoningFormat = "deepseek_r1", *, starts_in_reasoning: bool = False
) -> tuple[str | None, str | None]:
    """Whole-text split: ``(reasoning, content)``, each None when empty (see the module docstring).

    The same result as feeding ``text`` to a :class:`ReasoningParser` and finishing it (the tests check
    every split of many texts against it), in a few string operations: a whole answer from an upstream
    takes this path once per request."""
    if fmt == "none":
        return None, text or None
    head = text.lstrip()
    if head.startswith(THINK_OPEN):
        head = head[len(THINK_OPEN) :]
    elif not starts_in_reasoning:
        return None, text or None  # not a reasoning output: untouched, leading whitespace included
    head = head.lstrip()
    end = head.find(THINK_CLOSE)
    if end < 0:  # never closed: all of it is reasoning
        return head or None, None
    return head[:end] or None, head[end + len(THINK_CLOSE) :].lstrip() or None


_THINK_BLOCK = re.compile(re.escape(THINK_OPEN) + r".*?" + re.escape(THINK_CLOSE) + r"\s*", re.DOTALL)


def _strip_think(text: str) -> str:
    close = text.find(THINK_CLOSE)
    # Output of a prompt that opened <think> itself starts inside the reasoning: "…</think>answer".
    if close >= 0 and THINK_OPEN not in text[:close]:
        text = text[close + len(THINK_CLOSE) :].lstrip()
    return _THINK_BLOCK.sub("", text)


def strip_reasoning_from_history(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Copies of ``messages`` with the reasoning removed from assistant turns (R1's multi-turn rule).

    Earlier assistant turns go back to the model without their reasoning: the reasoning fields are
    cleared and any ``<think>…</think>`` block (or leading ``…</think>``) is cut from the text, along
    with the whitespace after it. Other roles are copied unchanged. Inputs are not mutated.
    """
    out: list[ChatMessage] = []
    for message in messages:
        # Text content and no extra fields: nothing nested to share, a shallow copy is a full one (and
        # several times cheaper than a deep one; this runs for every message of every request).
        nested = message.model_extra or not (message.content is None or isinstance(message.content, str))
        copy = message.model_copy(deep=bool(nested))
        if message.role == "assistant":
            copy.reasoning_content = None
            copy.reasoning = None
            stripped = _strip_think(message.text())
            if isinstance(message.content, str):
                copy.content = stripped
            elif message.content is not None and stripped != message.text():
                # A block may span parts, so the parts collapse into one text part.
                copy.content = [TextPart(type="text", text=stripped)]
        out.append(copy)
    return out
