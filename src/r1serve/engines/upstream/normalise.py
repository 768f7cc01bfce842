"""Upstream answers read the embedded engine's way: reasoning split from content per dialect, finish
reasons and logprobs mapped onto r1serve's, and the shape of a choice checked.

:class:`Normaliser` is why an upstream's output equals the embedded engine's for the same text: it feeds
:class:`r1serve.reasoning.ReasoningParser` (or :func:`~r1serve.reasoning.split_reasoning` for an answer
that came in one piece), whichever fields the upstream used.
"""

from __future__ import annotations

import json
from typing import Any

from r1serve.engines.base import FinishReason
from r1serve.engines.upstream.config import Dialect
from r1serve.protocol import TokenLogprob
from r1serve.reasoning import (
    THINK_CLOSE,
    ReasoningFormat,
    ReasoningParser,
    split_reasoning,
)
from r1serve.toolcalls import ToolCallPiece, new_call_id

_FINISH: dict[str, FinishReason] = {
    "length": "length", "stop": "stop", "tool_calls": "tool_calls", "function_call": "tool_calls",
}  # fmt: skip


def finish_reason(value: Any) -> FinishReason:
    """Upstream finish reasons mapped onto the three r1serve has (``eos`` and the like are stops)."""
    return _FINISH.get(value, "stop") if isinstance(value, str) else "stop"


class Normaliser:
    """Upstream text and reasoning fields in, ``(reasoning, content)`` out, with the embedded path's rules.

    Field dialects are read as the text ``<think>{reasoning}</think>{content}`` would be by the embedded
    parser, so whitespace trimming and the None rule are the same by construction.
    """

    def __init__(self, dialect: Dialect, *, chat: bool = True, eos_markers: tuple[str, ...] = ()) -> None:
        self._dialect = dialect if chat else "none"
        self._eos = eos_markers
        self._parser: ReasoningParser | None = None
        self._fields = False  # reading the "<think>{fields}</think>{content}" form
        self._closed = False  # the synthetic "</think>" was fed
        self.reasoning_parts: list[str] = []
        self.content_parts: list[str] = []

    def _form(self, *, fields: bool) -> tuple[ReasoningFormat, bool]:
        """The parser's format and whether it starts inside the reasoning, for the first text seen (a
        reasoning field if ``fields``); sets whether the fields form is being read."""
        self._fields = fields or self._dialect in ("reasoning_content", "reasoning")
        if self._fields or self._dialect == "think_in_content":
            return "deepseek_r1", True
        if self._dialect == "think_tags":
            return "deepseek_r1", False
        return "none", False

    def _start(self, *, fields: bool) -> ReasoningParser:
        fmt, starts = self._form(fields=fields)
        return ReasoningParser(fmt, starts_in_reasoning=starts)

    def whole(self, content: str | None, reasoning: str | None) -> tuple[str, str]:
        """:meth:`add` then :meth:`finish` on a fresh normaliser (the same text, in the parts too, as one
        piece each): an answer that came in one piece, split in one pass over its text instead of through
        the incremental parser."""
        if content and self._eos:
            content = self._strip_eos(content)
        if not reasoning and not content:
            return "", ""
        fmt, starts = self._form(fields=bool(reasoning))
        text = reasoning or ""
        if content:
            text += THINK_CLOSE + content if self._fields else content
        r, c = split_reasoning(text, fmt, starts_in_reasoning=starts)
        return self._record(r or "", c or "")

    def add(self, content: str | None, reasoning: str | None) -> tuple[str, str]:
        """The ``(reasoning, content)`` of one event (what :meth:`add_many` gives for a list of one)."""
        if content and self._eos:
            content = self._strip_eos(content)
        return self._add(content, reasoning)

    def add_many(self, events: list[tuple[str | None, str | None]]) -> tuple[str, str]:
        """:meth:`add` for the ``(content, reasoning)`` of several events, in order, as one output.

        Consecutive texts of one kind go to the parser joined, as one piece: its output does not depend
        on how its input is chunked, and one parser call per network read instead of one per event is
        most of what normalising a stream costs."""
        out_r = out_c = ""
        # The run being gathered: all of its reasoning came before all of its content.
        run_r: list[str] = []
        run_c: list[str] = []
        for content, reasoning in events:
            if reasoning:
                if run_c:  # reasoning after content: the run so far goes first
                    r, c = self._add("".join(run_c), "".join(run_r))
                    out_r += r
                    out_c += c
                    run_r, run_c = [], []
                run_r.append(reasoning)
            if content:
                if self._eos:
                    content = self._strip_eos(content)
                if content:
                    run_c.append(content)
        if run_r or run_c:
            r, c = self._add("".join(run_c), "".join(run_r))
            out_r += r
            out_c += c
        return out_r, out_c

    def _add(self, content: str | None, reasoning: str | None) -> tuple[str, str]:
        out_r = out_c = ""
        if reasoning:
            parser = self._parser
            if parser is None:
                parser = self._parser = self._start(fields=True)
            if self._fields and not self._closed:
                out_r, out_c = parser.feed(reasoning)
            else:  # reasoning after the answer started, or in a content dialect: pass it on as is
                out_r = reasoning
        if content:
            parser = self._parser
            if parser is None:
                parser = self._parser = self._start(fields=False)
            if self._fields and not self._closed:
                self._closed = True
                content = THINK_CLOSE + content
            r, c = parser.feed(content)
            out_r += r
            out_c += c
        return self._record(out_r, out_c)

    def _record(self, reasoning: str, content: str) -> tuple[str, str]:
        if reasoning:
            self.reasoning_parts.append(reasoning)
        if content:
            self.content_parts.append(content)
        return reasoning, content

    def _strip_eos(self, content: str) -> str:
        for marker in self._eos:
            if content == marker:
                return ""
            if content.endswith(marker):
                return content[: -len(marker)]
        return content

    def finish(self) -> tuple[str, str]:
        if self._parser is None:
            return "", ""
        return self._record(*self._parser.finish())


class Malformed(ValueError):
    """Valid JSON that is not the shape of a completion or of a chunk of one (reported as invalid_response)."""


def choice_texts(choice: dict[str, Any], chat: bool, field: str) -> tuple[str | None, str | None]:
    """``(content, reasoning)`` of an upstream choice, from any reasoning dialect's fields. ``field`` is
    where a chat choice keeps its message: "delta" in a stream's chunk, "message" in a whole answer (the
    other is read when it is missing). A message that is not an object, or a text that is not a string
    or null, raises Malformed."""
    if chat:
        message = choice.get(field) or choice.get("message" if field == "delta" else "delta") or {}
        if type(message) is not dict:
            raise Malformed
        text = message.get("content")
        reasoning = message.get("reasoning_content") or message.get("reasoning")
    else:
        text, reasoning = choice.get("text"), None
    if (text is None or type(text) is str) and (reasoning is None or type(reasoning) is str):
        return text, reasoning
    raise Malformed


def choice_logprobs(choice: dict[str, Any], chat: bool) -> list[TokenLogprob]:
    """The token logprobs of a chat choice (``logprobs.content``); entries of another shape are skipped."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return []
    items = lp.get("content") if chat else None
    if not isinstance(items, list):
        return []
    out = []
    for item in items:
        try:
            out.append(TokenLogprob.model_validate(item))
        except ValueError:
            continue
    return out


class ToolCallNormaliser:
    """An upstream's ``tool_calls`` fields in, :class:`~r1serve.toolcalls.ToolCallPiece` out, numbered
    r1serve's way whatever the provider sent.

    Providers differ: some give every call index 0 and tell calls apart by id, some leave the index out,
    some repeat the id or the name on every piece, some send ``arguments`` as an object (Ollama), and
    a whole answer's calls come without indexes. Here a piece with an id not seen before starts a new
    call; a piece without one (or with its call's id again) continues the call its index names, else the
    latest call. A call without an id is given one."""

    def __init__(self) -> None:
        self._by_id: dict[str, int] = {}
        self._by_index: dict[Any, int] = {}
        self._count = 0

    def add(self, raw: Any) -> list[ToolCallPiece]:
        """The pieces in one delta's (or one message's) ``tool_calls``; entries of another shape are skipped."""
        if not isinstance(raw, list):
            return []
        out: list[ToolCallPiece] = []
        for item in raw:
            if not isinstance(item, dict):
                continue
            function = item.get("function")
            function = function if isinstance(function, dict) else {}
            name = function.get("name")
            arguments = function.get("arguments")
            if arguments is None:
                arguments = ""
            elif not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            call_id = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else None
            upstream_index = item.get("index")
            ours = self._by_id.get(call_id) if call_id else None
            if ours is None and call_id is None:
                ours = self._by_index.get(upstream_index) if upstream_index is not None else None
                if ours is None and self._count and not isinstance(name, str):
                    ours = self._count - 1
            if ours is None:  # a new call
                ours = self._count
                self._count += 1
                if call_id:
                    self._by_id[call_id] = ours
                out.append(
                    ToolCallPiece(index=ours, id=call_id or new_call_id(), name=name if isinstance(name, str) else "")
                )
            if upstream_index is not None:
                self._by_index[upstream_index] = ours
            if arguments:
                out.append(ToolCallPiece(index=ours, arguments=arguments))
        return out


def choice_tool_calls(choice: dict[str, Any], field: str) -> Any:
    """The raw ``tool_calls`` of a chat choice (its ``delta`` or ``message``), or None."""
    message = choice.get(field) or choice.get("message" if field == "delta" else "delta")
    if type(message) is not dict:
        return None
    return message.get("tool_calls")
