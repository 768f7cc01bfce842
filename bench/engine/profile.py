"""Profile r1serve under the engine benchmark's load with py-spy (diagnosis, not a benchmark).

Starts r1serve on a GGUF, sends the same fixed chats as run.py (c concurrent streaming clients),
samples the server with `py-spy record` meanwhile, and prints: per-request prompt / cached tokens
(does prefix reuse hit?), time split of every thread (in llama_decode, Python work, waiting), and the
hottest Python functions outside llama_decode.

    .venv/bin/python bench/engine/profile.py --model PATH.gguf --clients 8

py-spy comes from PyPI (`pip install py-spy`); by default the one in the benchmark's lcpp venv.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (run.py next to this file)

DEFAULT_PYSPY = bench.CACHE / "bench/lcpp-venv/bin/py-spy"


def summarize(raw: Path, top: int) -> str:
    """py-spy raw format: 'thread (0x..);frame;frame;... count' per line, frames root first."""
    per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    hot: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        text = ";".join(frames)
        if "llama_decode" in text:
            kind = "llama_decode (C, GIL released)"
        elif "_run (r1serve/engines/llama/scheduler.py" in text and ("wait (threading.py" in text):
            kind = "idle: scheduler waiting for work"
        elif "select (selectors.py" in text or "_run_once (asyncio" in text and "select" in text:
            kind = "idle: event loop waiting on sockets"
        elif any(f.startswith(("wait (threading.py", "_worker (concurrent", "get (queue.py")) for f in frames[-2:]):
            kind = "idle: thread pool / waits"
        else:
            kind = "Python work"
            # attribute to the innermost frame from r1serve, else the leaf
            ours = [f for f in frames if "r1serve/" in f]
            hot[(ours[-1] if ours else frames[-1]) if frames else "?"] += n
        per_thread[thread][kind] += n
    out = ["Per thread (samples by kind):"]
    for thread, kinds in sorted(per_thread.items(), key=lambda kv: -sum(kv[1].values())):
        total = sum(kinds.values())
        parts = ", ".join(f"{k} {v / total:.0%}" for k, v in kinds.most_common())
        out.append(f"  {thread}: {total} samples: {parts}")
    total_hot = sum(hot.values())
    out.append(f"\nHottest 'Python work' frames (innermost r1serve frame, else leaf), {total_hot} samples:")
    for frame, n in hot.most_common(top):
        out.append(f"  {n:6d}  {n / max(total_hot, 1):5.1%}  {frame}")
    return "\n".join(out)


async def drive(args: argparse.Namespace) -> None:
    port = bench.free_port()
    spec = bench.ServerSpec(
        f"r1serve --parallel {args.parallel}",
        [
            str(bench.ROOT / ".venv/bin/r1serve"),
            "serve",
            "--model",
            str(args.model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            str(args.threads),
            "--ctx",
            str(args.ctx),
            "--parallel",
            str(args.parallel),
            "--log-level",
            "warning",
        ],
        port,
        True,
        [args.clients],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    server = bench.Server(spec, args.out / "profile-r1serve.log")
    server.start()
    assert server.proc is not None
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            await server.wait_ready(session)
            warm = await bench.stream_chat(session, server, bench.WARMUP_MESSAGES, args.max_tokens)
            print(f"warm-up: ok={warm.ok} tokens={warm.tokens}", flush=True)
            if args.quiet_wait:
                used = await bench.wait_quiet([server.proc.pid], args.quiet_wait, 0.25)
                print(f"other processes before the run: {used:.2f} cores", flush=True)
            raw = args.out / f"pyspy-c{args.clients}.txt"
            spy = None
            if not args.no_pyspy:
                spy = subprocess.Popen(
                    [
                        str(args.pyspy),
                        "record",
                        "-p",
                        str(server.proc.pid),
                        "-f",
                        "raw",
                        "-o",
                        str(raw),
                        "-r",
                        str(args.rate),
                        "--threads",
                        "--idle",
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                await asyncio.sleep(1.0)
            rounds = max(args.rounds, math.ceil(args.min_requests / args.clients))
            foreign = bench.ForeignCpu([server.proc.pid] + ([spy.pid] if spy else []))
            foreign.start()
            t0 = time.perf_counter()

            async def client(k: int) -> list[tuple[int, bench.RequestResult]]:
                out = []
                for r in range(rounds):
                    i = k + r * args.clients
                    out.append(
                        (i, await bench.stream_chat(session, server, bench.request_messages(i), args.max_tokens))
                    )
                return out

            results = [x for xs in await asyncio.gather(*(client(k) for k in range(args.clients))) for x in xs]
            wall = time.perf_counter() - t0
            others = foreign.stop()
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            tokens = sum(r.tokens for _, r in results if r.ok)
            print(
                f"\nc={args.clients}: {len(results)} requests, {tokens} tokens in {wall:.1f}s = {tokens / wall:.1f} tok/s; "
                f"errors {sum(not r.ok for _, r in results)}; other processes {others:.2f} cores"
            )
            print("request  prompt  cached  ttft_ms  tokens")
            for i, r in sorted(results, key=lambda x: x[1].start):
                print(f"{i:7d} {r.prompt_tokens!s:>7} {r.cached_tokens!s:>7} {(r.ttft or 0) * 1000:8.0f} {r.tokens:7d}")
            if spy is not None and raw.exists():
                print()
                print(summarize(raw, args.top))
                print(f"\nraw profile: {raw}")
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--quiet-wait", type=float, default=60.0)
    p.add_argument("--no-pyspy", action="store_true")
    p.add_argument("--pyspy", type=Path, default=DEFAULT_PYSPY)
    p.add_argument("--out", type=Path, default=bench.ROOT / "bench/engine/results/profile")
    asyncio.run(drive(p.parse_args()))


if __name__ == "__main__":
    main()
