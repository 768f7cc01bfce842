"""Instructions per request of a gateway path, counted by valgrind (callgrind): a cost that does not drift.

Requests/s and CPU time per request on a shared two-core VM move by 10-20% from one run to the next
(other tenants, frequency), more than most single changes to the gateway. The number of instructions a
server executes for a request does not: it is the same, to a percent or so, however busy the machine is.
It leaves out time in the kernel (system calls) and memory stalls, so it complements run.py's
measurements rather than replacing them.

    .venv/bin/python bench/gateway/count.py                       # floor and r1serve, JSON and streaming
    .venv/bin/python bench/gateway/count.py --paths r1serve --modes json

Each path runs twice under ``valgrind --tool=callgrind`` (the mock upstream and the client do not): once
serving ``--requests`` A, once B, 16 clients at a time; the difference of the two totals over B - A is
the cost of one request, start-up and shutdown cancelling out. Valgrind comes from Debian (installed
with apt-get when missing). A run takes a minute or two per path and mode (the server runs ~50x slower).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (run.py next to this file)

_COLLECTED = re.compile(r"Collected : (\d+)")


async def load(port: int, requests: int, stream: bool, clients: int = 16) -> None:
    """``requests`` chat completions, ``clients`` at a time, each checked and read to the end."""
    assert requests % clients == 0, f"--requests must be multiples of {clients}"
    body = {"model": bench.MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 64,
            "stream": stream}  # fmt: skip
    headers = {"Authorization": f"Bearer {bench.KEY}"}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:

        async def client(n: int) -> None:
            for _ in range(n):
                async with session.post(url, json=body, headers=headers) as resp:
                    text = await resp.text()
                    whole = text.rstrip().endswith("data: [DONE]") if stream else "How can I help?" in text
                    assert resp.status == 200 and whole and "I help?" in text, f"{resp.status}: {text[:200]}"

        await asyncio.gather(*(client(requests // clients) for _ in range(clients)))


def instructions(valgrind: str, path: str, mock_port: int, requests: int, stream: bool, work: Path) -> int:
    """Total instructions of one server process that served ``requests`` requests."""
    port = bench.free_port()
    upstream = f"http://127.0.0.1:{mock_port}/v1"
    cmd = [valgrind, "--tool=callgrind", f"--callgrind-out-file={work}/callgrind.{path}.{requests}", bench.PY]
    env = None
    if path == "serve":
        # `r1serve serve --upstream URL` as run.py's serve path starts it (SQLite accounts, a fresh data dir).
        env = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
        env |= {"R1SERVE_API_KEYS": bench.KEY, "R1SERVE_DATA_DIR": str(work / f"serve-data-{requests}-{stream}")}
        cmd += ["-m", "r1serve", "serve", "--upstream", upstream, "--reasoning-dialect", "reasoning_content",
                "--port", str(port)]  # fmt: skip
    else:
        cmd += [str(bench.HERE / "servers.py"), path, "--port", str(port), "--upstream", upstream]
    if path == "r1serve":
        cmd += ["--log-file", str(work / f"{path}-app.log")]
    log = work / f"valgrind.{path}.{'stream' if stream else 'json'}.{requests}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=work)
        try:
            bench.wait_http(port, "/health" if path in ("r1serve", "serve") else "/v1/models", 600)
            asyncio.run(load(port, requests, stream))
        finally:
            proc.send_signal(signal.SIGINT)  # uvicorn shuts down, valgrind writes its totals
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
    found = _COLLECTED.search(log.read_text(errors="replace"))
    if not found:
        raise RuntimeError(f"no instruction count in {log}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--paths", default="floor,r1serve", help="servers.py roles (floor, r1serve) or serve (`r1serve serve`)"
    )
    ap.add_argument("--modes", default="json,stream")
    ap.add_argument("--requests", default="160,960", help="A,B: requests in the two runs of each path")
    ap.add_argument("--write", type=Path, help="append the results as a section of this markdown file")
    args = ap.parse_args()
    small, large = (int(n) for n in args.requests.split(","))
    valgrind = bench.ensure_debian_tool("valgrind")
    work = Path(tempfile.mkdtemp(prefix="r1serve-count-"))
    mock = bench.Proc(
        "mock", [bench.PY, str(bench.HERE / "servers.py"), "mock", "--port", str(mock_port := bench.free_port())], work
    )
    rows: dict[tuple[str, str], float] = {}
    try:
        bench.wait_http(mock_port, "/v1/models", 30)
        for mode in args.modes.split(","):
            for path in args.paths.split(","):
                a = instructions(valgrind, path, mock_port, small, mode == "stream", work)
                b = instructions(valgrind, path, mock_port, large, mode == "stream", work)
                rows[(path, mode)] = (b - a) / (large - small)
                print(f"{path:8s} {mode:6s} {rows[(path, mode)] / 1000:8.0f} k instructions/request", flush=True)
    finally:
        mock.stop()
    lines = ["| path | mode | instructions per request | x floor |", "|---|---|---:|---:|"]
    for (path, mode), count in rows.items():
        floor = rows.get(("floor", mode))
        ratio = f"{count / floor:.2f}" if floor else "-"
        lines.append(f"| {path} | {mode} | {count / 1000:,.0f} k | {ratio} |")
    table = "\n".join(lines)
    print()
    print(table)
    print(f"\nlogs: {work}")
    if args.write:
        bench.append_section(args.write, "Gateway instructions per request", [
            f"Command: `{bench.command_line()}`. Machine: {bench.machine()}. {bench.versions()}.",
            f"Callgrind totals of the server process, (run of {large} requests - run of {small}) / {large - small}; "
            "16 clients, the same mock upstream and bodies as run.py. User-space instructions only (no kernel time).",
            "",
            table,
        ])  # fmt: skip


if __name__ == "__main__":
    main()
