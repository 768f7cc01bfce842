"""The embedded llama.cpp engine, driven directly with the real default model (no HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from r1serve.engines.base import Delta, GenerationRequest, SamplingParams
from r1serve.engines.llama import LlamaEngine
from r1serve.engines.llama.sampling import prompt_token_texts
from r1serve.engines.vocab import Vocab
from r1serve.errors import ContextLengthExceeded, Overloaded
from r1serve.models.catalog import DEFAULT_MODEL_ID, find_entry
from r1serve.models.fetch import ensure_model
from r1serve.protocol import ChatMessage
from r1serve.settings import Settings

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

QUESTIONS = [
    "Name one planet of the solar system.",
    "What is 2 + 2? Answer with a number.",
    "Write a Python function that returns the square of x.",
    "Say hello in French.",
    "Give one word that rhymes with cat.",
    "What colour is the sky on a clear day?",
]


def _settings(**overrides: object) -> Settings:
    return Settings(n_ctx=2048, max_running=4, max_queued=8, **overrides)  # type: ignore[arg-type]


def _request(question: str, *, max_tokens: int = 32, **kw: object) -> GenerationRequest:
    return GenerationRequest(
        request_id="test",
        messages=[ChatMessage(role="user", content=question)],
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=0.0, seed=7),
        **kw,  # type: ignore[arg-type]
    )


async def _collect(engine: LlamaEngine, request: GenerationRequest) -> list[Delta]:
    # Without the empty keep-alive deltas a request still queued gets every queue_keepalive_seconds:
    # on a loaded machine a request can wait that long, and the tests are about what comes after.
    return [d async for d in engine.generate(request) if d != _KEEPALIVE]


_KEEPALIVE = Delta()


def _text(deltas: list[Delta]) -> str:
    return "".join(d.reasoning + d.content for d in deltas)


def _token_texts(deltas: list[Delta]) -> list[tuple[str, float]]:
    """(token text, margin between the best and second-best logprob) for every generated token."""
    out = []
    for d in deltas:
        for lp in d.logprobs:
            alts = sorted((t.logprob for t in lp.top_logprobs), reverse=True)
            out.append((lp.token, alts[0] - alts[1] if len(alts) > 1 else float("inf")))
    return out


def assert_same_or_near_tie(reference: list[Delta], other: str, *, tie: float = 0.3) -> None:
    """``other`` must equal the reference text, or first differ at a token the model nearly tied on.

    llama.cpp's CPU kernels round differently depending on how many rows a batch holds, so a greedy
    choice between two almost equally likely tokens can flip when a request shares a batch. A mix-up
    between sequences would instead diverge at a confident token, which this rejects.
    """
    ref = _text(reference)
    if other == ref:
        return
    diverge = next((i for i, (a, b) in enumerate(zip(ref, other, strict=False)) if a != b), min(len(ref), len(other)))
    pos = 0
    for token, margin in _token_texts(reference):
        # A token without text (the end of the output) is the choice at its position: "Mount Everest"
        # ending there or going on with "." can flip like any other near tie.
        if pos + len(token) > diverge or (not token and pos >= diverge):
            assert margin < tie, f"diverged at a confident token {token!r} (margin {margin:.3f}): {ref!r} vs {other!r}"
            return
        pos += len(token)
    pytest.fail(f"outputs differ past the reference's end: {ref!r} vs {other!r}")


@contextlib.asynccontextmanager
async def _own_engine(**settings: object) -> AsyncIterator[LlamaEngine]:
    """An engine of the default model with its own settings, for tests that need a particular shape."""
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    path = ensure_model(entry, Settings().models_dir, progress=False)
    eng = LlamaEngine(path, entry, Settings(**settings))  # type: ignore[arg-type]
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


# Long enough that a new chat does not take over another's slot for the chat header they share.
_NUMBERS_ONLY = " Answer with numbers only, separated by commas, nothing before or after them."
_NUMBER_CHATS = [f"List five prime numbers.{_NUMBERS_ONLY}", f"List five even numbers.{_NUMBERS_ONLY}",
                 f"Count from 1 to 300.{_NUMBERS_ONLY}", f"List five odd numbers.{_NUMBERS_ONLY}",
                 f"Count down from 90.{_NUMBERS_ONLY}"]  # fmt: skip


@pytest.fixture(scope="module")
async def engine():
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    path = ensure_model(entry, Settings().models_dir, progress=False)
    eng = LlamaEngine(path, entry, _settings())
    await eng.start()
    yield eng
    await eng.close()


async def test_generates_real_text_with_usage(engine: LlamaEngine) -> None:
    deltas = await _collect(engine, _request("What is the capital of France?", max_tokens=24))
    final = deltas[-1]
    assert final.finish_reason in ("stop", "length")
    assert "Paris" in _text(deltas)
    assert final.usage is not None
    assert final.usage.prompt_tokens > 10
    assert 0 < final.usage.completion_tokens <= 24
    assert final.usage.reasoning_tokens == 0  # the default model has no reasoning format
    assert all(d.finish_reason is None for d in deltas[:-1])


async def test_max_tokens_gives_length(engine: LlamaEngine) -> None:
    deltas = await _collect(engine, _request("Count from 1 to 100, separated by commas.", max_tokens=5))
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 5


async def test_stop_string_cuts_output(engine: LlamaEngine) -> None:
    full = _text(await _collect(engine, _request("Count from 1 to 20, separated by commas.", max_tokens=40)))
    assert "5" in full
    cut = await _collect(engine, _request("Count from 1 to 20, separated by commas.", max_tokens=40, stop=["5"]))
    assert cut[-1].finish_reason == "stop"
    assert _text(cut) == full[: full.index("5")]


async def test_concurrent_requests_match_alone(engine: LlamaEngine) -> None:
    alone = [await _collect(engine, _request(q, logprobs=2)) for q in QUESTIONS]
    together = await asyncio.gather(*[_collect(engine, _request(q)) for q in QUESTIONS])
    for ref, got in zip(alone, together, strict=False):
        assert_same_or_near_tie(ref, _text(got))
    # The engine really ran them together: more requests than slots, all served, none lost.
    assert len(together) > engine.settings.max_running


async def test_prefix_reuse_reports_cached_tokens_and_same_text(engine: LlamaEngine) -> None:
    system = ChatMessage(role="system", content="You are a terse assistant. " * 20)
    first = _request("Name a primary colour.", logprobs=2)
    first.messages = [system, ChatMessage(role="user", content="Name a primary colour.")]
    cold = await _collect(engine, first)
    again = _request("Name a primary colour.")
    again.messages = list(first.messages)
    warm = await _collect(engine, again)
    assert warm[-1].usage is not None and cold[-1].usage is not None
    assert warm[-1].usage.cached_tokens >= cold[-1].usage.prompt_tokens - 1
    assert_same_or_near_tie(cold, _text(warm))
    # Another question with the same system prompt reuses the system prompt's tokens.
    other = _request("Name a fruit.")
    other.messages = [system, ChatMessage(role="user", content="Name a fruit.")]
    shared = await _collect(engine, other)
    assert shared[-1].usage is not None and shared[-1].usage.cached_tokens > 100


async def test_prefix_in_another_slot_is_copied_not_recomputed(engine: LlamaEngine) -> None:
    """Requests arriving together with the same long system prompt each get it from the cache, even
    though only one of them can take the slot that holds it."""
    system = ChatMessage(role="system", content="You answer in one short sentence, politely. " * 15)
    questions = ["Name a river.", "Name a mountain.", "Name a desert."]

    def ask(q: str, **kw: object) -> GenerationRequest:
        req = _request(q, max_tokens=12, **kw)
        req.messages = [system, ChatMessage(role="user", content=q)]
        return req

    alone = [await _collect(engine, ask(q, logprobs=2)) for q in questions]
    together = await asyncio.gather(*[_collect(engine, ask(q)) for q in questions])
    system_tokens = len(engine.vocab.tokenize(system.text(), add_special=False))
    for ref, got in zip(alone, together, strict=False):
        assert got[-1].usage is not None
        assert got[-1].usage.cached_tokens >= system_tokens, got[-1].usage
        assert_same_or_near_tie(ref, _text(got))


async def test_a_short_shared_header_is_reused_from_any_slot(engine: LlamaEngine) -> None:
    """Two different short chats share only the chat template's header; the second still takes it
    from the cache and answers as it does cold."""
    await _collect(engine, _request("Name a colour.", max_tokens=4))
    other = await _collect(engine, _request("Name an animal.", max_tokens=8, logprobs=2))
    header = engine.vocab.prompt_tokens(engine.render_prompt(_request("x"))[0])
    prompt = engine.vocab.prompt_tokens(engine.render_prompt(_request("Name an animal."))[0])
    shared = next(i for i, (a, b) in enumerate(zip(header, prompt, strict=False)) if a != b)
    assert other[-1].usage is not None
    assert other[-1].usage.cached_tokens >= shared > 0


async def test_new_sequences_join_the_block_of_running_seq_ids() -> None:
    """llama.cpp runs the weights once per run of consecutive seq ids in a step, so a sequence admitted
    while others run takes a slot next to theirs, even when its prompt's best cache or the least
    recently used slot lies elsewhere: the cached prefix is then copied over, and answers the same."""
    from prometheus_client import REGISTRY

    async with _own_engine(n_ctx=512, max_running=5) as eng:
        warm = _NUMBER_CHATS
        alone = {q: await _collect(eng, _request(q, max_tokens=24, logprobs=2)) for q in warm}
        assert [len(slot.tokens) > 0 for slot in eng._slots] == [True] * 5  # slot i holds warm[i]

        def running_ids() -> list[int]:
            return sorted(s.slot.seq_id for s in eng._running if s.slot is not None)

        def copies() -> float:
            return REGISTRY.get_sample_value("r1serve_engine_kv_stream_copies_total", {"model": eng.entry.id}) or 0.0

        streams, got = {}, {}

        async def start(question: str) -> None:
            streams[question] = eng.generate(_request(question, max_tokens=24))
            got[question] = [await anext(streams[question])]

        await start(warm[2])  # its own chat is cached in slot 2: reused in place, nothing else runs
        assert running_ids() == [2]
        await start(warm[1])  # slot 1 is next to 2 and holds this chat
        assert running_ids() == [1, 2]
        before = copies()
        # Cached in slot 4, which is not next to the block: it goes to 0 or 3 and the prefix is copied.
        await start(warm[4])
        ids = running_ids()
        assert ids in ([0, 1, 2], [1, 2, 3])
        assert copies() > before

        async def rest(q: str) -> None:
            got[q] += [d async for d in streams[q]]

        await asyncio.gather(*(rest(q) for q in streams))
        for q, deltas in got.items():
            usage = deltas[-1].usage
            assert usage is not None and usage.cached_tokens == usage.prompt_tokens - 1, (q, usage)
            assert_same_or_near_tie(alone[q], _text(deltas))


async def test_a_conversation_in_the_slot_a_new_sequence_needs_is_saved_not_lost() -> None:
    """Which slot a sequence gets depends on the running seq ids, not on what is cached there: what it
    held goes to the least recently used idle slot first, so only the oldest conversation is lost."""
    async with _own_engine(n_ctx=512, max_running=4) as eng:
        chats = _NUMBER_CHATS[:4]
        for q in chats:  # slot i holds chats[i]; chats[0] is the least recently used
            await _collect(eng, _request(q, max_tokens=24))
        assert all(slot.tokens for slot in eng._slots)  # none was reused in place for the shared header
        running = eng.generate(_request(chats[2], max_tokens=60))
        await anext(running)  # in place in slot 2
        # Shares only the chat header with anything cached; slots 1 and 3 are the ones next to slot 2,
        # and slot 1 (chats[1]) is the less recently used: it is saved over slot 0 (chats[0], the oldest).
        other = await _collect(eng, _request(f"Name three colours.{_NUMBERS_ONLY}", max_tokens=8))
        await running.aclose()
        while eng.n_running:  # the scheduler frees the closed sequence at its next step
            await asyncio.sleep(0.01)
        assert other[-1].usage is not None
        for q in chats[1:]:
            again = await _collect(eng, _request(q, max_tokens=4))
            assert again[-1].usage is not None and again[-1].usage.cached_tokens == again[-1].usage.prompt_tokens - 1, q


async def test_a_gap_in_the_running_seq_ids_is_closed_and_the_moved_stream_continues_unchanged() -> None:
    """A sequence that finishes in the middle of the running block leaves a gap (two weight passes per
    step); the sequence at the top moves into it, its KV stream copied, and goes on as if never moved."""
    from prometheus_client import REGISTRY

    async with _own_engine(n_ctx=512, max_running=4) as eng:
        questions = [
            "Count from 1 to 300, separated by commas.",
            "List the even numbers from 2 to 400.",
            "Count down from 300 to 1, separated by spaces.",
        ]
        alone = {q: await _collect(eng, _request(q, max_tokens=120, logprobs=2)) for q in questions}

        def running() -> dict[int, str]:
            return {s.slot.seq_id: s.request.messages[0].text() for s in eng._running if s.slot and s.request.messages}

        streams = {q: eng.generate(_request(q, max_tokens=120)) for q in questions}
        got = {q: [await anext(stream)] for q, stream in streams.items()}
        ids = sorted(running())
        assert ids == list(range(ids[0], ids[0] + 3))
        top, middle = running()[ids[2]], running()[ids[1]]
        copies = REGISTRY.get_sample_value("r1serve_engine_kv_stream_copies_total", {"model": eng.entry.id}) or 0.0

        await streams.pop(middle).aclose()  # the client leaves: the middle sequence is freed
        got.pop(middle)
        for _ in range(100):  # its queue may hold deltas of steps from before the close
            got[top].append(await anext(streams[top]))
            if sorted(running()) == ids[:2]:
                break
        assert running() == {ids[0]: running()[ids[0]], ids[1]: top}, "the top sequence moved into the gap"
        assert (
            REGISTRY.get_sample_value("r1serve_engine_kv_stream_copies_total", {"model": eng.entry.id}) or 0
        ) > copies

        async def rest(q: str) -> None:
            got[q] += [d async for d in streams[q]]

        await asyncio.gather(*(rest(q) for q in streams))
        for q, deltas in got.items():
            assert deltas[-1].finish_reason is not None
            assert_same_or_near_tie(alone[q], _text(deltas))


async def test_every_slot_can_fill_its_whole_context_at_once() -> None:
    """Each slot's stream holds a whole context: all slots running to their limit together, next to
    prefixes cached by earlier requests, must all finish (no llama_decode failure)."""
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    path = ensure_model(entry, Settings().models_dir, progress=False)
    eng = LlamaEngine(path, entry, Settings(n_ctx=256, max_running=3, max_queued=8))
    await eng.start()
    try:
        assert eng.context_length == 256
        for q in ("Tell me about rivers.", "Tell me about mountains.", "Tell me about deserts."):
            await _collect(eng, _request(q, max_tokens=40))  # leaves cached prompts behind

        def full(q: str) -> GenerationRequest:
            n_prompt = len(eng.vocab.prompt_tokens(eng.render_prompt(_request(q))[0]))
            req = _request(q, max_tokens=eng.context_length - n_prompt)
            req.sampling = SamplingParams(temperature=1.0, seed=7)  # keeps writing past any stop
            return req

        qs = [
            "Write a long story about a lighthouse.",
            "Write a long story about a forest.",
            "Write a long story about a submarine.",
        ]
        results = await asyncio.gather(*[_collect(eng, full(q)) for q in qs])
        for deltas in results:
            final = deltas[-1]
            assert final.finish_reason in ("length", "stop")
            assert final.usage is not None
        assert any(d[-1].finish_reason == "length" for d in results), "at least one ran to the limit"
    finally:
        await eng.close()


async def test_greedy_fast_path_matches_llama_cpp_sampler(engine: LlamaEngine) -> None:
    """Temperature 0 takes the argmax in numpy; top_k=1 goes through llama.cpp's sampler chain and
    must pick the same tokens."""
    fast = _request("List three uses of copper.", max_tokens=24)
    fast.sampling = SamplingParams(temperature=0.0)
    chain = _request("List three uses of copper.", max_tokens=24)
    chain.sampling = SamplingParams(temperature=1.0, top_k=1, seed=3)
    assert _text(await _collect(engine, fast)) == _text(await _collect(engine, chain))


async def test_seeded_sampling_is_reproducible(engine: LlamaEngine) -> None:
    req = _request("Invent a name for a cat.", max_tokens=16)
    req.sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    a = _text(await _collect(engine, req))
    b = _text(await _collect(engine, req))
    assert a == b


async def test_cancelled_stream_frees_its_sequence(engine: LlamaEngine) -> None:
    stream = engine.generate(_request("Write a very long story about a dragon.", max_tokens=1500))
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.aclose()
    for _ in range(100):  # each step is tens of milliseconds; this waits at most a few seconds
        if engine.health()["running"] == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.health()["running"] == 0
    deltas = await _collect(engine, _request("Say yes.", max_tokens=4))
    assert deltas[-1].finish_reason is not None


async def test_context_length_exceeded(engine: LlamaEngine) -> None:
    with pytest.raises(ContextLengthExceeded) as err:
        await _collect(engine, _request("hello", max_tokens=engine.context_length))
    assert err.value.code == "context_length_exceeded"
    long_prompt = "word " * (engine.context_length + 100)
    with pytest.raises(ContextLengthExceeded):
        await _collect(engine, GenerationRequest(request_id="t", prompt=long_prompt))


async def test_queue_limit_refuses_with_retry_after() -> None:
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    path = ensure_model(entry, Settings().models_dir, progress=False)
    eng = LlamaEngine(path, entry, Settings(n_ctx=1024, max_running=1, max_queued=1, queue_keepalive_seconds=0.2))
    await eng.start()
    try:
        running = eng.generate(_request("Write a long poem about the sea.", max_tokens=400))
        await running.__anext__()  # admitted and decoding

        async def every_delta(request: GenerationRequest) -> list[Delta]:
            return [d async for d in eng.generate(request)]  # the keep-alive deltas included

        queued = asyncio.ensure_future(every_delta(_request("Say hi.", max_tokens=2)))
        for _ in range(100):
            if eng.health()["queued"] == 1:
                break
            await asyncio.sleep(0.01)
        from prometheus_client import REGISTRY

        refused_before = REGISTRY.get_sample_value("r1serve_engine_admissions_refused_total", {"model": entry.id}) or 0
        with pytest.raises(Overloaded) as err:
            await _collect(eng, _request("Say hi.", max_tokens=2))
        refused_after = REGISTRY.get_sample_value("r1serve_engine_admissions_refused_total", {"model": entry.id})
        assert refused_after == refused_before + 1
        assert err.value.status == 503
        assert err.value.headers.get("Retry-After")
        await asyncio.sleep(0.5)  # the queued request sends heartbeats while it waits
        await running.aclose()
        served = await queued
        assert served[-1].finish_reason is not None
        heartbeats = [d for d in served if d == Delta()]
        assert heartbeats and served[0] == Delta(), "a queued request yields empty deltas while waiting"
    finally:
        await eng.close()


async def test_thinking_budget_closes_reasoning_and_answer_follows() -> None:
    """A template that opens ``<think>`` (as new R1 templates do) makes the whole output reasoning
    until ``</think>``; the budget makes the engine write that tag, and the model then answers."""
    entry = find_entry(DEFAULT_MODEL_ID)
    assert entry is not None
    path = ensure_model(entry, Settings().models_dir, progress=False)
    thinking_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n<think>\n"
    )
    r1_like = replace(entry, chat_template=thinking_template, reasoning_format="deepseek_r1")
    eng = LlamaEngine(path, r1_like, Settings(n_ctx=1024, max_running=2))
    await eng.start()
    try:
        deltas = await _collect(
            eng, _request("Explain in detail why the sky is blue.", max_tokens=60, reasoning_budget=6)
        )
        final = deltas[-1]
        reasoning = "".join(d.reasoning for d in deltas)
        content = "".join(d.content for d in deltas)
        assert reasoning.strip(), "the output before the forced </think> is reasoning"
        assert content.strip(), "an answer follows the closed reasoning"
        assert "</think>" not in reasoning + content
        assert final.reasoning_truncated is True
        assert final.usage is not None and final.usage.reasoning_tokens >= 6
        # Without a budget (and with few tokens) the reasoning never closes: all reasoning, no content.
        unbounded = await _collect(eng, _request("Explain in detail why the sky is blue.", max_tokens=8))
        assert "".join(d.content for d in unbounded) == ""
        assert unbounded[-1].finish_reason == "length" and unbounded[-1].reasoning_truncated is True
    finally:
        await eng.close()


async def test_metrics_follow_the_work(engine: LlamaEngine) -> None:
    from prometheus_client import REGISTRY

    model = {"model": engine.entry.id}

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, model) or 0.0

    before_tokens = sample("r1serve_engine_generated_tokens_total")
    before_ttft = sample("r1serve_engine_time_to_first_token_seconds_count")
    before_hits = sample("r1serve_engine_prefix_cache_hits_total")
    deltas = await _collect(engine, _request("Name a planet.", max_tokens=6))
    await _collect(engine, _request("Name a planet.", max_tokens=6))  # same prompt: prefix hit
    usage = deltas[-1].usage
    assert usage is not None
    assert sample("r1serve_engine_generated_tokens_total") - before_tokens >= 2 * usage.completion_tokens - 1
    assert sample("r1serve_engine_time_to_first_token_seconds_count") - before_ttft == 2
    assert sample("r1serve_engine_prefix_cache_hits_total") - before_hits >= 1
    assert sample("r1serve_engine_inter_token_latency_seconds_count") > 0
    assert 0 < sample("r1serve_engine_kv_cache_usage_ratio") <= 1


def _raw(prompt: str, **kw: object) -> GenerationRequest:
    return GenerationRequest(
        request_id="test",
        prompt=prompt,
        max_tokens=1,
        sampling=SamplingParams(temperature=0.0),
        **kw,  # type: ignore[arg-type]
    )


async def test_scored_prompt_matches_the_models_own_next_token_logprobs(engine: LlamaEngine) -> None:
    # Longer than a scoring chunk (64 tokens), so chunk boundaries are crossed.
    prompt = "def fibonacci(n):\n    " + "# returns the n-th Fibonacci number, counting from zero\n    " * 14
    plain = await _collect(engine, _raw(prompt))  # puts the prompt in the prefix cache
    assert plain[-1].usage is not None
    n_prompt = plain[-1].usage.prompt_tokens
    assert n_prompt > 2 * 64

    deltas = await _collect(engine, _raw(prompt, logprobs=3, prompt_logprobs=True))
    scored = deltas[0].prompt_logprobs
    assert [d for d in deltas if d.prompt_logprobs] == [deltas[0]]  # once, before anything else
    assert deltas[-1].usage is not None and deltas[-1].usage.cached_tokens == 0  # recomputed, not reused
    # The default model adds no BOS: every prompt token has an entry, the first unscored.
    assert len(scored) == n_prompt
    assert "".join(e.token for e in scored) == prompt
    assert scored[0].logprob is None and scored[0].top_logprobs is None
    for entry in scored[1:]:
        assert entry.logprob is not None and entry.logprob <= 0 and entry.top_logprobs is not None
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
    # The repeated comment line is predictable the second time round: its tokens are the model's first
    # choice far more often than the first time.
    line = len(scored) // 15
    assert sum(e.token == e.top_logprobs[0].token for e in scored[-line:]) > line * 0.8  # type: ignore[index]

    # Scoring a prompt ending in the token the model generates after it gives that token's own logprob.
    step = await _collect(engine, _raw(prompt, logprobs=1))
    generated = step[0].logprobs[0]
    extended = await _collect(engine, _raw(prompt + generated.token, logprobs=1, prompt_logprobs=True))
    last = extended[0].prompt_logprobs[-1]
    assert last.token == generated.token
    # Not to the bit: a prompt is computed in batches of many positions, and the CPU kernels round a
    # batch differently from one token (measured: -0.725 against -0.769). A position off by one
    # would score the token in the wrong context instead, far from it.
    assert last.logprob == pytest.approx(generated.logprob, abs=0.1)
    assert last.top_logprobs is not None and last.top_logprobs[0].token == generated.token


async def test_scoring_does_not_disturb_concurrent_streams(engine: LlamaEngine) -> None:
    alone = [await _collect(engine, _request(q, logprobs=2)) for q in QUESTIONS[:3]]
    together = await asyncio.gather(
        *[_collect(engine, _request(q)) for q in QUESTIONS[:3]],
        _collect(engine, _raw("The quick brown fox jumps over the lazy dog. " * 8, logprobs=0, prompt_logprobs=True)),
    )
    for ref, got in zip(alone, together[:3], strict=False):
        assert_same_or_near_tie(ref, _text(got))
    assert all(not d.prompt_logprobs for got in together[:3] for d in got)
    scored = together[3][0].prompt_logprobs
    assert "".join(e.token for e in scored) == "The quick brown fox jumps over the lazy dog. " * 8
    assert all(e.top_logprobs == [] for e in scored[1:])  # logprobs=0: the token's own logprob only


async def test_several_prompts_scored_at_once_share_one_bounded_step(engine: LlamaEngine) -> None:
    """Logits at every position of several prompts in one step would grow llama.cpp's output buffer
    (which it keeps) to the whole batch: a step scores at most 64 positions, all prompts together."""
    prompts = [
        "The quick brown fox jumps over the lazy dog. " * 6,
        "Größe, café, naïve, 東京, Ελλάδα. " * 5,
        "def add(a, b):\n    return a + b\n" * 6,
    ]
    scored_per_step: list[int] = []
    fill = engine._fill_batch

    def spy() -> list:  # type: ignore[type-arg]
        feeds = fill()
        scored_per_step.append(sum(f.fed for f in feeds if f.seq.prompt_scores is not None))
        return feeds

    engine._fill_batch = spy  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(*[_collect(engine, _raw(p, logprobs=1, prompt_logprobs=True)) for p in prompts])
    finally:
        del engine._fill_batch
    assert max(scored_per_step) == 64 and sum(scored_per_step) >= 3 * 64
    for p, deltas in zip(prompts, results, strict=False):
        scored = deltas[0].prompt_logprobs
        # Multi-byte characters split across tokens: each token holds the characters it completes.
        assert "".join(e.token for e in scored) == p
        assert all(e.logprob is not None and e.logprob <= 0 for e in scored[1:])


async def test_prompt_texts_leave_out_a_bos_the_tokenizer_added() -> None:
    from r1_vocab import BOS_ID, cached_r1_vocab_gguf

    vocab = Vocab.load(cached_r1_vocab_gguf())
    try:
        text = "Größe: 東京<｜User｜>hi"
        prompt = vocab.prompt_tokens(text)
        assert prompt[0] == BOS_ID  # R1's tokenizer adds one
        texts, head = prompt_token_texts(vocab, text, prompt)
        assert head == [] and texts[0] == "" and "".join(texts) == text  # the BOS is not in the echo
        written = vocab.bos_text + text  # a prompt that writes the BOS itself echoes it
        texts, head = prompt_token_texts(vocab, written, vocab.prompt_tokens(written))
        assert [e.token for e in head] == [vocab.bos_text] and head[0].logprob is None
        assert "".join(texts) == written
    finally:
        vocab.close()


async def test_near_tie_check_covers_the_end_of_the_output() -> None:
    """The check above must accept a flip between ending and going on only when that choice was close."""
    from r1serve.protocol import TokenLogprob, TopLogprob

    def ref(end_margin: float) -> list[Delta]:
        def lp(token: str, margin: float) -> TokenLogprob:
            return TokenLogprob(token=token, logprob=-0.1, top_logprobs=[
                TopLogprob(token=token, logprob=-0.1), TopLogprob(token="x", logprob=-0.1 - margin)])  # fmt: skip

        return [Delta(content="Mount", logprobs=[lp("Mount", 2.0)]),
                Delta(content=" Everest", logprobs=[lp(" Everest", 2.0)]),
                Delta(finish_reason="stop", logprobs=[lp("", end_margin)])]  # fmt: skip

    assert_same_or_near_tie(ref(0.1), "Mount Everest.")
    with pytest.raises(AssertionError, match="confident"):
        assert_same_or_near_tie(ref(2.0), "Mount Everest.")
    with pytest.raises(AssertionError, match="confident"):
        assert_same_or_near_tie(ref(0.1), "Mount Fuji")


async def test_prompt_tokens_are_counted_once_off_the_event_loop(engine: LlamaEngine) -> None:
    """count_prompt_tokens renders and tokenizes in a worker thread and keeps the result on the request;
    generate reuses it. A long conversation rendered on the event loop would stall every stream."""
    import threading

    renders: list[int] = []
    render = engine.render_prompt

    def spy(request: GenerationRequest) -> tuple[str, bool]:
        renders.append(threading.get_ident())
        return render(request)

    engine.render_prompt = spy  # type: ignore[method-assign]
    try:
        req = _request("Name a planet.", max_tokens=4)
        n = await engine.count_prompt_tokens(req)
        assert n == len(engine.vocab.prompt_tokens(render(req)[0]))
        assert await engine.count_prompt_tokens(req) == n
        deltas = await _collect(engine, req)
        assert deltas[-1].usage is not None and deltas[-1].usage.prompt_tokens == n
        assert len(renders) == 1 and renders[0] != threading.get_ident()
        # Without a count first, generate renders in a worker thread as well.
        await _collect(engine, _request("Name a moon.", max_tokens=2))
        assert len(renders) == 2 and renders[1] != threading.get_ident()
        # What was kept for other messages is not reused.
        moved = replace(req, messages=[ChatMessage(role="user", content="Name a star.")])
        assert moved.prepared is req.prepared
        await engine.count_prompt_tokens(moved)
        assert len(renders) == 3
    finally:
        del engine.render_prompt
    raw = GenerationRequest(request_id="t", prompt="def f(x):")
    assert await engine.count_prompt_tokens(raw) == len(engine.vocab.prompt_tokens("def f(x):"))
    assert engine.count_tokens("Hello, world!") == len(engine.vocab.tokenize("Hello, world!", add_special=False))
    assert engine.count_tokens("") == 0


async def test_a_counted_empty_prompt_still_fails_before_the_first_delta(engine: LlamaEngine) -> None:
    from r1serve.errors import InvalidRequest

    req = _raw("")
    assert await engine.count_prompt_tokens(req) == 0
    with pytest.raises(InvalidRequest):
        await _collect(engine, req)


async def test_engines_that_cannot_count_say_so() -> None:
    from r1serve.engines.base import Engine

    class Silent(Engine):
        name = "silent"

        async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
            yield Delta(finish_reason="stop")

    silent = Silent()
    assert await silent.count_prompt_tokens(_request("hi")) is None
    assert silent.count_tokens("hi") is None
