"""The embedded llama.cpp engine: one context, many sequences, one ``llama_decode`` per step.

llama-cpp-python's high-level ``Llama`` object serves one request at a time. This engine drives the
low-level batch API instead: each request owns a sequence (``seq_id``) in a shared context, and a
scheduler thread builds one batch per step holding the next token of every running sequence plus a
chunk of any prompt still being processed. Admission, cancellation and KV cleanup happen between steps.

The scheduler thread is the only code that touches the llama context. The event loop talks to it
through a locked queue of new sequences and per-sequence asyncio queues of deltas; ctypes releases the
GIL during ``llama_decode``, so HTTP handlers keep running while the model computes.
"""

from __future__ import annotations

import asyncio
import codecs
import ctypes
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import llama_cpp
import llama_cpp._logger as llama_logger
import numpy as np

from r1serve.engines.base import Delta, Engine, EngineUsage, FinishReason, GenerationRequest
from r1serve.engines import metrics
from r1serve.engines.prompt import CHATML_TEMPLATE, ChatTemplate
from r1serve.engines.text import StopMatcher
from r1serve.engines.vocab import Vocab
from r1serve.errors import ContextLengthExceeded, InvalidRequest, Overloaded, R1ServeError
from r1serve.models.catalog import LocalSource, ModelEntry, detect_reasoning_format
from r1serve.protocol import PromptLogprob, TokenLogprob, TopLogprob
from r1serve.reasoning import ReasoningParser, prompt_opens_reasoning
from r1serve.settings import Settings

log = logging.getLogger("r1serve.engine")

# Appended to force the end of the reasoning when a thinking budget runs out.
_CLOSE_REASONING = "\n</think>\n\n"
# Penalties look back this far; OpenAI's presence/frequency penalties cover the whole completion.
_PENALTY_WINDOW = 4096
# While other sequences are decoding, a prompt is processed in chunks of at most this many tokens per
# step, so that one long prompt does not freeze every running stream.
_PREFILL_CHUNK_WHEN_BUSY = 256
# A prompt being scored (echo with logprobs) needs logits at every position; llama.cpp sizes its output
# buffer to the largest step and keeps it (vocabulary x positions x 4 bytes: 39 MB for 64 positions of
# a 152k vocabulary), so a step scores at most this many positions, all sequences together.
_SCORING_CHUNK = 64
_GIL_SWITCH_INTERVAL = 0.0005
# Copying a cached prefix from another slot copies that slot's whole KV stream (llama.cpp copies across
# streams whole or not at all). A 4,096-cell stream copies in the time of 1.3 prompt tokens, on the 0.5B
# and on the 1.5B (bench/engine/copycost.py); a copy is made when it saves at least
# per_seq / _CELLS_PER_TOKEN tokens, a margin of about 3x.
_CELLS_PER_TOKEN = 1024
# A gap in the running seq ids is closed when it is still there this many steps after it opened (a client
# sending requests back to back fills it sooner, at no cost).
_GAP_STEPS = 2


def _read_template(value: str | None) -> str | None:
    if not value:
        return None
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


@dataclass(eq=False)
class _Slot:
    """A llama.cpp sequence id and the tokens its KV cells currently hold (kept for prefix reuse)."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    last_used: float = 0.0
    busy: bool = False


class _Feed(NamedTuple):
    """What one sequence put in a step's batch: ``fed`` tokens from batch index ``start``; ``logits_at`` is
    where the logits to sample from are, -1 when the step only advanced a prompt."""

    seq: _Sequence
    start: int
    fed: int
    logits_at: int


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    prompt: list[int]
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Delta | BaseException]
    parser: ReasoningParser
    stops: StopMatcher
    sampler: Any = None
    slot: _Slot | None = None
    pending: list[int] = field(default_factory=list)  # tokens to feed before the next sample
    n_past: int = 0
    generated: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    budget_spent: bool = False
    reasoning_truncated: bool = False
    cancelled: bool = False
    stopped_by_string: bool = False
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    greedy: bool = False  # temperature 0 and no penalties: the sampler chain is a bare argmax
    submitted: float = field(default_factory=time.monotonic)
    last_token_at: float = 0.0
    answered: bool = False
    # The prompt's scored tokens while it is processed, when the request asks for them; sent (and set to
    # None) with the first sample.
    prompt_scores: list[PromptLogprob] | None = None
    prompt_texts: list[str] = field(default_factory=list)  # per prompt token, when scored


class LlamaEngine(Engine):
    scores_prompts = True

    def __init__(self, model_path: Path, entry: ModelEntry, settings: Settings) -> None:
        self.name = f"llama.cpp:{entry.id}"
        self.model_path = Path(model_path)
        self.entry = entry
        self.settings = settings
        self.context_length = settings.n_ctx
        self._model: Any = None
        self._ctx: Any = None
        self.vocab: Vocab  # set by start()
        self._batch: Any = None
        self._template: ChatTemplate | None = None
        self._slots: list[_Slot] = []
        self._running: list[_Sequence] = []
        self._waiting: deque[_Sequence] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._close_tokens: list[int] = []
        self._copy_pays_from = 1  # set by _load
        self._gap_steps = 0  # steps the running seq ids have had a gap
        self._outbox: list[tuple[_Sequence, Delta | BaseException]] = []  # the scheduler thread's only
        self._metrics = metrics.ModelMetrics(entry.id)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        # The scheduler thread retakes the GIL after every ctypes call; with Python's default 5 ms
        # switch interval it can wait that long behind the event loop each time, stalling decode.
        sys.setswitchinterval(_GIL_SWITCH_INTERVAL)
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._run, name="r1serve-llama", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self._free()

    def _load(self) -> None:
        llama_logger.set_verbose(self.settings.log_level == "debug")
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = self.settings.n_gpu_layers
        mparams.use_extra_bufts = self.settings.repack_weights
        model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {self.model_path}")
        self._model = model
        self.vocab = Vocab(model)

        n_train = llama_cpp.llama_model_n_ctx_train(model)
        per_seq = min(self.settings.n_ctx, n_train) if n_train > 0 else self.settings.n_ctx
        n_seq = self.settings.max_running
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = per_seq * n_seq
        cparams.n_batch = self.settings.n_batch
        cparams.n_ubatch = self.settings.n_batch
        cparams.n_seq_max = n_seq
        cparams.n_threads = self.settings.n_threads
        cparams.n_threads_batch = self.settings.n_threads
        # A KV stream per sequence, as llama-server runs: a sequence's attention scans its own cells
        # only. In one unified cache every step scanned every cell held, idle slots' cached prompts
        # included (measured, the benchmark's one-stream run on the 0.5B: 44.5 tok/s with earlier
        # requests' prompts kept, 47.4 with none kept). The price is llama.cpp's batch split: one
        # weight pass per run of consecutive seq ids, which _adjacent, _close_gaps and _fill_batch's
        # order keep to one.
        cparams.kv_unified = False
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self._ctx = ctx
        # Each stream holds per_seq cells, and a slot never holds more than per_seq tokens.
        self.context_length = per_seq
        self._copy_pays_from = max(1, per_seq // _CELLS_PER_TOKEN)
        self._batch = llama_cpp.llama_batch_init(self.settings.n_batch, 0, 1)
        self._slots = [_Slot(seq_id=i) for i in range(n_seq)]

        template = (
            _read_template(self.settings.chat_template)
            or self.entry.chat_template
            or self.vocab.chat_template
            or CHATML_TEMPLATE
        )
        self._template = ChatTemplate(template, bos_token=self.vocab.bos_text, eos_token=self.vocab.eos_text)
        self._close_tokens = self.vocab.tokenize(_CLOSE_REASONING, add_special=False)

        fmt = self.entry.reasoning_format
        if isinstance(self.entry.source, LocalSource) and fmt == "none":
            fmt = detect_reasoning_format(template, self.model_path.name)
        if self.settings.reasoning_format != "auto":
            fmt = self.settings.reasoning_format
        self.entry = replace(self.entry, reasoning_format=fmt, context_length=self.context_length)
        log.info(
            "loaded %s: %d-token context per sequence, %d sequences, %d threads, reasoning format %s",
            self.model_path.name, self.context_length, n_seq, self.settings.n_threads, fmt,
        )

    def _free(self) -> None:
        for slot_seq in self._running:
            if slot_seq.sampler:
                llama_cpp.llama_sampler_free(slot_seq.sampler)
        self._running.clear()
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    # ----------------------------------------------------------------- prompts

    def render_prompt(self, request: GenerationRequest) -> tuple[str, bool]:
        """The prompt text, and whether it already opened the reasoning (``<think>`` at its end)."""
        assert self._template is not None
        if request.messages is not None:
            text = self._template.render(request.messages)
            opened = self.entry.reasoning_format == "deepseek_r1" and prompt_opens_reasoning(text)
            return text, opened
        return request.prompt or "", False

    # ----------------------------------------------------------------- the async side

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self._ctx is None:
            raise R1ServeError("the engine is not running")
        text, opened = self.render_prompt(request)
        prompt = self.vocab.prompt_tokens(text)
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="messages" if request.messages else "prompt")
        room = self.context_length - len(prompt)
        if request.max_tokens is not None:
            if request.max_tokens > room:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.context_length} tokens. However, you "
                    f"requested {len(prompt) + request.max_tokens} tokens ({len(prompt)} in the messages, "
                    f"{request.max_tokens} in the completion). Please reduce the length of the messages "
                    "or completion.",
                    param="messages" if request.messages else "prompt",
                )
            max_tokens = request.max_tokens
        else:
            if room < 1:
                raise ContextLengthExceeded(
                    f"This model's maximum context length is {self.context_length} tokens. However, your "
                    f"messages resulted in {len(prompt)} tokens. Please reduce the length of the messages.",
                    param="messages" if request.messages else "prompt",
                )
            max_tokens = min(self.settings.default_max_tokens, room)

        fmt = self.entry.reasoning_format if request.messages is not None else "none"
        seq = _Sequence(
            request=request,
            prompt=prompt,
            max_tokens=max_tokens,
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
            parser=ReasoningParser(fmt, starts_in_reasoning=opened),
            stops=StopMatcher(request.stop),
        )
        if request.prompt_logprobs:
            seq.prompt_texts, seq.prompt_scores = prompt_token_texts(self.vocab, text, prompt)
        with self._lock:
            if len(self._waiting) >= self.settings.max_queued:
                self._metrics.refused.inc()
                raise Overloaded(
                    "The server is at capacity; retry shortly.",
                    headers={"Retry-After": "1"},
                )
            self._waiting.append(seq)
        self._wake.set()
        keepalive = self.settings.queue_keepalive_seconds
        try:
            while True:
                if seq.slot is None and keepalive > 0:
                    # Still queued: an empty delta lets a streaming client know it is not forgotten.
                    try:
                        item = await asyncio.wait_for(seq.out.get(), keepalive)
                    except TimeoutError:
                        yield Delta()
                        continue
                else:
                    item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            # Client gone or stream finished: the scheduler frees the sequence at its next step.
            seq.cancelled = True
            self._wake.set()

    def health(self) -> dict[str, Any]:
        with self._lock:
            waiting = len(self._waiting)
        return {
            "status": "ok" if self._ctx is not None else "loading",
            "model": self.entry.id,
            "running": len(self._running),
            "queued": waiting,
            "slots": len(self._slots),
        }

    @property
    def n_running(self) -> int:
        return len(self._running)

    # ----------------------------------------------------------------- the scheduler thread

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drop_cancelled()  # first: a disconnected client's slot is free for the next request
                self._admit()
                self._close_gaps()
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
        held = sum(len(slot.tokens) for slot in self._slots)
        self._metrics.kv_used.set(held / (self.context_length * len(self._slots)))

    def _admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting:
                    return
                free = [s for s in self._slots if not s.busy]
                if not free:
                    return
                seq = self._waiting.popleft()
            if seq.cancelled:
                continue
            self._assign_slot(seq, free)
            seq.sampler, seq.greedy = self._make_sampler(seq.request)
            self._running.append(seq)

    def _assign_slot(self, seq: _Sequence, free: list[_Slot]) -> None:
        """Give the sequence a free slot and as much of its prompt from the KV cache as any slot holds.

        The slot must be next to a running one (``_adjacent``). Among those allowed, one is reused in
        place when its own cache is the best match there and most of what it holds is kept; otherwise
        the sequence takes an empty one, else the least recently used. A longer prefix cached in another
        slot (busy ones included) is then copied in, when it saves enough tokens to pay for copying that
        slot's whole stream. When most of what the slot held is not kept, it is first saved to an idle
        slot (``_save``): which slot a sequence gets depends on seq ids, not on what is cached, and
        another conversation should not be lost for it while older ones are kept.
        """

        def common(slot: _Slot) -> int:
            n = 0
            for a, b in zip(slot.tokens, seq.prompt):
                if a != b:
                    break
                n += 1
            return n

        # A prompt being scored needs the logits of every position: no cached prefix can give them.
        scoring = seq.prompt_scores is not None
        matches = {slot.seq_id: 0 if scoring else common(slot) for slot in self._slots}
        donor = max(self._slots, key=lambda s: (matches[s.seq_id], s.last_used))
        longest = matches[donor.seq_id]
        allowed = self._adjacent(free)
        own = max(matches[s.seq_id] for s in allowed)
        in_place = [s for s in allowed if matches[s.seq_id] == own and own * 2 >= len(s.tokens)] if own else []
        if in_place:
            best = max(in_place, key=lambda s: s.last_used)
        else:
            empty = [s for s in allowed if not s.tokens]
            best = empty[0] if empty else min(allowed, key=lambda s: s.last_used)
        # At least the last prompt token is decoded again: its logits give the first sample.
        usable = len(seq.prompt) - 1
        keep = min(matches[best.seq_id], usable)
        copy = min(longest, usable) - keep >= self._copy_pays_from
        if keep * 2 < len(best.tokens):
            self._save(best, exclude=donor)
        if copy:
            self._copy(donor, best)
            keep = min(longest, usable)
        self._cut(best, keep)
        best.busy = True
        seq.slot = best
        seq.n_past = keep
        seq.cached_tokens = keep
        seq.pending = seq.prompt[keep:]
        self._metrics.prompt_tokens.inc(len(seq.prompt))
        if keep:
            self._metrics.prefix_hits.inc()
            self._metrics.cached_tokens.inc(keep)

    def _adjacent(self, free: list[_Slot]) -> list[_Slot]:
        """The free slots a new sequence may take without adding a run of consecutive running seq ids:
        those next to a running one, the ones that join two runs first, then those inside a gap (which
        otherwise a move will close); any slot when nothing runs."""
        busy = {s.seq_id for s in self._slots if s.busy}
        if not busy:
            return free
        lo, hi = min(busy), max(busy)
        nearby = [s for s in free if s.seq_id - 1 in busy or s.seq_id + 1 in busy]
        joining = [s for s in nearby if s.seq_id - 1 in busy and s.seq_id + 1 in busy]
        inside = [s for s in nearby if lo < s.seq_id < hi]
        return joining or inside or nearby

    def _close_gaps(self) -> None:
        """Move running sequences into the gaps that finished ones left in the block of running seq ids.

        Each run of consecutive ids costs a pass over the weights every step; a move copies a stream or
        two once, each in about the time of one prompt token. Admission takes a slot inside a gap first,
        so a gap is only closed when no request has filled it for _GAP_STEPS steps. The sequence at the
        top of the block moves into the lowest gap, whose finished conversation is saved first."""
        by_id = {s.slot.seq_id: s for s in self._running if s.slot is not None and not s.cancelled}
        ids = sorted(by_id)
        if len(ids) < 2 or ids[-1] - ids[0] + 1 == len(ids):
            self._gap_steps = 0
            return
        self._gap_steps += 1
        if self._gap_steps < _GAP_STEPS:
            return
        while len(by_id) > 1:
            ids = sorted(by_id)
            if ids[-1] - ids[0] + 1 == len(ids):
                return
            gap = self._slots[next(i for i in range(ids[0], ids[-1]) if i not in by_id)]
            seq = by_id.pop(ids[-1])
            src = seq.slot
            assert src is not None and not gap.busy
            self._save(gap)
            self._copy(src, gap)
            gap.busy = True
            seq.slot = gap
            # What it leaves behind is a prefix of what the sequence goes on writing in its new slot.
            src.busy = False
            self._cut(src, 0)
            by_id[gap.seq_id] = seq

    def _save(self, slot: _Slot, exclude: _Slot | None = None) -> None:
        """Copy an idle slot's cache to another idle slot, an empty one or else the least recently used,
        if that one holds nothing more recent: the slot is about to be reused or overwritten. Among empty
        slots, the one farthest from the running ones, which new sequences take last."""
        if not slot.tokens:
            return
        idle = [s for s in self._slots if not s.busy and s is not slot and s is not exclude]
        if not idle:
            return
        empty = [s for s in idle if not s.tokens]
        if empty:
            busy = [s.seq_id for s in self._slots if s.busy] or [slot.seq_id]
            victim = max(empty, key=lambda s: min(abs(s.seq_id - b) for b in busy))
        else:
            victim = min(idle, key=lambda s: s.last_used)
        if victim.tokens and victim.last_used >= slot.last_used:
            return
        self._copy(slot, victim)
        victim.last_used = slot.last_used

    def _cut(self, slot: _Slot, keep: int) -> None:
        """Drop a slot's cached tokens from position ``keep`` on."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), slot.seq_id, keep, -1)
        slot.tokens = slot.tokens[:keep]

    def _copy(self, src: _Slot, dst: _Slot) -> None:
        """Replace dst's cache with src's. llama.cpp copies streams whole (or not at all), in the next
        decode, in the order asked: later copies and removals see the earlier ones done."""
        llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(self._ctx), src.seq_id, dst.seq_id, -1, -1)
        dst.tokens = list(src.tokens)
        self._metrics.stream_copies.inc()

    def _make_sampler(self, request: GenerationRequest) -> tuple[Any, bool]:
        """The request's llama.cpp sampler chain, and whether it is plain greedy (temperature 0, no
        penalties): then the scheduler takes the argmax itself, the same choice, without the chain."""
        # The API has already filled in the model's recommended values; what is still unset gets
        # OpenAI's defaults (temperature 1, no truncation).
        sp = request.sampling
        temperature = 1.0 if sp.temperature is None else sp.temperature
        top_p = 1.0 if sp.top_p is None else sp.top_p
        top_k = sp.top_k or 0
        min_p = sp.min_p or 0.0
        presence = sp.presence_penalty or 0.0
        frequency = sp.frequency_penalty or 0.0
        repeat = sp.repetition_penalty or 1.0

        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        chain = llama_cpp.llama_sampler_chain_init(params)
        add = llama_cpp.llama_sampler_chain_add
        penalised = bool(presence or frequency or repeat != 1.0)
        if penalised:
            add(chain, llama_cpp.llama_sampler_init_penalties(
                self.vocab.n_tokens, _PENALTY_WINDOW, repeat, frequency, presence))
        if temperature <= 0.0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain, not penalised
        if top_k > 0:
            add(chain, llama_cpp.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            add(chain, llama_cpp.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            add(chain, llama_cpp.llama_sampler_init_min_p(min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(temperature))
        seed = sp.seed if sp.seed is not None else int.from_bytes(os.urandom(4), "little")
        add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain, False

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._running if s.cancelled]:
            self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        self._running.remove(seq)
        if seq.sampler:
            llama_cpp.llama_sampler_free(seq.sampler)
            seq.sampler = None
        slot = seq.slot
        if slot is not None:
            slot.busy = False
            slot.last_used = time.monotonic()
            if seq.parser.saw_reasoning:
                # R1's next turn sends this answer back without its reasoning, so it can only reuse the
                # prompt; cut to that, it matches the next turn in full and is reused in place.
                self._cut(slot, len(seq.prompt))

    def _fill_batch(self) -> list[_Feed]:
        """Fill the batch; returns what each sequence put in it."""
        batch = self._batch
        capacity = self.settings.n_batch
        n = 0
        feeds: list[_Feed] = []

        def put(seq: _Sequence, tokens: list[int], want_logits: bool) -> _Feed:
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
            return _Feed(seq, start, len(tokens), n - 1 if want_logits else -1)

        # Decoding sequences first: one token each keeps every stream moving.
        decoding = [s for s in self._running if len(s.pending) == 1 and s.generated > 0][:capacity]
        prefilling = [s for s in self._running if s not in decoding and s.pending]
        chosen: list[tuple[_Sequence, list[int], bool]] = [(s, s.pending, True) for s in decoding]
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

    def _fail_batch(self, feeds: list[_Feed], rc: int) -> None:
        log.error("llama_decode returned %d for a batch of %d sequences", rc, len(feeds))
        for seq, _, _, _ in feeds:
            assert seq.slot is not None
            self._cut(seq.slot, 0)
            self._emit(seq, R1ServeError(f"the engine failed to decode (llama_decode returned {rc})"))
            self._release(seq)

    def _after_decode(self, feeds: list[_Feed]) -> None:
        for seq, start, fed, logits_at in feeds:
            assert seq.slot is not None
            if seq.prompt_scores is not None and not seq.cancelled:
                self._score_prompt(seq, start, fed)
            seq.slot.tokens.extend(seq.pending[:fed])
            seq.n_past += fed
            seq.pending = seq.pending[fed:]
            if logits_at < 0 or seq.cancelled:
                continue
            if seq.prompt_scores is not None:
                self._emit(seq, Delta(prompt_logprobs=seq.prompt_scores))
                seq.prompt_scores = None
            if seq.greedy:
                # The same choice as llama.cpp's greedy sampler (first maximum), without filling its
                # vocabulary-sized candidate array: 25 us instead of 180 us per token here.
                ptr = llama_cpp.llama_get_logits_ith(self._ctx, logits_at)
                token = int(np.ctypeslib.as_array(ptr, shape=(self.vocab.n_tokens,)).argmax())
            else:
                token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, logits_at)
            logprobs = self._logprobs(logits_at, token, seq.request.logprobs) if seq.request.logprobs is not None else []
            self._advance(seq, token, logprobs)
        for seq in [s for s in self._running if s.cancelled]:
            self._release(seq)

    def _score_prompt(self, seq: _Sequence, start: int, fed: int) -> None:
        """Score the prompt tokens that this chunk's logits predict: position p's logits give the
        logprob of the prompt's token p + 1 (the last position's give the first sample instead)."""
        assert seq.prompt_scores is not None
        first = seq.n_past + 1
        n = min(fed, len(seq.prompt) - first)
        if n <= 0:
            return
        rows = np.stack([
            np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, start + i), shape=(self.vocab.n_tokens,))
            for i in range(n)
        ])  # fmt: skip
        peak = rows.max(axis=1, keepdims=True)
        logsumexp = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
        targets = seq.prompt[first : first + n]
        chosen = rows[np.arange(n), targets] - logsumexp
        top_n = seq.request.logprobs or 0
        best = None
        if top_n:
            best = np.argpartition(-rows, top_n, axis=1)[:, :top_n]
            best = np.take_along_axis(best, np.argsort(-np.take_along_axis(rows, best, axis=1), axis=1), axis=1)
        for i in range(n):
            top = []
            if best is not None:
                top = [TopLogprob(token=self.vocab.special_text(int(t)), logprob=float(rows[i, t] - logsumexp[i]))
                       for t in best[i]]  # fmt: skip
            seq.prompt_scores.append(
                PromptLogprob(token=seq.prompt_texts[first + i], logprob=float(chosen[i]), top_logprobs=top)
            )

    def _advance(self, seq: _Sequence, token: int, logprobs: list[TokenLogprob]) -> None:
        """Account for one sampled token: finish, or queue it to be fed in the next step."""
        seq.generated += 1
        self._observe_token(seq)
        if self.vocab.is_eog(token):
            self._finish(seq, "stop", logprobs)
            return
        text = seq.decoder.decode(self.vocab.piece(token))
        visible, hit_stop = seq.stops.feed(text)
        was_reasoning = seq.parser.in_reasoning
        reasoning, content = seq.parser.feed(visible)
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

    def _observe_token(self, seq: _Sequence) -> None:
        now = time.monotonic()
        self._metrics.generated_tokens.inc()
        if seq.last_token_at:
            self._metrics.itl.observe(now - seq.last_token_at)
        else:
            self._metrics.ttft.observe(now - seq.submitted)
        seq.last_token_at = now

    def _close_reasoning(self, seq: _Sequence) -> None:
        # The model is made to write "</think>" itself: the forced tokens are fed like a prompt
        # chunk, recorded in the sampler's history, and parsed like generated text.
        forced = self._close_tokens
        room = self.context_length - seq.n_past - 2
        if len(forced) > room:
            return
        for tok in forced:
            llama_cpp.llama_sampler_accept(seq.sampler, tok)
        seq.pending = seq.pending + forced
        seq.generated += len(forced)
        seq.reasoning_tokens += len(forced)
        seq.reasoning_truncated = True
        seq.budget_spent = True
        reasoning, content = seq.parser.feed(_CLOSE_REASONING)
        if reasoning or content:
            self._emit(seq, Delta(reasoning=reasoning, content=content))

    def _finish(
        self,
        seq: _Sequence,
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

    def _logprobs(self, logits_at: int, token: int, top_n: int) -> list[TokenLogprob]:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, logits_at)
        logits = np.ctypeslib.as_array(ptr, shape=(self.vocab.n_tokens,)).astype(np.float64)
        peak = logits.max()
        logsumexp = peak + np.log(np.exp(logits - peak).sum())
        top: list[TopLogprob] = []
        if top_n > 0:
            ids = np.argpartition(-logits, top_n)[:top_n]
            ids = ids[np.argsort(-logits[ids])]
            top = [self._top_logprob(int(i), float(logits[i] - logsumexp)) for i in ids]
        chosen = self._top_logprob(token, float(logits[token] - logsumexp))
        return [TokenLogprob(**chosen.model_dump(), top_logprobs=top)]

    def _top_logprob(self, token: int, logprob: float) -> TopLogprob:
        piece = self.vocab.piece(token)
        return TopLogprob(token=piece.decode("utf-8", "replace"), logprob=logprob, bytes=list(piece))

    def _emit(self, seq: _Sequence, item: Delta | BaseException) -> None:
        self._outbox.append((seq, item))

    def _flush(self) -> None:
        """Hand the step's deltas to the event loop(s) in one wake-up per loop, not one per token: every
        wake-up steals CPU from llama.cpp's compute threads mid-step."""
        if not self._outbox:
            return
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, Delta | BaseException]]] = {}
        for seq, item in self._outbox:
            batches.setdefault(seq.loop, []).append((seq, item))
        self._outbox = []
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the client's event loop is closed: nobody is listening
                for seq, _ in items:
                    seq.cancelled = True


def prompt_token_texts(vocab: Vocab, text: str, prompt: list[int]) -> tuple[list[str], list[PromptLogprob]]:
    """The text of each prompt token, and the first entry of the scored prompt.

    A token's text is what it completes of the prompt's UTF-8 (special tokens written out, as a prompt
    can hold them), so that the texts join into the echoed prompt and the offsets add up. The first
    token has nothing before it to be scored against: its entry has no logprob. A BOS that the tokenizer
    added is not in the echoed text: it gets no entry and no text, and the text's first token is scored
    against it.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    texts = [decoder.decode(vocab.special_piece(t)) for t in prompt]
    texts[-1] += decoder.decode(b"", final=True)
    if prompt[0] == vocab.bos and not text.startswith(vocab.bos_text):
        texts[0] = ""
        return texts, []
    return texts, [PromptLogprob(token=texts[0])]


def _deliver(items: list[tuple[_Sequence, Delta | BaseException]]) -> None:
    for seq, item in items:
        seq.out.put_nowait(item)
