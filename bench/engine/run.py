"""Engine benchmark: r1serve against llama.cpp's llama-server and llama-cpp-python's own server.

Starts each server in turn on the same GGUF and thread count, drives it with 1, 4, 8 and 16
concurrent streaming chat clients, and reports aggregate completion tokens/s, time to first token,
inter-token latency and errors, next to llama-bench / llama-batched-bench ceilings from the same
llama.cpp source. Writes a markdown report and a JSON file.

Not a test: timings depend on the machine. Run bench/engine/setup.sh first; then, with the
project's venv:

    .venv/bin/python bench/engine/run.py --model PATH.gguf [--model OTHER.gguf]

See BENCHMARKS.md ("Engine") for how the numbers are read.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "r1serve"

# ------------------------------------------------------------------------------------------------
# Fixed load. Half the requests share one long system prompt (prefix reuse matters for servers that
# have it); the other half use a short one. Every question asks for a long, explanatory answer so
# that max_tokens, not the end of the answer, normally ends a request; tokens actually generated are
# counted and reported.

SHARED_SYSTEM = (
    "You are a senior software engineer who mentors junior developers. You answer questions about "
    "programming, algorithms, operating systems, networking and databases. Your answers are thorough "
    "and structured: you start with a short summary, then explain the underlying concepts step by "
    "step, give at least one concrete code example in Python or C with comments, discuss common "
    "mistakes and edge cases, mention performance characteristics (time and memory complexity where "
    "relevant), and end with a list of further topics to study. You never answer in a single sentence. "
    "You prefer precise technical vocabulary, but you define every term the first time you use it. "
    "When a question is ambiguous, you state your assumptions explicitly before answering. When there "
    "are several reasonable approaches, you compare them in a small table and recommend one."
)
SHORT_SYSTEM = "You are a helpful assistant. Answer in detail."

TOPICS = [
    "how a hash table handles collisions",
    "how TCP congestion control works",
    "the difference between processes and threads",
    "how garbage collection works in CPython",
    "how B-trees are used in database indexes",
    "what virtual memory and page tables are",
    "how quicksort works and why its worst case is quadratic",
    "how HTTPS establishes a secure connection",
    "what a race condition is and how mutexes prevent it",
    "how Dijkstra's shortest path algorithm works",
    "how a compiler turns source code into machine code",
    "what the CAP theorem says about distributed systems",
    "how Python's asyncio event loop schedules coroutines",
    "how a CPU cache hierarchy affects program performance",
    "how Git stores commits, trees and blobs",
    "how dynamic programming solves the knapsack problem",
]


def request_messages(i: int) -> list[dict[str, str]]:
    """The i-th fixed chat (16 distinct user questions; even ones share the long system prompt)."""
    topic = TOPICS[i % len(TOPICS)]
    system = SHARED_SYSTEM if i % 2 == 0 else SHORT_SYSTEM
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Explain in depth {topic}. Include an example and discuss trade-offs."},
    ]


WARMUP_MESSAGES = [
    {"role": "system", "content": SHARED_SYSTEM},
    {"role": "user", "content": "Explain in depth what a linked list is."},
]


# ------------------------------------------------------------------------------------------------
# Servers


@dataclass
class ServerSpec:
    name: str  # as shown in the table
    argv: list[str]
    port: int
    usage_in_stream: bool  # sends usage in the final chunk when asked (stream_options.include_usage)
    concurrency: list[int]
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess started by the benchmark; stopped only through its own pid."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{spec.port}"
        self.model_id = "default"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        env = {**os.environ, **self.spec.env}
        self.proc = subprocess.Popen(self.spec.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                async with session.get(self.base + "/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        body = await r.json()
                        data = body.get("data") or body.get("models") or []
                        if data:
                            self.model_id = data[0].get("id") or data[0].get("name") or self.model_id
                        return
            except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError):
                pass
            await asyncio.sleep(1.0)
        raise RuntimeError(f"{self.spec.name} not ready after {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------------------------------------
# One streaming request


@dataclass
class RequestResult:
    ok: bool
    error: str = ""
    start: float = 0.0
    ttft: float | None = None  # seconds to the first chunk with text
    gaps: list[float] = field(default_factory=list)  # seconds between text chunks
    chunks: int = 0  # SSE chunks carrying text
    usage_tokens: int | None = None  # usage.completion_tokens from the final chunk, when sent
    prompt_tokens: int | None = None  # usage.prompt_tokens, when sent
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when sent
    end: float = 0.0
    finish_reason: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    @property
    def decode_rate(self) -> float | None:
        """Tokens/s of this stream after its first token (prompt processing excluded)."""
        if self.ttft is None or self.tokens < 2:
            return None
        span = self.end - (self.start + self.ttft)
        return (self.tokens - 1) / span if span > 0 else None


async def stream_chat(
    session: aiohttp.ClientSession, server: Server, messages: list[dict[str, str]], max_tokens: int
) -> RequestResult:
    body: dict[str, Any] = {
        "model": server.model_id,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    if server.spec.usage_in_stream:
        body["stream_options"] = {"include_usage": True}
    res = RequestResult(ok=False, start=time.perf_counter())
    last = None
    done = False
    try:
        async with session.post(
            server.base + "/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=900)
        ) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                res.end = time.perf_counter()
                return res
            buf = b""
            async for raw in resp.content:
                buf += raw
                if not buf.endswith(b"\n"):
                    continue
                line, buf = buf.strip(), b""
                if not line.startswith(b"data:"):
                    continue  # blank lines, ": keep-alive" comments, event: lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {json.dumps(chunk['error'])[:200]}"
                    break
                now = time.perf_counter()
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
                    if text:
                        res.chunks += 1
                        if res.ttft is None:
                            res.ttft = now - res.start
                        else:
                            res.gaps.append(now - last)
                        last = now
                    if choice.get("finish_reason"):
                        res.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    res.usage_tokens = int(usage["completion_tokens"])
                    res.prompt_tokens = usage.get("prompt_tokens")
                    res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, ValueError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.end = time.perf_counter()
    if not res.error:
        if not done and res.finish_reason is None:
            res.error = "stream ended without finish_reason or [DONE]"
        elif res.tokens == 0:
            res.error = "no tokens"
        else:
            res.ok = True
    return res


# ------------------------------------------------------------------------------------------------
# One measured run: c clients, each sending `rounds` requests back to back


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return list(os.getloadavg())


# The machine is shared and has few cores; llama.cpp's threads spin at barriers, so a single foreign
# busy process can slow decoding several-fold. Every run therefore records how much CPU *other*
# processes used while it ran (all CPU time from /proc/stat minus the server's and this process's).

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_busy_jiffies() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle  # guest time is already counted in user


def proc_jiffies(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    rest = stat.rsplit(")", 1)[1].split()
    return int(rest[11]) + int(rest[12])  # utime + stime


class ForeignCpu:
    """CPU (in cores) used by processes other than `pids` and this one between start() and stop()."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = [*pids, os.getpid()]

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = cpu_busy_jiffies()
        self.ours0 = sum(proc_jiffies(p) for p in self.pids)

    def stop(self) -> float:
        wall = time.monotonic() - self.t0
        foreign = (cpu_busy_jiffies() - self.busy0) - (sum(proc_jiffies(p) for p in self.pids) - self.ours0)
        return max(0.0, foreign / CLK_TCK / wall) if wall > 0 else 0.0


async def wait_quiet(pids: list[int], max_wait: float, threshold: float) -> float:
    """Wait (up to max_wait s) until other processes use < threshold cores over 3 s; returns the last sample."""
    deadline = time.monotonic() + max_wait
    while True:
        probe = ForeignCpu(pids)
        probe.start()
        await asyncio.sleep(3.0)
        used = probe.stop()
        if used < threshold or time.monotonic() >= deadline:
            return used
        print(f"    waiting for a quieter machine: other processes use {used:.2f} cores", file=sys.stderr, flush=True)


async def measure(
    session: aiohttp.ClientSession,
    server: Server,
    clients: int,
    rounds: int,
    max_tokens: int,
    quiet_wait: float = 0.0,
    quiet_threshold: float = 0.25,
) -> dict[str, Any]:
    # Warm-up (not measured): loads weights into the page cache, primes the shared system prompt.
    warm = await stream_chat(session, server, WARMUP_MESSAGES, max_tokens)
    assert server.proc is not None
    foreign_before = await wait_quiet([server.proc.pid], quiet_wait, quiet_threshold) if quiet_wait else None
    load = loadavg()
    foreign = ForeignCpu([server.proc.pid])
    foreign.start()

    async def client(k: int) -> list[RequestResult]:
        out = []
        for r in range(rounds):
            out.append(await stream_chat(session, server, request_messages(k + r * clients), max_tokens))
        return out

    t0 = time.perf_counter()
    per_client = await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    foreign_during = foreign.stop()
    results = [r for rs in per_client for r in rs]
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    rates = [x for r in ok if (x := r.decode_rate) is not None]
    counted = "usage" if ok and all(r.usage_tokens is not None for r in ok) else "chunks"
    return {
        "server": server.spec.name,
        "clients": clients,
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if not r.ok})[:3],
        "warmup_ok": warm.ok,
        "loadavg_start": load,
        "foreign_cpu_before": foreign_before,
        "foreign_cpu_during": foreign_during,
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_counted_by": counted,
        "text_chunks": sum(r.chunks for r in ok),
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "cached_prompt_tokens": (
            sum(r.cached_tokens for r in ok if r.cached_tokens is not None)
            if any(r.cached_tokens is not None for r in ok)
            else None
        ),
        "tokens_per_request_min": min((r.tokens for r in ok), default=0),
        "tokens_per_request_max": max((r.tokens for r in ok), default=0),
        "agg_tps": tokens / wall if wall > 0 else 0.0,
        "ttft_p50": pct(ttfts, 0.5),
        "ttft_p95": pct(ttfts, 0.95),
        "itl_p50": pct(gaps, 0.5),
        "itl_p95": pct(gaps, 0.95),
        "stream_decode_tps_mean": statistics.fmean(rates) if rates else None,
    }


# ------------------------------------------------------------------------------------------------
# Ceilings: llama-bench and llama-batched-bench from the same llama.cpp source


def run_tool(argv: list[str], timeout: float = 3600) -> tuple[str, float]:
    """Runs a llama.cpp tool; returns its stdout and the CPU (cores) other processes used meanwhile."""
    print("  $", shlex.join(argv), file=sys.stderr, flush=True)
    t0, busy0 = time.monotonic(), cpu_busy_jiffies()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.monotonic() - t0
    tool_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    foreign = max(0.0, ((cpu_busy_jiffies() - busy0) / CLK_TCK - tool_s) / wall)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout, foreign


def llama_bench_tg(bin_dir: Path, model: Path, threads: int) -> tuple[float, float, list[str]]:
    """llama-bench tg128 (three repetitions): tok/s, the CPU other processes used meanwhile, the command."""
    argv = [str(bin_dir / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", "0", "-n", "128", "-r", "3",
            "-o", "json"]  # fmt: skip
    text, foreign = run_tool(argv)
    return float(json.loads(text)[0]["avg_ts"]), foreign, argv


def tg_row(bin_dir: Path, model: Path, threads: int) -> dict[str, Any]:
    """A run row for llama-bench tg128 taken between server runs (``--servers ...,llama-bench,...``), so
    that the one-stream target compares neighbours in time rather than a ceiling measured minutes
    earlier on a VM whose speed drifts."""
    load = loadavg()
    tps, foreign, argv = llama_bench_tg(bin_dir, model, threads)
    return {
        "command": shlex.join(argv),
        "server": "llama-bench tg128", "clients": 1, "requests": 3, "errors": 0, "completion_tokens": 384,
        "tokens_counted_by": "tool", "agg_tps": tps, "stream_decode_tps_mean": tps, "ttft_p50": None,
        "ttft_p95": None, "itl_p50": None, "itl_p95": None, "prompt_tokens": None, "cached_prompt_tokens": None,
        "loadavg_start": load, "foreign_cpu_during": foreign,
    }  # fmt: skip


def ceilings(bin_dir: Path, model: Path, threads: int, max_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {"loadavg_start": loadavg()}
    bench_argv = [
        str(bin_dir / "llama-bench"),
        "-m",
        str(model),
        "-t",
        str(threads),
        "-p",
        "512",
        "-n",
        "128",
        "-r",
        "3",
        "-o",
        "json",
    ]
    text, out["llama_bench_foreign_cpu"] = run_tool(bench_argv)
    rows = json.loads(text)
    out["llama_bench_cmd"] = shlex.join(bench_argv)
    for row in rows:
        kind = "pp" if row.get("n_prompt", 0) > 0 else "tg"
        out[f"llama_bench_{kind}_tps"] = row["avg_ts"]
        out[f"llama_bench_{kind}_stddev"] = row.get("stddev_ts")
    npl = [1, 2, 4, 8, 16]
    npp, ntg = 128, max_tokens
    bb_argv = [
        str(bin_dir / "llama-batched-bench"),
        "-m",
        str(model),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-c",
        str(max(npl) * (npp + ntg) + 256),
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        str(npp),
        "-ntg",
        str(ntg),
        "-npl",
        ",".join(map(str, npl)),
        "--output-format",
        "jsonl",
    ]
    text, out["batched_bench_foreign_cpu"] = run_tool(bb_argv)
    out["batched_bench_cmd"] = shlex.join(bb_argv)
    bb = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            bb[int(row["pl"])] = {"s_tg": row["speed_tg"], "s_pp": row["speed_pp"], "s": row["speed"]}
    out["batched_bench"] = bb
    return out


# ------------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem_kb = int(line.split()[1])
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "src"], capture_output=True, text=True
            ).stdout.strip()
        )
    except OSError:
        rev, dirty = "", False
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "r1serve_git": rev + ("+dirty" if dirty else ""),
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def fmt(x: float | None, scale: float = 1.0, nd: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{nd}f}"


NOISY_CORES = 0.10  # other processes using more than this during a run make a comparison inconclusive


def targets(model_result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets. A server run several times (``--servers r1serve,llama-server,r1serve,...``)
    counts by the median of its runs, and ratios are of medians: on this VM the speed drifts by more
    than the gaps measured, and only alternated runs compare like with like."""
    runs = model_result["runs"]
    ceil = model_result.get("ceilings") or {}

    def of(server_prefix: str, c: int) -> list[dict[str, Any]]:
        # The runs of the first matching server name (r1serve --parallel 8, not also --parallel 16).
        rows = [r for r in runs if r["server"].startswith(server_prefix) and r["clients"] == c]
        return [r for r in rows if r["server"] == rows[0]["server"]]

    def median(rows: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    def noise(*groups: list[dict[str, Any]]) -> list[float | None]:
        return [r.get("foreign_cpu_during") for rows in groups for r in rows]

    def runs_note(*groups: list[dict[str, Any]]) -> str:
        counts = [len(rows) for rows in groups]
        return "" if all(n == 1 for n in counts) else f" (medians of {' / '.join(map(str, counts))} runs)"

    out = []

    def add(
        name: str,
        value: float | None,
        threshold: float,
        higher_is_better: bool = True,
        note: str = "",
        noise: list[float | None] = (),
    ) -> None:
        ok = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
        worst = max((x for x in noise if x is not None), default=0.0)
        noisy = worst > NOISY_CORES
        if noisy:
            note += f" (other processes used up to {worst:.2f} cores: inconclusive)"
        out.append(
            {"target": name, "value": value, "threshold": threshold, "pass": ok, "noisy": noisy, "note": note.strip()}
        )

    r1 = of("r1serve", 1)
    # llama-bench tg128: the rows taken between servers, else the ceiling measured before them.
    tg_rows = of("llama-bench", 1)
    if not tg_rows and ceil.get("llama_bench_tg_tps"):
        tg_rows = [{"stream_decode_tps_mean": ceil["llama_bench_tg_tps"],
                    "foreign_cpu_during": ceil.get("llama_bench_foreign_cpu")}]  # fmt: skip
    r1_decode, tg = median(r1, "stream_decode_tps_mean"), median(tg_rows, "stream_decode_tps_mean")
    if r1_decode and tg:
        add(
            "1 stream: r1serve stream decode / llama-bench tg",
            r1_decode / tg,
            0.95,
            note=f"{fmt(r1_decode)} / {fmt(tg)} tok/s{runs_note(r1, tg_rows)}",
            noise=noise(r1, tg_rows),
        )
    for c in (4, 8):
        r, ls, lp = of("r1serve", c), of("llama-server -np 8", c), of("llama-cpp-python", c)
        r_tps, ls_tps, lp_tps = median(r, "agg_tps"), median(ls, "agg_tps"), median(lp, "agg_tps")
        if r_tps and ls_tps:
            add(
                f"{c} streams: r1serve / llama-server -np 8",
                r_tps / ls_tps,
                1.0,
                note=f"{fmt(r_tps)} / {fmt(ls_tps)} tok/s{runs_note(r, ls)}",
                noise=noise(r, ls),
            )
        if r_tps and lp_tps:
            add(
                f"{c} streams: r1serve / llama-cpp-python server",
                r_tps / lp_tps,
                2.5,
                note=f"{fmt(r_tps)} / {fmt(lp_tps)} tok/s{runs_note(r, lp)}",
                noise=noise(r, lp),
            )
    r1_errors = sum(r["errors"] for r in runs if r["server"].startswith("r1serve"))
    add("r1serve errors (all runs)", float(r1_errors), 0.0, higher_is_better=False)
    r, ls = of("r1serve", 8), of("llama-server -np 8", 8)
    r_ttft, ls_ttft = median(r, "ttft_p95"), median(ls, "ttft_p95")
    if r_ttft is not None and ls_ttft:
        add(
            "8 streams: TTFT p95 r1serve / llama-server -np 8",
            r_ttft / ls_ttft,
            1.0,
            higher_is_better=False,
            note=f"{fmt(r_ttft, 1000, 0)} / {fmt(ls_ttft, 1000, 0)} ms{runs_note(r, ls)}",
            noise=noise(r, ls),
        )
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, Linux {m['kernel']}; "
        f"{m['date_utc']}; r1serve {m['r1serve_git']}.",
        f"Command: `{report['command']}`",
        "",
    ]
    for mr in report["models"]:
        ceil = mr.get("ceilings") or {}
        lines += [f"### {mr['model_name']}", ""]
        lines += [f"Load: {report['load_description']}", ""]
        lines += ["Servers:", ""]
        for name, argv in mr["server_commands"].items():
            lines.append(f"- {name}: `{argv}`")
        lines.append("")
        if ceil:
            lines.append(
                f"Ceilings (llama.cpp tools, same source and flags; load average at start "
                f"{' '.join(f'{x:.2f}' for x in ceil['loadavg_start'])}): "
                f"`llama-bench` pp512 {fmt(ceil.get('llama_bench_pp_tps'))} tok/s, "
                f"tg128 {fmt(ceil.get('llama_bench_tg_tps'))} tok/s; `llama-batched-bench` "
                f"(npp 128, ntg {report['max_tokens']}) decode tok/s, all sequences together: "
                + ", ".join(
                    f"{k} seq {v['s_tg']:.1f}"
                    for k, v in sorted(ceil["batched_bench"].items(), key=lambda kv: int(kv[0]))
                )
                + f". Other processes' CPU meanwhile: {ceil['llama_bench_foreign_cpu']:.2f} / "
                f"{ceil['batched_bench_foreign_cpu']:.2f} cores."
            )
            lines.append("")
        lines += [
            "| server | clients | requests | errors | tokens (counted by) | agg tok/s | stream decode tok/s "
            "| TTFT p50 / p95 ms | ITL p50 / p95 ms | prompt tokens (cached) | load avg at start "
            "| other procs' CPU during run |",
            "|---|---:|---:|---:|---|---:|---:|---|---|---|---|---:|",
        ]
        for r in mr["runs"]:
            lines.append(
                f"| {r['server']} | {r['clients']} | {r['requests']} | {r['errors']} | "
                f"{r['completion_tokens']} ({r['tokens_counted_by']}) | **{r['agg_tps']:.1f}** | "
                f"{fmt(r['stream_decode_tps_mean'])} | {fmt(r['ttft_p50'], 1000, 0)} / {fmt(r['ttft_p95'], 1000, 0)} | "
                f"{fmt(r['itl_p50'], 1000, 0)} / {fmt(r['itl_p95'], 1000, 0)} | "
                f"{r.get('prompt_tokens') or '-'} ({'-' if r.get('cached_prompt_tokens') is None else r['cached_prompt_tokens']}) | "
                f"{' '.join(f'{x:.2f}' for x in r['loadavg_start'])} | {r['foreign_cpu_during']:.2f} cores |"
            )
        lines.append("")
        if mr.get("targets"):
            lines += ["| target | ratio | threshold | result | detail |", "|---|---:|---:|---|---|"]
            for t in mr["targets"]:
                res = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "FAIL")
                res += "*" if t.get("noisy") else ""
                lines.append(f"| {t['target']} | {fmt(t['value'], nd=2)} | {t['threshold']} | {res} | {t['note']} |")
            lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Main


def server_specs(args: argparse.Namespace, model: Path) -> list[ServerSpec]:
    t, ctx = str(args.threads), args.ctx
    specs = []
    for name in args.servers:
        port = free_port()
        if name == "r1serve":
            # Like llama-server: 8 sequences for c <= 8, 16 for c = 16. A unified KV cache sized for
            # more sequences than are running keeps more idle cached prompts in attention's way.
            for par in args.r1_parallel:
                conc = args.concurrency if par == min(args.r1_parallel) else [c for c in args.concurrency if c >= par]
                specs.append(
                    ServerSpec(
                        f"r1serve --parallel {par}",
                        [
                            str(ROOT / ".venv/bin/r1serve"),
                            "serve",
                            "--model",
                            str(model),
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(port),
                            "--threads",
                            t,
                            "--ctx",
                            str(ctx),
                            "--parallel",
                            str(par),
                            "--log-level",
                            "warning",
                        ],
                        port,
                        True,
                        conc,
                    )
                )
                port = free_port()
        elif name == "llama-server":
            for np_ in args.llama_server_np:
                conc = args.concurrency if np_ == 8 else [c for c in args.concurrency if c >= np_]
                specs.append(
                    ServerSpec(
                        f"llama-server -np {np_}",
                        [
                            str(args.llama_bin_dir / "llama-server"),
                            "-m",
                            str(model),
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(port),
                            "-t",
                            t,
                            "-tb",
                            t,
                            "-np",
                            str(np_),
                            "-c",
                            str(np_ * ctx),
                        ],
                        port,
                        True,
                        conc,
                    )
                )
                port = free_port()
        elif name == "llama-cpp-python":
            specs.append(
                ServerSpec(
                    "llama-cpp-python server",
                    [
                        str(args.lcpp_python),
                        "-m",
                        "llama_cpp.server",
                        "--model",
                        str(model),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--n_threads",
                        t,
                        "--n_threads_batch",
                        t,
                        "--n_ctx",
                        str(ctx),
                        # queue concurrent requests (its default cuts a running stream short when another arrives)
                        "--interrupt_requests",
                        "False",
                    ],
                    # its streaming chunks carry no usage: tokens are counted as text chunks
                    port,
                    False,
                    args.concurrency,
                )
            )
        elif name == "llama-bench":
            specs.append(ServerSpec("llama-bench tg128", [], 0, False, [1]))
        else:
            raise SystemExit(f"unknown server {name}")
    return specs


async def bench_model(args: argparse.Namespace, model: Path, log_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"model_path": str(model), "model_name": model.name, "runs": [], "server_commands": {}}
    if not args.skip_ceilings:
        print(f"[{model.name}] ceilings", file=sys.stderr, flush=True)
        if args.quiet_wait:
            await wait_quiet([], args.quiet_wait, args.quiet_threshold)
        result["ceilings"] = ceilings(args.llama_bin_dir, model, args.threads, args.max_tokens)
    # A fresh connection per request: a pooled keep-alive connection the server has since closed
    # would otherwise surface as a spurious client error.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for spec in server_specs(args, model):
            if spec.name.startswith("llama-bench"):
                print(f"[{model.name}] llama-bench tg128", file=sys.stderr, flush=True)
                if args.quiet_wait:
                    await wait_quiet([], args.quiet_wait, args.quiet_threshold)
                result["runs"].append(tg_row(args.llama_bin_dir, model, args.threads))
                result["server_commands"][spec.name] = result["runs"][-1]["command"]
                print(f"  llama-bench tg128: {result['runs'][-1]['agg_tps']:.1f} tok/s", file=sys.stderr, flush=True)
                continue
            result["server_commands"][spec.name] = shlex.join(spec.argv)
            server = Server(spec, log_dir / f"{model.stem}.{re.sub(r'[^A-Za-z0-9]+', '-', spec.name)}.log")
            print(f"[{model.name}] starting {spec.name}", file=sys.stderr, flush=True)
            server.start()
            try:
                await server.wait_ready(session)
                for c in spec.concurrency:
                    rounds = max(args.rounds, math.ceil(args.min_requests / c))
                    run = await measure(
                        session, server, c, rounds, args.max_tokens, args.quiet_wait, args.quiet_threshold
                    )
                    result["runs"].append(run)
                    print(
                        f"  {spec.name:28s} c={c:2d}: {run['agg_tps']:6.1f} tok/s  errors {run['errors']}  "
                        f"ttft p95 {fmt(run['ttft_p95'], 1000, 0)} ms  load {run['loadavg_start']}  "
                        f"others' cpu {run['foreign_cpu_during']:.2f}",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                server.stop()
    result["targets"] = targets(result)
    return result


def read_setup_env() -> dict[str, str]:
    """LLAMA_BIN_DIR / LCPP_PYTHON printed by setup.sh (it is quick when everything is built)."""
    out = subprocess.run(["bash", str(ROOT / "bench/engine/setup.sh")], capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", type=Path, required=True, help="GGUF path (repeatable)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=4096, help="context per sequence, every server")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="requests each client sends back to back")
    p.add_argument("--min-requests", type=int, default=8, help="at least this many requests per run")
    p.add_argument(
        "--servers",
        type=lambda s: s.split(","),
        default=["r1serve", "llama-server", "llama-cpp-python"],
        help="in the order run; repeat names to alternate them (targets use the medians); "
        "'llama-bench' runs llama-bench tg128 at that point",
    )
    p.add_argument(
        "--r1-parallel",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[8, 16],
        help="r1serve --parallel values: the smallest serves every c, the others c >= value",
    )
    p.add_argument(
        "--llama-server-np",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[8, 16],
        help="llama-server -np values; -np 8 runs every concurrency, others only c >= np",
    )
    p.add_argument("--skip-ceilings", action="store_true")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=90.0,
        help="before each run, wait up to this many seconds for other processes to go quiet (0: don't)",
    )
    p.add_argument("--quiet-threshold", type=float, default=0.25, help="'quiet': others use fewer cores than this")
    p.add_argument("--llama-bin-dir", type=Path)
    p.add_argument("--lcpp-python", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "bench/engine/results")
    p.add_argument("--render", type=Path, help="only print the markdown report of an earlier JSON result")
    if "--render" in sys.argv:
        i = sys.argv.index("--render")
        report = json.loads(Path(sys.argv[i + 1]).read_text())
        for mr in report["models"]:
            mr["targets"] = targets(mr)
        print(markdown(report))
        return
    args = p.parse_args()

    if args.llama_bin_dir is None or args.lcpp_python is None:
        env = read_setup_env()
        args.llama_bin_dir = args.llama_bin_dir or Path(env["LLAMA_BIN_DIR"])
        args.lcpp_python = args.lcpp_python or Path(env["LCPP_PYTHON"])

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine(),
        "threads": args.threads,
        "ctx_per_sequence": args.ctx,
        "max_tokens": args.max_tokens,
        "load_description": (
            f"c concurrent streaming clients (c = {', '.join(map(str, args.concurrency))}), each sending "
            f"max({args.rounds}, ceil({args.min_requests}/c)) chat requests back to back; 16 fixed "
            f"questions, half behind one shared ~160-token system prompt; max_tokens {args.max_tokens}, "
            "temperature 0; one unmeasured warm-up request before each run. Agg tok/s = completion tokens "
            "of all requests / wall time of the run. Stream decode tok/s = mean over requests of "
            "(tokens - 1) / (last text chunk - first text chunk). TTFT = first chunk with text. ITL = gap "
            "between text chunks."
        ),
        "models": [],
    }
    log_dir = args.out / f"logs-{stamp}"
    for model in args.model:
        report["models"].append(asyncio.run(bench_model(args, model.resolve(), log_dir)))
        # written after each model so a partial run still leaves its numbers
        (args.out / f"engine-{stamp}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (args.out / f"engine-{stamp}.md").write_text(md + "\n")
    print(md)
    print(f"\nwrote {args.out / f'engine-{stamp}.json'} and .md", file=sys.stderr)


if __name__ == "__main__":
    main()
