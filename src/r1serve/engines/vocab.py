"""A GGUF's tokenizer through llama.cpp: tokens to text and back.

Used by the embedded engine, and on its own (``Vocab.load(path)`` loads the vocabulary only, no
weights) to count tokens for engines that report none and to render prompts in tests.

Special tokens written in the text are split out here rather than by llama.cpp. llama.cpp's own split
(``tokenizer_st_partition``) walks its fragment list from the start for every occurrence it finds, so a
text with n special tokens costs O(n^2): a chat of 110,000 tiny messages (220,000 ``<|im_start|>`` /
``<|im_end|>``) took minutes to tokenize, 20,000 took 3.3 s. :meth:`Vocab.tokenize` does the same
split in one pass per special token that occurs, then hands llama.cpp the plain text between them
(``parse_special`` off), so the cost is linear and the tokens are the same (tests/test_attacks.py
compares them with llama.cpp's on the real vocabularies).
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, NamedTuple

import llama_cpp
import llama_cpp._logger as llama_logger

# The token attributes that make llama.cpp treat a token's text as the token itself when it parses
# special tokens (its cache_special_tokens).
_SPECIAL_ATTRS = (
    llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
)
# C's isspace() in the "C" locale, which llama.cpp's LSTRIP / RSTRIP use.
_C_SPACE = frozenset(b" \t\n\v\f\r")


class _Special(NamedTuple):
    text: bytes
    token: int
    lstrip: bool  # whitespace before the token's text is dropped
    rstrip: bool  # and after it


def _specials(vocab: Any, n_tokens: int) -> list[_Special]:
    """The vocabulary's special tokens in llama.cpp's order: longest text first (llama.cpp's sort leaves
    ties unordered; they can differ only for two same-length special tokens that overlap in a text)."""
    found: list[_Special] = []
    for token in range(n_tokens):
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if not attr & _SPECIAL_ATTRS:
            continue
        text = llama_cpp.llama_vocab_get_text(vocab, token) or b""
        if text:
            found.append(
                _Special(
                    text,
                    token,
                    bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP),
                    bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP),
                )
            )
    found.sort(key=lambda s: -len(s.text))  # stable: ties keep id order
    return found


def split_special(data: bytes, specials: list[_Special]) -> list[tuple[int, int] | int]:
    """``data`` as llama.cpp partitions it before tokenizing: spans ``(start, end)`` of plain text and
    the ids of the special tokens between them. Each special token, longest first, splits every span
    at each of its occurrences (leftmost first, not overlapping), stripping whitespace around it where
    its attributes say so. Linear: one ``find`` per occurrence, one pass over the parts per special
    token that occurs at all."""
    parts: list[tuple[int, int] | int] = [(0, len(data))] if data else []
    for special in specials:
        text = special.text
        if text not in data:
            continue
        split: list[tuple[int, int] | int] = []
        for part in parts:
            if isinstance(part, int):
                split.append(part)
                continue
            start, end = part
            while (at := data.find(text, start, end)) >= 0:
                left = at
                if special.lstrip:
                    while left > start and data[left - 1] in _C_SPACE:
                        left -= 1
                if left > start:
                    split.append((start, left))
                split.append(special.token)
                start = at + len(text)
                if special.rstrip:
                    while start < end and data[start] in _C_SPACE:
                        start += 1
            if start < end:
                split.append((start, end))
        parts = split
    return parts


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
        self._specials = _specials(self._vocab, self.n_tokens)
        # What add_special puts around a text (BOS, EOS, or CLS / SEP, depending on the vocabulary),
        # learned from llama.cpp itself: a probe tokenized with and without it.
        probe = self._llama_tokenize(b"a", add_special=False, parse_special=False)
        wrapped = self._llama_tokenize(b"a", add_special=True, parse_special=False)
        at = next(i for i in range(len(wrapped) - len(probe) + 1) if wrapped[i : i + len(probe)] == probe)
        self._head, self._tail = wrapped[:at], wrapped[at + len(probe) :]

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
        """Special tokens written in the text (``<|im_start|>``, ``<think>``) become their ids, as with
        llama.cpp's ``parse_special``, in time linear in the text (see the module's docstring)."""
        data = text.encode("utf-8")
        tokens = list(self._head) if add_special else []
        for part in split_special(data, self._specials):
            if isinstance(part, int):
                tokens.append(part)
            else:
                # Each piece of plain text is tokenized on its own, as llama.cpp does with its fragments.
                start, end = part
                tokens.extend(self._llama_tokenize(data[start:end], add_special=False, parse_special=False))
        if add_special:
            tokens.extend(self._tail)
        return tokens

    def _llama_tokenize(self, data: bytes, *, add_special: bool, parse_special: bool) -> list[int]:
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
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
