"""An engine that forwards to an OpenAI-compatible upstream (a provider, or vLLM / SGLang / llama-server /
Ollama on a GPU box) and normalises what comes back into r1serve's deltas.

One :class:`UpstreamEngine` is one target: one base URL, one key, one reasoning dialect. It makes exactly
one attempt per ``generate`` call; retries, failover, circuit breaking and health checks live one level
up, in :mod:`r1serve.gateway`, which needs to know whether anything has reached the client yet. The
rule here: an error before the first delta is yielded is an :class:`AttemptFailed` (the gateway may try
again, nothing was sent); an error after it is a plain :class:`~r1serve.errors.UpstreamError` (the API
turns it into an error event followed by ``[DONE]``).

Wire choices
------------
* A streaming client's request goes upstream with ``stream: true`` and ``stream_options.include_usage``
  (turn the latter off per provider with ``include_usage = false`` for servers that reject it): it is
  the only way to ask for usage on a stream, and idle timeouts need chunks. A client that wants one
  JSON answer (``GenerationRequest.stream`` False) gets it asked for as one JSON answer (``stream:
  false``): half the work on both sides, and the same normalisation (the whole text goes through the
  same parser as one piece). Such a request has no chunks to time: headers and body must arrive within
  ``Timeouts.whole``. An upstream that answers either way with the other shape is accepted too.
* The body is read as it arrives (``readany``), split into SSE lines, and every read becomes at most
  one delta: events that arrived in the same read are merged, nothing waits for more. The read that
  ends the stream (finish and ``[DONE]``) becomes the final delta, its text included.
* Reasoning is split with :class:`r1serve.reasoning.ReasoningParser`, so the result is identical to the
  embedded engine's for the same text. See :data:`Dialect` for how each dialect is read.
* History: the API already removed reasoning from earlier assistant turns
  (:func:`r1serve.reasoning.strip_reasoning_from_history`); here messages are serialised field by field
  and ``reasoning_content`` / ``reasoning`` are never sent, whatever the caller passed.
* Usage: upstream's when it sends one; otherwise counted locally with the configured
  :class:`TokenCounter` and marked ``estimated``.
* The API key is sent only in the Authorization header; it is never logged, never part of ``repr`` and
  scrubbed from any upstream error text before that text goes anywhere (:meth:`UpstreamEngine.scrub`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

import aiohttp
import orjson

import r1serve
from r1serve.engines.base import Delta, Engine, EngineUsage, FinishReason, GenerationRequest
from r1serve.errors import InvalidRequest, UpstreamError
from r1serve.models.catalog import detect_reasoning_format
from r1serve.protocol import ChatMessage, TokenLogprob, jsonfast
from r1serve.reasoning import THINK_CLOSE, ReasoningFormat, ReasoningParser, split_reasoning

log = logging.getLogger("r1serve.upstream")

Dialect = Literal["auto", "think_in_content", "think_tags", "reasoning_content", "reasoning", "none"]
"""How an upstream returns R1's reasoning.

Every dialect accepts the ``reasoning_content`` and ``reasoning`` fields (vLLM renamed one to the other;
Ollama and OpenRouter send ``reasoning``): when one arrives before any answer text, the answer text is
taken as plain answer. The dialects differ in how ``content`` is read when no such field comes:

* ``reasoning_content`` / ``reasoning``: content is the answer (its leading whitespace trimmed, as after
  ``</think>`` on the embedded path). AIML API, DeepSeek, OpenRouter, llama-server
  ``--reasoning-format deepseek``, vLLM / SGLang started with a reasoning parser.
* ``think_in_content``: content holds ``…</think>answer``; the opening tag may be missing because the
  chat template already opened it (vLLM without a reasoning parser, as in Nosana's R1 template). A
  leading ``<think>`` is dropped. Output that never closes the tag is all reasoning (content null),
  exactly as on the embedded path.
* ``think_tags``: reasoning only when content *starts* with ``<think>``; otherwise content is passed
  through untouched (DeepInfra's documented shape: plain content, no tags).
* ``none``: content is passed through untouched; reasoning fields, if any, still become reasoning.
* ``auto``: ``think_in_content`` when the upstream model's name looks like R1 (the catalog's
  :func:`~r1serve.models.catalog.detect_reasoning_format`), else ``think_tags``.
"""

DIALECTS: tuple[str, ...] = ("auto", "think_in_content", "think_tags", "reasoning_content", "reasoning", "none")


class TokenCounter(Protocol):
    """Counts tokens of text; ``exact`` is False for approximations."""

    exact: bool

    def count(self, text: str) -> int: ...


class ApproxTokenCounter:
    """About 4 characters per token (OpenAI's rule of thumb for English; R1's BPE on English text gives
    3.5-4.5). Used when no tokenizer is configured for the model; usage is marked estimated either way."""

    exact = False

    def count(self, text: str) -> int:
        return math.ceil(len(text) / 4) if text else 0


# Tokens a chat template adds per message (role markers) and once per prompt (BOS, assistant prefix),
# for the local prompt-token estimate: R1's template adds 1 per turn plus BOS and "<｜Assistant｜><think>\n".
_PER_MESSAGE_TOKENS = 1
_PER_PROMPT_TOKENS = 3


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``first_byte``: from sending the request to the first body bytes (headers included);
    ``idle``: the longest gap between two reads of the body; ``whole``: a non-streaming answer, all of it."""

    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 60.0
    # A non-streaming request (the client wants one JSON answer): the whole answer, from sending the
    # request; upstreams send nothing until the generation is done, so first_byte cannot apply.
    whole: float = 600.0

    def first_deadline(self, stream: bool) -> float:
        """Seconds allowed before the response headers."""
        return self.first_byte if stream else max(self.first_byte, self.whole)


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    base_url: str
    model: str | None = None
    # The key itself is never printed (repr=False); api_key_env names where it came from, for messages.
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    dialect: Dialect = "auto"
    timeouts: Timeouts = Timeouts()
    include_usage: bool = True
    # Literal end-of-sequence text some providers leak into content (DeepInfra's stream sends "</s>").
    eos_markers: tuple[str, ...] = ()
    # Request fields this upstream rejects; removed before sending.
    drop_params: tuple[str, ...] = ()

    @property
    def effective_dialect(self) -> Dialect:
        if self.dialect != "auto":
            return self.dialect
        if self.model and detect_reasoning_format(None, self.model) == "deepseek_r1":
            return "think_in_content"
        return "think_tags"


class AttemptFailed(UpstreamError):
    """One attempt failed before anything was yielded: the gateway may retry or fail over.

    ``retryable``: worth another try on the same target (connect error, timeout, 5xx, 429).
    ``failover``: worth trying another target (everything except a bad request).
    ``breaker``: counts against the target's circuit breaker.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        retryable: bool,
        failover: bool = True,
        breaker: bool = True,
        retry_after: float | None = None,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(message, code=kind)
        self.kind = kind
        self.retryable = retryable
        self.failover = failover
        self.breaker = breaker
        self.retry_after = retry_after
        self.upstream_status = upstream_status


class HttpClient:
    """The process's one pooled ``aiohttp.ClientSession`` (keep-alive), shared by every upstream engine.

    Reference counted: every engine ``acquire``s it in ``start`` and ``release``s it in ``close``; the
    session is created on first use (inside the running loop) and closed with the last user.
    """

    def __init__(self, *, limit: int = 0, keepalive_timeout: float = 30.0, connect_timeout: float = 10.0) -> None:
        self._limit = limit
        self._keepalive = keepalive_timeout
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None
        self._users = 0

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limit, limit_per_host=0, keepalive_timeout=self._keepalive, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Only the connect phase here; first byte and idle are enforced per request (see _stream).
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout, sock_read=None),
                headers={"User-Agent": f"r1serve/{r1serve.__version__}"},
                auto_decompress=True,
            )
        return self._session

    def acquire(self) -> None:
        self._users += 1

    async def release(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._session is not None:
            session, self._session = self._session, None
            await session.close()


# ----------------------------------------------------------------------------- secrets

_WORD = re.compile(r"[A-Za-z0-9_\-.]{8,}")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
_MAX_ERROR_TEXT = 500


def scrub_secret(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` and any 8+ character piece of it replaced, and Bearer tokens cut.

    Providers echo keys in 401 bodies, whole or partly masked ("sk-abcd****wxyz"); every word of the
    text that is a long-enough substring of the key goes.
    """
    text = _BEARER.sub(r"\1[redacted]", text)
    if not secret:
        return text
    # Case-blind: a body may echo the key upper-cased.
    text = re.sub(re.escape(secret), "[redacted]", text, flags=re.IGNORECASE)
    folded = secret.casefold()
    return _WORD.sub(lambda m: "[redacted]" if m.group(0).casefold() in folded else m.group(0), text)


# ----------------------------------------------------------------------------- normalisation


_FINISH: dict[str, FinishReason] = {"length": "length", "stop": "stop"}


def finish_reason(value: Any) -> FinishReason:
    """Upstream finish reasons mapped onto the two r1serve has (``eos``, ``tool_calls``... are stops)."""
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


def parse_usage(raw: Any) -> EngineUsage | None:
    if not isinstance(raw, dict):
        return None
    prompt = raw.get("prompt_tokens")
    completion = raw.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    usage = EngineUsage(prompt_tokens=prompt, completion_tokens=completion)
    details = raw.get("completion_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("reasoning_tokens"), int):
        usage.reasoning_tokens = details["reasoning_tokens"]
    else:
        usage.reasoning_tokens = -1  # unknown: filled in locally
    pdetails = raw.get("prompt_tokens_details")
    if isinstance(pdetails, dict) and isinstance(pdetails.get("cached_tokens"), int):
        usage.cached_tokens = pdetails["cached_tokens"]
    elif isinstance(raw.get("prompt_cache_hit_tokens"), int):  # DeepSeek's own API
        usage.cached_tokens = raw["prompt_cache_hit_tokens"]
    return usage


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def message_dict(message: ChatMessage) -> dict[str, Any]:
    """One message for the upstream body: never its reasoning fields."""
    out: dict[str, Any] = {"role": message.role}
    content = message.content
    if content is not None and not isinstance(content, str):
        content = [part.model_dump() for part in content]
    extra = message.model_extra
    if content is None and not (extra and "tool_calls" in extra):
        content = ""
    out["content"] = content
    if message.name is not None:
        out["name"] = message.name
    if extra:
        for key, value in extra.items():
            if key not in ("reasoning_content", "reasoning"):
                out[key] = value
    return out


# ----------------------------------------------------------------------------- the engine


class UpstreamEngine(Engine):
    def __init__(
        self,
        config: UpstreamConfig,
        client: HttpClient | None = None,
        *,
        tokens: TokenCounter | None = None,
    ) -> None:
        self.config = config
        self.name = f"upstream:{config.name}"
        self._own_client = client is None
        self._client = client or HttpClient(connect_timeout=config.timeouts.connect)
        self.tokens: TokenCounter = tokens or ApproxTokenCounter()
        base = config.base_url.rstrip("/")
        self._chat_url = base + "/chat/completions"
        self._completions_url = base + "/completions"
        self._models_url = base + "/models"
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream, application/json"}
        headers.update(config.headers)
        if config.api_key:
            headers["Authorization"] = f"Bearer {config.api_key}"
        self._headers = headers
        self._dialect: Dialect = config.effective_dialect
        self._users = 0

    def __repr__(self) -> str:
        return f"UpstreamEngine({self.config.name!r}, {self.config.base_url!r})"

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        self._users += 1
        if self._users == 1:
            self._client.acquire()

    async def close(self) -> None:
        if self._users == 0:
            return
        self._users -= 1
        if self._users == 0:
            await self._client.release()

    def set_model(self, model: str) -> None:
        """Adopt a model id discovered from ``GET /models`` (a one-off ``--upstream`` without a model)."""
        self.config = _replace(self.config, model=model)
        self._dialect = self.config.effective_dialect

    @property
    def dialect(self) -> Dialect:
        return self._dialect

    def scrub(self, text: str) -> str:
        return scrub_secret(text, self.config.api_key)[:_MAX_ERROR_TEXT]

    # ------------------------------------------------------------------ health

    async def list_models(self, timeout: float | None = None) -> list[str]:
        """``GET {base}/models``: the ids upstream serves. Raises AttemptFailed."""
        t = self.config.timeouts
        try:
            async with asyncio.timeout(timeout if timeout is not None else t.connect + 5.0):
                async with self._client.session.get(self._models_url, headers=self._headers) as resp:
                    if resp.status >= 400:
                        await self._raise_http_error(resp)
                    data = await resp.json(content_type=None)
        except AttemptFailed:
            raise
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise AttemptFailed(
                f"upstream {self.config.name}: health check failed ({type(exc).__name__})",
                kind="unreachable",
                retryable=True,
            ) from None
        items = data.get("data") if isinstance(data, dict) else data
        if not isinstance(items, list):
            return []
        return [str(m["id"]) for m in items if isinstance(m, dict) and "id" in m]

    # ------------------------------------------------------------------ requests

    def request_body(self, request: GenerationRequest) -> bytes:
        body: dict[str, Any] = dict(request.extra)
        model = request.model or self.config.model
        if model:
            body["model"] = model
        if request.messages is not None:
            body["messages"] = [message_dict(m) for m in request.messages]
        else:
            body["prompt"] = request.prompt or ""
        body["stream"] = request.stream
        if request.stream and self.config.include_usage:
            body["stream_options"] = {"include_usage": True}
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        # Every sampling field has its OpenAI / vLLM name; the unset ones are left to the upstream.
        body.update({key: value for key, value in vars(request.sampling).items() if value is not None})
        if request.stop:
            body["stop"] = request.stop
        # The upstream enforces the thinking budget, if it can: OpenAI's reasoning_effort, or r1serve's
        # (and compatible servers') max_reasoning_tokens. Servers ignore what they do not know;
        # a strict one can be given drop_params.
        if request.reasoning_effort is not None:
            body["reasoning_effort"] = request.reasoning_effort
        elif request.reasoning_budget is not None:
            body["max_reasoning_tokens"] = request.reasoning_budget
        if request.logprobs is not None:
            if request.messages is not None:
                body["logprobs"] = True
                if request.logprobs:
                    body["top_logprobs"] = request.logprobs
            else:
                body["logprobs"] = request.logprobs
        for key in self.config.drop_params:
            body.pop(key, None)
        return jsonfast.dumps(body)

    async def _raise_http_error(self, resp: aiohttp.ClientResponse) -> None:
        status = resp.status
        try:
            raw = await resp.content.read(16384)
        except (aiohttp.ClientError, TimeoutError):
            raw = b""
        text = raw.decode("utf-8", "replace")
        try:
            data = json.loads(text)
            err = data.get("error") if isinstance(data, dict) else None
            if isinstance(err, dict):
                text = str(err.get("message") or err)
            elif isinstance(err, str):
                text = err
            elif isinstance(data, dict) and "message" in data:
                text = str(data["message"])
        except ValueError:
            pass
        detail = self.scrub(text.strip()) or resp.reason or ""
        name = self.config.name
        if status == 429:
            raise AttemptFailed(
                f"upstream {name} is rate limiting (HTTP 429): {detail}",
                kind="rate_limited",
                retryable=True,
                breaker=False,
                retry_after=retry_after_seconds(resp.headers.get("Retry-After")),
                upstream_status=status,
            )
        if status >= 500 or status == 408:
            raise AttemptFailed(
                f"upstream {name} failed (HTTP {status}): {detail}",
                kind="upstream_unavailable",
                retryable=True,
                retry_after=retry_after_seconds(resp.headers.get("Retry-After")),
                upstream_status=status,
            )
        if status in (401, 403):
            # The body is not forwarded at all: it is about r1serve's credentials, not the client's request.
            where = f" (the key comes from ${self.config.api_key_env})" if self.config.api_key_env else ""
            raise AttemptFailed(
                f"upstream {name} rejected r1serve's credentials (HTTP {status}){where}",
                kind="upstream_auth",
                retryable=False,
                upstream_status=status,
            )
        if status == 404:
            raise AttemptFailed(
                f"upstream {name} answered 404 for model {self.config.model!r}: {detail}",
                kind="upstream_not_found",
                retryable=False,
                upstream_status=status,
            )
        # The request itself was refused (400, 413, 422...): the client's to fix; no retry, no failover.
        raise InvalidRequest(f"upstream {name} rejected the request (HTTP {status}): {detail}", code="upstream_rejected")

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        cfg = self.config
        t = cfg.timeouts
        chat = request.messages is not None
        body = self.request_body(request)
        url = self._chat_url if chat else self._completions_url
        session = self._client.session
        loop = asyncio.get_running_loop()
        first_wait = t.first_deadline(request.stream)
        deadline = loop.time() + first_wait
        resp: aiohttp.ClientResponse | None = None
        raw: bytes | None = None
        try:
            # One timer for the whole exchange when the answer is one JSON body: its headers and its body
            # are due by the same deadline. A stream's reads get their own (idle) deadlines below.
            async with asyncio.timeout_at(deadline):
                resp = await session.post(url, data=body, headers=self._headers)
                if resp.status < 400 and "text/event-stream" not in resp.headers.get("Content-Type", ""):
                    raw = await resp.read()
        except TimeoutError:
            if resp is not None:
                resp.close()
            # Not retried on this target: it has had its whole wait, and retrying would double what the
            # client waits (a JSON answer's 600 s by default). Other targets are still tried.
            raise AttemptFailed(
                f"upstream {cfg.name} sent no response within {first_wait:g}s", kind="timeout", retryable=False
            ) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            if resp is None:
                if not isinstance(exc, aiohttp.ClientError):
                    raise
                raise AttemptFailed(
                    f"could not reach upstream {cfg.name}: {type(exc).__name__}", kind="connect_error", retryable=True
                ) from None
            resp.close()
            raise self._failure(
                f"upstream {cfg.name} dropped the connection ({type(exc).__name__})", "connection_dropped", False
            ) from None
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        norm = Normaliser(self._dialect, chat=chat, eos_markers=cfg.eos_markers)
        if raw is not None:
            resp.release()  # all of it was read: the connection goes back to the pool
            # The whole answer in one delta: nothing can fail after it.
            yield self._whole(raw, request, norm)
            return
        yielded = False
        complete = False
        try:
            if resp.status >= 400:
                await self._raise_http_error(resp)
            content = resp.content
            buf = b""
            finish: FinishReason | None = None
            usage: EngineUsage | None = None
            done = False
            want_logprobs = request.logprobs is not None
            # The text of the read that ended the stream: it goes out with the final delta.
            last_r = last_c = ""
            last_lps: list[TokenLogprob] = []
            while not done:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await content.readany()
                except TimeoutError:
                    if finish is not None:
                        break  # finished but never said [DONE]: what we have is complete
                    phase = "idle" if yielded or buf else "first-byte"
                    secs = t.idle if phase == "idle" else first_wait
                    raise self._failure(
                        f"upstream {cfg.name} sent nothing for {secs:g}s ({phase} timeout)", "timeout", yielded,
                        retryable=False,  # as above: fail over, do not wait the same timeout again
                    ) from None
                if not data:  # end of body
                    break
                deadline = loop.time() + t.idle
                buf += data
                cut = buf.rfind(b"\n")
                if cut < 0:
                    continue
                # The data of the complete lines read so far (blank separators, ": keep-alive" comments
                # and event: names are not data lines), found in one pass of C code.
                payloads = _DATA_LINE.findall(buf, 0, cut)
                if buf.find(b"[DONE]", 0, cut) >= 0:
                    ends = [payload.rstrip() for payload in payloads]
                    if b"[DONE]" in ends:
                        payloads = payloads[: ends.index(b"[DONE]")]
                        done = True
                buf = buf[cut + 1 :]
                try:
                    events = [orjson.loads(payload) for payload in payloads]
                except orjson.JSONDecodeError:
                    events = _parse_events(payloads)
                    if events is None:
                        raise self._failure(
                            f"upstream {cfg.name} sent invalid JSON in its stream", "invalid_response", yielded
                        ) from None
                texts: list[tuple[str | None, str | None]] = []  # (content, reasoning) of this read's events
                lps: list[TokenLogprob] = []
                try:
                    for event in events:
                        if type(event) is not dict:
                            raise _Malformed
                        choices = event.get("choices")
                        if event.get("usage"):
                            usage = parse_usage(event["usage"]) or usage
                        if not choices:
                            if "error" in event:
                                raise self._failure(
                                    f"upstream {cfg.name} reported an error: {self.scrub(_error_text(event['error']))}",
                                    "upstream_error",
                                    yielded,
                                )
                            continue
                        if type(choices) is not list or type(choices[0]) is not dict:
                            raise _Malformed
                        choice = choices[0]
                        text, reasoning = _choice_texts(choice, chat, "delta")
                        if text or reasoning:
                            texts.append((text, reasoning))
                        if want_logprobs:
                            lps.extend(_logprobs(choice, chat))
                        fr = choice.get("finish_reason")
                        if fr:
                            finish = finish_reason(fr)
                except _Malformed:
                    raise self._failure(
                        f"upstream {cfg.name} sent an event that is not a completion chunk", "invalid_response", yielded
                    ) from None
                r_out, c_out = norm.add_many(texts) if texts else ("", "")
                if done and finish is not None:
                    # Finish and [DONE] came with this text: one delta, not a text delta then the final one
                    # (each is a pass through the API's layers and a write to the client).
                    last_r, last_c, last_lps = r_out, c_out, lps
                elif r_out or c_out or lps:
                    yielded = True
                    yield Delta(reasoning=r_out, content=c_out, logprobs=lps)
            if finish is None:
                if buf.strip():
                    raise self._failure(f"upstream {cfg.name} cut its stream mid-event", "truncated", yielded)
                raise self._failure(
                    f"upstream {cfg.name} ended its stream without a finish reason", "truncated", yielded
                )
            r, c = norm.finish()
            yielded = complete = True
            yield Delta(
                reasoning=last_r + r,
                content=last_c + c,
                logprobs=last_lps,
                finish_reason=finish,
                usage=self._usage(usage, request, norm),
            )
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise self._failure(
                f"upstream {cfg.name} dropped the connection ({type(exc).__name__})", "connection_dropped", yielded
            ) from None
        finally:
            # A finished response goes back to the pool (after reading the chunked terminator, which
            # usually arrived with [DONE]); a half-read one is closed, dropping the connection: that is
            # how a client that went away stops the upstream generation.
            if complete and resp.content.at_eof():
                resp.release()
            elif complete:
                # The terminator is usually one more TCP segment away: read it in the background rather
                # than make the client wait for it (a whole JSON answer is sent only after this runs).
                task = asyncio.get_running_loop().create_task(_drain_and_release(resp))
                _background.add(task)
                task.add_done_callback(_background.discard)
            else:
                resp.close()

    def _failure(self, message: str, kind: str, yielded: bool, *, retryable: bool = True) -> UpstreamError:
        if yielded:
            return UpstreamError(message, code=kind)
        return AttemptFailed(message, kind=kind, retryable=retryable)

    def _whole(self, raw: bytes, request: GenerationRequest, norm: Normaliser) -> Delta:
        """A plain JSON answer (an upstream that ignores ``stream``)."""
        chat = request.messages is not None
        try:
            data = jsonfast.loads(raw)
            choices = data.get("choices") if type(data) is dict else None
            if type(choices) is not list or not choices or type(choices[0]) is not dict:
                raise _Malformed
            choice = choices[0]
            content, reasoning = _choice_texts(choice, chat, "message")
        except ValueError:  # not JSON (or _Malformed: JSON, not a completion's shape)
            raise AttemptFailed(
                f"upstream {self.config.name} sent a body that is not a completion",
                kind="invalid_response",
                retryable=True,
            ) from None
        reasoning, content = norm.whole(content, reasoning)
        return Delta(
            reasoning=reasoning,
            content=content,
            logprobs=_logprobs(choice, chat) if request.logprobs is not None else [],
            finish_reason=finish_reason(choice.get("finish_reason")),
            usage=self._usage(parse_usage(data.get("usage")), request, norm),
        )

    def _usage(self, usage: EngineUsage | None, request: GenerationRequest, norm: Normaliser) -> EngineUsage:
        if usage is not None:
            if usage.reasoning_tokens < 0:  # upstream gave totals but no reasoning split
                reasoning = "".join(norm.reasoning_parts)
                usage.reasoning_tokens = min(usage.completion_tokens, self.tokens.count(reasoning)) if reasoning else 0
            return usage
        reasoning = "".join(norm.reasoning_parts)
        count = self.tokens.count
        r_tokens = count(reasoning) if reasoning else 0
        c_tokens = count("".join(norm.content_parts))
        # R1 spends a token each on <think>/</think> (and the template's own opening when present).
        tags = 1 if reasoning else 0
        if request.messages is not None:
            prompt = _PER_PROMPT_TOKENS + sum(_PER_MESSAGE_TOKENS + count(m.text()) for m in request.messages)
        else:
            prompt = count(request.prompt or "")
        return EngineUsage(
            prompt_tokens=prompt,
            completion_tokens=r_tokens + c_tokens + tags,
            reasoning_tokens=r_tokens,
            estimated=True,
        )

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "kind": "upstream",
            "provider": self.config.name,
            "base_url": self.config.base_url,
            "model": self.config.model,
            "dialect": self._dialect,
        }


_background: set[asyncio.Task[None]] = set()

# An SSE data line's value, from its first non-blank character to the end of the line. The trailing
# blanks (and the \r of a CRLF line end) are kept: JSON allows them, and a lazy match that left them
# out cost 20 times as much here.
_DATA_LINE = re.compile(rb"^data:[ \t]*(.*)$", re.MULTILINE)


def _parse_events(payloads: list[bytes]) -> list[Any] | None:
    """The events orjson refused, through the json module's extensions (NaN, huge integers): None when
    one of them is not JSON at all."""
    try:
        return [jsonfast.loads(payload) for payload in payloads]
    except ValueError:
        return None


async def _drain_and_release(resp: aiohttp.ClientResponse) -> None:
    """Read what is left of a finished response (the chunked terminator) so its connection is reused."""
    try:
        async with asyncio.timeout(1.0):
            while await resp.content.readany():
                pass
    except (TimeoutError, aiohttp.ClientError, ConnectionError):
        resp.close()
        return
    resp.release()


def _error_text(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


class _Malformed(ValueError):
    """Valid JSON that is not the shape of a completion or of a chunk of one (reported as invalid_response)."""


def _choice_texts(choice: dict[str, Any], chat: bool, field: str) -> tuple[str | None, str | None]:
    """``(content, reasoning)`` of an upstream choice, from any reasoning dialect's fields. ``field`` is
    where a chat choice keeps its message: "delta" in a stream's chunk, "message" in a whole answer (the
    other is read when it is missing). A message that is not an object, or a text that is not a string
    or null, raises _Malformed."""
    if chat:
        message = choice.get(field) or choice.get("message" if field == "delta" else "delta") or {}
        if type(message) is not dict:
            raise _Malformed
        text = message.get("content")
        reasoning = message.get("reasoning_content") or message.get("reasoning")
    else:
        text, reasoning = choice.get("text"), None
    if (text is None or type(text) is str) and (reasoning is None or type(reasoning) is str):
        return text, reasoning
    raise _Malformed


def _logprobs(choice: dict[str, Any], chat: bool) -> list[TokenLogprob]:
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


def _replace(config: UpstreamConfig, **changes: Any) -> UpstreamConfig:
    from dataclasses import replace

    return replace(config, **changes)
