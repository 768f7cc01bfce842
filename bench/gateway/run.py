"""Gateway overhead benchmark: what r1serve adds in front of an upstream, next to a floor proxy and LiteLLM.

    .venv/bin/python bench/gateway/run.py                 # every path, c=1/16/64, JSON and streaming
    .venv/bin/python bench/gateway/run.py --write BENCHMARKS.md --soak 300
    .venv/bin/python bench/gateway/run.py --paths direct,r1serve --duration 4 --profile

Paths (servers.py has the code of each):
  direct        wrk -> mock upstream (raw ASGI, uvicorn + uvloop + httptools)
  floor         wrk -> raw ASGI proxy + aiohttp client, no logic -> mock   (the floor)
  floor-httpx   the same proxy with an httpx client                         (client library choice)
  r1serve       wrk -> the stripped app (real app: static key auth, routing, normalisation, usage, cost,
                no accounts database) -> mock
  serve         wrk -> `r1serve serve --upstream URL` as a user starts it: defaults, R1SERVE_API_KEYS, the
                accounts database (SQLite in the data dir): key check, limits, a ledger row per request,
                committed before the response ends -> mock
  serve-pg      the same with R1SERVE_DATABASE_URL on a throwaway PostgreSQL on loopback (fsync on, as
                PostgreSQL ships; tests/pg.py starts it, scripts/install-test-services.sh installs it)
  litellm       wrk -> LiteLLM proxy (master key, no database) -> mock

Load: ``wrk -t1 -cC -dDs --latency`` with a Lua script POSTing a chat body (``stream`` false or true).
wrk comes from Debian (installed with apt-get when missing); LiteLLM (``litellm[proxy]``) is installed
into its own venv under ~/.cache/r1serve/bench/litellm-venv on first use.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PY = sys.executable
CACHE = Path(os.environ.get("R1SERVE_BENCH_CACHE", Path.home() / ".cache" / "r1serve" / "bench"))
LITELLM_VENV = CACHE / "litellm-venv"
KEY = "sk-bench"
MODEL = "deepseek-reasoner"
ALL_PATHS = ("direct", "floor", "floor-httpx", "r1serve", "serve", "serve-pg", "litellm")
# The paths that run r1serve's code (checked for reasoning and usage, profiled with --profile).
R1SERVE_PATHS = ("r1serve", "serve", "serve-pg")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str, timeout: float, headers: dict[str, str] | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path, headers=headers or {})
            if conn.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing answered on port {port}{path} within {timeout}s")


def post(port: int, path: str, body: dict[str, object]) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


class Proc:
    def __init__(
        self, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.log = open(log_dir / f"{name}.log", "wb")
        self.p = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )

    def rss_mb(self) -> float:
        """RSS of the process (and its children: LiteLLM forks a worker)."""
        total = 0
        pids = [self.p.pid]
        try:
            out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.p.pid)], capture_output=True, text=True)
            pids += [int(x) for x in out.stdout.split()]
        except OSError:
            pass
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGINT)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.log.close()


# ----------------------------------------------------------------------------- tools


def ensure_debian_tool(name: str) -> str:
    """The path of ``name``, installed from the Debian package of the same name when missing."""
    path = shutil.which(name)
    if path:
        return path
    print(f"installing {name} (apt-get)...", flush=True)
    subprocess.run(["apt-get", "install", "-y", name], check=False, capture_output=True)
    if not shutil.which(name):
        subprocess.run(["apt-get", "update"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", name], check=True, capture_output=True)
    return shutil.which(name) or name


def ensure_wrk() -> str:
    return ensure_debian_tool("wrk")


def ensure_litellm() -> Path:
    exe = LITELLM_VENV / "bin" / "litellm"
    if exe.exists():
        return exe
    print(f"installing litellm[proxy] into {LITELLM_VENV} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return exe


def litellm_version() -> str:
    out = subprocess.run(
        [str(LITELLM_VENV / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip() or "?"


# ----------------------------------------------------------------------------- wrk


@dataclass
class Result:
    path: str
    mode: str
    conc: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    requests: int
    cpu_us: float | None = None  # CPU time of the path's server process per request (None: not measured)


def lua_script(tmp: Path, stream: bool) -> Path:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 64, "stream": stream}
    script = tmp / f"post_{'stream' if stream else 'json'}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
    )
    return script


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return float("nan")
    return float(m.group(1)) * _UNIT[m.group(2)]


def cpu_seconds(proc: Proc) -> float:
    """User + system CPU time so far of the process and its children (LiteLLM forks a worker): per-request
    CPU is the quantity to compare on a shared machine, where requests/s also depends on what else runs."""
    pids = [proc.p.pid]
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.p.pid)], capture_output=True, text=True)
    pids += [int(x) for x in out.stdout.split()]
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def run_wrk(
    wrk: str, port: int, script: Path, conc: int, duration: int, timeout: int = 10
) -> tuple[float, float, float, int, int]:
    cmd = [wrk, "-t1", f"-c{conc}", f"-d{duration}s", "--latency", f"--timeout={timeout}s", "-s", str(script),
           f"http://127.0.0.1:{port}/v1/chat/completions"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return rps, p50, p99, errors, requests


# ----------------------------------------------------------------------------- paths


def start_postgres() -> tuple[object, str]:
    """A throwaway PostgreSQL (tests/pg.py's server, fsync on) with an upgraded accounts database."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pg import PostgresServer  # type: ignore[import-not-found]

    from r1serve.accounts import db as accounts_db
    from r1serve.settings import Settings

    server = PostgresServer(fsync=True)
    server.start()
    url = server.create_database()
    engine = accounts_db.make_engine(accounts_db.database_url(Settings(_env_file=None, database_url=url)))  # type: ignore[call-arg]
    accounts_db.upgrade(engine)  # `r1serve db upgrade`
    engine.dispose()
    return server, url


def start_path(name: str, mock_port: int, log_dir: Path, database_url: str | None = None) -> tuple[Proc, int]:
    port = free_port()
    upstream = f"http://127.0.0.1:{mock_port}/v1"
    if name in ("serve", "serve-pg"):
        # As a user starts it; its own data dir (the SQLite database, the key secret) and a fresh cwd
        # (no .env). R1SERVE_* variables of the caller's environment are left out.
        env = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
        env |= {"R1SERVE_API_KEYS": KEY, "R1SERVE_DATA_DIR": str(log_dir / f"{name}-data")}
        if name == "serve-pg":
            assert database_url is not None
            env["R1SERVE_DATABASE_URL"] = database_url
        cwd = log_dir / f"{name}-cwd"
        cwd.mkdir(exist_ok=True)
        proc = Proc(name, [PY, "-m", "r1serve", "serve", "--upstream", upstream, "--reasoning-dialect",
                           "reasoning_content", "--port", str(port)], log_dir, env, cwd=cwd)  # fmt: skip
        wait_http(port, "/health", 60)
        return proc, port
    if name == "floor":
        proc = Proc(name, [PY, str(HERE / "servers.py"), "floor", "--port", str(port), "--upstream", upstream], log_dir)
    elif name == "floor-httpx":
        proc = Proc(name, [PY, str(HERE / "servers.py"), "floor", "--port", str(port), "--upstream", upstream,
                           "--client", "httpx"], log_dir)  # fmt: skip
    elif name == "r1serve":
        proc = Proc(name, [PY, str(HERE / "servers.py"), "r1serve", "--port", str(port), "--upstream", upstream,
                           "--log-file", str(log_dir / "r1serve-app.log")], log_dir)  # fmt: skip
    elif name == "litellm":
        exe = ensure_litellm()
        config = log_dir / "litellm.yaml"
        config.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL}\n"
            "    litellm_params:\n"
            "      model: openai/mock-r1\n"
            f"      api_base: {upstream}\n"
            "      api_key: sk-mock\n"
            "general_settings:\n"
            f"  master_key: {KEY}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "LITELLM_"))}
        proc = Proc(name, [str(exe), "--config", str(config), "--port", str(port), "--host", "127.0.0.1"], log_dir, env)
        wait_http(port, "/health/liveliness", 120)
        return proc, port
    else:
        raise ValueError(name)
    wait_http(port, "/health" if name == "r1serve" else "/v1/models", 60)
    return proc, port


def check(name: str, port: int) -> None:
    """One request each way, before timing: the path must really work."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 64}
    status, text = post(port, "/v1/chat/completions", body)
    assert status == 200, f"{name}: {status} {text[:300]}"
    assert "Hello! How can I help?" in text, f"{name}: unexpected body {text[:300]}"
    if name in R1SERVE_PATHS:
        data = json.loads(text)
        assert data["choices"][0]["message"]["reasoning_content"] == "Okay, the user says hello. I should greet back."
        assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 9
    status, text = post(port, "/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and "[DONE]" in text, f"{name}: {status} {text[:300]}"


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
    return f"{cpu}, {os.cpu_count()} cores, {mem} GB RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def versions() -> str:
    import aiohttp
    import fastapi
    import httpx
    import uvicorn

    return f"uvicorn {uvicorn.__version__}, fastapi {fastapi.__version__}, aiohttp {aiohttp.__version__}, httpx {httpx.__version__}"


def table(results: list[Result], concs: list[int]) -> str:
    direct = {(r.mode, r.conc): r for r in results if r.path == "direct"}
    floor = {(r.mode, r.conc): r for r in results if r.path == "floor"}
    lines = [
        "| path | mode | concurrency | requests/s | p50 | p99 | added p50 vs direct | x floor req/s | CPU us/req | x floor CPU | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d, f = direct.get((r.mode, r.conc)), floor.get((r.mode, r.conc))
        added = f"{r.p50_ms - d.p50_ms:.2f} ms" if d and r.path != "direct" else "-"
        ratio = f"{r.rps / f.rps:.2f}" if f and f.rps else "-"
        cpu = f"{r.cpu_us:.0f}" if r.cpu_us is not None else "-"
        cpu_ratio = f"{r.cpu_us / f.cpu_us:.2f}" if r.cpu_us is not None and f and f.cpu_us else "-"
        lines.append(
            f"| {r.path} | {r.mode} | {r.conc} | {r.rps:,.0f} | {fmt_ms(r.p50_ms)} | {fmt_ms(r.p99_ms)} | {added} | {ratio} "
            f"| {cpu} | {cpu_ratio} | {r.errors} |"
        )
    return "\n".join(lines)


def targets(results: list[Result]) -> str:
    """The accounts-on rows against the stripped app (req/s at c=64) and the floor (p50 at c=1)."""
    by = {(r.path, r.mode, r.conc): r for r in results}
    lines = [
        "| path | mode | req/s at c=64 / stripped app's | added p50 at c=1 over the floor |",
        "|---|---|---|---|",
    ]
    for path in ("serve", "serve-pg"):
        for mode in ("json", "stream"):
            r64, s64 = by.get((path, mode, 64)), by.get(("r1serve", mode, 64))
            r1, f1 = by.get((path, mode, 1)), by.get(("floor", mode, 1))
            if r64 is None and r1 is None:
                continue
            ratio = f"{r64.rps / s64.rps:.2f}x" if r64 and s64 and s64.rps else "-"
            added = f"{r1.p50_ms - f1.p50_ms:+.2f} ms" if r1 and f1 else "-"
            lines.append(f"| {path} | {mode} | {ratio} | {added} |")
    return "\n".join(lines)


def fmt_ms(ms: float) -> str:
    return f"{ms * 1000:.0f} us" if ms < 1 else f"{ms:.2f} ms" if ms < 100 else f"{ms:.0f} ms"


def soak(wrk: str, port: int, proc: Proc, tmp: Path, seconds: int) -> list[tuple[float, float]]:
    """Load r1serve for ``seconds`` (c=16, JSON then streaming halves), sampling RSS."""
    samples = [(0.0, proc.rss_mb())]
    started = time.time()
    half = max(1, seconds // 2)
    for stream in (False, True):
        p = subprocess.Popen([wrk, "-t1", "-c16", f"-d{half}s", "-s", str(lua_script(tmp, stream)),
                              f"http://127.0.0.1:{port}/v1/chat/completions"], stdout=subprocess.DEVNULL)  # fmt: skip
        while p.poll() is None:
            time.sleep(min(15, half))
            samples.append((time.time() - started, proc.rss_mb()))
    samples.append((time.time() - started, proc.rss_mb()))
    return samples


def profile(port: int, proc: Proc, tmp: Path, wrk: str, log_dir: Path, name: str = "r1serve") -> str:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(spy).exists():
        subprocess.run([PY, "-m", "pip", "install", "-q", "py-spy"], check=True)
    out = log_dir / f"{name}-profile.txt"
    load = subprocess.Popen([wrk, "-t1", "-c64", "-d12s", "-s", str(lua_script(tmp, False)),
                             f"http://127.0.0.1:{port}/v1/chat/completions"], stdout=subprocess.DEVNULL)  # fmt: skip
    time.sleep(1)
    subprocess.run([spy, "record", "-p", str(proc.p.pid), "-d", "8", "-r", "200", "-f", "raw", "-o", str(out), "--nonblocking"],
                   capture_output=True)  # fmt: skip
    load.wait()
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default=",".join(ALL_PATHS))
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--modes", default="json,stream")
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--soak", type=int, default=0, help="seconds of load on r1serve, RSS sampled (0: none)")
    ap.add_argument("--profile", action="store_true", help="py-spy r1serve under c=64 JSON load")
    ap.add_argument("--write", type=Path, help="append the results as a section of this markdown file")
    args = ap.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    concs = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")
    wrk = ensure_wrk()
    log_dir = Path(tempfile.mkdtemp(prefix="r1serve-bench-"))
    tmp = log_dir
    results: list[Result] = []
    soak_samples: list[tuple[float, float]] = []
    profile_path = None
    postgres, database_url = start_postgres() if "serve-pg" in paths else (None, None)
    mock = Proc("mock", [PY, str(HERE / "servers.py"), "mock", "--port", str(mock_port := free_port())], log_dir)
    try:
        wait_http(mock_port, "/v1/models", 30)
        for name in paths:
            if name == "direct":
                proc, port = None, mock_port
            else:
                proc, port = start_path(name, mock_port, log_dir, database_url)
            try:
                if name != "direct":
                    check(name, port)
                for mode in modes:
                    script = lua_script(tmp, mode == "stream")
                    run_wrk(wrk, port, script, 16, 2)  # warm-up: connections, caches, JIT-free Python paths
                    for conc in concs:
                        cpu0 = cpu_seconds(proc) if proc is not None else None
                        rps, p50, p99, errors, requests = run_wrk(wrk, port, script, conc, args.duration)
                        cpu_us = None
                        if proc is not None and cpu0 is not None and requests:
                            cpu_us = (cpu_seconds(proc) - cpu0) / requests * 1e6
                        r = Result(name, mode, conc, rps, p50, p99, errors, requests, cpu_us)
                        results.append(r)
                        cpu_text = f"  CPU {cpu_us:5.0f} us/req" if cpu_us is not None else ""
                        print(f"{name:12s} {mode:6s} c={conc:<3d} {rps:9.0f} req/s  p50 {fmt_ms(p50):>9s}  "
                              f"p99 {fmt_ms(p99):>9s}  errors {errors}{cpu_text}", flush=True)  # fmt: skip
                if name in R1SERVE_PATHS and proc is not None:
                    if args.profile:
                        profile_path = profile(port, proc, tmp, wrk, log_dir, name)
                        print("profile:", profile_path, flush=True)
                    if args.soak and name == "r1serve":
                        soak_samples = soak(wrk, port, proc, tmp, args.soak)
                        print("soak RSS (s, MB):", [(round(t), round(m, 1)) for t, m in soak_samples], flush=True)
            finally:
                if proc is not None:
                    proc.stop()
    finally:
        mock.stop()
        if postgres is not None:
            postgres.stop()  # type: ignore[attr-defined]
    md = table(results, concs)
    if any(r.path in ("serve", "serve-pg") for r in results):
        md += "\n\nTargets (same run): `r1serve serve` with accounts on against the stripped app and the floor.\n\n"
        md += targets(results)
    print()
    print(md)
    print(f"\nlogs: {log_dir}")
    if args.write:
        section = [
            f"Command: `{command_line()}` (wrk -t1 -d{args.duration}s --latency, Lua POST chat body, after a 2 s warm-up).",
            f"Machine: {machine()}. {versions()}"
            + (f", LiteLLM {litellm_version()}" if "litellm" in paths else "")
            + ".",
            "Mock upstream: raw ASGI under uvicorn + uvloop + httptools; streaming answers are 11 SSE events (role, 5 reasoning_content, 3 content, finish, usage) + [DONE].",
            "`r1serve` is the stripped app (the real app with static key auth, routing, reasoning normalisation, "
            "usage, cost, request ids, access log to a file, and no accounts database); `serve` is "
            "`r1serve serve --upstream URL --reasoning-dialect reasoning_content` as a user starts it (defaults, "
            "R1SERVE_API_KEYS, the SQLite accounts database, each response's ledger row committed before its end "
            "goes out), `serve-pg` the same on PostgreSQL (loopback, fsync on). Each asks the upstream for the "
            "shape the client asked for (JSON or a stream).",
            "All rows from the same run; the machine's 2 cores are shared by wrk, the mock and the path under test.",
            "",
            md,
        ]
        if soak_samples:
            start, end = soak_samples[0][1], soak_samples[-1][1]
            section += ["", f"Soak: {args.soak} s of load on r1serve (c=16, JSON then streaming): RSS {start:.1f} MB at "
                            f"start, {end:.1f} MB at end; samples (s, MB): "
                            + ", ".join(f"({t:.0f}, {m:.1f})" for t, m in soak_samples)]  # fmt: skip
        append_section(args.write, "Gateway overhead", section)


def command_line() -> str:
    """How this script was run, for the report."""
    return " ".join(["python", f"bench/gateway/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def append_section(path: Path, title: str, lines: list[str]) -> None:
    """Append a dated markdown section to ``path`` (to be pasted into BENCHMARKS.md as measured)."""
    section = ["", f"## {title} ({time.strftime('%Y-%m-%d %H:%M %Z')})", "", *lines]
    with open(path, "a") as f:
        f.write("\n".join(section) + "\n")
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
