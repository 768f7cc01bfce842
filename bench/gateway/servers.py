"""The processes the gateway benchmark runs, one per subcommand (see run.py):

* ``mock``: a fast OpenAI-compatible upstream, raw ASGI (no framework). ``stream: true`` gets eleven SSE
  events sent one by one (role, reasoning_content pieces, content pieces, finish, usage) and ``[DONE]``,
  the shape of vLLM with a reasoning parser; anything else gets the same answer as one JSON body.
* ``floor``: the thinnest possible proxy: raw ASGI, one pooled client (aiohttp or httpx), bytes passed
  through chunk by chunk, no parsing, no logic. The floor for any Python gateway.
* ``r1serve``: the real r1serve app (create_app: auth with a key, routing, normalisation, usage, cost,
  request ids, metrics, access log) with a one-off upstream route to the mock, as
  ``r1serve serve --upstream URL --reasoning-dialect reasoning_content`` builds it.

All run under uvicorn with uvloop and httptools, one worker, without uvicorn's proxy-headers middleware
(``r1serve serve`` runs without it: it never reads the client's address).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import uvicorn

# ----------------------------------------------------------------------------- mock upstream

_REASONING = ["Okay, ", "the user ", "says hello. ", "I should ", "greet back."]
_CONTENT = ["Hello! ", "How can ", "I help?"]


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _mock_bodies() -> tuple[list[bytes], bytes]:
    head = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": int(time.time()), "model": "mock-r1"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        return _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    usage = {"prompt_tokens": 9, "completion_tokens": 14, "total_tokens": 23,
             "completion_tokens_details": {"reasoning_tokens": 9}}  # fmt: skip
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"reasoning_content": r}) for r in _REASONING]
    events += [chunk({"content": c}) for c in _CONTENT]
    events.append(chunk({}, "stop"))
    events.append(_sse({**head, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    whole = json.dumps(
        {
            "id": "chatcmpl-mock", "object": "chat.completion", "created": head["created"], "model": "mock-r1",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "".join(_CONTENT), "reasoning_content": "".join(_REASONING)}}],
            "usage": usage,
        },
        separators=(",", ":"),
    ).encode()  # fmt: skip
    return events, whole


def mock_app() -> Any:
    events, whole = _mock_bodies()
    models = json.dumps({"object": "list", "data": [{"id": "mock-r1", "object": "model"}]}).encode()
    sse_headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
    json_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(whole)).encode())]
    models_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(models)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200, "headers": models_headers})
            await send({"type": "http.response.body", "body": models})
            return
        if b'"stream":true' in body or b'"stream": true' in body:
            await send({"type": "http.response.start", "status": 200, "headers": sse_headers})
            for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": json_headers})
        await send({"type": "http.response.body", "body": whole})

    return app


# ----------------------------------------------------------------------------- the floor proxy


def floor_app(upstream: str, client: str) -> Any:
    state: dict[str, Any] = {}

    async def lifespan(receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if client == "aiohttp":
                    import aiohttp

                    state["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                else:
                    import httpx

                    state["client"] = httpx.AsyncClient(
                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256), timeout=None
                    )
                await send({"type": "lifespan.startup.complete"})
            else:
                if "session" in state:
                    await state["session"].close()
                if "client" in state:
                    await state["client"].aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        url = upstream + scope["path"].removeprefix("/v1")
        headers = {"content-type": "application/json"}
        if client == "aiohttp":
            async with state["session"].post(url, data=body, headers=headers) as resp:
                await send({"type": "http.response.start", "status": resp.status,
                            "headers": [(b"content-type", resp.headers.get("content-type", "").encode())]})  # fmt: skip
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        else:
            async with state["client"].stream("POST", url, content=body, headers=headers) as resp:
                await send({"type": "http.response.start", "status": resp.status_code,
                            "headers": [(b"content-type", resp.headers.get("content-type", "").encode())]})  # fmt: skip
                async for chunk in resp.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


# ----------------------------------------------------------------------------- r1serve


async def serve_r1serve(port: int, upstream: str, log_file: str | None) -> None:
    from r1serve.api import create_app
    from r1serve.gateway import GatewayOptions, build_from_config, load_gateway_config
    from r1serve.logs import configure_logging
    from r1serve.settings import Settings

    settings = Settings(_env_file=None, api_keys=["sk-bench"], port=port)  # type: ignore[call-arg]
    configure_logging(settings.log_level)  # the product default: info, one access line per request
    if log_file:  # the product's own handler, writing to a file instead of stderr
        logging.getLogger().handlers[0].setStream(open(log_file, "a"))
    config = load_gateway_config(
        GatewayOptions(upstream=upstream, reasoning_dialect="reasoning_content", env_file=None), env={}
    )
    assert config is not None
    registry = await build_from_config(config)
    app = create_app(settings, registry=registry)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            loop="none",
            http="httptools",
            log_config=None,
            access_log=False,
            proxy_headers=False,
            backlog=4096,
        )  # fmt: skip  (as `r1serve serve`)
    )
    try:
        await server.serve()
    finally:
        from r1serve.routing.build import close_registry

        await close_registry(registry)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["mock", "floor", "r1serve"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp")
    parser.add_argument("--log-file")
    args = parser.parse_args()
    import uvloop

    if args.role == "r1serve":
        uvloop.run(serve_r1serve(args.port, args.upstream, args.log_file))
        return
    app = mock_app() if args.role == "mock" else floor_app(args.upstream, args.client)
    # No X-Forwarded-For rewriting (uvicorn's default wraps every app in it): nothing here reads the
    # client's address, as in r1serve.
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False, proxy_headers=False, backlog=4096)  # fmt: skip


if __name__ == "__main__":
    main()
