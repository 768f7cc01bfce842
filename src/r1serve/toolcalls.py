"""Tool calls out of a model's answer text: Qwen2.5's ``<tool_call>`` JSON blocks and DeepSeek-R1's
``<｜tool▁calls▁begin｜>`` format, read incrementally.

Pure: no I/O. :class:`ToolCallParser` takes the answer (the content, after the reasoning parser) in
chunks and returns the content that is safe to emit and :class:`ToolCallPiece` events, as OpenAI
streams them: a call's first piece has its ``index``, ``id`` and ``name`` (arguments ``""``), later ones
more of its arguments. Joined per index, the pieces and the content are the same for any chunking of
the same text (the tests split texts at every point), and no part of a marker ever reaches the content.

The formats (both are recognised whichever model wrote them: an upstream may return either)::

    <tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>
    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\\n```json\\n{"x": 1}\\n```
        <｜tool▁call▁end｜><｜tool▁calls▁end｜>           (one line: the call's end follows the fence)

Rules, chosen once:

* Whitespace right before a marker and right after a call (or R1's block markers) is dropped; other
  content is passed through. Trailing whitespace is held back until it is known not to precede a marker.
* Arguments stream as the model writes them; the closing ``}`` of Qwen's outer object (or R1's closing
  fence) and the whitespace around it are held back until the call's end marker shows they are not part
  of the arguments. A Qwen call whose JSON does not begin ``{"name": "...", "arguments":`` is read whole
  at its ``</tool_call>`` (``arguments`` re-encoded as a JSON string).
* A block that does not parse as a call is content, markers included (the model wrote it as text). An
  unclosed call at the end (``length``) keeps what its arguments had so far.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "QWEN_OPEN",
    "QWEN_CLOSE",
    "R1_CALLS_BEGIN",
    "R1_CALLS_END",
    "R1_CALL_BEGIN",
    "R1_CALL_END",
    "R1_SEP",
    "ToolCallPiece",
    "ToolCallParser",
    "new_call_id",
    "parse_tool_calls",
]

QWEN_OPEN = "<tool_call>"
QWEN_CLOSE = "</tool_call>"
R1_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
R1_CALLS_END = "<｜tool▁calls▁end｜>"
R1_CALL_BEGIN = "<｜tool▁call▁begin｜>"
R1_CALL_END = "<｜tool▁call▁end｜>"
R1_SEP = "<｜tool▁sep｜>"

# Small models asked for Qwen's format often write the call's JSON bare or in a Markdown fence instead
# (the default model does both, with tool_choice "auto"); llama.cpp's Hermes parser takes those too. A
# fence, or a JSON object that starts the answer (or follows a call), is a call only when it starts
# {"name": "<one of the request's tools>", "arguments": ...; anything else is content, decided as soon
# as the text rules a call out. A bare call ends where its object closes (strings and nesting tracked).
FENCE_JSON = "```json"
FENCE = "```\n"
FENCE_END = "```"
_MARKERS = (QWEN_OPEN, R1_CALLS_BEGIN, R1_CALL_BEGIN, R1_CALLS_END, FENCE_JSON, FENCE)
# Qwen's head: the name is read only when it is a plain identifier (so that no marker can hide in it).
_QWEN_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_.\-]+)"\s*,\s*"arguments"\s*:')
_HEAD_PARTS = (None, "{", None, '"name"', None, ":", None, "NAME", None, ",", None, '"arguments"', None, ":")
_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _could_be_head(text: str) -> bool:
    """Whether ``text`` is a prefix of Qwen's call head (or holds one whole): what _QWEN_HEAD matches."""
    pos = 0
    for part in _HEAD_PARTS:
        if part is None:  # whitespace
            while pos < len(text) and text[pos].isspace():
                pos += 1
        elif part == "NAME":
            if pos < len(text) and text[pos] != '"':
                return False
            pos += 1
            while pos < len(text) and text[pos] in _NAME_CHARS:
                pos += 1
            if pos < len(text) and text[pos] != '"':
                return False
            pos += 1
        else:
            rest = text[pos : pos + len(part)]
            if not part.startswith(rest):
                return False
            pos += len(part)
        if pos >= len(text):
            return True
    return True


_R1_HEAD = re.compile(r"\s*([A-Za-z_]*)\s*" + re.escape(R1_SEP) + r"([^\n<]*)\n")


def new_call_id() -> str:
    return "call_" + os.urandom(12).hex()


@dataclass
class ToolCallPiece:
    index: int
    arguments: str = ""
    id: str | None = None  # on a call's first piece only, with its name
    name: str | None = None


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers``."""
    best = 0
    for marker in markers:
        for size in range(min(len(text), len(marker) - 1), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


_State = Literal["text", "qwen_head", "r1_head", "r1_fence", "args"]


class ToolCallParser:
    """Incremental: ``feed`` answer chunks, then ``finish`` once."""

    def __init__(self, *, new_id: Callable[[], str] = new_call_id, names: frozenset[str] = frozenset()) -> None:
        """``names``: the request's functions; a fenced call must name one of them."""
        self._new_id = new_id
        self._names = names
        self._close = QWEN_CLOSE  # what ends the Qwen-style call being read: </tool_call>, a fence, "" (bare)
        self._bare_ok = bool(names)  # a bare JSON call may start here (the answer's start, after a call)
        # A bare call's arguments are scanned for the outer object's close: where, nesting, in a string.
        self._scan = 0
        self._depth = 1
        self._in_str = False
        self._esc = False
        self._state: _State = "text"
        self._buf = ""
        self._trim = False  # drop leading whitespace (after a call or a block marker)
        self._count = 0
        # The call being read (args state): its end marker, the tail held back before it, its region.
        self._end = ""
        self._tail = ""
        self._args = ""
        self._sent = 0  # characters of the stripped arguments already emitted
        self._open = ""  # the marker that opened the head being read (content if it fails)
        self.content_parts: list[str] = []
        self.calls: list[ToolCallPiece] = []  # whole calls so far (id, name, arguments joined)

    def feed(self, text: str) -> tuple[str, list[ToolCallPiece]]:
        return self._run(text, final=False)

    def finish(self) -> tuple[str, list[ToolCallPiece]]:
        return self._run("", final=True)

    # ------------------------------------------------------------------ the machine

    def _run(self, text: str, *, final: bool) -> tuple[str, list[ToolCallPiece]]:
        # The common case, taken once per token: answer text that starts no marker, and nothing held.
        if (
            self._state == "text" and not self._buf and not self._bare_ok and not final
            and "<" not in text and "`" not in text
        ):  # fmt: skip
            return self._text_out(text, hold_ws=True), []
        self._buf += text
        content: list[str] = []
        pieces: list[ToolCallPiece] = []
        while True:
            progressed = getattr(self, "_step_" + self._state)(final, content, pieces)
            if not progressed:
                break
        out = "".join(content)
        if out:
            self.content_parts.append(out)
        return out, pieces

    def _text_out(self, text: str, *, hold_ws: bool) -> str:
        """Content from the text state (trimmed after a call), holding trailing whitespace back."""
        if self._trim:
            text = text.lstrip()
            if not text:
                return ""
            self._trim = False
        if hold_ws:
            body = text.rstrip()
            self._buf = text[len(body) :] + self._buf
            text = body
        if text:
            self.content_parts.append(text)
        return text

    def _step_text(self, final: bool, content: list[str], pieces: list[ToolCallPiece]) -> bool:
        buf = self._buf
        if self._bare_ok:
            head = buf.lstrip()
            if not head and not final:
                return False  # only whitespace so far: a bare call may still start
            self._bare_ok = False
            if head.startswith("{"):
                self._open, self._buf = buf[: len(buf) - len(head)], head
                self._state, self._close = "qwen_head", ""
                return True
        found = -1
        marker = ""
        for m in _MARKERS:
            i = buf.find(m)
            if i >= 0 and (found < 0 or i < found):
                found, marker = i, m
        if found < 0:
            keep = 0 if final else _partial_suffix(buf, _MARKERS)
            head, held = buf[: len(buf) - keep], buf[len(buf) - keep :]
            body = head if final else head.rstrip()
            self._buf = head[len(body) :] + held
            content.append(self._plain(body))
            return False
        before = buf[:found]
        body = before.rstrip()
        content.append(self._plain(body))
        self._buf = buf[found + len(marker) :]
        # The whitespace before the marker is dropped if a call follows, kept if it turns out to be text.
        self._open = before[len(body) :] + marker
        if marker in (R1_CALLS_BEGIN, R1_CALLS_END):
            self._trim = True
        elif marker in (QWEN_OPEN, FENCE_JSON, FENCE):
            self._state = "qwen_head"
            self._close = QWEN_CLOSE if marker == QWEN_OPEN else FENCE_END
        else:
            self._state = "r1_head"
        return True

    def _plain(self, text: str) -> str:
        if self._trim:
            text = text.lstrip()
            if text:
                self._trim = False
        return text

    def _start_call(self, name: str, pieces: list[ToolCallPiece], *, end: str, tail: str) -> None:
        piece = ToolCallPiece(index=self._count, id=self._new_id(), name=name)
        self._count += 1
        self.calls.append(ToolCallPiece(index=piece.index, id=piece.id, name=name))
        pieces.append(piece)
        self._state, self._end, self._tail, self._args, self._sent = "args", end, tail, "", 0
        self._scan, self._depth, self._in_str, self._esc = 0, 1, False, False

    def _fail_head(self, content: list[str]) -> bool:
        """Not a call after all: its marker is content, and what followed it is read again as text."""
        content.append(self._plain(self._open))
        self._state = "text"
        return True

    def _step_qwen_head(self, final: bool, content: list[str], pieces: list[ToolCallPiece]) -> bool:
        fenced = self._close != QWEN_CLOSE  # in a fence or bare: only the request's functions
        m = _QWEN_HEAD.match(self._buf)
        if m:
            if fenced and m.group(1) not in self._names:
                return self._fail_head(content)
            self._buf = self._buf[m.end() :]
            self._start_call(m.group(1), pieces, end=self._close, tail="}")
            return True
        if fenced and not _could_be_head(self._buf):
            return self._fail_head(content)
        if not self._close:  # bare: a call only if the head matches
            return self._fail_head(content) if final else False
        close = self._buf.find(self._close)
        if close < 0:
            return self._fail_head(content) if final else False
        if fenced:  # the head never matched: not a call
            return self._fail_head(content)
        body = self._buf[:close]
        try:
            call = json.loads(body)
            name = call["name"]
            arguments = call.get("arguments", call.get("parameters", {}))
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, TypeError, KeyError, AttributeError):
            return self._fail_head(content)
        self._buf = self._buf[close + len(self._close) :]
        args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        self._start_call(name, pieces, end=self._close, tail="}")
        self._finish_call(args, pieces)
        return True

    def _step_r1_head(self, final: bool, content: list[str], pieces: list[ToolCallPiece]) -> bool:
        m = _R1_HEAD.match(self._buf)
        if m:
            self._buf = self._buf[m.end() :]
            self._start_call(m.group(2).strip(), pieces, end=R1_CALL_END, tail="`")
            self._state = "r1_fence"
            return True
        if R1_CALL_END in self._buf or final or len(self._buf) > 4096:
            return self._fail_head(content)
        return False

    def _step_r1_fence(self, final: bool, content: list[str], pieces: list[ToolCallPiece]) -> bool:
        """After R1's name line: an optional ```json fence line, which is not part of the arguments."""
        rest = self._buf.lstrip()
        if rest.startswith("```"):
            newline = rest.find("\n")
            if newline < 0:
                if not final:
                    return False
                rest = ""
            else:
                rest = rest[newline + 1 :]
        elif "```".startswith(rest) and not final:
            return False
        self._buf = rest
        self._state = "args"
        return True

    def _outer_close(self) -> int:
        """A bare call: the index in the arguments read so far of the '}' closing the call's object, or -1."""
        text, i = self._args, self._scan
        depth, in_str, esc = self._depth, self._in_str, self._esc
        found = -1
        while i < len(text):
            ch = text[i]
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    found = i
                    break
            i += 1
        self._scan, self._depth, self._in_str, self._esc = i, depth, in_str, esc
        return found

    def _step_args(self, final: bool, content: list[str], pieces: list[ToolCallPiece]) -> bool:
        # The end marker may have begun in what was held back of the arguments.
        start = max(0, len(self._args) - len(self._end) + 1)
        self._args += self._buf
        self._buf = ""
        if not self._end:  # bare: the call's object closing ends it
            end = self._outer_close()
            if end >= 0:
                self._buf = self._args[end + 1 :]
                self._finish_call(self._args[:end].strip(), pieces)
                return True
        else:
            end = self._args.find(self._end, start)
        if end < 0:
            region = self._args.lstrip()
            if final:
                self._emit_args(region, pieces)
                self._state = "text"
                return False
            keep = _partial_suffix(region, (self._end,)) if self._end else 0
            safe = len(region) - keep
            while safe > 0 and (region[safe - 1].isspace() or region[safe - 1] in self._tail):
                safe -= 1
            self._emit_args(region[:safe], pieces)
            return False
        self._buf = self._args[end + len(self._end) :]
        args = self._args[:end].strip()
        if self._tail == "}" and args.endswith("}"):
            args = args[:-1].rstrip()
        elif self._tail == "`" and args.endswith("```"):
            args = args[:-3].rstrip()
        self._finish_call(args, pieces)
        return True

    def _emit_args(self, text: str, pieces: list[ToolCallPiece]) -> None:
        if len(text) > self._sent:
            more = text[self._sent :]
            self._sent = len(text)
            self.calls[-1].arguments += more
            pieces.append(ToolCallPiece(index=self.calls[-1].index, arguments=more))

    def _finish_call(self, args: str, pieces: list[ToolCallPiece]) -> None:
        self._emit_args(args, pieces)
        self._state, self._trim, self._args = "text", True, ""
        self._bare_ok = bool(self._names)


def parse_tool_calls(
    text: str, *, new_id: Callable[[], str] = new_call_id, names: frozenset[str] = frozenset()
) -> tuple[str, list[ToolCallPiece]]:
    """Whole-text form: the content and the calls (one piece each) of ``text``."""
    parser = ToolCallParser(new_id=new_id, names=names)
    parser.feed(text)
    parser.finish()
    return "".join(parser.content_parts), parser.calls
