"""The upstream engine: one attempt at one target per ``generate`` call, its answer read as it arrives.

A request is posted with one deadline for the headers (and, for a JSON answer, its body); a stream's
reads then each get the idle deadline. Every read becomes at most one delta, and the read that ends the
stream becomes the final delta, its text included. The pieces it is made of: :mod:`.wire` (the body),
:mod:`.sse` (the events of a read, the response afterwards), :mod:`.normalise` (texts, finish reasons,
logprobs), :mod:`.usage`, :mod:`.errors` (which failure may be retried) and :mod:`.pool` (connections).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import replace
from typing import Any

import aiohttp

from r1serve.engines.base import (
    Delta,
    Engine,
    EngineUsage,
    FinishReason,
    GenerationRequest,
)
from r1serve.engines.upstream.config import Dialect, UpstreamConfig
from r1serve.engines.upstream.errors import (
    AttemptFailed,
    error_text,
    failure,
    log_detail,
    raise_for_status,
    scrub,
)
from r1serve.engines.upstream.normalise import (
    Malformed,
    Normaliser,
    ToolCallNormaliser,
    choice_logprobs,
    choice_texts,
    choice_tool_calls,
    finish_reason,
)
from r1serve.engines.upstream.pool import HttpClient
from r1serve.engines.upstream.sse import finish_response, read_events
from r1serve.engines.upstream.usage import (
    ApproxTokenCounter,
    TokenCounter,
    final_usage,
    parse_usage,
)
from r1serve.engines.upstream.wire import request_body
from r1serve.protocol import TokenLogprob, jsonfast
from r1serve.toolcalls import ToolCallPiece


class UpstreamEngine(Engine):
    """One upstream target (see the package's docstring for the one-attempt rule and the wire choices)."""

    def __init__(
        self,
        config: UpstreamConfig,
        client: HttpClient | None = None,
        *,
        tokens: TokenCounter | None = None,
    ) -> None:
        self.config = config
        self.name = f"upstream:{config.name}"
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
        self.config = replace(self.config, model=model)
        self._dialect = self.config.effective_dialect

    @property
    def dialect(self) -> Dialect:
        return self._dialect

    def scrub(self, text: str) -> str:
        """Upstream text without this target's key, cut to a message's length."""
        return scrub(text, self.config)

    # ------------------------------------------------------------------ health

    async def list_models(self, timeout: float | None = None) -> list[str]:
        """``GET {base}/models``: the ids upstream serves. Raises AttemptFailed."""
        t = self.config.timeouts
        try:
            async with asyncio.timeout(timeout if timeout is not None else t.connect + 5.0):
                async with self._client.session.get(
                    self._models_url, headers=self._headers, allow_redirects=False
                ) as resp:
                    if resp.status >= 300:
                        await raise_for_status(resp, self.config)
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

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        cfg = self.config
        t = cfg.timeouts
        chat = request.messages is not None
        body = request_body(request, cfg)
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
                # Redirects are not followed: each hop would re-send the prompt (and the key) to wherever
                # the Location header points; a moved upstream is a configuration to fix.
                resp = await session.post(url, data=body, headers=self._headers, allow_redirects=False)
                if resp.status < 300 and "text/event-stream" not in resp.headers.get("Content-Type", ""):
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
            raise failure(
                f"upstream {cfg.name} dropped the connection ({type(exc).__name__})", "connection_dropped", False
            ) from None
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        norm = Normaliser(self._dialect, chat=chat, eos_markers=cfg.eos_markers)
        calls = ToolCallNormaliser()
        if raw is not None:
            resp.release()  # all of it was read: the connection goes back to the pool
            # The whole answer in one delta: nothing can fail after it.
            yield self._whole(raw, request, norm, calls)
            return
        yielded = False
        complete = False
        try:
            if resp.status >= 300:
                await raise_for_status(resp, cfg)
            content = resp.content
            buf = b""
            finish: FinishReason | None = None
            usage: EngineUsage | None = None
            done = False
            want_logprobs = request.logprobs is not None
            # The text of the read that ended the stream: it goes out with the final delta.
            last_r = last_c = ""
            last_lps: list[TokenLogprob] = []
            last_calls: list[ToolCallPiece] = []
            while not done:
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await content.readany()
                except TimeoutError:
                    if finish is not None:
                        break  # finished but never said [DONE]: what we have is complete
                    phase = "idle" if yielded or buf else "first-byte"
                    secs = t.idle if phase == "idle" else first_wait
                    raise failure(
                        f"upstream {cfg.name} sent nothing for {secs:g}s ({phase} timeout)",
                        "timeout",
                        yielded,
                        retryable=False,  # as above: fail over, do not wait the same timeout again
                    ) from None
                if not data:  # end of body
                    break
                deadline = loop.time() + t.idle
                buf += data
                cut = buf.rfind(b"\n")
                if cut < 0:
                    continue
                events, done = read_events(buf, cut)
                buf = buf[cut + 1 :]
                if events is None:
                    raise failure(f"upstream {cfg.name} sent invalid JSON in its stream", "invalid_response", yielded)
                texts: list[tuple[str | None, str | None]] = []  # (content, reasoning) of this read's events
                lps: list[TokenLogprob] = []
                pieces: list[ToolCallPiece] = []
                try:
                    for event in events:
                        if type(event) is not dict:
                            raise Malformed
                        choices = event.get("choices")
                        if event.get("usage"):
                            usage = parse_usage(event["usage"]) or usage
                        if not choices:
                            if "error" in event:
                                log_detail(cfg, "reported an error in its stream", error_text(event["error"]))
                                raise failure(
                                    f"upstream {cfg.name} reported an error in its stream",
                                    "upstream_error",
                                    yielded,
                                )
                            continue
                        if type(choices) is not list or type(choices[0]) is not dict:
                            raise Malformed
                        choice = choices[0]
                        text, reasoning = choice_texts(choice, chat, "delta")
                        if text or reasoning:
                            texts.append((text, reasoning))
                        if chat and (raw_calls := choice_tool_calls(choice, "delta")):
                            pieces += calls.add(raw_calls)
                        if want_logprobs:
                            lps.extend(choice_logprobs(choice, chat))
                        fr = choice.get("finish_reason")
                        if fr:
                            finish = finish_reason(fr)
                except Malformed:
                    raise failure(
                        f"upstream {cfg.name} sent an event that is not a completion chunk", "invalid_response", yielded
                    ) from None
                r_out, c_out = norm.add_many(texts) if texts else ("", "")
                if done and finish is not None:
                    # Finish and [DONE] came with this text: one delta, not a text delta then the final one
                    # (each is a pass through the API's layers and a write to the client).
                    last_r, last_c, last_lps, last_calls = r_out, c_out, lps, pieces
                elif r_out or c_out or lps or pieces:
                    yielded = True
                    yield Delta(reasoning=r_out, content=c_out, logprobs=lps, tool_calls=pieces)
            if finish is None:
                if buf.strip():
                    raise failure(f"upstream {cfg.name} cut its stream mid-event", "truncated", yielded)
                raise failure(f"upstream {cfg.name} ended its stream without a finish reason", "truncated", yielded)
            r, c = norm.finish()
            yielded = complete = True
            yield Delta(
                reasoning=last_r + r,
                content=last_c + c,
                logprobs=last_lps,
                tool_calls=last_calls,
                finish_reason=finish,
                usage=final_usage(usage, request, norm, self.tokens),
            )
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise failure(
                f"upstream {cfg.name} dropped the connection ({type(exc).__name__})", "connection_dropped", yielded
            ) from None
        finally:
            finish_response(resp, complete=complete)

    def _whole(self, raw: bytes, request: GenerationRequest, norm: Normaliser, calls: ToolCallNormaliser) -> Delta:
        """A plain JSON answer (an upstream that ignores ``stream``)."""
        chat = request.messages is not None
        try:
            data = jsonfast.loads(raw)
            choices = data.get("choices") if type(data) is dict else None
            if type(choices) is not list or not choices or type(choices[0]) is not dict:
                raise Malformed
            choice = choices[0]
            content, reasoning = choice_texts(choice, chat, "message")
        except ValueError:  # not JSON (or Malformed: JSON, not a completion's shape)
            raise AttemptFailed(
                f"upstream {self.config.name} sent a body that is not a completion",
                kind="invalid_response",
                retryable=True,
            ) from None
        reasoning, content = norm.whole(content, reasoning)
        return Delta(
            reasoning=reasoning,
            content=content,
            logprobs=choice_logprobs(choice, chat) if request.logprobs is not None else [],
            tool_calls=calls.add(choice_tool_calls(choice, "message")) if chat else [],
            finish_reason=finish_reason(choice.get("finish_reason")),
            usage=final_usage(parse_usage(data.get("usage")), request, norm, self.tokens),
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
