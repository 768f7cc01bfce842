"""Fake OpenAI-compatible upstreams: real aiohttp servers on loopback, speaking each reasoning dialect,
the exact response shapes from the providers' own documentation, and the broken behaviours a gateway
must survive.

Seed shapes (copied verbatim from the documentation pages; see tests/test_gateway_upstream.py):

* ``NOSANA_JSON``: Nosana's DeepSeek-R1 template (vLLM without a reasoning parser) answering
  ``POST /v1/chat/completions``: reasoning and answer both in ``content``, no opening ``<think>``,
  ``reasoning_content: null``, and vLLM's extra fields.
* ``AIML_JSON``: AIML API's documented ``deepseek/deepseek-r1`` answer: ``reasoning_content: ''`` and the
  answer with a leading newline (the page shows the emoji as mojibake, "ðŸ˜Š"; here it is the 😊 it was).
* ``DEEPINFRA_JSON`` / ``DEEPINFRA_STREAM_LINES``: DeepInfra's documented answer for
  ``deepseek-ai/DeepSeek-R1``: plain content, ``usage.estimated_cost``; the stream repeats the role in
  every delta, leaks a literal ``</s>``, sends no usage and ends with ``[DONE]``.

Each request takes the next :class:`Reply` from ``server.script`` (or ``server.default``); every
request's path, headers and JSON body are recorded in ``server.requests``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# ----------------------------------------------------------------------------- seed shapes

NOSANA_JSON = '{\n  "id": "chatcmpl-03680db79978401fbfd0ce64281bb1be",\n  "object": "chat.completion",\n  "created": 1765194200,\n  "model": "DeepSeek-R1-Distill-Qwen-1.5B",\n  "choices": [\n    {\n      "index": 0,\n      "message": {\n        "role": "assistant",\n        "content": "Okay, so I need to come up with a short fun fact about the Roman Empire. Let me start by recalling what I know about the Roman Empire. It was one of the most influential empires in history, right? They ruled for about 2,000 years. They made a lot of contributions to different fields like law, literature, and engineering. I also remember that they had a lot of symbols, like the tentacle and cross for the君emere. \\n\\nHmm, I need to make a fun fact, so I should think of something that\'s interesting but not too obscure. Maybe something about their achievements. How about their road construction? I think they built a lot of roads, especially for their soldiers. That must have been a big deal because it made traveling easier and faster. So, maybe a fact about their ability to build roads quickly and efficiently.\\n\\nWait, is there anything else? Maybe something about their philosophy or how they organized their society. I remember they had a complex society with a mix of classes. Maybe something about how they kept the peace or their celebration methods. But probably the road construction fact is the best one because it\'s both fun and informative.\\n\\nLet me check if I can find a specific reference to this. I think I read somewhere that they built one of the world\'s longest roads, the .\\nWait, no, that\'s a specific road. Maybe it\'s a general fact about their road-building techniques. Yeah, that sounds right. So, putting it together: the Roman Empire\'s ability to build long, narrow roads quickly and efficiently made their travel easier and faster than ever before, which was a significant contribution to their society.\\n\\nI think that\'s a solid fact. It\'s interesting because it highlights their ingenuity and the impact of their engineering on the world. I don\'t see any inaccuracies in that thought process, so I\'ll go with this.\\n</think>\\n\\nThe Roman Empire\'s remarkable ability to construct long, narrow roads quickly and efficiently was a testament to their ingenuity. These roads, often referred to as the \\"Luncius,\\" facilitated easy travel for their military forces and soldiers, making their journey across the Mediterranean and across the globe more accessible and faster than ever before. This engineering achievement was a cornerstone of their societal development, enhancing their mobility and resilience, thus significantly influencing the world\'s history.",\n        "refusal": null,\n        "annotations": null,\n        "audio": null,\n        "function_call": null,\n        "tool_calls": [],\n        "reasoning_content": null\n      },\n      "logprobs": null,\n      "finish_reason": "stop",\n      "stop_reason": null,\n      "token_ids": null\n    }\n  ],\n  "service_tier": null,\n  "system_fingerprint": null,\n  "usage": {\n    "prompt_tokens": 21,\n    "total_tokens": 498,\n    "completion_tokens": 477,\n    "prompt_tokens_details": null\n  },\n  "prompt_logprobs": null,\n  "prompt_token_ids": null,\n  "kv_transfer_params": null\n}'

AIML_JSON = '{"id": "npPT68N-zqrih-92d94499ec25b74e", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null, "message": {"role": "assistant", "content": "\\nHello! How can I assist you today? 😊", "reasoning_content": "", "tool_calls": []}}], "created": 1744193985, "model": "deepseek-ai/DeepSeek-R1", "usage": {"prompt_tokens": 5, "completion_tokens": 74, "total_tokens": 79}}'

DEEPINFRA_JSON = '{\n    "id": "chatcmpl-guMTxWgpFf",\n    "object": "chat.completion",\n    "created": 1694623155,\n    "model": "deepseek-ai/DeepSeek-R1",\n    "choices": [\n        {\n            "index": 0,\n            "message": {\n                "role": "assistant",\n                "content": " Hello! It\'s nice to meet you. Is there something I can help you with or would you like to chat for a bit?"\n            },\n            "finish_reason": "stop"\n        }\n    ],\n    "usage": {\n        "prompt_tokens": 15,\n        "completion_tokens": 16,\n        "total_tokens": 31,\n        "estimated_cost": 0.0000268\n    }\n}'

DEEPINFRA_STREAM_LINES = (
    'data: {"id": "Rc5hsIPHOSfMP3rNSFUw9tfR", "object": "chat.completion.chunk", "created": 1694623354, "model": "deepseek-ai/DeepSeek-R1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": " "}, "finish_reason": null}]}',
    'data: {"id": "Rc5hsIPHOSfMP3rNSFUw9tfR", "object": "chat.completion.chunk", "created": 1694623354, "model": "deepseek-ai/DeepSeek-R1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": " Hi"}, "finish_reason": null}]}',
    'data: {"id": "Rc5hsIPHOSfMP3rNSFUw9tfR", "object": "chat.completion.chunk", "created": 1694623354, "model": "deepseek-ai/DeepSeek-R1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "!"}, "finish_reason": null}]}',
    'data: {"id": "Rc5hsIPHOSfMP3rNSFUw9tfR", "object": "chat.completion.chunk", "created": 1694623354, "model": "deepseek-ai/DeepSeek-R1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}',
    'data: {"id": "Rc5hsIPHOSfMP3rNSFUw9tfR", "object": "chat.completion.chunk", "created": 1694623354, "model": "deepseek-ai/DeepSeek-R1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "</s>"}, "finish_reason": null}]}',
    'data: {"id": "Rc5hsIPHOSfMP3rNSFUw9tfR", "object": "chat.completion.chunk", "created": 1694623354, "model": "deepseek-ai/DeepSeek-R1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}',
)


# ----------------------------------------------------------------------------- behaviours


@dataclass
class Reply:
    """What the fake answers to one request.

    kind:
      ``stream``   SSE (or JSON when the request has ``stream: false``) built from ``fields``
      ``json``     ``body`` as given, Content-Type application/json, whatever the request asked
      ``sse``      ``lines`` as given (each followed by a blank line), text/event-stream
      ``status``   HTTP ``status`` with ``body`` and ``headers`` (errors: 500, 429 + Retry-After, 401...)
      ``drop``     stream ``drop_after`` chunks, then abort the TCP connection
      ``truncated`` stream ``drop_after`` chunks, then end the body cleanly without finish or [DONE]
      ``cut``      stream ``drop_after`` chunks, then half a JSON event, then end the body
      ``invalid_json`` a ``data:`` line that is not JSON after ``drop_after`` chunks
    fields: (delta field, text) in order; each text is sent ``chunk`` characters at a time, so tags
      split across chunk boundaries.
    """

    kind: str = "stream"
    fields: list[tuple[str, str]] = field(
        default_factory=lambda: [("reasoning_content", "Thinking."), ("content", "Answer.")]
    )
    chunk: int = 5
    usage: bool = True  # send usage when stream_options.include_usage asks for it (always on JSON)
    finish_reason: str = "stop"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    lines: tuple[str, ...] = ()
    first_byte_delay: float = 0.0  # before the response headers
    chunk_delay: float = 0.0  # between chunks
    drop_after: int = 2
    role_in_every_delta: bool = False
    model: str = "fake-r1"


def think_content(reasoning: str, answer: str, *, open_tag: bool = False) -> list[tuple[str, str]]:
    """R1's raw output in ``content``: ``[<think>]reasoning</think>answer``."""
    text = ("<think>\n" if open_tag else "") + reasoning + "\n</think>\n\n" + answer
    return [("content", text)]


class FakeUpstream:
    def __init__(self, *, default: Reply | None = None, model: str = "fake-r1", api_key: str | None = None) -> None:
        self.default = default or Reply()
        self.script: deque[Reply] = deque()
        self.model = model
        self.api_key = api_key  # when set, a wrong Authorization gets 401 echoing the key sent
        self.requests: list[dict[str, Any]] = []
        self.models_status = 200
        self.models_calls = 0
        self.connections = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def push(self, *replies: Reply) -> None:
        self.script.extend(replies)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self.base_url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ handlers

    async def _models(self, request: web.Request) -> web.Response:
        self.models_calls += 1
        if self.models_status != 200:
            return web.json_response({"error": {"message": "down"}}, status=self.models_status)
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    def _chunk(
        self, reply: Reply, delta: dict[str, Any] | None, finish: str | None = None, *, text: bool = False
    ) -> bytes:
        if text:
            choice: dict[str, Any] = {"index": 0, "text": (delta or {}).get("content", ""), "finish_reason": finish}
        else:
            d = dict(delta or {})
            if reply.role_in_every_delta and delta is not None:
                d = {"role": "assistant", **d}
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        event = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": reply.model,
            "choices": [choice],
        }
        return b"data: " + json.dumps(event).encode() + b"\n\n"

    def _pieces(self, reply: Reply) -> list[dict[str, str]]:
        out = []
        for name, text in reply.fields:
            for i in range(0, len(text), reply.chunk):
                out.append({name: text[i : i + reply.chunk]})
        return out

    def _usage(self, body: dict[str, Any], reply: Reply) -> dict[str, int]:
        prompt = sum(len(str(m.get("content", ""))) for m in body.get("messages", [])) // 4 + 3
        completion = sum(len(t) for _, t in reply.fields) // 4 + 1
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body, "peer": peer})
        reply = self.script.popleft() if self.script else self.default
        if self.api_key is not None:
            auth = request.headers.get("Authorization", "")
            if auth != f"Bearer {self.api_key}":
                sent = auth.removeprefix("Bearer ")
                return web.json_response(
                    {
                        "error": {
                            "message": f"Incorrect API key provided: {sent}. You can find your API key at "
                            "https://example.invalid/keys.",
                            "type": "invalid_request_error",
                        }
                    },
                    status=401,
                )
        if reply.first_byte_delay:
            await asyncio.sleep(reply.first_byte_delay)
        if reply.kind == "status":
            return web.Response(
                status=reply.status, text=reply.body, headers=reply.headers, content_type="application/json"
            )
        if reply.kind == "json":
            return web.Response(text=reply.body, content_type="application/json")
        text_api = request.path.endswith("/completions") and not request.path.endswith("chat/completions")
        if reply.kind == "stream" and not body.get("stream"):
            return web.json_response(self._whole(body, reply, text_api))

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if reply.kind == "sse":
            for line in reply.lines:
                await resp.write(line.encode() + b"\n\n")
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
            await resp.write_eof()
            return resp
        if not text_api:
            await resp.write(self._chunk(reply, {"role": "assistant", "content": ""}))
        for n, piece in enumerate(self._pieces(reply)):
            if reply.kind in ("drop", "truncated", "cut", "invalid_json") and n == reply.drop_after:
                if reply.kind == "drop":
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if reply.kind == "cut":
                    await resp.write(self._chunk(reply, piece)[:25])
                if reply.kind == "invalid_json":
                    await resp.write(b"data: {this is not json}\n\n")
                    await asyncio.sleep(0.5)
                await resp.write_eof()
                return resp
            await resp.write(self._chunk(reply, piece, text=text_api))
            if reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
        await resp.write(self._chunk(reply, {}, reply.finish_reason, text=text_api))
        opts = body.get("stream_options") or {}
        if reply.usage and opts.get("include_usage"):
            event = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": reply.model,
                "choices": [],
                "usage": self._usage(body, reply),
            }
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _whole(self, body: dict[str, Any], reply: Reply, text_api: bool) -> dict[str, Any]:
        joined: dict[str, str] = {}
        for name, text in reply.fields:
            joined[name] = joined.get(name, "") + text
        if text_api:
            choice: dict[str, Any] = {
                "index": 0,
                "text": joined.get("content", ""),
                "finish_reason": reply.finish_reason,
            }
        else:
            choice = {"index": 0, "message": {"role": "assistant", **joined}, "finish_reason": reply.finish_reason}
        out: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": reply.model,
            "choices": [choice],
        }
        if reply.usage:
            out["usage"] = self._usage(body, reply)
        return out
