"""What structured outputs cost on the embedded engine (llama.cpp's grammar sampler).

1. Compile: the JSON schema to GBNF (llama-cpp-python's converter, in Python) and the GBNF to a grammar
   sampler (llama_sampler_init_grammar), median of 50.
2. Per token: checking one candidate against the grammar (what almost every constrained token costs),
   accepting a token, and masking the whole vocabulary (the slow path, when the model's choice is refused).
3. Decode: the same prompts at temperature 0 with and without a json_schema, alternated in one process so
   that load from elsewhere on the machine hits both alike; decode tokens/s from the first token to the
   last, the ratio, and how often the whole vocabulary had to be masked.

Usage: PYTHONPATH=src .venv/bin/python bench/engine/grammar.py [ROUNDS]
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import statistics
import sys
import time

import llama_cpp
import numpy as np

from r1serve.engines.base import GenerationRequest, SamplingParams
from r1serve.engines.llama import LlamaEngine
from r1serve.engines.llama.grammar import Grammar, compile_response_format
from r1serve.models.catalog import DEFAULT_MODEL_ID, find_entry
from r1serve.models.fetch import ensure_model
from r1serve.protocol import ChatMessage, ResponseFormat
from r1serve.settings import Settings

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"type": "string", "enum": ["planet", "star", "moon", "comet"]},
        "facts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"fact": {"type": "string", "maxLength": 80}, "confidence": {"type": "number"}},
                "required": ["fact", "confidence"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "kind", "facts"],
    "additionalProperties": False,
}
FORMAT = ResponseFormat.model_validate(
    {"type": "json_schema", "json_schema": {"name": "body", "schema": SCHEMA, "strict": True}}
)
PROMPTS = ["Tell me about Mars.", "Describe the Sun.", "What is Europa?", "Tell me about Halley's comet."]
SAMPLE = '{"name": "Mars", "kind": "planet", "facts": [{"fact": "Mars is the fourth planet from the Sun.", "confidence": 0.9}]}'
MAX_TOKENS = 96


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.3f} ms"


def grammar_costs(engine: LlamaEngine) -> None:
    vocab = engine.vocab
    py, c = [], []
    gbnf = ""
    for _ in range(50):
        t = time.perf_counter()
        gbnf = compile_response_format(FORMAT) or ""
        py.append(time.perf_counter() - t)
        g = Grammar(gbnf)
        t = time.perf_counter()
        g.start(vocab)
        c.append(time.perf_counter() - t)
        g.free()
    print(f"compile: schema -> GBNF {ms(py)}, GBNF -> sampler {ms(c)} ({len(gbnf.splitlines())} rules)")

    g = Grammar(gbnf)
    g.start(vocab)
    g.begin(vocab, "")
    check, accept, full = [], [], []
    logits = np.random.default_rng(0).standard_normal(vocab.n_tokens).astype(np.float32)
    for token in vocab.tokenize(SAMPLE, add_special=False):
        t = time.perf_counter()
        assert g.allows(token)
        check.append(time.perf_counter() - t)
        g._fill(logits)
        t = time.perf_counter()
        llama_cpp.llama_sampler_apply(g._sampler, ctypes.byref(g._all_array))
        full.append(time.perf_counter() - t)
        t = time.perf_counter()
        llama_cpp.llama_sampler_accept(g._sampler, token)
        accept.append(time.perf_counter() - t)
    g.free()
    print(
        f"per token: check one candidate {ms(check)}, accept {ms(accept)}, "
        f"mask all {vocab.n_tokens} tokens {ms(full)} (over the {len(check)} tokens of a sample answer)"
    )


async def decode_rate(engine: LlamaEngine, prompt: str, fmt: ResponseFormat | None) -> tuple[float, int, str]:
    request = GenerationRequest(
        request_id="bench",
        messages=[ChatMessage(role="user", content=prompt)],
        max_tokens=MAX_TOKENS,
        sampling=SamplingParams(temperature=0.0),
        response_format=fmt,
    )
    stamps: list[float] = []
    text = ""
    async for delta in engine.generate(request):
        if delta.content or delta.finish_reason:
            stamps.append(time.perf_counter())
        text += delta.content
        if delta.usage is not None:
            tokens = delta.usage.completion_tokens
    return (tokens - 1) / (stamps[-1] - stamps[0]), tokens, text


async def main(rounds: int) -> None:
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    path = ensure_model(entry, Settings().models_dir, progress=False)
    engine = LlamaEngine(path, entry, Settings(n_ctx=1024, max_running=1))
    await engine.start()
    try:
        grammar_costs(engine)
        free_rates, json_rates = [], []
        seen_masks = 0
        original_sample = Grammar.sample

        def counting(self: Grammar, *args: object) -> int:
            nonlocal seen_masks
            before = self.full_masks
            token = original_sample(self, *args)  # type: ignore[arg-type]
            seen_masks += self.full_masks - before
            return token

        Grammar.sample = counting  # type: ignore[method-assign]
        constrained_tokens = 0
        for _ in range(rounds):
            for prompt in PROMPTS:
                rate, _, _ = await decode_rate(engine, prompt, None)
                free_rates.append(rate)
                rate, n, text = await decode_rate(engine, prompt, FORMAT)
                json_rates.append(rate)
                constrained_tokens += n
        free, constrained = statistics.median(free_rates), statistics.median(json_rates)
        print(
            f"decode, temperature 0, {len(free_rates)} answers each: unconstrained {free:.1f} tok/s, "
            f"json_schema {constrained:.1f} tok/s, ratio {constrained / free:.3f}; whole-vocabulary masks: "
            f"{seen_masks} in {constrained_tokens} constrained tokens"
        )
        print("last constrained answer:", json.dumps(text)[:200])
    finally:
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2))
