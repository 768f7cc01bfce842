"""The embedded llama.cpp engine: one context, many sequences, one ``llama_decode`` per step.

llama-cpp-python's high-level ``Llama`` object serves one request at a time. This engine drives the
low-level batch API instead: each request owns a sequence (``seq_id``) in a shared context, and a
scheduler thread builds one batch per step holding the next token of every running sequence plus a
chunk of any prompt still being processed. Admission, cancellation and KV cleanup happen between steps.

The scheduler thread is the only code that touches the llama context. The event loop talks to it
through a locked queue of new sequences and per-sequence asyncio queues of deltas; ctypes releases the
GIL during ``llama_decode``, so HTTP handlers keep running while the model computes.

This module holds the engine's lifecycle (load, start, close, free), prompt rendering and ``generate``;
the step loop is in scheduler.py, slot placement and prefix reuse in placement.py, sampling and
scoring in sampling.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp._logger as llama_logger

from r1serve.engines import metrics
from r1serve.engines.base import Delta, Engine, GenerationRequest
from r1serve.engines.llama.grammar import Grammar, compile_response_format
from r1serve.engines.llama.placement import Placement, Slot
from r1serve.engines.llama.sampling import prompt_token_texts
from r1serve.engines.llama.scheduler import CLOSE_REASONING, Scheduler
from r1serve.engines.llama.sequence import Sequence
from r1serve.engines.llama.toolgrammar import compile_tool_choice, constrains
from r1serve.engines.prompt import CHATML_TEMPLATE, ChatTemplate
from r1serve.engines.stops import StopMatcher
from r1serve.engines.vocab import Vocab
from r1serve.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    Overloaded,
    R1ServeError,
)
from r1serve.models.catalog import LocalSource, ModelEntry, detect_reasoning_format
from r1serve.protocol import PromptLogprob
from r1serve.reasoning import ReasoningParser, prompt_opens_reasoning
from r1serve.settings import Settings

log = logging.getLogger("r1serve.engine")

_GIL_SWITCH_INTERVAL = 0.0005


def _read_template(value: str | None) -> str | None:
    if not value:
        return None
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    return value


def _no_context(*_: int) -> None:
    raise RuntimeError("the engine has no llama.cpp context")


@dataclass(eq=False)
class _Prepared:
    """A request's rendered and tokenized prompt, kept in ``GenerationRequest.prepared``: counting the
    prompt's tokens and generating render and tokenize it once between them. Valid only for the engine
    that made it and the messages (or prompt) it was made from."""

    owner: LlamaEngine
    source: object  # request.messages or request.prompt, compared by identity
    text: str
    opened: bool  # the prompt already opened the reasoning
    tokens: list[int]
    # With prompt_logprobs: each token's text, and the scored prompt's first entry (see prompt_token_texts).
    texts: list[str] | None = None
    head: list[PromptLogprob] | None = None
    gbnf: str | None = None  # the response_format's grammar


class LlamaEngine(Scheduler, Engine):
    scores_prompts = True

    def __init__(self, model_path: Path, entry: ModelEntry, settings: Settings) -> None:
        super().__init__()
        self.name = f"llama.cpp:{entry.id}"
        self.model_path = Path(model_path)
        self.entry = entry
        self.settings = settings
        self.default_max_tokens = settings.default_max_tokens
        self.context_length = settings.n_ctx
        self._model: Any = None
        self._ctx: Any = None
        self.vocab: Vocab  # set by start()
        self._batch: Any = None
        self._template: ChatTemplate | None = None
        self._placement = Placement(0, settings.n_ctx, seq_rm=_no_context, seq_cp=_no_context)  # set by _load
        self._thread: threading.Thread | None = None
        self._close_tokens: list[int] = []
        self._metrics = metrics.ModelMetrics(entry.id)
        # Worker threads rendering and tokenizing prompts: close() frees the model only once they are done.
        self._preparing = 0
        self._prepared_cond = threading.Condition()

    @property
    def _slots(self) -> list[Slot]:
        return self._placement.slots

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
        await asyncio.to_thread(self._wait_for_preparations)
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
        # weight pass per run of consecutive seq ids, which Placement.adjacent, Placement.close_gaps
        # and Scheduler._fill_batch's order keep to one.
        cparams.kv_unified = False
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self._ctx = ctx
        # Each stream holds per_seq cells, and a slot never holds more than per_seq tokens.
        self.context_length = per_seq
        self._batch = llama_cpp.llama_batch_init(self.settings.n_batch, 0, 1)
        memory = llama_cpp.llama_get_memory(ctx)
        self._placement = Placement(
            n_seq,
            per_seq,
            seq_rm=functools.partial(llama_cpp.llama_memory_seq_rm, memory),
            seq_cp=functools.partial(llama_cpp.llama_memory_seq_cp, memory),
            on_copy=self._metrics.stream_copies.inc,
        )

        template = (
            _read_template(self.settings.chat_template)
            or self.entry.chat_template
            or self.vocab.chat_template
            or CHATML_TEMPLATE
        )
        self._template = ChatTemplate(template, bos_token=self.vocab.bos_text, eos_token=self.vocab.eos_text)
        self._close_tokens = self.vocab.tokenize(CLOSE_REASONING, add_special=False)

        fmt = self.entry.reasoning_format
        if isinstance(self.entry.source, LocalSource) and fmt == "none":
            fmt = detect_reasoning_format(template, self.model_path.name)
        if self.settings.reasoning_format != "auto":
            fmt = self.settings.reasoning_format
        self.entry = replace(self.entry, reasoning_format=fmt, context_length=self.context_length)
        log.info(
            "loaded %s: %d-token context per sequence, %d sequences, %d threads, reasoning format %s",
            self.model_path.name,
            self.context_length,
            n_seq,
            self.settings.n_threads,
            fmt,
        )

    def _wait_for_preparations(self) -> None:
        with self._prepared_cond:
            self._prepared_cond.wait_for(lambda: self._preparing == 0)

    def _free(self) -> None:
        for slot_seq in self._running:
            if slot_seq.sampler:
                llama_cpp.llama_sampler_free(slot_seq.sampler)
            if slot_seq.grammar is not None:
                slot_seq.grammar.free()
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
            # tool_choice "none": the model is not told of the tools at all.
            tools = request.tools if request.tool_choice != "none" else None
            text = self._template.render(request.messages, tools=tools)
            opened = self.entry.reasoning_format == "deepseek_r1" and prompt_opens_reasoning(text)
            return text, opened
        return request.prompt or "", False

    async def count_prompt_tokens(self, request: GenerationRequest) -> int | None:
        """The prompt's exact token count. The rendered, tokenized prompt is kept on the request, and
        ``generate`` uses it. Raises InvalidRequest when the chat template refuses the messages."""
        if self._model is None or self._stopping:
            return None
        return len((await self._prepare(request)).tokens)

    def count_tokens(self, text: str) -> int | None:
        if self._model is None:
            return None
        return len(self.vocab.tokenize(text, add_special=False))

    async def _prepare(self, request: GenerationRequest) -> _Prepared:
        """The request's prompt, rendered and tokenized: the one kept on the request, else made now in
        a worker thread (a long conversation takes seconds to render, which would stall every stream
        on the event loop) and kept."""
        source = request.messages if request.messages is not None else request.prompt
        found = request.prepared
        if isinstance(found, _Prepared) and found.owner is self and found.source is source:
            return found
        prepared = await asyncio.to_thread(self._prepare_now, request, source)
        request.prepared = prepared
        return prepared

    def _prepare_now(self, request: GenerationRequest, source: object) -> _Prepared:
        with self._prepared_cond:
            if self._model is None or self._stopping:
                raise R1ServeError("the engine is not running")
            self._preparing += 1
        try:
            text, opened = self.render_prompt(request)
            self._check_size(text, request)
            tokens = self.vocab.prompt_tokens(text)
            gbnf = compile_response_format(request.response_format)
            if request.tools and constrains(request.tool_choice):
                # A required or named call: the answer is calls (response_format does not apply to them).
                assert self._template is not None
                gbnf = compile_tool_choice(
                    request.tools,
                    request.tool_choice,
                    parallel=request.parallel_tool_calls is not False,
                    fmt=self._template.tool_format,
                )
            prepared = _Prepared(self, source, text, opened, tokens, gbnf=gbnf)
            if request.prompt_logprobs and tokens:
                prepared.texts, prepared.head = prompt_token_texts(self.vocab, text, tokens)
            return prepared
        finally:
            with self._prepared_cond:
                self._preparing -= 1
                self._prepared_cond.notify_all()

    def _check_size(self, text: str, request: GenerationRequest) -> None:
        """Refuse a prompt over ``settings.max_prompt_bytes`` before it is tokenized (rendering is cheap
        next to tokenizing, and no bigger than the body and the template make it)."""
        limit = self.settings.max_prompt_bytes
        # Under the limit in characters is no proof (a character is up to 4 bytes); over it in bytes is.
        if len(text) * 4 > limit and (size := len(text.encode("utf-8"))) > limit:
            what = "messages" if request.messages is not None else "prompt"
            raise InvalidRequest(
                f"The {'rendered chat' if request.messages is not None else 'prompt'} is {size} bytes; "
                f"the limit is {limit} bytes (R1SERVE_MAX_PROMPT_BYTES). Please reduce the length of the "
                f"{what}.",
                param=what,
                code="string_above_max_length",
            )

    # ----------------------------------------------------------------- the async side

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        if self._ctx is None:
            raise R1ServeError("the engine is not running")
        prepared = await self._prepare(request)
        prompt = prepared.tokens
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
        seq = Sequence(
            request=request,
            prompt=prompt,
            max_tokens=max_tokens,
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
            parser=ReasoningParser(fmt, starts_in_reasoning=prepared.opened),
            stops=StopMatcher(request.stop),
            grammar=Grammar(prepared.gbnf) if prepared.gbnf else None,
        )
        if request.prompt_logprobs:
            assert prepared.texts is not None and prepared.head is not None
            seq.prompt_texts, seq.prompt_scores = prepared.texts, list(prepared.head)
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
            # Prompts being rendered and tokenized in worker threads, off the event loop.
            "preparing": self._preparing,
            "slots": len(self._slots),
        }

    @property
    def n_running(self) -> int:
        return len(self._running)
