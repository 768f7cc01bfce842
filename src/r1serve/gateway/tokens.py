"""Local token counting for upstreams that report no usage.

The model's own tokenizer when one is available: a GGUF (llama.cpp loads just its vocabulary with
``vocab_only=True``, milliseconds and a few MB even for a full model file), configured per provider
(``tokenizer = "PATH"``) or, for R1 models, any R1 distill GGUF already in the models cache (the
distills carry the R1 special tokens and chat markers). Otherwise
:class:`~r1serve.engines.upstream.usage.ApproxTokenCounter` (4 characters a token). Usage counted locally is
always marked ``estimated``.
"""

from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path
from typing import Any

from r1serve.engines.upstream.usage import ApproxTokenCounter, TokenCounter

log = logging.getLogger("r1serve.gateway")


class GGUFTokenCounter:
    """Counts with the tokenizer inside a GGUF (llama.cpp, vocabulary only), through the embedded engine's
    :class:`~r1serve.engines.vocab.Vocab`, whose special-token split is linear (llama.cpp's own is
    quadratic in the number of special tokens a text holds)."""

    exact = True

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._vocab: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        from r1serve.engines.vocab import Vocab  # imports llama_cpp: only when a tokenizer is configured

        with self._lock:
            if self._vocab is None:
                self._vocab = Vocab.load(self.path)

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self._vocab is None:
            self.load()
        return len(self._vocab.tokenize(text, add_special=False))

    def close(self) -> None:
        with self._lock:
            if self._vocab is not None:
                self._vocab.close()
                self._vocab = None


_cache: dict[Path, GGUFTokenCounter] = {}


@atexit.register
def _close_counters() -> None:
    # Left to the garbage collector, llama-cpp-python frees a vocabulary after the interpreter has begun
    # tearing down its modules, and prints a TypeError traceback on the way out.
    for counter in _cache.values():
        counter.close()


def gguf_counter(path: Path) -> GGUFTokenCounter:
    """One counter per file per process (the vocabulary is loaded once)."""
    path = Path(path).expanduser().resolve()
    counter = _cache.get(path)
    if counter is None:
        counter = _cache[path] = GGUFTokenCounter(path)
    return counter


def local_r1_tokenizer(models_dir: Path | None) -> Path | None:
    """An R1 GGUF present in the models cache, if any (never downloads)."""
    if models_dir is None:
        return None
    from r1serve.models.catalog import CATALOG
    from r1serve.models.fetch import local_path

    for entry in CATALOG:
        if entry.reasoning_format != "deepseek_r1":
            continue
        try:
            path = local_path(entry, models_dir)
        except OSError:
            continue
        if path is not None:
            return path
    return None


def token_counter(tokenizer: Path | None, *, models_dir: Path | None = None) -> TokenCounter:
    path = tokenizer or local_r1_tokenizer(models_dir)
    if path is None:
        return ApproxTokenCounter()
    counter = gguf_counter(path)
    try:
        counter.load()
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer must not stop serving: fall back, say so
        log.warning("tokenizer %s could not be loaded (%s); counting ~4 characters a token", path, exc)
        return ApproxTokenCounter()
    return counter
