"""``tool_choice: "required"`` and a named function on the embedded engine: the answer decoded under a
grammar that admits only calls, in the format of the model's own template, with each function's
arguments following its ``parameters`` schema.

The grammar is built from llama-cpp-python's schema converter (as response_format's is, grammar.py):
one arguments rule per function, and a root rule that writes the call markers around them::

    qwen: "<tool_call>\\n{\\"name\\": \\"NAME\\", \\"arguments\\": " ARGS "}\\n</tool_call>"
    r1:   "<｜tool▁calls▁begin｜>" ( "<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n" ARGS
          "\\n```<｜tool▁call▁end｜>" )+ "<｜tool▁calls▁end｜>"

With ``parallel_tool_calls`` (the default) the calls may repeat; without it there is exactly one. After
the grammar completes only end-of-generation tokens are allowed, so the answer is the calls alone; the
tool-call parser (r1serve.toolcalls) reads them as it reads free output.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from llama_cpp.llama_grammar import SchemaConverter

from r1serve.engines.llama.grammar import _CHAR_RULE, _enforceable
from r1serve.errors import InvalidRequest
from r1serve.protocol import NamedToolChoice, Tool, ToolChoice
from r1serve.toolcalls import QWEN_CLOSE, QWEN_OPEN, R1_CALL_BEGIN, R1_CALL_END, R1_CALLS_BEGIN, R1_CALLS_END, R1_SEP

ToolFormat = Literal["qwen", "r1"]


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # GBNF takes JSON's escapes for quotes, backslashes, newlines


def constrains(tool_choice: ToolChoice | None) -> bool:
    return tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)


def compile_tool_choice(
    tools: list[Tool], tool_choice: ToolChoice | None, *, parallel: bool, fmt: ToolFormat
) -> str | None:
    """The GBNF for a constraining ``tool_choice`` (None for ``auto``/``none``: the answer is free).
    Raises InvalidRequest naming the function whose parameters cannot be compiled."""
    if not constrains(tool_choice):
        return None
    chosen = [
        (i, t)
        for i, t in enumerate(tools)
        if not isinstance(tool_choice, NamedToolChoice) or t.function.name == tool_choice.function.name
    ]
    make: Any = SchemaConverter  # untyped, as in grammar.py
    converter: Any = make(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    alternatives = []
    for i, tool in chosen:
        params = tool.function.parameters or {"type": "object"}
        try:
            resolved = converter.resolve_refs(json.loads(json.dumps(_enforceable(params))), f"tool{i}")
            rule = converter.visit(resolved, f"args-{i}")
        except (AssertionError, KeyError, ValueError, TypeError, IndexError, RecursionError) as exc:
            raise InvalidRequest(
                f"tools[{i}].function.parameters cannot be compiled to a grammar: {exc or type(exc).__name__}",
                param=f"tools[{i}].function.parameters",
                code="unsupported_value",
            ) from None
        name = tool.function.name
        if fmt == "qwen":
            head = f'{QWEN_OPEN}\n{{"name": "{name}", "arguments": '
            alternatives.append(f"{_literal(head)} {rule} {_literal(chr(125) + chr(10) + QWEN_CLOSE)}")
        else:
            head = f"{R1_CALL_BEGIN}function{R1_SEP}{name}\n```json\n"
            alternatives.append(f"{_literal(head)} {rule} {_literal(chr(10) + '```' + R1_CALL_END)}")
    converter._add_rule("call", " | ".join(f"( {a} )" for a in alternatives))
    if fmt == "qwen":
        root = 'call ( "\\n" call )*' if parallel else "call"
    else:
        calls = 'call ( "\\n" call )*' if parallel else "call"
        root = f"{_literal(R1_CALLS_BEGIN)} {calls} {_literal(R1_CALLS_END)}"
    converter._add_rule("root", root)
    rules: dict[str, str] = converter._rules
    if "char" in rules:
        rules["char"] = _CHAR_RULE
    return str(converter.format_grammar())
