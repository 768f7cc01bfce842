"""Where the deployment URL's added latency goes: one parent, one deployment, alternating requests
straight to the replica and through the endpoint URL (as run.py's latency phase), with the parent's and
the replica's CPU time per request.

    PYTHONPATH=src .venv/bin/python bench/deployments/latency_why.py           # a real replica (the model)
    PYTHONPATH=src .venv/bin/python bench/deployments/latency_why.py mock      # run.py's instant mock
    DIAG_CMD="{python} $PWD/bench/deployments/sleepy_replica.py --port {port}" MOCK2_WORK=sleep MOCK2_MS=20 \
        PYTHONPATH=src .venv/bin/python bench/deployments/latency_why.py mock  # a replica that waits 20 ms

Environment: DIAG_N (pairs, 300), DIAG_THREADS (the real replica's threads, 2), DIAG_VIA=v1 (through
the main /v1 with the deployment's name as the model instead of the endpoint URL), DIAG_HOLD (a file to
wait for before the timed loop, to attach py-spy), DIAG_LOG (a file for the per-request times, JSON). MOCK2_WORK:
none | sleep | spin | mem (see sleepy_replica.py).
"""

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx
import run as B


def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def main():
    mock = "mock" in sys.argv
    threads = int(os.environ.get("DIAG_THREADS", "2"))
    n = int(os.environ.get("DIAG_N", "300"))
    hold = os.environ.get("DIAG_HOLD")  # a file: wait until it exists before the timed loop
    with tempfile.TemporaryDirectory(prefix="lat-diag-") as tmp:
        work = Path(tmp)
        parent, base = B.serve(work, "parent", B.MODEL, 1, "--parallel", "2")
        try:
            B.wait_health(base)
            if mock:
                body = {
                    "name": "lm",
                    "template": "mock-r1",
                    "engine": "command",
                    "replicas": 1,
                    "timeout": 120,
                    "command": os.environ.get("DIAG_CMD", f"{{python}} {B.MOCK} mock --port {{port}}"),
                }
                dep = httpx.post(f"{base}/v1/deployments", json=body, timeout=60).json()
            else:
                dep = B.create(base, "lr", B.MODEL, 1, threads)
            dep = B.until_running(base, dep["id"])
            rep = dep["replicas_detail"][0]
            straight = f"http://127.0.0.1:{rep['port']}/v1/chat/completions"
            through = dep["endpoints"][0]["url"] + "/chat/completions"
            tbody = B.CHAT
            if os.environ.get("DIAG_VIA") == "v1":
                through = base + "/v1/chat/completions"
                tbody = {**B.CHAT, "model": dep["name"]}
            print(
                json.dumps({"parent": parent.pid, "replica": rep["pid"], "straight": straight, "through": through}),
                flush=True,
            )
            log = []
            with httpx.Client(timeout=60) as c:
                for u in (straight, through) * 10:
                    c.post(u, json=B.CHAT if u == straight else tbody).raise_for_status()
                if hold:
                    while not os.path.exists(hold):
                        time.sleep(0.1)
                cpu0 = {"parent": cpu(parent.pid), "replica": cpu(rep["pid"])}
                t_start = time.time()
                for i in range(2 * n):
                    which = "s" if i % 2 == 0 else "t"
                    w0 = time.time()
                    t0 = time.perf_counter()
                    r = c.post(straight, json=B.CHAT) if which == "s" else c.post(through, json=tbody)
                    dt = time.perf_counter() - t0
                    r.raise_for_status()
                    log.append((which, w0, dt, r.json().get("usage")))
                cpu1 = {"parent": cpu(parent.pid), "replica": cpu(rep["pid"])}
            s = [d for w, _, d, _ in log if w == "s"]
            t = [d for w, _, d, _ in log if w == "t"]
            diffs = [b - a for a, b in zip(s, t, strict=True)]
            out = {
                "n": n,
                "wall_s": time.time() - t_start,
                "straight_p50_ms": statistics.median(s) * 1e3,
                "through_p50_ms": statistics.median(t) * 1e3,
                "diff_p50_ms": statistics.median(diffs) * 1e3,
                "parent_cpu_ms_per_through": (cpu1["parent"] - cpu0["parent"]) * 1e3 / n,
                "replica_cpu_ms_per_request": (cpu1["replica"] - cpu0["replica"]) * 1e3 / (2 * n),
                "usage_s": log[0][3],
                "usage_t": log[1][3],
            }
            print(json.dumps(out), flush=True)
            if os.environ.get("DIAG_LOG"):
                Path(os.environ["DIAG_LOG"]).write_text(json.dumps(log))
        finally:
            B.stop(parent)


main()
