"""What preparing a chat prompt costs as the chat grows: rendering (Jinja) and tokenizing, with llama.cpp's
own special-token split and with r1serve's (engines/vocab.py), in one run.

Hardening issue 18, item 1: a body of 110,000 tiny messages took 191 s to be refused. Each message puts two
special tokens (``<|im_start|>``, ``<|im_end|>``) in the rendered prompt, and llama.cpp's split walks its
fragment list from the start for each one it finds: quadratic. Read the ratios: each row doubles the
messages, so a linear cost doubles and a quadratic one quadruples.

    .venv/bin/python bench/engine/prompt_cost.py [--model PATH.gguf] [--max 40000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from r1serve.engines.prompt import ChatTemplate
from r1serve.engines.vocab import Vocab
from r1serve.models.catalog import DEFAULT_MODEL_ID, find_entry
from r1serve.models.fetch import ensure_model
from r1serve.protocol import ChatMessage
from r1serve.settings import Settings


def timed(fn: object, *args: object, **kwargs: object) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)  # type: ignore[operator]
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None, help="a GGUF (default: the default model)")
    parser.add_argument("--max", type=int, default=40_000, help="the largest chat, in messages")
    args = parser.parse_args()
    path = args.model
    if path is None:
        entry = find_entry(DEFAULT_MODEL_ID)
        assert entry is not None
        path = ensure_model(entry, Settings().models_dir, progress=False)
    vocab = Vocab.load(path)
    template = ChatTemplate(vocab.chat_template or "", bos_token=vocab.bos_text, eos_token=vocab.eos_text)
    print(f"{path.name}: {len(vocab._specials)} special tokens")
    print(f"{'messages':>9} {'bytes':>9} {'tokens':>8} {'render s':>9} {'llama.cpp s':>12} {'r1serve s':>10} "
          f"{'llama.cpp x':>12} {'r1serve x':>10}")  # fmt: skip
    previous: tuple[float, float] | None = None
    n = 2500
    while n <= args.max:
        messages = [ChatMessage(role="user", content="hi") for _ in range(n)]
        render, text = timed(template.render, messages)
        assert isinstance(text, str)
        data = text.encode()
        theirs_s, theirs = timed(vocab._llama_tokenize, data, add_special=False, parse_special=True)
        ours_s, ours = timed(vocab.tokenize, text, add_special=False)
        assert ours == theirs, "the split differs from llama.cpp's"
        growth = ("", "") if previous is None else (f"{theirs_s / previous[0]:.2f}", f"{ours_s / previous[1]:.2f}")
        print(f"{n:9d} {len(data):9d} {len(ours):8d} {render:9.3f} {theirs_s:12.3f} {ours_s:10.3f} "  # type: ignore[arg-type]
              f"{growth[0]:>12} {growth[1]:>10}", flush=True)  # fmt: skip
        previous = (theirs_s, ours_s)
        n *= 2
    vocab.close()


if __name__ == "__main__":
    main()
