"""What a cross-stream KV copy costs, in prompt tokens: the rule behind the engine's _CELLS_PER_TOKEN.

With one KV stream per sequence, llama.cpp copies a cached prefix from one slot to another by copying the
whole stream, at the start of the next llama_decode. This times a one-token decode with and without a
pending copy of a 4,096-cell stream, and a 64-token prompt chunk, on the same context the engine builds
(8 streams, 2 threads). Usage: .venv/bin/python bench/engine/copycost.py MODEL.gguf
"""

from __future__ import annotations

import statistics
import sys
import time

import llama_cpp

PER_SEQ, N_SEQ, ROUNDS = 4096, 8, 6


def main(model_path: str) -> None:
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = PER_SEQ * N_SEQ, 512, 512, N_SEQ
    cp.n_threads = cp.n_threads_batch = 2
    cp.kv_unified, cp.no_perf = False, True
    ctx = llama_cpp.llama_init_from_model(model, cp)
    mem = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(seq: int, tokens: list[int], pos0: int) -> float:
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos0 + i, 1, 0
            batch.seq_id[i][0] = seq
        batch.logits[len(tokens) - 1], batch.n_tokens = 1, len(tokens)
        start = time.perf_counter()
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        return time.perf_counter() - start

    decode(0, [100 + i for i in range(200)], 0)  # something in stream 0 to copy
    plain, with_copy, prompt = [], [], []
    for r in range(ROUNDS):
        plain.append(decode(1, [5], 2 * r))
        llama_cpp.llama_memory_seq_cp(mem, 0, 2, -1, -1)  # whole stream 0 -> stream 2, done in the next decode
        with_copy.append(decode(1, [5], 2 * r + 1))
        llama_cpp.llama_memory_seq_rm(mem, 3, -1, -1)
        prompt.append(decode(3, [100 + i for i in range(64)], 0))
    copy = statistics.median(with_copy) - statistics.median(plain)
    per_token = statistics.median(prompt) / 64
    print(
        f"one-token decode {statistics.median(plain) * 1e3:.1f} ms, with a pending stream copy "
        f"{statistics.median(with_copy) * 1e3:.1f} ms: the copy costs {copy * 1e3:.1f} ms for {PER_SEQ} cells"
    )
    print(
        f"prompt: {per_token * 1e3:.2f} ms a token (64-token chunk); a copy = {copy / per_token:.1f} prompt tokens, "
        f"{PER_SEQ / (copy / per_token):.0f} cells per token"
    )


if __name__ == "__main__":
    main(sys.argv[1])
