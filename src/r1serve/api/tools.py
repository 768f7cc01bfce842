"""Function-calling fields checked before any work: ``tools``, ``tool_choice`` and the tool turns of the
history. Each refusal is a 400 naming the field, as OpenAI words them.

:func:`check_tools` is cheap (names and ids); :func:`check_tool_schemas` checks each function's
``parameters`` against the JSON Schema meta-schema and, like the response_format check, runs in a
worker thread.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import orjson

from r1serve.errors import InvalidRequest
from r1serve.protocol import ChatCompletionRequest, NamedToolChoice, Tool

# As for response_format's schema: the meta-schema check costs about 4 us per byte.
MAX_PARAMETERS_BYTES = 64 * 1024


def _bad(message: str, param: str, code: str = "invalid_value") -> InvalidRequest:
    return InvalidRequest(message, param=param, code=code)


def check_tools(req: ChatCompletionRequest) -> None:
    tools = req.tools or []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if name in names:
            raise _bad(f"tools[{i}]: the function name '{name}' is used twice.", f"tools[{i}].function.name")
        names.add(name)
        params = tool.function.parameters
        if params is not None and len(orjson.dumps(params)) > MAX_PARAMETERS_BYTES:
            raise _bad(
                f"tools[{i}].function.parameters is larger than {MAX_PARAMETERS_BYTES} bytes.",
                f"tools[{i}].function.parameters",
            )
    choice = req.tool_choice
    if choice is not None and choice != "none" and choice != "auto" and not tools:
        raise _bad("tool_choice needs tools: send the functions in 'tools'.", "tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise _bad(
            f"tool_choice names the function '{choice.function.name}', which is not among the tools "
            f"({', '.join(sorted(names))}).",
            "tool_choice.function.name",
        )
    _check_history(req)


def _check_history(req: ChatCompletionRequest) -> None:
    """Assistant tool calls carry JSON arguments; each tool turn answers a call made before it."""
    called: set[str] = set()
    for i, message in enumerate(req.messages):
        if message.role == "assistant" and message.tool_calls:
            for j, call in enumerate(message.tool_calls):
                where = f"messages[{i}].tool_calls[{j}].function.arguments"
                try:
                    json.loads(call.function.arguments)
                except ValueError:
                    raise _bad(f"{where} is not valid JSON: send the arguments as a JSON string.", where) from None
                called.add(call.id)
        elif message.role == "tool":
            if message.tool_call_id is None:
                raise _bad(
                    f"messages[{i}] has role 'tool' but no tool_call_id.",
                    f"messages[{i}].tool_call_id",
                    "missing_required_parameter",
                )
            if message.tool_call_id not in called:
                raise _bad(
                    f"messages[{i}].tool_call_id '{message.tool_call_id}' does not answer any tool call of an "
                    "earlier assistant message: messages with role 'tool' must be a response to a preceding "
                    "message with 'tool_calls'.",
                    f"messages[{i}].tool_call_id",
                )


def check_tool_schemas(tools: list[Tool] | None) -> None:
    """Each function's parameters checked against the meta-schema of the draft it names (2020-12 by
    default). Blocking: run in a worker thread."""
    for i, tool in enumerate(tools or []):
        schema: Any = tool.function.parameters
        if schema is None:
            continue
        param = f"tools[{i}].function.parameters"
        try:
            if not isinstance(schema.get("$schema", ""), str):
                raise _bad(f"{param}: $schema must be a string (a draft's URI).", param)
            validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
            validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path)
            raise _bad(
                f"{param} is not a valid JSON Schema: {exc.message}" + (f" (at /{where})" if where else ""), param
            ) from None
        except RecursionError:
            raise _bad(f"{param} is not a valid JSON Schema: it nests too deeply.", param) from None
        except (TypeError, AttributeError, ValueError) as exc:
            raise _bad(
                f"{param} is not a valid JSON Schema: it could not be read ({type(exc).__name__}).", param
            ) from None
