"""Deployments of the ``command`` engine and of hub templates, with real processes and the real default
model: llama-cpp-python's own OpenAI-compatible server (``python -m llama_cpp.server``) supervised as a
replica (readiness on /v1/models, a 200 KiB line in its output, SIGKILL and restart, stop, and its
series on /metrics: state, requests, outstanding during a stream, restarts); the
``deepseek-r1`` template served from a Hugging Face cache laid out on disk (no download: offline); a
template whose weights are not here fails with the reason in its events; a killed r1serve takes its
command replicas with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import DEFAULT_MODEL, LiveServer
from test_deployments_metrics import samples

from r1serve.deployments.adoption import alive
from r1serve.models.catalog import HubSource, find_entry
from r1serve.models.fetch import local_path
from r1serve.settings import Settings

pytestmark = pytest.mark.slow

_WAIT = float(os.environ.get("R1SERVE_TEST_START_TIMEOUT", "900"))
BIG = 200 * 1024
# sh prints one 200 KiB line (the log pump must cut it and keep draining), then becomes the server.
COMMAND = (
    "sh -c '{python} -c \"print(chr(120) * " + str(BIG) + ', flush=True)"; '
    "exec {python} -m llama_cpp.server --model {model} --host 127.0.0.1 --port {port} "
    "--n_threads {threads} --n_ctx 2048'"
)
REV = "0123456789abcdef0123456789abcdef01234567"


def _models_dir(root: Path) -> Path:
    """A models dir holding the default GGUF (linked, as r1serve stores it) and, in the hub cache's
    layout, the same file under DeepSeek-R1-Distill-Qwen-1.5B's repo and name: the hub code finds it
    offline. (It is not R1's weights; the test is about finding and serving the template.)"""
    entry = find_entry(DEFAULT_MODEL)
    assert entry is not None
    src_dir = Path(os.environ.get("R1SERVE_MODELS_DIR") or Settings(_env_file=None).models_dir).expanduser()
    gguf = local_path(entry, src_dir)
    assert gguf is not None, f"the default model is not in {src_dir}: run scripts/setup.sh"
    models = root / "models"
    models.mkdir()
    for path in src_dir.glob(gguf.name + "*"):
        (models / path.name).symlink_to(path.resolve())
    r1 = find_entry("deepseek-r1-distill-qwen-1.5b")
    assert r1 is not None and isinstance(r1.source, HubSource)
    repo = models / "hub" / ("models--" + r1.source.repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    blob = repo / "blobs" / ("0" * 64)
    blob.symlink_to(gguf.resolve())
    snapshot = repo / "snapshots" / REV / r1.source.filename
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return models


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("deploy-command")
    env = {
        "R1SERVE_MODELS_DIR": str(_models_dir(root)),
        "R1SERVE_DEPLOYMENT_CRASH_LIMIT": "2",
        "R1SERVE_DEPLOYMENT_CRASH_WINDOW": "600",
        "R1SERVE_N_THREADS": "1",
        "HF_HUB_OFFLINE": "1",  # nothing may be downloaded: the hub cache above is all there is
    }
    live = LiveServer(root, "deploy-command", env, ("--parallel", "2"))
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


def _get(server: LiveServer, ident: str) -> dict[str, Any]:
    resp = httpx.get(f"{server.url}/v1/deployments/{ident}", timeout=30)
    resp.raise_for_status()
    return resp.json()  # type: ignore[no-any-return]


def _until(server: LiveServer, ident: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + _WAIT
    while True:
        dep = _get(server, ident)
        if done(dep):
            return dep
        if time.monotonic() > deadline:
            raise AssertionError(f"deployment never got there: {json.dumps(dep, indent=1)}\n{server.log_tail()}")
        time.sleep(0.5)


def _create(server: LiveServer, **fields: Any) -> dict[str, Any]:
    body = {"template": DEFAULT_MODEL, "replicas": 1, "strategy": "SIMPLE", "timeout": 60, **fields}
    resp = httpx.post(f"{server.url}/v1/deployments", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _ask(dep: dict[str, Any]) -> str:
    sdk = openai.OpenAI(base_url=dep["endpoints"][0]["url"], api_key="unused", max_retries=0, timeout=600)
    reply = sdk.chat.completions.create(
        model=openai.NOT_GIVEN,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    message = reply.choices[0].message
    text = message.content or getattr(message, "reasoning_content", None) or ""
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    return str(text)


def test_command_engine_runs_llama_cpp_server(server: LiveServer) -> None:
    created = subprocess.run(
        [sys.executable, "-m", "r1serve", "deploy", "create", "llamacpp", "--template", DEFAULT_MODEL,
         "--engine", "command", "--command", COMMAND, "--no-wait", "--url", server.url],
        capture_output=True, text=True, timeout=120, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")},
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    dep = _until(server, "llamacpp", lambda d: d["status"] == "RUNNING")
    assert dep["engine"] == "command"
    assert _ask(dep)

    logs = httpx.get(f"{server.url}/v1/deployments/{dep['id']}/logs", params={"replica": 0}, timeout=30).json()
    lines = logs["data"]
    pieces = [line for line in lines if line["line"] and set(line["line"]) == {"x"}]
    assert "".join(p["line"] for p in pieces) == "x" * BIG
    assert [p["continues"] for p in pieces] == [True] * (len(pieces) - 1) + [False]
    after = lines[lines.index(pieces[-1]) + 1 :]
    assert any("Uvicorn running" in line["line"] for line in after)  # the server's own lines came after it
    supervisor = httpx.get(
        f"{server.url}/v1/deployments/{dep['id']}/logs", params={"replica": "supervisor"}, timeout=30
    ).json()["data"]
    assert any("-m llama_cpp.server --model /" in s["line"] for s in supervisor)  # {model}: the GGUF's path

    # /metrics: one READY replica, the request counted, one outstanding while a stream runs.
    def scrape(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return samples(httpx.get(f"{server.url}/metrics", timeout=30).text, name)

    one = (("deployment", "llamacpp"), ("replica", "replica-0"))
    assert scrape("r1serve_deployment_replicas")[(("deployment", "llamacpp"), ("state", "READY"))] == 1
    assert scrape("r1serve_deployment_replica_requests_total")[one] == 1
    assert scrape("r1serve_deployment_replica_outstanding")[one] == 0
    body = {"messages": [{"role": "user", "content": "Count to fifty."}], "max_tokens": 64, "stream": True}
    with httpx.stream("POST", f"{dep['endpoints'][0]['url']}/chat/completions", json=body, timeout=600) as resp:
        lines_in = resp.iter_lines()
        # The first chunk (the role) goes out before the replica is asked; a text chunk comes from it.
        next(line for line in lines_in if line.startswith("data: {") and '"content":"' in line.replace(" ", ""))
        assert scrape("r1serve_deployment_replica_outstanding")[one] == 1
        assert "data: [DONE]" in list(lines_in)
    assert scrape("r1serve_deployment_replica_outstanding")[one] == 0

    # Supervised like an r1serve replica: SIGKILL, restart with backoff, ready, serving again.
    victim = dep["replicas_detail"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    dep = _until(
        server,
        dep["id"],
        lambda d: d["replicas_detail"][0]["restarts"] == 1 and d["replicas_detail"][0]["status"] == "READY",
    )
    assert dep["replicas_detail"][0]["pid"] != victim and "SIGKILL" in dep["replicas_detail"][0]["last_error"]
    assert _ask(dep)
    assert scrape("r1serve_deployment_replica_restarts_total")[one] == 1
    assert scrape("r1serve_deployment_replica_requests_total")[one] == 3  # across both processes
    stopped = httpx.post(f"{server.url}/v1/deployments/{dep['id']}/stop", timeout=120).json()
    assert stopped["status"] == "STOPPED"
    resp = httpx.post(
        f"{dep['endpoints'][0]['url']}/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}]},
        timeout=30,
    )
    assert resp.status_code == 404


def test_deepseek_r1_template_is_served_from_the_hub_cache(server: LiveServer) -> None:
    dep = _create(server, name="r1-template", template="deepseek-r1")
    assert dep["model"] == "deepseek-r1-distill-qwen-1.5b"
    dep = _until(server, dep["id"], lambda d: d["status"] == "RUNNING")
    resp = httpx.post(
        f"{dep['endpoints'][0]['url']}/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
        timeout=600,
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-r1serve-model"] == "deepseek-r1-distill-qwen-1.5b"
    httpx.post(f"{server.url}/v1/deployments/{dep['id']}/stop", timeout=120).raise_for_status()


def test_a_template_whose_weights_are_missing_fails_saying_why(server: LiveServer) -> None:
    # Through the CLI, as a user creates it: it follows the start, then says it failed (exit 1), with no
    # endpoint URL or curl to paste.
    created = subprocess.run(
        [sys.executable, "-m", "r1serve", "deploy", "create", "r1-7b", "--template", "ollama/deepseek-r1:7b",
         "--url", server.url],
        capture_output=True, text=True, timeout=_WAIT, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")},
    )  # fmt: skip
    assert created.returncode == 1, created.stdout + created.stderr
    assert "failed to start" in created.stderr and "endpoint URL" not in created.stdout, created.stdout
    dep = _until(server, "r1-7b", lambda d: d["status"] == "ERROR")
    assert dep["model"] == "deepseek-r1-distill-qwen-7b"
    assert dep["replicas_detail"][0]["status"] == "FAILED"
    failed = [e for e in dep["events"] if e["reason"] == "REPLICA_FAILED"][-1]["message"]
    # The child's own last words, whole (its error is one line, not wrapped at 80 columns into a last line
    # like "connection is on."), not just "exited with code 1".
    assert "offline mode is on" in failed and "unset HF_HUB_OFFLINE" in failed, failed


def test_a_killed_r1serve_takes_its_command_replicas_with_it(tmp_path: Path) -> None:
    """A command's server is not ``r1serve serve``: it knows no lease and cannot be re-adopted, so it
    must die with a killed r1serve (not hold its port as an orphan); the next r1serve starts it afresh."""
    servers: list[LiveServer] = []

    def boot(name: str) -> LiveServer:
        live = LiveServer(tmp_path, name, {"R1SERVE_N_THREADS": "1"}, ("--parallel", "2"))
        servers.append(live)
        live.wait_ready()
        return live

    plain = "{python} -m llama_cpp.server --model {model} --host 127.0.0.1 --port {port} --n_threads 1 --n_ctx 1024"
    try:
        first = boot("first")
        dep = _create(first, name="orphan-free", engine="command", command=plain)
        dep = _until(first, dep["id"], lambda d: d["status"] == "RUNNING")
        pid = dep["replicas_detail"][0]["pid"]
        first.proc.kill()
        first.proc.wait()
        deadline = time.monotonic() + 60
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(pid), "the command's server outlived its killed r1serve"

        second = boot("second")
        dep = _until(second, "orphan-free", lambda d: d["status"] == "RUNNING")
        assert dep["replicas_detail"][0]["pid"] != pid
        assert _ask(dep)
    finally:
        for live in servers:
            live.stop()
