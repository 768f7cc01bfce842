"""Constrained decoding, r1serve against llama-server on the same model in the same run: json_schema
(response_format) and tool_choice "required", each beside the same request without the constraint.

The servers run one at a time (2 cores: side by side they would share them), in the order given, each
taking every request kind in turn, round after round; r1serve from this tree (``python -m r1serve serve``),
llama-server from ``bench/engine/setup.sh``'s build with ``--jinja`` (its tool calling needs the template).
Decode tokens/s per answer is measured from the first streamed chunk (sent with the first token by both
servers) to the last, with the answer's own token count (``usage``); medians are reported.

Usage: PYTHONPATH=src .venv/bin/python bench/engine/constrained_vs_llama_server.py [ROUNDS]
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from r1serve.models.catalog import DEFAULT_MODEL_ID, find_entry
from r1serve.models.fetch import ensure_model
from r1serve.settings import Settings

LLAMA_SERVER = Path.home() / ".cache/r1serve/bench/llama.cpp-44d608e8629257bc/build/bin/llama-server"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "kind": {"type": "string", "enum": ["planet", "star", "moon", "comet"]},
        "facts": {"type": "array", "items": {"type": "string", "maxLength": 60}, "minItems": 1, "maxItems": 2},
    },
    "required": ["name", "kind", "facts"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}]  # fmt: skip
KINDS: dict[str, dict[str, Any]] = {
    "free": {"messages": [{"role": "user", "content": "Tell me about Mars as JSON."}]},
    "json_schema": {
        "messages": [{"role": "user", "content": "Tell me about Mars as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "body", "schema": SCHEMA}},
    },
    "tools auto": {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": TOOLS},
    "tools required": {
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": TOOLS,
        "tool_choice": "required",
    },
}  # fmt: skip
MAX_TOKENS = 80


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(name: str, model: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    if name == "r1serve":
        env = {**os.environ, "R1SERVE_DATA_DIR": f"/tmp/bench-constrained-{port}", "R1SERVE_MAX_RUNNING": "1",
               "R1SERVE_N_THREADS": "2", "R1SERVE_LOG_LEVEL": "warning"}  # fmt: skip
        cmd = [sys.executable, "-m", "r1serve", "serve", "--model", str(model), "--host", "127.0.0.1", "--port",
               str(port)]  # fmt: skip
    else:
        env = dict(os.environ)
        cmd = [str(LLAMA_SERVER), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", "2", "-tb",
               "2", "-np", "1", "-c", "4096", "--jinja"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{name} did not start")


def one(url: str, body: dict[str, Any]) -> tuple[float, int, str]:
    payload = {**body, "model": "deepseek-reasoner", "temperature": 0, "max_tokens": MAX_TOKENS, "stream": True,
               "stream_options": {"include_usage": True}}  # fmt: skip
    stamps: list[float] = []
    tokens = 0
    finish = ""
    with httpx.stream("POST", url + "/v1/chat/completions", json=payload, timeout=300) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                # Every chunk counts, the first (role) one included: a tool call's first chunk comes only
                # once its name is known, so timing from it would leave the call's head out of the time
                # but not out of the token count.
                stamps.append(time.perf_counter())
                finish = choice.get("finish_reason") or finish
    rate = (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and tokens > 1 else float("nan")
    return rate, tokens, finish


def main(rounds: int) -> None:
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    model = ensure_model(entry, Settings().models_dir, progress=False)
    rates: dict[tuple[str, str], list[float]] = {}
    finishes: dict[tuple[str, str], list[str]] = {}
    for _ in range(rounds):
        for server in ("r1serve", "llama-server"):
            proc, url = start(server, model)
            try:
                one(url, KINDS["free"])  # warm-up
                for _ in range(2):
                    for kind, body in KINDS.items():
                        rate, _, finish = one(url, body)
                        rates.setdefault((server, kind), []).append(rate)
                        finishes.setdefault((server, kind), []).append(finish)
            finally:
                proc.terminate()
                proc.wait(30)
    print("| kind | r1serve tok/s | llama-server tok/s | r1serve / llama-server | finish (r1serve; llama-server) |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        r, ls = statistics.median(rates["r1serve", kind]), statistics.median(rates["llama-server", kind])
        fin = f"{','.join(sorted(set(finishes['r1serve', kind])))}; {','.join(sorted(set(finishes['llama-server', kind])))}"
        print(f"| {kind} | {r:.1f} | {ls:.1f} | {r / ls:.2f} | {fin} |")
    for server in ("r1serve", "llama-server"):
        free = statistics.median(rates[server, "free"])
        print(f"{server}: json_schema / free {statistics.median(rates[server, 'json_schema']) / free:.3f}, "
              f"tools required / auto "
              f"{statistics.median(rates[server, 'tools required']) / statistics.median(rates[server, 'tools auto']):.3f}")  # fmt: skip


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
