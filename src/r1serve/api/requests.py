"""OpenAI requests in, engine requests out: the body parsed and validated, then mapped to a
:class:`~r1serve.engines.base.GenerationRequest`.

Bodies are parsed here rather than by FastAPI's body injection so that every parse or validation
failure becomes an OpenAI 400 with the failing field in ``param`` (the content type was checked before,
by the browser guard: api/guard.py).
"""

from __future__ import annotations

import json
import sys
from typing import Any, TypeVar

import jsonschema
import orjson
from pydantic import BaseModel, ValidationError

from r1serve.api.errors import validation_error
from r1serve.api.tools import check_tools
from r1serve.engines.base import GenerationRequest, SamplingParams
from r1serve.errors import InvalidRequest
from r1serve.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ResponseFormat
from r1serve.reasoning import strip_reasoning_from_history
from r1serve.routing import ServedModel
from r1serve.settings import Settings

M = TypeVar("M", bound=BaseModel)

# ----------------------------------------------------------------------------- bodies

_TOO_DEEP = "The request body nests arrays or objects too deeply."


def json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequest("The request has no body; send a JSON object.", code="missing_required_parameter")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # CPython's cap on digits (sys.int_info)
            raise InvalidRequest(
                f"A number in the request body has more than {sys.get_int_max_str_digits()} digits.",
                code="invalid_value",
            ) from None
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}). Send a JSON object "
            "with Content-Type: application/json."
        ) from None
    except UnicodeDecodeError as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request ({exc}). Send a JSON object "
            "with Content-Type: application/json."
        ) from None
    except RecursionError:
        raise InvalidRequest(_TOO_DEEP) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    # The json module takes what pydantic's parser (the fast path) refuses and nothing downstream can
    # handle: "\ud800" escapes that pair with nothing (no UTF-8 for the tokenizer or an upstream), and
    # nesting deep enough to exhaust the stack when a message is copied. orjson refuses both.
    try:
        orjson.dumps(data)
    except orjson.JSONEncodeError as exc:
        if "surrogate" in str(exc):
            raise InvalidRequest(
                "The request body has a \\u escape of half a UTF-16 surrogate pair (e.g. \\ud800 alone); "
                "text must be valid Unicode."
            ) from None
        if "ecursion" in str(exc):  # orjson's "Recursion limit reached" (no more exact way to tell)
            raise InvalidRequest(_TOO_DEEP) from None
        # Anything else orjson refuses (integers past 64 bits) is the json module's to accept.
    return data


def parse_raw(raw: bytes, model: type[M]) -> M:
    """A request body (bytes) as ``model``; any failure is an InvalidRequest (400) naming the field."""
    try:
        # pydantic parses and validates the bytes in one pass, a little more than twice as fast as
        # json.loads + model_validate; a body it refuses takes the path below, which words the error.
        return model.model_validate_json(raw)
    except ValidationError:
        pass
    data = json_object(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


# ----------------------------------------------------------------------------- generation requests


def _sampling(req: ChatCompletionRequest | CompletionRequest, defaults: dict[str, float]) -> SamplingParams:
    # The model's recommended values (R1: temperature 0.6, top_p 0.95) fill what the client omitted.
    top_k = req.top_k
    if top_k is None and "top_k" in defaults:
        top_k = int(defaults["top_k"])
    return SamplingParams(
        temperature=req.temperature if req.temperature is not None else defaults.get("temperature"),
        top_p=req.top_p if req.top_p is not None else defaults.get("top_p"),
        top_k=top_k,
        min_p=req.min_p if req.min_p is not None else defaults.get("min_p"),
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
    )


def _check_n(n: int) -> None:
    if n != 1:
        raise InvalidRequest(
            f"n={n} is not supported: r1serve generates one choice per request; send n parallel requests instead.",
            param="n",
            code="unsupported_value",
        )


def reasoning_budget(req: ChatCompletionRequest, settings: Settings) -> int | None:
    """``max_reasoning_tokens`` if given, else the budget for ``reasoning_effort``, else unlimited."""
    if req.max_reasoning_tokens is not None:
        return req.max_reasoning_tokens
    if req.reasoning_effort is None:
        return None
    return {
        "low": settings.reasoning_budget_low,
        "medium": settings.reasoning_budget_medium,
        "high": settings.reasoning_budget_high,
    }[req.reasoning_effort]


def check_messages(req: ChatCompletionRequest, settings: Settings) -> None:
    """Refuse more messages than ``settings.max_messages`` before any work is done for them (resolving
    the model, rendering, counting), worded as OpenAI words it. Called by the chat handler right after
    parsing."""
    if len(req.messages) > settings.max_messages:
        raise _too_many_messages(len(req.messages), settings)


def precheck_messages(raw: bytes, settings: Settings) -> None:
    """:func:`check_messages` before parsing, for bodies that may hold too many messages: validating the
    issue's 110,000 messages into models took 0.74 s of the event loop, decoding them with orjson 0.06 s.
    Every message has a ``"role"`` key, so a body with fewer of those than the limit is left alone (and one
    that spells the key with escapes is still refused after parsing)."""
    if raw.count(b'"role"') <= settings.max_messages:
        return
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return  # parse_raw words the error
    messages = data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list) and len(messages) > settings.max_messages:
        raise _too_many_messages(len(messages), settings)


def _too_many_messages(n: int, settings: Settings) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid 'messages': array too long. Expected an array with maximum length "
        f"{settings.max_messages}, but got an array with length {n} instead.",
        param="messages",
        code="array_above_max_length",
    )


# A schema's size bound: the meta-schema check costs about 4 us per byte here (a 42 KB schema 0.17 s), and
# OpenAI's strict mode allows 100 properties and 5 levels, far below it.
MAX_SCHEMA_BYTES = 64 * 1024


def response_format(fmt: ResponseFormat | None) -> ResponseFormat | None:
    """``response_format`` checked for shape: a ``json_schema`` needs its object, its schema a bounded size and
    ``$schema`` (when given) a string. :func:`check_json_schema` checks the schema itself, off the loop."""
    if fmt is None or fmt.type != "json_schema":
        return fmt
    if fmt.json_schema is None:
        raise InvalidRequest(
            'response_format of type json_schema needs a json_schema object: {"name": ..., "schema": {...}}.',
            param="response_format.json_schema",
            code="missing_required_parameter",
        )
    schema = fmt.json_schema.schema_
    if schema is None:
        return fmt
    if len(orjson.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise _bad_schema(f"it is larger than {MAX_SCHEMA_BYTES} bytes")
    if isinstance(schema, dict) and not isinstance(schema.get("$schema", ""), str):
        raise _bad_schema("$schema must be a string (a draft's URI)")
    return fmt


def check_json_schema(fmt: ResponseFormat | None) -> None:
    """The schema checked against the meta-schema of the draft it names (2020-12 by default). Blocking
    (tens of milliseconds for a large schema): the serving code runs it in a worker thread. What a backend
    can enforce of the schema is the engine's to check."""
    if fmt is None or fmt.json_schema is None or fmt.json_schema.schema_ is None:
        return
    schema = fmt.json_schema.schema_
    try:
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise _bad_schema(exc.message + (f" (at /{where})" if where else "")) from None
    except RecursionError:
        raise _bad_schema("it nests too deeply") from None
    except (TypeError, AttributeError, ValueError) as exc:  # a $schema or keyword the library cannot read
        raise _bad_schema(f"it could not be read ({type(exc).__name__})") from None


def _bad_schema(why: str) -> InvalidRequest:
    return InvalidRequest(
        f"response_format.json_schema.schema is not a valid JSON Schema: {why}",
        param="response_format.json_schema.schema",
        code="invalid_value",
    )


def chat_generation_request(
    req: ChatCompletionRequest, served: ServedModel, settings: Settings, request_id: str
) -> GenerationRequest:
    _check_n(req.n)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs: true.", param="top_logprobs", code="invalid_value")
    check_tools(req)
    return GenerationRequest(
        request_id=request_id,
        messages=_history(req.messages),
        # None: the engine uses settings.default_max_tokens, capped to what the context has left.
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        sampling=_sampling(req, served.entry.sampling_defaults),
        stop=req.stop_list(),
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        reasoning_budget=reasoning_budget(req, settings),
        reasoning_effort=req.reasoning_effort,
        model=served.engine_model,
        extra=dict(req.model_extra or {}),
        response_format=response_format(req.response_format),
        tools=req.tools or None,
        tool_choice=req.tool_choice,
        parallel_tool_calls=req.parallel_tool_calls if "parallel_tool_calls" in req.model_fields_set else None,
        stream=req.stream,
        cache_salt=req.cache_salt,
    )


def _history(messages: list[ChatMessage]) -> list[ChatMessage]:
    """R1's multi-turn rule: earlier answers go back without their reasoning. Without an earlier answer
    there is nothing to strip, and the request's own messages go as they are (nothing downstream
    changes them; the copies cost more than the rest of the request's mapping)."""
    for message in messages:
        if message.role == "assistant":
            return strip_reasoning_from_history(messages)
    return messages


def completion_prompt(req: CompletionRequest) -> str:
    if isinstance(req.prompt, str):
        return req.prompt
    if len(req.prompt) != 1:
        raise InvalidRequest(
            f"prompt must be a string or a list of one string (got {len(req.prompt)}); send one request per prompt.",
            param="prompt",
            code="unsupported_value",
        )
    return req.prompt[0]


def completion_generation_request(
    req: CompletionRequest, served: ServedModel, settings: Settings, request_id: str
) -> GenerationRequest:
    _check_n(req.n)
    # Echo with logprobs scores the prompt too (lm-evaluation-harness computes loglikelihoods this way).
    score_prompt = req.echo and req.logprobs is not None
    if score_prompt and not served.engine.scores_prompts:
        raise InvalidRequest(
            f"echo with logprobs needs the prompt's logprobs, which {served.engine.name} does not give; "
            "send echo or logprobs, not both.",
            param="echo",
            code="unsupported_value",
        )
    return GenerationRequest(
        request_id=request_id,
        prompt=completion_prompt(req),
        max_tokens=req.max_tokens,
        sampling=_sampling(req, served.entry.sampling_defaults),
        stop=req.stop_list(),
        logprobs=req.logprobs,
        prompt_logprobs=score_prompt,
        model=served.engine_model,
        extra=dict(req.model_extra or {}),
        response_format=response_format(req.response_format),
        stream=req.stream,
        cache_salt=req.cache_salt,
    )
