"""Deployments with real processes and the real default model: Nosana's DeepSeek-R1 flow end to end
(create SIMPLE with 2 replicas and a timeout, follow the start in the logs, call the endpoint URL with
their request body and no model, stop, 404), a replica killed with SIGKILL, repeated crashes, the
timeout.

One r1serve server for the module; each test makes its own deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
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

pytestmark = pytest.mark.slow

# Nosana's request body, from their guide (seeds): system + user, max_tokens, temperature, no model.
NOSANA_BODY: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Give me a short fun fact about the roman empire"},
    ],
    "max_tokens": 4000,
    "temperature": 0.7,
}
# The SDK insists on a model argument; NOT_GIVEN satisfies it and is left out of the body, so the
# request goes as Nosana's does, without a model.
NO_MODEL = {"model": openai.NOT_GIVEN}
_WAIT = float(os.environ.get("R1SERVE_TEST_START_TIMEOUT", "900"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {
        "R1SERVE_DEPLOYMENT_CRASH_LIMIT": "2",
        "R1SERVE_DEPLOYMENT_CRASH_WINDOW": "600",
        "R1SERVE_N_THREADS": "1",
    }
    live = LiveServer(tmp_path_factory.mktemp("deployments"), "deployments", env, ("--parallel", "2"))
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
    """Poll the deployment until ``done`` holds (a generous deadline: model loads on a busy machine)."""
    deadline = time.monotonic() + _WAIT
    while True:
        dep = _get(server, ident)
        if done(dep):
            return dep
        if time.monotonic() > deadline:
            raise AssertionError(f"deployment never got there: {json.dumps(dep, indent=1)}\n{server.log_tail()}")
        time.sleep(0.5)


def _create(server: LiveServer, name: str, **fields: Any) -> dict[str, Any]:
    body = {"name": name, "template": DEFAULT_MODEL, "replicas": 1, "strategy": "SIMPLE", "timeout": 60, **fields}
    resp = httpx.post(f"{server.url}/v1/deployments", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _cli(server: LiveServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "r1serve", "deploy", *args, "--url", server.url],
        capture_output=True, text=True, env=env, timeout=_WAIT, check=False,
    )  # fmt: skip


def _requests(dep: dict[str, Any]) -> list[int]:
    return [r["requests"] for r in dep["replicas_detail"]]


def test_nosana_flow(server: LiveServer, tmp_path: Path) -> None:
    created = _cli(
        server, "create", "nosana-r1", "--template", DEFAULT_MODEL,
        "--replicas", "2", "--strategy", "SIMPLE", "--timeout", "60",
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    endpoint = f"{server.url}/deployments/nosana-r1/v1"
    assert f"endpoint URL: {endpoint}" in created.stdout
    assert f"curl -X POST {endpoint}/chat/completions" in created.stdout
    assert "replica-0 READY" in created.stdout and "replica-1 READY" in created.stdout  # the start, as it went
    dep = _get(server, "nosana-r1")
    assert dep["status"] == "RUNNING" and [r["status"] for r in dep["replicas_detail"]] == ["READY", "READY"]
    assert dep["endpoints"][0]["url"] == endpoint

    # The logs show the start: the supervisor's lines and each replica's own output, with times.
    logs = httpx.get(f"{server.url}/v1/deployments/{dep['id']}/logs", timeout=30).json()["data"]
    sources = {line["source"] for line in logs}
    assert {"supervisor", "replica-0", "replica-1"} <= sources
    assert any("replica-1 is ready" in line["line"] for line in logs)
    assert any("Uvicorn running" in line["line"] for line in logs if line["source"] == "replica-0")
    cli_logs = _cli(server, "logs", "nosana-r1", "--replica", "1")
    assert cli_logs.returncode == 0 and "[replica-1]" in cli_logs.stdout and "[replica-0]" not in cli_logs.stdout

    # The endpoint URL with the openai SDK as base_url, Nosana's body (no model).
    sdk = openai.OpenAI(base_url=endpoint, api_key="unused", max_retries=0, timeout=600)
    for _ in range(4):
        answer = sdk.chat.completions.create(**NO_MODEL, **NOSANA_BODY)
        assert answer.choices[0].message.content
        assert answer.model == "nosana-r1"
        assert answer.choices[0].finish_reason in ("stop", "length")
    stream = sdk.chat.completions.create(**NO_MODEL, **NOSANA_BODY, stream=True, max_completion_tokens=16)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    if shutil.which("curl"):
        body = tmp_path / "body.json"
        body.write_text(json.dumps({**NOSANA_BODY, "max_tokens": 16}))
        curled = subprocess.run(
            ["curl", "-sS", "-X", "POST", f"{endpoint}/chat/completions", "-H", "Content-Type: application/json",
             "-d", f"@{body}"],
            capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
        assert json.loads(curled.stdout)["choices"][0]["message"]["content"]
    # Its name is a model name on the server's own /v1 too.
    main = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)
    via_main = main.chat.completions.create(model="nosana-r1", messages=NOSANA_BODY["messages"], max_tokens=8)
    assert via_main.model == "nosana-r1" and via_main.choices[0].message.content
    # Least outstanding first, ties taken in turn: both replicas took traffic.
    assert all(n >= 1 for n in _requests(_get(server, "nosana-r1"))), _get(server, "nosana-r1")["replicas_detail"]

    stopped = _cli(server, "stop", "nosana-r1")
    assert stopped.returncode == 0 and "STOPPED" in stopped.stdout
    dep = _get(server, "nosana-r1")
    assert dep["status"] == "STOPPED" and {r["status"] for r in dep["replicas_detail"]} == {"STOPPED"}
    assert [e["reason"] for e in dep["events"]][-2:] == ["REPLICA_STOPPED", "STOPPED"] or "STOPPED" in [
        e["reason"] for e in dep["events"]
    ]
    for replica in dep["replicas_detail"]:
        with pytest.raises(ProcessLookupError):
            os.kill(replica["pid"], 0)  # the processes are gone
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(**NO_MODEL, **NOSANA_BODY)
    assert "stopped" in str(caught.value)
    listed = _cli(server, "list")
    assert listed.returncode == 0 and "nosana-r1" in listed.stdout and "STOPPED" in listed.stdout


def test_killed_replica_is_restarted_and_serves_again(server: LiveServer) -> None:
    dep = _create(server, "kill-me", replicas=2)
    dep = _until(server, dep["id"], lambda d: d["status"] == "RUNNING")
    victim = dep["replicas_detail"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    # Requests right after the kill still succeed: failover to the other replica before the first byte.
    sdk = openai.OpenAI(base_url=dep["endpoints"][0]["url"], api_key="unused", max_retries=0, timeout=600)
    for _ in range(3):
        assert sdk.chat.completions.create(**NO_MODEL, **{**NOSANA_BODY, "max_tokens": 8}).choices[0].message.content
    dep = _until(
        server,
        dep["id"],
        lambda d: d["replicas_detail"][0]["restarts"] == 1 and d["replicas_detail"][0]["status"] == "READY",
    )
    first = dep["replicas_detail"][0]
    assert first["pid"] != victim["pid"] and "SIGKILL" in first["last_error"]
    assert dep["status"] == "RUNNING"
    reasons = [e["reason"] for e in dep["events"] if e.get("replica") == "replica-0"]
    assert reasons[-3:] == ["REPLICA_PENDING", "REPLICA_STARTING", "REPLICA_READY"]
    before = first["requests"]
    for _ in range(4):
        sdk.chat.completions.create(**NO_MODEL, **{**NOSANA_BODY, "max_tokens": 8})
    assert _get(server, dep["id"])["replicas_detail"][0]["requests"] > before  # it takes traffic again
    httpx.post(f"{server.url}/v1/deployments/{dep['id']}/stop", timeout=120).raise_for_status()


def test_repeated_crashes_fail_the_replica_and_the_deployment(server: LiveServer) -> None:
    dep = _create(server, "crashy", replicas=1)
    dep = _until(server, dep["id"], lambda d: d["status"] == "RUNNING")
    first_pid = dep["replicas_detail"][0]["pid"]
    os.kill(first_pid, signal.SIGKILL)
    dep = _until(
        server,
        dep["id"],
        lambda d: d["replicas_detail"][0]["status"] == "READY" and d["replicas_detail"][0]["pid"] != first_pid,
    )
    os.kill(dep["replicas_detail"][0]["pid"], signal.SIGKILL)  # the second crash in the window: limit 2
    dep = _until(server, dep["id"], lambda d: d["status"] == "ERROR")
    assert dep["replicas_detail"][0]["status"] == "FAILED"
    failed = [e for e in dep["events"] if e["reason"] == "REPLICA_FAILED"]
    assert failed and "crashed 2 times" in failed[-1]["message"]
    assert dep["events"][-1]["reason"] == "ERROR" and "replica-0 failed" in dep["events"][-1]["message"]
    resp = httpx.post(f"{dep['endpoints'][0]['url']}/chat/completions", json=NOSANA_BODY, timeout=60)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "deployment_not_ready"


def test_timeout_stops_the_deployment(server: LiveServer) -> None:
    dep = _create(server, "short", replicas=1, timeout=0.1)  # six seconds
    dep = _until(server, dep["id"], lambda d: d["status"] == "STOPPED")
    reasons = [e["reason"] for e in dep["events"]]
    assert "TIMEOUT" in reasons and reasons[-1] == "STOPPED"
    resp = httpx.post(f"{dep['endpoints'][0]['url']}/chat/completions", json=NOSANA_BODY, timeout=60)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "deployment_stopped"


def test_logs_follow_streams_new_lines(server: LiveServer) -> None:
    dep = _create(server, "followed", replicas=1)
    url = f"{server.url}/v1/deployments/{dep['id']}/logs"
    seen: list[dict[str, Any]] = []
    with httpx.stream("GET", url, params={"follow": "true", "replica": "supervisor"}, timeout=_WAIT) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if "RUNNING" in seen[-1]["line"]:
                    break  # the start, line by line, up to the moment it is running
    assert [s["seq"] for s in seen] == sorted({s["seq"] for s in seen})  # in order, none twice
    assert any("CREATED" in s["line"] for s in seen) and any("is ready" in s["line"] for s in seen)
    httpx.post(f"{server.url}/v1/deployments/{dep['id']}/stop", timeout=120).raise_for_status()


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def test_restarted_server_brings_its_deployments_back(tmp_path: Path) -> None:
    servers: list[LiveServer] = []

    def boot(name: str) -> LiveServer:
        live = LiveServer(tmp_path, name, {"R1SERVE_N_THREADS": "1"}, ("--parallel", "2"))
        servers.append(live)
        live.wait_ready()
        return live

    try:
        first = boot("first")
        dep = _until(first, _create(first, "durable", replicas=1)["id"], lambda d: d["status"] == "RUNNING")
        old_pid = dep["replicas_detail"][0]["pid"]
        first.stop()  # a clean shutdown ends the replicas but keeps the deployment's status
        assert _gone(old_pid)

        second = boot("second")
        dep = _until(second, "durable", lambda d: d["status"] == "RUNNING")
        assert "RESTORED" in [e["reason"] for e in dep["events"]]
        chat = httpx.post(
            f"{second.url}/deployments/durable/v1/chat/completions", json={**NOSANA_BODY, "max_tokens": 8}, timeout=600
        )
        assert chat.status_code == 200, chat.text
        # r1serve killed outright: its replicas die with it (no orphan holds a port), and the next
        # start brings the deployment back once more.
        pid = dep["replicas_detail"][0]["pid"]
        second.proc.kill()
        assert _gone(pid)
        third = boot("third")
        assert _until(third, "durable", lambda d: d["status"] == "RUNNING")["replicas_detail"][0]["status"] == "READY"
    finally:
        for live in servers:
            live.stop()


async def _client_run(url: str, stream: bool) -> dict[str, Any]:
    body = {**NOSANA_BODY, "max_tokens": 96, "temperature": 0, "stream": stream}
    async with httpx.AsyncClient(timeout=600) as client:
        if not stream:
            resp = await client.post(f"{url}/chat/completions", json=body)
            return {"stream": False, "status": resp.status_code, "body": resp.json()}
        events: list[Any] = []
        async with client.stream("POST", f"{url}/chat/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
        return {"stream": True, "status": resp.status_code, "events": events}


def test_kill_under_load_loses_no_request_that_had_not_started(server: LiveServer) -> None:
    dep = _until(server, _create(server, "loaded", replicas=2)["id"], lambda d: d["status"] == "RUNNING")
    url = dep["endpoints"][0]["url"]

    async def scenario() -> tuple[list[dict[str, Any]], int]:
        tasks = [asyncio.create_task(_client_run(url, stream=i % 2 == 1)) for i in range(8)]
        while True:  # kill the first replica while it has requests in flight
            detail = (await asyncio.to_thread(_get, server, dep["id"]))["replicas_detail"][0]
            if detail["outstanding"] > 0:
                os.kill(detail["pid"], signal.SIGKILL)
                return list(await asyncio.gather(*tasks)), detail["outstanding"]
            await asyncio.sleep(0.05)

    results, in_flight = asyncio.run(scenario())
    assert in_flight > 0
    for r in results:
        assert r["status"] == 200, r
        if not r["stream"]:
            assert r["body"]["choices"][0]["message"]["content"], r  # JSON answers never fail: failover
            continue
        events = r["events"]
        assert events[-1] == "[DONE]", events[-3:]
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        if errors:  # only a stream that had started on the killed replica, with text before the error
            before = events[: events.index(errors[0])]
            assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in before), events
            assert errors[0]["error"]["message"]
        else:
            assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in events[:-1] if c.get("choices"))
    after = _until(server, dep["id"], lambda d: d["replicas_detail"][0]["status"] == "READY")
    assert after["replicas_detail"][0]["restarts"] == 1
    httpx.post(f"{server.url}/v1/deployments/{dep['id']}/stop", timeout=120).raise_for_status()


def test_stop_lets_a_stream_in_flight_finish(server: LiveServer) -> None:
    dep = _until(server, _create(server, "drained", replicas=1)["id"], lambda d: d["status"] == "RUNNING")
    url = dep["endpoints"][0]["url"]
    # Long enough to outlast the replica's own graceful shutdown (uvicorn's 5 s): only the supervisor's
    # draining, waiting for it before the process is told to end, lets it finish.
    count = "Count from 1 to 400, one number per line, nothing else."
    body = {"messages": [{"role": "user", "content": count}], "max_tokens": 400, "temperature": 0, "stream": True}
    events: list[Any] = []
    marks: list[int] = []  # how many events had arrived when the deployment was already stopping
    stopping: asyncio.Task[Any] | None = None

    async def scenario() -> dict[str, Any]:
        nonlocal stopping
        async with httpx.AsyncClient(timeout=600) as client:
            async with client.stream("POST", f"{url}/chat/completions", json=body) as resp:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                    if stopping is None:  # the stream has started: stop the deployment under it
                        stopping = asyncio.create_task(client.post(f"{server.url}/v1/deployments/{dep['id']}/stop"))
                        await asyncio.sleep(0.5)
                        refused = await client.post(f"{url}/chat/completions", json={**body, "stream": False})
                        assert refused.status_code == 404  # no new request once it is stopping
                        marks.append(len(events))
            assert stopping is not None
            stopped = await stopping
            return stopped.json()  # type: ignore[no-any-return]

    stopped = asyncio.run(scenario())
    assert len(events) > marks[0] + 2  # text kept coming while the deployment was stopping
    assert events[-1] == "[DONE]"
    assert not [e for e in events if isinstance(e, dict) and "error" in e]
    assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in events[:-1] if c.get("choices"))
    assert stopped["status"] == "STOPPED"
    reasons = [e["reason"] for e in stopped["events"]]
    assert reasons.index("REPLICA_DRAINING") < reasons.index("REPLICA_STOPPED")


def test_a_client_that_hangs_up_cancels_the_replicas_request(server: LiveServer) -> None:
    dep = _until(server, _create(server, "hangup", replicas=1)["id"], lambda d: d["status"] == "RUNNING")
    count = "Count from 1 to 400, one number per line, nothing else."
    body = {"messages": [{"role": "user", "content": count}], "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{dep['endpoints'][0]['url']}/chat/completions", json=body, timeout=600) as resp:
        for n, _line in enumerate(resp.iter_lines()):
            if n >= 4:
                break  # hang up mid-stream
    dep = _until(server, dep["id"], lambda d: d["replicas_detail"][0]["outstanding"] == 0)
    # The replica saw its client (r1serve) leave too: its own ledger settled the request as cancelled,
    # not as a 400-token answer generated for nobody.
    ledger = server.log_path.parent / "data" / "deployments" / dep["id"] / "replica-0" / "data" / "accounts.db"
    assert _ledger_statuses(ledger) == ["cancelled"]
    httpx.post(f"{server.url}/v1/deployments/{dep['id']}/stop", timeout=120).raise_for_status()


def _ledger_statuses(path: Path) -> list[str]:
    deadline = time.monotonic() + 60
    while True:  # the ledger is written in batches
        with contextlib.closing(sqlite3.connect(path)) as db:
            rows = [str(r[0]) for r in db.execute("SELECT status FROM usage_ledger WHERE model_served != ''")]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)
