"""The embedded llama.cpp engine (``LlamaEngine``), a package along its seams:

- engine.py: the engine's lifecycle (load, start, close), prompt rendering, ``generate``, ``health``;
- scheduler.py: the step loop, one ``llama_decode`` per step over every running sequence;
- placement.py: which slot (seq id) a sequence gets and what of its prompt it finds cached there;
- sampling.py: sampler chains, token logprobs, prompt scoring;
- sequence.py: the state a request's sequence carries through the scheduler.

``LlamaEngine`` and ``prompt_token_texts`` are imported lazily, so that placement.py (which does not
use llama.cpp) can be imported without loading llama.cpp's library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from r1serve.engines.llama.engine import LlamaEngine
    from r1serve.engines.llama.sampling import prompt_token_texts

__all__ = ["LlamaEngine", "prompt_token_texts"]


def __getattr__(name: str) -> Any:
    if name == "LlamaEngine":
        from r1serve.engines.llama.engine import LlamaEngine

        return LlamaEngine
    if name == "prompt_token_texts":
        from r1serve.engines.llama.sampling import prompt_token_texts

        return prompt_token_texts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
