"""Choosing tokens and scoring them: the request's sampler chain, token logprobs, a prompt's scores.

The scheduler calls these with the context and the batch index of the logits to read; it takes the
argmax of a greedy sequence itself, inline (``make_sampler`` says when that is the same choice).
"""

from __future__ import annotations

import codecs
import os
from typing import Any

import llama_cpp
import numpy as np

from r1serve.engines.base import SamplingParams
from r1serve.engines.vocab import Vocab
from r1serve.protocol import PromptLogprob, TokenLogprob, TopLogprob

# Penalties look back this far; OpenAI's presence/frequency penalties cover the whole completion.
_PENALTY_WINDOW = 4096


def make_sampler(sp: SamplingParams, n_vocab: int) -> tuple[Any, bool]:
    """The request's llama.cpp sampler chain, and whether it is plain greedy (temperature 0, no
    penalties): then the scheduler takes the argmax itself, the same choice, without the chain."""
    # The API has already filled in the model's recommended values; what is still unset gets
    # OpenAI's defaults (temperature 1, no truncation).
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
        add(chain, llama_cpp.llama_sampler_init_penalties(n_vocab, _PENALTY_WINDOW, repeat, frequency, presence))
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


def token_logprobs(ctx: Any, vocab: Vocab, logits_at: int, token: int, top_n: int) -> list[TokenLogprob]:
    """The sampled token's logprob and the ``top_n`` most likely tokens', from the logits at ``logits_at``."""
    ptr = llama_cpp.llama_get_logits_ith(ctx, logits_at)
    logits = np.ctypeslib.as_array(ptr, shape=(vocab.n_tokens,)).astype(np.float64)
    peak = logits.max()
    logsumexp = peak + np.log(np.exp(logits - peak).sum())
    top: list[TopLogprob] = []
    if top_n > 0:
        ids = np.argpartition(-logits, top_n)[:top_n]
        ids = ids[np.argsort(-logits[ids])]
        top = [_top_logprob(vocab, int(i), float(logits[i] - logsumexp)) for i in ids]
    chosen = _top_logprob(vocab, token, float(logits[token] - logsumexp))
    return [TokenLogprob(**chosen.model_dump(), top_logprobs=top)]


def _top_logprob(vocab: Vocab, token: int, logprob: float) -> TopLogprob:
    piece = vocab.piece(token)
    return TopLogprob(token=piece.decode("utf-8", "replace"), logprob=logprob, bytes=list(piece))


def score_prompt(
    ctx: Any,
    vocab: Vocab,
    prompt: list[int],
    texts: list[str],
    n_past: int,
    start: int,
    fed: int,
    top_n: int,
) -> list[PromptLogprob]:
    """Score the prompt tokens that a chunk's logits predict: the chunk fed ``fed`` tokens from prompt
    position ``n_past``, at batch index ``start``. Position p's logits give the logprob of the prompt's
    token p + 1 (the last position's give the first sample instead)."""
    first = n_past + 1
    n = min(fed, len(prompt) - first)
    if n <= 0:
        return []
    rows = np.stack([
        np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, start + i), shape=(vocab.n_tokens,))
        for i in range(n)
    ])  # fmt: skip
    peak = rows.max(axis=1, keepdims=True)
    logsumexp = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
    targets = prompt[first : first + n]
    chosen = rows[np.arange(n), targets] - logsumexp
    best = None
    if top_n:
        best = np.argpartition(-rows, top_n, axis=1)[:, :top_n]
        best = np.take_along_axis(best, np.argsort(-np.take_along_axis(rows, best, axis=1), axis=1), axis=1)
    scores = []
    for i in range(n):
        top = []
        if best is not None:
            top = [TopLogprob(token=vocab.special_text(int(t)), logprob=float(rows[i, t] - logsumexp[i]))
                   for t in best[i]]  # fmt: skip
        scores.append(PromptLogprob(token=texts[first + i], logprob=float(chosen[i]), top_logprobs=top))
    return scores


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
