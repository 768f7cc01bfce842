"""Tool calls parsed out of an engine's answer text, for any engine: the embedded model writes them in its
template's format, and some providers return R1's tool-call tokens inside ``content``.

:func:`with_tool_calls` wraps a delta stream: the content goes through a
:class:`~r1serve.toolcalls.ToolCallParser`, calls come out as ``Delta.tool_calls`` (after any the engine
reported itself), and a generation that made calls and stopped finishes with ``"tool_calls"``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from r1serve.engines.base import Delta
from r1serve.toolcalls import ToolCallParser


async def with_tool_calls(
    stream: AsyncGenerator[Delta, None], names: frozenset[str] = frozenset()
) -> AsyncGenerator[Delta, None]:
    """``names``: the request's functions (a call in a Markdown fence must name one)."""
    parser = ToolCallParser(names=names)
    called = False
    started = False
    offset = 0  # calls the engine reported itself come first; parsed ones are numbered after them
    try:
        async for delta in stream:
            had_text = bool(delta.content)
            if delta.tool_calls:
                called = True
                offset = max(offset, *(p.index + 1 for p in delta.tool_calls))
            if had_text or delta.finish_reason is not None:
                content, pieces = parser.feed(delta.content) if had_text else ("", [])
                if delta.finish_reason is not None:
                    tail, more = parser.finish()
                    content += tail
                    pieces += more
                for piece in pieces:
                    piece.index += offset
                delta.content = content
                if pieces:
                    called = True
                    delta.tool_calls = [*delta.tool_calls, *pieces]
                if delta.finish_reason == "stop" and called:
                    delta.finish_reason = "tool_calls"
                held = not (delta.content or delta.tool_calls or delta.reasoning or delta.logprobs)
                if started and held and delta.finish_reason is None:
                    continue  # all of its text is held back (part of a call): nothing to send yet
            # The first delta always goes: it starts the response (a stream's first chunk) at the first
            # token, not once a call's name has been parsed.
            started = True
            yield delta
    finally:
        await stream.aclose()
