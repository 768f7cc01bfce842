"""What tool_choice "required" costs on the embedded engine against "auto" (the same tools, free decoding).

1. Compile: the tools to the call grammar's GBNF (tool_choice "required", two functions) and the GBNF to a
   grammar sampler, median of 50.
2. Decode: the same prompts at temperature 0 with tool_choice "auto" and "required", alternated in one
   process so that load from elsewhere on the machine hits both alike; decode tokens/s from the first
   token to the last, the ratio, how often the whole vocabulary had to be masked (the grammar's slow
   path), and how many answers came out as calls.

Usage: PYTHONPATH=src .venv/bin/python bench/engine/tools.py [ROUNDS]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

from r1serve.engines.base import GenerationRequest, SamplingParams
from r1serve.engines.llama import LlamaEngine
from r1serve.engines.llama.grammar import Grammar
from r1serve.engines.llama.toolgrammar import compile_tool_choice
from r1serve.engines.tools import with_tool_calls
from r1serve.models.catalog import DEFAULT_MODEL_ID, find_entry
from r1serve.models.fetch import ensure_model
from r1serve.protocol import ChatMessage, Tool
from r1serve.settings import Settings

TOOLS = [
    Tool.model_validate({"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}}),
    Tool.model_validate({"type": "function", "function": {"name": "get_time", "description": "The time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}),
]  # fmt: skip
PROMPTS = ["What is the weather in Paris?", "What time is it in Tokyo?", "Is it cold in Oslo?", "Weather in Lima?"]
MAX_TOKENS = 64


def compile_costs(engine: LlamaEngine) -> None:
    py, c = [], []
    gbnf = ""
    for _ in range(50):
        t = time.perf_counter()
        gbnf = compile_tool_choice(TOOLS, "required", parallel=True, fmt="qwen") or ""
        py.append(time.perf_counter() - t)
        g = Grammar(gbnf)
        t = time.perf_counter()
        g.start(engine.vocab)
        c.append(time.perf_counter() - t)
        g.free()
    print(f"compile: tools -> GBNF {statistics.median(py) * 1e3:.3f} ms, GBNF -> sampler "
          f"{statistics.median(c) * 1e3:.3f} ms ({len(gbnf.splitlines())} rules)")  # fmt: skip


async def decode_rate(engine: LlamaEngine, prompt: str, choice: Any) -> tuple[float, int, bool]:
    request = GenerationRequest(
        request_id="bench", messages=[ChatMessage(role="user", content=prompt)], max_tokens=MAX_TOKENS,
        sampling=SamplingParams(temperature=0.0), tools=TOOLS, tool_choice=choice,
    )  # fmt: skip
    stamps: list[float] = []
    called = False
    tokens = 0
    async for delta in with_tool_calls(engine.generate(request), frozenset(t.function.name for t in TOOLS)):
        if delta.content or delta.tool_calls or delta.finish_reason:
            stamps.append(time.perf_counter())
        called = called or bool(delta.tool_calls)
        if delta.usage is not None:
            tokens = delta.usage.completion_tokens
    return (tokens - 1) / (stamps[-1] - stamps[0]), tokens, called


async def main(rounds: int) -> None:
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    engine = LlamaEngine(ensure_model(entry, Settings().models_dir, progress=False), entry,
                         Settings(n_ctx=1024, max_running=1))  # fmt: skip
    await engine.start()
    try:
        compile_costs(engine)
        masks = 0
        original = Grammar.sample

        def counting(self: Grammar, *args: object) -> int:
            nonlocal masks
            before = self.full_masks
            token = original(self, *args)  # type: ignore[arg-type]
            masks += self.full_masks - before
            return token

        Grammar.sample = counting  # type: ignore[method-assign]
        rates: dict[str, list[float]] = {"auto": [], "required": []}
        calls = {"auto": 0, "required": 0}
        constrained = 0
        for _ in range(rounds):
            for prompt in PROMPTS:
                for choice in ("auto", "required"):
                    rate, n, called = await decode_rate(engine, prompt, choice)
                    rates[choice].append(rate)
                    calls[choice] += called
                    constrained += n if choice == "required" else 0
        auto, required = statistics.median(rates["auto"]), statistics.median(rates["required"])
        print(
            f"decode, temperature 0, {len(rates['auto'])} answers each: auto {auto:.1f} tok/s, required "
            f"{required:.1f} tok/s, ratio {required / auto:.3f}; whole-vocabulary masks: {masks} in {constrained} "
            f"constrained tokens; answers that were calls: auto {calls['auto']}, required {calls['required']}"
        )
    finally:
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2))
