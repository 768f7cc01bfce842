"""An experiment replica for latency_why.py (run by the command engine): answers every chat request with
the body an r1serve replica of the default model sends for a one-token answer, after MOCK2_WORK:
``none`` (at once), ``sleep`` (waits MOCK2_MS ms without CPU), ``spin`` (busy MOCK2_MS ms) or ``mem``
(streams a 400 MB array for MOCK2_MS ms, as a model's weights go through the caches). Comparing them
separates "the replica is slow" from "the replica uses the CPU" from "the answer differs"."""

import argparse
import asyncio
import json
import os
import time

import uvicorn

MODE = os.environ.get("MOCK2_WORK", "none")
MS = float(os.environ.get("MOCK2_MS", "20"))
WHOLE = json.dumps(
    {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "qwen2.5-coder-0.5b-instruct",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "reasoning_content": None},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {
            "prompt_tokens": 32,
            "completion_tokens": 1,
            "total_tokens": 33,
            "prompt_tokens_details": {"cached_tokens": 31},
            "completion_tokens_details": {"reasoning_tokens": 0},
            "estimated_cost": 0.0,
        },
    },
    separators=(",", ":"),
).encode()
buf = None
if MODE == "mem":
    import numpy as np

    buf = np.ones(400 * 1024 * 1024 // 8)


def work():
    end = time.perf_counter() + MS / 1000
    if MODE == "spin":
        while time.perf_counter() < end:
            pass
    elif MODE == "mem":
        s = 0.0
        while time.perf_counter() < end:
            s += float(buf[: 8 * 1024 * 1024].sum())


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        m = await receive()
        more = m.get("more_body", False)
    if scope["method"] == "GET":
        b = (
            b'{"object":"list","data":[{"id":"qwen2.5-coder-0.5b-instruct","object":"model"}]}'
            if scope["path"].endswith("models")
            else b'{"status":"ok"}'
        )
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b})
        return
    if MODE == "sleep":
        await asyncio.sleep(MS / 1000)
    elif MODE != "none":
        work()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(WHOLE)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": WHOLE})


p = argparse.ArgumentParser()
p.add_argument("--port", type=int)
a = p.parse_args()
uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", loop="uvloop", http="httptools")
