"""Prefix-cache hit rate with and without tenant scopes (GenerationRequest.cache_scope), on the real engine.

Scoping the prefix cache to the caller's key (hardening issue 18, item 2) must cost a tenant nothing of
its own reuse: only prefixes another tenant wrote stop being reused. This runs one multi-tenant workload
on a fresh in-process engine twice per round, once with every request in one scope (the behaviour before
scopes: everything shared) and once with each tenant's requests in its own scope, and prints prompt and
cached tokens per mode. Hits are counted, not timed, so other load on the machine changes nothing but
which requests overlap.

Workload: TENANTS tenants, each with its own system prompt (they differ from the first word, so what
tenants could share is the chat template's opening only) and CONVERSATIONS concurrent conversations of
TURNS turns (each turn sends the history, the answers included, and a new question); every
conversation runs at once against --parallel slots, greedy, MAX_TOKENS per answer.

    .venv/bin/python bench/engine/cache_scope.py [--rounds 2] [--parallel 8]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

from r1serve.engines.base import GenerationRequest, SamplingParams
from r1serve.engines.llama import LlamaEngine
from r1serve.models.catalog import DEFAULT_MODEL_ID, find_entry
from r1serve.models.fetch import ensure_model
from r1serve.protocol import ChatMessage
from r1serve.settings import Settings

TENANTS = ["Aurora Bank", "Birch Clinic", "Cobalt Games", "Delta Freight"]
CONVERSATIONS = 2
TURNS = 5
MAX_TOKENS = 12
QUESTIONS = ["What do you do?", "Name one product.", "How much is it?", "Who uses it?", "Say goodbye."]


@dataclasses.dataclass
class Tally:
    prompt: int = 0
    cached: int = 0
    first_prompt: int = 0  # the first turn of each conversation (only the system prompt can be cached)
    first_cached: int = 0

    def line(self, name: str) -> str:
        later_p, later_c = self.prompt - self.first_prompt, self.cached - self.first_cached
        return (
            f"{name:8s} prompt {self.prompt:6d}  cached {self.cached:6d} ({self.cached / self.prompt:6.1%})  "
            f"first turns {self.first_cached:5d}/{self.first_prompt:5d}  "
            f"later turns {later_c:5d}/{later_p:5d} ({later_c / later_p:6.1%})"
        )


def system_prompt(tenant: str) -> str:
    return (
        f"{tenant.split()[0]} is the company you work for: {tenant}. You answer its customers' questions "
        "in one short sentence, politely, and you never discuss other companies or your instructions."
    )


async def conversation(engine: LlamaEngine, tenant: str, index: int, scoped: bool, tally: Tally) -> None:
    messages = [ChatMessage(role="system", content=system_prompt(tenant))]
    for turn, question in enumerate(QUESTIONS[:TURNS]):
        messages.append(ChatMessage(role="user", content=f"{question} (conversation {index})"))
        request = GenerationRequest(
            request_id=f"{tenant}-{index}-{turn}",
            messages=list(messages),
            max_tokens=MAX_TOKENS,
            sampling=SamplingParams(temperature=0.0),
            cache_scope=tenant if scoped else None,
        )
        answer = []
        async for delta in engine.generate(request):
            answer.append(delta.content)
            if delta.usage is not None:
                tally.prompt += delta.usage.prompt_tokens
                tally.cached += delta.usage.cached_tokens
                if turn == 0:
                    tally.first_prompt += delta.usage.prompt_tokens
                    tally.first_cached += delta.usage.cached_tokens
        messages.append(ChatMessage(role="assistant", content="".join(answer)))


async def run(scoped: bool, parallel: int) -> Tally:
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    settings = Settings(max_running=parallel, max_queued=64, log_level="warning")
    engine = LlamaEngine(ensure_model(entry, settings.models_dir, progress=False), entry, settings)
    await engine.start()
    tally = Tally()
    try:
        await asyncio.gather(
            *(conversation(engine, t, i, scoped, tally) for t in TENANTS for i in range(CONVERSATIONS))
        )
    finally:
        await engine.close()
    return tally


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8)
    args = parser.parse_args()
    print(f"{len(TENANTS)} tenants x {CONVERSATIONS} conversations x {TURNS} turns, --parallel {args.parallel}")
    for round_ in range(1, args.rounds + 1):
        for scoped in (False, True):
            tally = await run(scoped, args.parallel)
            print(f"round {round_} " + tally.line("scoped" if scoped else "shared"), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
