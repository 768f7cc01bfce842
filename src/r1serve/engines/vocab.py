"""A GGUF's tokenizer through llama.cpp: tokens to text and back.

Used by the embedded engine, and on its own (``Vocab.load(path)`` loads the vocabulary only, no
weights) to count tokens for engines that report none and to render prompts in tests.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp._logger as llama_logger


class Vocab:
    def __init__(self, model: Any, *, owned: bool = False) -> None:
        self._model = model
        self._owned = owned
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_tokens = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self.bos = llama_cpp.llama_vocab_bos(self._vocab)  # -1: none
        self.bos_text = self.special_text(self.bos)
        self.eos_text = self.special_text(llama_cpp.llama_vocab_eos(self._vocab))

    @classmethod
    def load(cls, path: Path | str) -> Vocab:
        llama_logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise ValueError(f"llama.cpp could not read the vocabulary of {path}")
        return cls(model, owned=True)

    def close(self) -> None:
        if self._owned and self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    @property
    def handle(self) -> Any:
        """The ``llama_vocab`` pointer, for llama.cpp calls that take one (the grammar sampler)."""
        return self._vocab

    @property
    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", "replace") if raw else None

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        """Special tokens written in the text (``<|im_start|>``, ``<think>``) become their ids."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, True)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, True)
        return list(buf[:n])

    def prompt_tokens(self, text: str) -> list[int]:
        # Chat templates usually write the BOS themselves; adding another would change the output.
        add_bos = not (self.bos_text and text.startswith(self.bos_text))
        return self.tokenize(text, add_special=add_bos)

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (may be part of a UTF-8 character)."""
        cached = self._pieces.get(token)
        if cached is None:
            cached = self._to_piece(token, special=False)
            self._pieces[token] = cached
        return cached

    def special_text(self, token: int) -> str:
        return self.special_piece(token).decode("utf-8", "replace")

    def special_piece(self, token: int) -> bytes:
        """The token's bytes, a special token's written out (``<|im_start|>``) rather than empty."""
        if token < 0:
            return b""
        return self._to_piece(token, special=True)

    def is_eog(self, token: int) -> bool:
        # Cached: each ctypes call releases and retakes the GIL, which the scheduler pays per token.
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return eog

    def _to_piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[:n]
