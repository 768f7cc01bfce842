"""Deployments benchmark: start-up, added latency, requests lost when a replica is killed.

    PYTHONPATH=src .venv/bin/python bench/deployments/run.py                  # all three, defaults
    PYTHONPATH=src .venv/bin/python bench/deployments/run.py --only latency --latency-requests 400

1. **start-up**: ``r1serve serve --model M`` from spawn to its first answer, beside
   ``POST /v1/deployments`` (one replica of M) to the first answer through the endpoint URL, each
   ``--startup-runs`` times, alternating.
2. **latency**: the same chat request sent straight to a replica's port and through the deployment URL,
   alternating one by one, sequentially; p50 of each and the p50 of the paired differences (through
   minus straight). Twice: with a replica that is the gateway benchmark's instant mock server (run by the
   command engine: the deployment path's own cost) and with a real replica (one token, prompt cached).
3. **kill**: ``--clients`` clients (half JSON, half streaming) loop on the endpoint URL of a deployment of
   two replicas; one replica is SIGKILLed after ``--kill-after`` seconds; the load runs ``--load-seconds``.
   Counted: requests that failed before their first byte ("lost", target 0), streams that had started
   and ended with an error event then ``[DONE]``, and that the killed replica came back READY.

Everything runs on loopback in a throwaway data dir; every process started is stopped at the end. The
model is the embedded default unless ``--model`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

MODEL = "qwen2.5-coder-0.5b-instruct"
CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 1, "temperature": 0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(work: Path, name: str, model: str, threads: int, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
    for key in ("R1SERVE_MODELS_DIR",):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(R1SERVE_DATA_DIR=str(work / name), R1SERVE_N_THREADS=str(threads))
    (work / name).mkdir(parents=True, exist_ok=True)
    log = open(work / f"{name}.log", "wb")  # noqa: SIM115 - the server's whole life
    proc = subprocess.Popen(
        [sys.executable, "-m", "r1serve", "serve", "--model", model, "--port", str(port), *extra],
        cwd=work / name, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def first_answer(url: str, deadline: float = 900.0) -> float:
    """Poll ``url`` (a chat completions URL) until it answers 200; the monotonic time it did."""
    end = time.monotonic() + deadline
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < end:
            try:
                resp = client.post(url, json=CHAT)
                if resp.status_code == 200:
                    return time.monotonic()
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"{url} never answered")


def wait_health(url: str) -> None:
    end = time.monotonic() + 900
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} never healthy")


def create(base: str, name: str, model: str, replicas: int, threads: int) -> dict[str, Any]:
    body = {"name": name, "template": model, "replicas": replicas, "timeout": 120, "threads": threads}
    resp = httpx.post(f"{base}/v1/deployments", json=body, timeout=60)
    resp.raise_for_status()
    return resp.json()  # type: ignore[no-any-return]


def get(base: str, ident: str) -> dict[str, Any]:
    return httpx.get(f"{base}/v1/deployments/{ident}", timeout=30).json()  # type: ignore[no-any-return]


def until_running(base: str, ident: str) -> dict[str, Any]:
    end = time.monotonic() + 900
    while time.monotonic() < end:
        dep = get(base, ident)
        if dep["status"] == "RUNNING":
            return dep
        time.sleep(0.2)
    raise RuntimeError(f"deployment {ident} never RUNNING")


def stop_deployment(base: str, ident: str) -> None:
    httpx.post(f"{base}/v1/deployments/{ident}/stop", timeout=300).raise_for_status()


# ----------------------------------------------------------------------------- 1. start-up


def bench_startup(work: Path, base: str, args: argparse.Namespace) -> dict[str, Any]:
    serve_times, deploy_times = [], []
    for run in range(args.startup_runs):
        t0 = time.monotonic()
        proc, url = serve(work, f"plain-{run}", args.model, args.threads)
        try:
            serve_times.append(first_answer(f"{url}/v1/chat/completions") - t0)
        finally:
            stop(proc)
        t0 = time.monotonic()
        dep = create(base, f"startup-{run}", args.model, 1, args.threads)
        deploy_times.append(first_answer(dep["endpoints"][0]["url"] + "/chat/completions") - t0)
        stop_deployment(base, dep["id"])
    return {"serve_s": serve_times, "deployment_s": deploy_times}


# ----------------------------------------------------------------------------- 2. added latency


MOCK = Path(__file__).resolve().parents[1] / "gateway" / "servers.py"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc), NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_latency(base: str, args: argparse.Namespace, *, mock: bool, parent: int) -> dict[str, Any]:
    """Straight to the replica against through the deployment URL. ``mock``: the replica is the gateway
    benchmark's instant OpenAI-compatible server run by the command engine, so the difference is the
    deployment path's own cost, not the model's noise. ``parent``: the supervising server's pid, whose CPU
    time over the timed requests is reported per request through it (less noisy than wall clock on a
    shared machine; it includes the server's background work over that time)."""
    if mock:
        body = {"name": "latency-mock", "template": "mock-r1", "engine": "command", "replicas": 1, "timeout": 120,
                "command": f"{{python}} {MOCK} mock --port {{port}}"}  # fmt: skip
        resp = httpx.post(f"{base}/v1/deployments", json=body, timeout=60)
        resp.raise_for_status()
        dep = resp.json()
    else:
        dep = create(base, "latency", args.model, 1, args.threads)
    dep = until_running(base, dep["id"])
    straight = f"http://127.0.0.1:{dep['replicas_detail'][0]['port']}/v1/chat/completions"
    through = dep["endpoints"][0]["url"] + "/chat/completions"
    times: dict[str, list[float]] = {"straight": [], "through": []}
    with httpx.Client(timeout=60) as client:
        for url in (straight, through) * 10:  # warm both paths (prefix cache, connections)
            client.post(url, json=CHAT).raise_for_status()
        cpu0 = cpu_seconds(parent)
        for i in range(args.latency_requests * 2):
            which = "straight" if i % 2 == 0 else "through"
            t0 = time.perf_counter()
            resp = client.post(straight if which == "straight" else through, json=CHAT)
            times[which].append(time.perf_counter() - t0)
            resp.raise_for_status()
        parent_cpu = cpu_seconds(parent) - cpu0
    stop_deployment(base, dep["id"])
    requests_each = args.latency_requests
    diffs = [b - a for a, b in zip(times["straight"], times["through"], strict=True)]
    return {
        "replica": "mock (command engine)" if mock else args.model,
        "requests_each": requests_each,
        "straight_p50_ms": statistics.median(times["straight"]) * 1000,
        "through_p50_ms": statistics.median(times["through"]) * 1000,
        "paired_diff_p50_ms": statistics.median(diffs) * 1000,
        "straight_p90_ms": statistics.quantiles(times["straight"], n=10)[-1] * 1000,
        "through_p90_ms": statistics.quantiles(times["through"], n=10)[-1] * 1000,
        "parent_cpu_ms_per_request_through": parent_cpu * 1000 / requests_each,
    }


# ----------------------------------------------------------------------------- 3. kill under load


async def _client(url: str, stream: bool, until: float, tally: dict[str, int]) -> None:
    body = {
        "messages": [{"role": "user", "content": "Count from one to twenty."}],
        "max_tokens": 48,
        "stream": stream,
    }
    async with httpx.AsyncClient(timeout=600) as client:
        while time.monotonic() < until:
            tally["sent"] += 1
            started = False
            try:
                if not stream:
                    resp = await client.post(url, json=body)
                    ok = resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] is not None
                    tally["ok" if ok else "lost"] += 1
                    continue
                events: list[str] = []
                async with client.stream("POST", url, json=body) as resp:
                    if resp.status_code != 200:
                        tally["lost"] += 1
                        continue
                    async for line in resp.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            if '"content":' in line.replace(" ", "") and '"content":null' not in line.replace(" ", ""):
                                started = True
                errored = any(e.startswith("{") and '"error"' in e for e in events)
                done = bool(events) and events[-1] == "[DONE]"
                if errored and started and done:
                    tally["cut_clean"] += 1  # started, then an error event and [DONE]: the allowed outcome
                elif errored or not done:
                    tally["lost" if not started else "cut_unclean"] += 1
                else:
                    tally["ok"] += 1
            except httpx.HTTPError:
                tally["cut_unclean" if started else "lost"] += 1


def bench_kill(base: str, args: argparse.Namespace) -> dict[str, Any]:
    dep = create(base, "killed", args.model, 2, max(1, args.threads // 2))
    dep = until_running(base, dep["id"])
    url = dep["endpoints"][0]["url"] + "/chat/completions"
    tally = dict.fromkeys(("sent", "ok", "lost", "cut_clean", "cut_unclean"), 0)
    victim = dep["replicas_detail"][0]["pid"]

    async def main() -> None:
        until = time.monotonic() + args.load_seconds
        clients = [asyncio.create_task(_client(url, i % 2 == 1, until, tally)) for i in range(args.clients)]
        await asyncio.sleep(args.kill_after)
        os.kill(victim, signal.SIGKILL)
        await asyncio.gather(*clients)

    asyncio.run(main())
    back = False
    end = time.monotonic() + 600
    while time.monotonic() < end:
        replica = get(base, dep["id"])["replicas_detail"][0]
        if replica["status"] == "READY" and replica["pid"] != victim:
            back = True
            break
        time.sleep(0.5)
    final = get(base, dep["id"])
    stop_deployment(base, dep["id"])
    return {
        **tally,
        "clients": args.clients,
        "load_seconds": args.load_seconds,
        "killed_replica_ready_again": back,
        "requests_per_replica": [r["requests"] for r in final["replicas_detail"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--threads", type=int, default=2, help="threads of each r1serve serve / single replica")
    parser.add_argument("--only", choices=("startup", "latency", "kill"), action="append")
    parser.add_argument("--startup-runs", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--load-seconds", type=float, default=40.0)
    parser.add_argument("--kill-after", type=float, default=12.0)
    args = parser.parse_args()
    wanted = set(args.only or ("startup", "latency", "kill"))

    with tempfile.TemporaryDirectory(prefix="r1serve-bench-deploy-") as tmp:
        work = Path(tmp)
        # The parent server: it supervises the deployments (and loads its own copy of the model).
        parent, base = serve(work, "parent", args.model, 1, "--parallel", "2")
        results: dict[str, Any] = {
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "model": args.model,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        try:
            wait_health(base)
            if "startup" in wanted:
                results["startup"] = bench_startup(work, base, args)
            if "latency" in wanted:
                results["latency_mock"] = bench_latency(base, args, mock=True, parent=parent.pid)
                results["latency_model"] = bench_latency(base, args, mock=False, parent=parent.pid)
            if "kill" in wanted:
                results["kill"] = bench_kill(base, args)
        finally:
            stop(parent)
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
