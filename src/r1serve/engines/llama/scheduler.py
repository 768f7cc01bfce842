"""The step loop: one batch, one ``llama_decode``, per step, over every running sequence.

Each step frees cancelled sequences, admits queued ones (``Placement`` gives each a slot and its cached
prefix), closes gaps in the block of running seq ids, fills the batch (the next token of every decoding
sequence, then chunks of prompts), decodes, samples, and hands the step's deltas to the event loops.

``Scheduler`` is the loop's half of ``LlamaEngine`` (a base class, so the loop calls its steps as plain
methods, with no indirection per token): the engine loads the model and fills in the attributes declared
here, runs ``_run`` on its own thread, and puts new sequences on ``_waiting``. That thread is the only
code that touches the llama context.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

import llama_cpp
import numpy as np

from r1serve.engines import metrics
from r1serve.engines.base import Delta, EngineUsage, FinishReason
from r1serve.engines.llama.placement import Placement, Slot
from r1serve.engines.llama.sampling import make_sampler, score_prompt, token_logprobs
from r1serve.engines.llama.sequence import Feed, Sequence
from r1serve.engines.vocab import Vocab
from r1serve.errors import R1ServeError
from r1serve.protocol import TokenLogprob
from r1serve.settings import Settings

log = logging.getLogger("r1serve.engine")

# Appended to force the end of the reasoning when a thinking budget runs out.
CLOSE_REASONING = "\n</think>\n\n"
# While other sequences are decoding, a prompt is processed in chunks of at most this many tokens per
# step, so that one long prompt does not freeze every running stream.
_PREFILL_CHUNK_WHEN_BUSY = 256
# A prompt being scored (echo with logprobs) needs logits at every position; llama.cpp sizes its output
# buffer to the largest step and keeps it (vocabulary x positions x 4 bytes: 39 MB for 64 positions of
# a 152k vocabulary), so a step scores at most this many positions, all sequences together.
_SCORING_CHUNK = 64


class Scheduler:
    # Set by the engine: in __init__, and (the context, batch, placement, vocabulary) when it loads.
    settings: Settings
    context_length: int
    vocab: Vocab
    _ctx: Any
    _batch: Any
    _placement: Placement
    _close_tokens: list[int]
    _metrics: metrics.ModelMetrics

    def __init__(self) -> None:
        self._running: list[Sequence] = []
        self._waiting: deque[Sequence] = deque()
        self._lock = threading.Lock()  # guards _waiting
        self._wake = threading.Event()
        self._stopping = False
        self._outbox: list[tuple[Sequence, Delta | BaseException]] = []  # the scheduler thread's only

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drop_cancelled()  # first: a disconnected client's slot is free for the next request
                self._admit()
                moves = self._placement.close_gaps(
                    [s.slot for s in self._running if s.slot is not None and not s.cancelled]
                )
                if moves:
                    self._moved(moves)
                self._observe_load()
                feeds = self._fill_batch()
                if not feeds:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                rc = llama_cpp.llama_decode(self._ctx, self._batch)
                if rc != 0:
                    self._fail_batch(feeds, rc)
                else:
                    self._after_decode(feeds)
                self._flush()
        except BaseException as exc:  # the thread must never die silently: fail everyone waiting
            log.exception("scheduler crashed")
            for seq in list(self._running) + list(self._waiting):
                self._emit(seq, R1ServeError(f"engine failure: {exc}"))
        finally:
            for seq in list(self._running) + list(self._waiting):
                self._emit(seq, R1ServeError("the engine is shutting down"))
            self._flush()

    def _observe_load(self) -> None:
        self._metrics.running.set(len(self._running))
        self._metrics.queued.set(len(self._waiting))
        slots = self._placement.slots
        held = sum(len(slot.tokens) for slot in slots)
        self._metrics.kv_used.set(held / (self.context_length * len(slots)))

    def _admit(self) -> None:
        placement = self._placement
        while True:
            with self._lock:
                if not self._waiting:
                    return
                free = [s for s in placement.slots if not s.busy]
                if not free:
                    return
                seq = self._waiting.popleft()
            if seq.cancelled:
                continue
            request = seq.request
            seq.slot, keep = placement.assign(
                seq.prompt,
                free,
                scoring=seq.prompt_scores is not None,
                scope=(request.cache_scope, request.cache_salt),
            )
            seq.n_past = keep
            seq.cached_tokens = keep
            seq.pending = seq.prompt[keep:]
            self._metrics.prompt_tokens.inc(len(seq.prompt))
            if keep:
                self._metrics.prefix_hits.inc()
                self._metrics.cached_tokens.inc(keep)
            seq.sampler, seq.greedy = make_sampler(seq.request.sampling, self.vocab.n_tokens)
            self._running.append(seq)
            if seq.grammar is not None:
                self._start_grammar(seq)

    def _start_grammar(self, seq: Sequence) -> None:
        assert seq.grammar is not None
        try:
            seq.grammar.start(self.vocab)
        except R1ServeError as exc:
            self._emit(seq, exc)
            seq.cancelled = True  # released after this step
            return
        if seq.parser.reasoning_closed:  # no reasoning to wait for: the whole output is the answer
            seq.grammar.begin(self.vocab, "")

    def _moved(self, moves: list[tuple[Slot, Slot]]) -> None:
        """Point the sequences that close_gaps moved at their new slots."""
        by_slot = {s.slot: s for s in self._running if s.slot is not None and not s.cancelled}
        for src, dst in moves:
            seq = by_slot.pop(src)
            seq.slot = dst
            by_slot[dst] = seq

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self._running.remove(seq)
        if seq.sampler:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        if seq.grammar is not None:
            seq.grammar.free()
        if seq.slot is not None:
            # R1's next turn sends this answer back without its reasoning, so it can only reuse the
            # prompt; cut to that, it matches the next turn in full and is reused in place.
            self._placement.release(seq.slot, len(seq.prompt) if seq.parser.saw_reasoning else None)

    def _fill_batch(self) -> list[Feed]:
        """Fill the batch; returns what each sequence put in it."""
        batch = self._batch
        capacity = self.settings.n_batch
        n = 0
        feeds: list[Feed] = []

        def put(seq: Sequence, tokens: list[int], want_logits: bool) -> Feed:
            nonlocal n
            assert seq.slot is not None
            start = n
            every = int(seq.prompt_scores is not None)
            for i, tok in enumerate(tokens):
                batch.token[n] = tok
                batch.pos[n] = seq.n_past + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot.seq_id
                batch.logits[n] = every
                n += 1
            if want_logits:
                batch.logits[n - 1] = 1
            return Feed(seq, start, len(tokens), n - 1 if want_logits else -1)

        # Decoding sequences first: one token each keeps every stream moving.
        decoding = [s for s in self._running if len(s.pending) == 1 and s.generated > 0][:capacity]
        prefilling = [s for s in self._running if s not in decoding and s.pending]
        chosen: list[tuple[Sequence, list[int], bool]] = [(s, s.pending, True) for s in decoding]
        room = capacity - len(decoding)
        chunk_cap = _PREFILL_CHUNK_WHEN_BUSY if decoding else capacity
        scoring_cap = _SCORING_CHUNK
        for seq in prefilling:
            take = min(room, chunk_cap)
            if seq.prompt_scores is not None:
                take = min(take, scoring_cap)
                scoring_cap -= take
            if take <= 0:
                continue
            chunk = seq.pending[:take]
            chosen.append((seq, chunk, len(chunk) == len(seq.pending)))
            room -= len(chunk)
            chunk_cap -= len(chunk)
        # Written in seq id order: llama.cpp puts consecutive ids in one ubatch only in that order.
        chosen.sort(key=lambda c: c[0].slot.seq_id if c[0].slot else 0)
        feeds = [put(seq, tokens, want_logits) for seq, tokens, want_logits in chosen]
        batch.n_tokens = n
        return feeds

    def _fail_batch(self, feeds: list[Feed], rc: int) -> None:
        log.error("llama_decode returned %d for a batch of %d sequences", rc, len(feeds))
        for seq, _, _, _ in feeds:
            assert seq.slot is not None
            self._placement.cut(seq.slot, 0)
            self._emit(seq, R1ServeError(f"the engine failed to decode (llama_decode returned {rc})"))
            self._release(seq)

    def _after_decode(self, feeds: list[Feed]) -> None:
        for seq, start, fed, logits_at in feeds:
            assert seq.slot is not None
            if seq.prompt_scores is not None and not seq.cancelled:
                seq.prompt_scores.extend(score_prompt(
                    self._ctx, self.vocab, seq.prompt, seq.prompt_texts, seq.n_past, start, fed,
                    seq.request.logprobs or 0,
                ))  # fmt: skip
            seq.slot.tokens.extend(seq.pending[:fed])
            seq.n_past += fed
            seq.pending = seq.pending[fed:]
            if logits_at < 0 or seq.cancelled:
                continue
            if seq.prompt_scores is not None:
                self._emit(seq, Delta(prompt_logprobs=seq.prompt_scores))
                seq.prompt_scores = None
            grammar = seq.grammar
            if grammar is not None and grammar.active:
                token = grammar.sample(self._ctx, logits_at, seq.sampler, seq.greedy, self.vocab)
            elif seq.greedy:
                # The same choice as llama.cpp's greedy sampler (first maximum), without filling its
                # vocabulary-sized candidate array: 25 us instead of 180 us per token here.
                ptr = llama_cpp.llama_get_logits_ith(self._ctx, logits_at)
                token = int(np.ctypeslib.as_array(ptr, shape=(self.vocab.n_tokens,)).argmax())
            else:
                token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, logits_at)
            top_n = seq.request.logprobs
            logprobs = token_logprobs(self._ctx, self.vocab, logits_at, token, top_n) if top_n is not None else []
            self._advance(seq, token, logprobs)
        for seq in [s for s in self._running if s.cancelled]:
            self._release(seq)

    def _advance(self, seq: Sequence, token: int, logprobs: list[TokenLogprob]) -> None:
        """Account for one sampled token: finish, or queue it to be fed in the next step."""
        seq.generated += 1
        self._observe_token(seq)
        if self.vocab.is_eog(token):
            if seq.grammar is not None and seq.parser.in_reasoning and self._close_reasoning(seq):
                # The model ended while thinking, but a structured answer is owed: the engine closes
                # the reasoning (as a spent budget does) and the answer follows under the grammar.
                return
            self._finish(seq, "stop", logprobs)
            return
        text = seq.decoder.decode(self.vocab.piece(token))
        visible, hit_stop = seq.stops.feed(text)
        was_reasoning = seq.parser.in_reasoning
        reasoning, content = seq.parser.feed(visible)
        if seq.grammar is not None and not seq.grammar.active and seq.parser.reasoning_closed:
            content = seq.grammar.begin(self.vocab, content)
        if was_reasoning or seq.parser.in_reasoning:
            seq.reasoning_tokens += 1
            self._metrics.reasoning_tokens.inc()
        if content and not seq.answered:
            seq.answered = True
            self._metrics.ttfat.observe(time.monotonic() - seq.submitted)
        if hit_stop:
            seq.stopped_by_string = True
            self._finish(seq, "stop", logprobs, reasoning, content)
            return
        if seq.generated >= seq.max_tokens or seq.n_past + 1 >= self.context_length:
            self._finish(seq, "length", logprobs, reasoning, content)
            return
        if reasoning or content or logprobs:
            self._emit(seq, Delta(reasoning=reasoning, content=content, logprobs=logprobs))
        seq.pending = [token]
        budget = seq.request.reasoning_budget
        if budget is not None and seq.parser.in_reasoning and seq.reasoning_tokens >= budget:
            self._close_reasoning(seq)

    def _observe_token(self, seq: Sequence) -> None:
        now = time.monotonic()
        self._metrics.generated_tokens.inc()
        if seq.last_token_at:
            self._metrics.itl.observe(now - seq.last_token_at)
        else:
            self._metrics.ttft.observe(now - seq.submitted)
        seq.last_token_at = now

    def _close_reasoning(self, seq: Sequence) -> bool:
        # The model is made to write "</think>" itself: the forced tokens are fed like a prompt
        # chunk, recorded in the sampler's history, and parsed like generated text.
        forced = self._close_tokens
        room = self.context_length - seq.n_past - 2
        if len(forced) > room:
            return False
        for tok in forced:
            llama_cpp.llama_sampler_accept(seq.sampler, tok)
        seq.pending = seq.pending + forced
        seq.generated += len(forced)
        seq.reasoning_tokens += len(forced)
        seq.reasoning_truncated = True
        reasoning, content = seq.parser.feed(CLOSE_REASONING)
        if seq.grammar is not None and not seq.grammar.active and seq.parser.reasoning_closed:
            content = seq.grammar.begin(self.vocab, content)
        if reasoning or content:
            self._emit(seq, Delta(reasoning=reasoning, content=content))
        return True

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        logprobs: list[TokenLogprob],
        reasoning: str = "",
        content: str = "",
    ) -> None:
        if not seq.stopped_by_string:
            tail_r, tail_c = seq.parser.feed(seq.stops.flush() + seq.decoder.decode(b"", final=True))
            reasoning, content = reasoning + tail_r, content + tail_c
        end_r, end_c = seq.parser.finish()
        reasoning, content = reasoning + end_r, content + end_c
        if reason == "length" and seq.parser.in_reasoning:
            seq.reasoning_truncated = True
        usage = EngineUsage(
            prompt_tokens=len(seq.prompt),
            completion_tokens=seq.generated,
            reasoning_tokens=seq.reasoning_tokens,
            cached_tokens=seq.cached_tokens,
        )
        self._emit(
            seq,
            Delta(
                reasoning=reasoning,
                content=content,
                logprobs=logprobs,
                finish_reason=reason,
                reasoning_truncated=seq.reasoning_truncated,
                usage=usage,
            ),
        )
        seq.cancelled = True  # released after this step

    def _emit(self, seq: Sequence, item: Delta | BaseException) -> None:
        self._outbox.append((seq, item))

    def _flush(self) -> None:
        """Hand the step's deltas to the event loop(s) in one wake-up per loop, not one per token: every
        wake-up steals CPU from llama.cpp's compute threads mid-step."""
        if not self._outbox:
            return
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Delta | BaseException]]] = {}
        for seq, item in self._outbox:
            batches.setdefault(seq.loop, []).append((seq, item))
        self._outbox = []
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the client's event loop is closed: nobody is listening
                for seq, _ in items:
                    seq.cancelled = True


def _deliver(items: list[tuple[Sequence, Delta | BaseException]]) -> None:
    for seq, item in items:
        seq.out.put_nowait(item)
