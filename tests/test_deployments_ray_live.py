"""Deployments on the Ray executor, with a real Ray head started here on loopback and the real default
model: 2 replicas in named detached actors take traffic through the endpoint URL, their output reaches
the logs API, a killed replica process is replaced and serves again, a stop removes the actors, and a
killed r1serve's successor re-adopts the replicas by actor name.

The head: ``ray start --head --block`` in its own session (killed with its group after the module),
2 CPUs, every address on 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps Ray from swapping
127.0.0.1 for the machine's own address). r1serve connects to it by address (R1SERVE_RAY_ADDRESS).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import DEFAULT_MODEL, LiveServer

pytestmark = pytest.mark.slow

_WAIT = float(os.environ.get("R1SERVE_TEST_START_TIMEOUT", "900"))
_LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# llama-cpp-python's own server as a command replica: {host} is the address of the node Ray placed it on.
COMMAND = "{python} -m llama_cpp.server --model {model} --host {host} --port {port} --n_threads {threads} --n_ctx 2048"
BODY: dict[str, Any] = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _head_logs(temp: Path) -> str:
    """The head's own output and its GCS logs, for a failure message (the temp dir goes with the module)."""
    files = [temp / "head.log", *sorted((temp / "session_latest" / "logs").glob("gcs_server.*"))]
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-4000:]}" for f in files if f.exists())


@pytest.fixture(scope="module")
def ray_temp() -> Iterator[Path]:
    # A short path: Ray's unix sockets live under it (a socket path has at most 107 bytes).
    temp = Path(tempfile.mkdtemp(prefix="r1ray-", dir="/tmp"))
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_address(ray_temp: Path) -> Iterator[str]:
    ray_cli = Path(sys.executable).parent / "ray"
    assert ray_cli.exists(), "Ray is not installed: scripts/test.sh installs r1serve[ray]"
    port = _free_port()
    temp = ray_temp
    head = subprocess.Popen(
        [
            str(ray_cli), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
            "--include-dashboard=false", "--node-ip-address", "127.0.0.1", "--temp-dir", temp,
            "--disable-usage-stats", "--ray-client-server-port", str(_free_port()),
        ],
        env={**os.environ, **_LOOPBACK_ONLY},
        stdout=open(temp / "head.log", "wb"),  # noqa: SIM115 - the head's whole life
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"

    try:
        deadline = time.monotonic() + 180
        while True:  # ready when a separate driver gets the cluster's status (GCS up, the head's node registered)
            assert head.poll() is None, _head_logs(temp)
            with contextlib.suppress(subprocess.TimeoutExpired):
                probe = subprocess.run(
                    [str(ray_cli), "status", "--address", address], env={**os.environ, **_LOOPBACK_ONLY},
                    capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
                )  # fmt: skip
                if probe.returncode == 0:
                    break
            assert time.monotonic() < deadline, f"the Ray head did not start\n{_head_logs(temp)}"
            time.sleep(1)
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # whatever of the group is left (workers, replicas)
        head.wait()


# A driver of its own, not this test process: after a few hundred tests in one pytest process, ray.init
# here waited on the GCS for ten minutes ("Timed out while waiting for GCS to become available") while
# `ray status` from a new process answered at once (CI on 2026-12-02, twice).
_ACTORS = """
import json, sys, time
import ray
address, names, wait = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, namespace="r1serve", log_to_driver=False)
def alive(name):
    try:
        ray.get_actor(name, namespace="r1serve")
    except ValueError:
        return False
    return True
deadline = time.monotonic() + wait
while any(alive(n) for n in names) and time.monotonic() < deadline:
    time.sleep(0.25)
print(json.dumps({n: alive(n) for n in names}))
"""


def _actors_alive(address: str, names: list[str], *, wait_gone: float = 0.0) -> dict[str, bool]:
    """Which of the named actors exist, looked up by name as r1serve does; ``wait_gone``: seconds to
    wait for all of them to go first (ray.kill is asynchronous: a name goes once its actor is dead)."""
    proc = subprocess.run(
        [sys.executable, "-c", _ACTORS, address, json.dumps(names), str(wait_gone)],
        env={**os.environ, **_LOOPBACK_ONLY}, capture_output=True, text=True, timeout=wait_gone + 180,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _until_gone(address: str, names: list[str]) -> None:
    alive = _actors_alive(address, names, wait_gone=120)
    assert not any(alive.values()), f"Ray actors still there: {alive}"


def _start_server(workdir: Path, ray_address: str, orphan_seconds: float = 120) -> LiveServer:
    env = {
        "R1SERVE_DEPLOYMENT_ORPHAN_SECONDS": str(orphan_seconds),
        "R1SERVE_DEPLOYMENT_EXECUTOR": "ray",
        "R1SERVE_RAY_ADDRESS": ray_address,
        "R1SERVE_DEPLOYMENT_CRASH_LIMIT": "3",
        "R1SERVE_DEPLOYMENT_CRASH_WINDOW": "600",
        "R1SERVE_N_THREADS": "1",
        **_LOOPBACK_ONLY,
    }
    live = LiveServer(workdir, "ray", env, ("--parallel", "2"))  # the same workdir: the same data dir
    live.wait_ready()
    return live


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, ray_address: str) -> Iterator[LiveServer]:
    live = _start_server(tmp_path_factory.mktemp("ray"), ray_address)
    try:
        yield live
    finally:
        live.stop()


def _get(server: LiveServer, ident: str) -> dict[str, Any]:
    resp = httpx.get(f"{server.url}/v1/deployments/{ident}", timeout=30)
    resp.raise_for_status()
    return resp.json()  # type: ignore[no-any-return]


def _until(server: LiveServer, ident: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    deadline = time.monotonic() + _WAIT  # generous: model loads on a busy machine
    while True:
        dep = _get(server, ident)
        if done(dep):
            return dep
        if time.monotonic() > deadline:
            raise AssertionError(f"deployment never got there: {json.dumps(dep, indent=1)}\n{server.log_tail()}")
        time.sleep(0.5)


def _create(server: LiveServer, name: str, **fields: Any) -> dict[str, Any]:
    body = {"name": name, "template": DEFAULT_MODEL, "replicas": 2, "timeout": 60, "threads": 1, **fields}
    resp = httpx.post(f"{server.url}/v1/deployments", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def test_bad_resources_are_400_naming_the_field(server: LiveServer) -> None:
    for field, value in (("num_cpus", 0), ("num_gpus", -1), ("accelerator_type", "A100; rm")):
        resp = httpx.post(
            f"{server.url}/v1/deployments", json={"name": "bad", "template": DEFAULT_MODEL, field: value}, timeout=30
        )
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == field and error["type"] == "invalid_request_error" and field in error["message"]


def test_two_ray_replicas_serve_log_restart_and_stop(server: LiveServer, ray_address: str) -> None:
    dep = _create(server, "on-ray", num_cpus=1)
    assert dep["executor"] == "ray" and dep["resources"]["num_cpus"] == 1
    dep = _until(server, dep["id"], lambda d: d["status"] == "RUNNING")
    names = [r["actor"] for r in dep["replicas_detail"]]
    assert names == ["r1serve/on-ray/replica-0", "r1serve/on-ray/replica-1"]
    assert all(_actors_alive(ray_address, names).values())  # named detached actors, found by name
    for replica in dep["replicas_detail"]:
        assert replica["executor"] == "ray" and replica["host"] == "127.0.0.1" and replica["status"] == "READY"

    sdk = openai.OpenAI(base_url=dep["endpoints"][0]["url"], api_key="unused", max_retries=0, timeout=600)
    for _ in range(4):
        answer = sdk.chat.completions.create(model="on-ray", **BODY)
        assert answer.choices[0].message.content and answer.model == "on-ray"
    dep = _get(server, dep["id"])
    assert all(r["requests"] >= 1 for r in dep["replicas_detail"]), dep["replicas_detail"]  # both took traffic

    # Each replica's own output (from its actor, on its node) is in the deployment's logs.
    logs = httpx.get(f"{server.url}/v1/deployments/{dep['id']}/logs", timeout=30).json()["data"]
    for source in ("replica-0", "replica-1"):
        assert any("Uvicorn running" in line["line"] for line in logs if line["source"] == source), source
    assert any("Ray actor r1serve/on-ray/replica-0" in line["line"] for line in logs if line["source"] == "supervisor")

    # A replica's process killed: the supervisor sees it through the actor and starts another in it.
    victim = dep["replicas_detail"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    dep = _until(
        server,
        dep["id"],
        lambda d: d["replicas_detail"][0]["restarts"] == 1 and d["replicas_detail"][0]["status"] == "READY",
    )
    first = dep["replicas_detail"][0]
    assert first["pid"] != victim["pid"] and "SIGKILL" in first["last_error"] and dep["status"] == "RUNNING"
    before = first["requests"]
    for _ in range(4):
        assert sdk.chat.completions.create(model="on-ray", **BODY).choices[0].message.content
    assert _get(server, dep["id"])["replicas_detail"][0]["requests"] > before  # it takes traffic again

    httpx.post(f"{server.url}/v1/deployments/{dep['id']}/stop", timeout=120).raise_for_status()
    dep = _get(server, dep["id"])
    assert dep["status"] == "STOPPED" and {r["status"] for r in dep["replicas_detail"]} == {"STOPPED"}
    _until_gone(ray_address, names)
    for replica in dep["replicas_detail"]:
        with pytest.raises(ProcessLookupError):
            os.kill(replica["pid"], 0)  # the processes went with their actors
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="on-ray", **BODY)


@pytest.mark.parametrize("engine", ["embedded", "command"])
def test_a_killed_r1serve_comes_back_and_re_adopts_its_ray_replicas(
    tmp_path: Path, ray_address: str, engine: str
) -> None:
    first = _start_server(tmp_path, ray_address)
    second: LiveServer | None = None
    # A command replica too: its parent is the actor, not r1serve, so it outlives r1serve as well.
    fields = {"engine": "command", "command": COMMAND} if engine == "command" else {}
    try:
        dep = _create(first, "adopt-ray", replicas=1, **fields)
        dep = _until(first, dep["id"], lambda d: d["status"] == "RUNNING")
        pid = dep["replicas_detail"][0]["pid"]
        first.proc.kill()  # no clean shutdown: the detached actor and its process live on
        first.proc.wait()
        first.stop()
        os.kill(pid, 0)  # still there
        second = _start_server(tmp_path, ray_address)
        dep = _until(second, "adopt-ray", lambda d: d["status"] == "RUNNING")
        replica = dep["replicas_detail"][0]
        assert replica["pid"] == pid and replica["status"] == "READY"  # re-adopted: the same process
        assert any(e["reason"] == "REPLICA_READY" and "re-adopted" in e["message"] for e in dep["events"])
        sdk = openai.OpenAI(base_url=f"{second.url}/deployments/adopt-ray/v1", api_key="unused", max_retries=0)
        assert sdk.chat.completions.create(model="adopt-ray", **BODY).choices[0].message.content
        # Its output since the re-adoption (the probes' and the request's access lines), read through the
        # actor, is in the new r1serve's logs under the replica's name.
        lines: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while not any("/v1/chat/completions" in ln["line"] for ln in lines):  # access lines come in batches
            assert time.monotonic() < deadline, lines[-5:]
            time.sleep(0.25)
            logs = httpx.get(f"{second.url}/v1/deployments/{dep['id']}/logs", timeout=30).json()["data"]
            lines = [ln for ln in logs if ln["source"] == "replica-0"]
        httpx.post(f"{second.url}/v1/deployments/{dep['id']}/stop", timeout=120).raise_for_status()
        _until_gone(ray_address, ["r1serve/adopt-ray/replica-0"])
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_the_actors_of_an_r1serve_gone_for_good_end_themselves(tmp_path: Path, ray_address: str) -> None:
    server = _start_server(tmp_path, ray_address, orphan_seconds=3)
    try:
        dep = _create(server, "orphan-ray", replicas=1)
        dep = _until(server, dep["id"], lambda d: d["status"] == "RUNNING")
        pid = dep["replicas_detail"][0]["pid"]
        server.proc.kill()  # and never restarted: nobody calls the actor any more
        server.proc.wait()
        _until_gone(ray_address, ["r1serve/orphan-ray/replica-0"])  # it killed itself, without restart
        deadline = time.monotonic() + 60
        while True:  # and its process went with it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, f"process {pid} outlived its actor"
            time.sleep(0.25)
    finally:
        server.stop()
