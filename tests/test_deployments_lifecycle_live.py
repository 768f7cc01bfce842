"""Deployments' lifecycle with real replica processes and the real default model: start while a stop
drains (409, the race), the timeout with a stream in flight, extend, scale 2 -> 1 with draining,
INFINITE (a failed replica replaced; replicas rotated before the timeout, the new one ready before the
old one goes), SIMPLE-EXTEND against the owner's budget, cost accrued while running only and written
to the ledger, a spent budget -> INSUFFICIENT_FUNDS.

One r1serve server with an admin key for the module; each test makes its own deployment, owned by a
managed admin key (the ledger bills replica-time to it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import DEFAULT_MODEL, LiveServer

pytestmark = pytest.mark.slow

ENV_ADMIN = "sk-env-admin-lifecycle"
_WAIT = float(os.environ.get("R1SERVE_TEST_START_TIMEOUT", "900"))
COUNT = "Count from 1 to 400, one number per line, nothing else."


class Api:
    def __init__(self, server: LiveServer, key: str) -> None:
        self.server = server
        self.key = key
        self.headers = {"Authorization": f"Bearer {key}"}

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return httpx.request(method, f"{self.server.url}{path}", json=body, headers=self.headers, timeout=900)

    def get(self, ident: str) -> dict[str, Any]:
        resp = self.call("GET", f"/v1/deployments/{ident}")
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]

    def until(self, ident: str, done: Callable[[dict[str, Any]], bool], wait: float = _WAIT) -> dict[str, Any]:
        deadline = time.monotonic() + wait
        while True:
            dep = self.get(ident)
            if done(dep):
                return dep
            if time.monotonic() > deadline:
                raise AssertionError(f"never got there: {json.dumps(dep, indent=1)}\n{self.server.log_tail()}")
            time.sleep(0.25)

    def create(self, name: str, **fields: Any) -> dict[str, Any]:
        body = {"name": name, "template": DEFAULT_MODEL, "replicas": 1, "strategy": "SIMPLE", "timeout": 60, **fields}
        resp = self.call("POST", "/v1/deployments", body)
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def running(self, name: str, **fields: Any) -> dict[str, Any]:
        return self.until(self.create(name, **fields)["id"], lambda d: d["status"] == "RUNNING")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
        return subprocess.run(
            [sys.executable, "-m", "r1serve", "deploy", *args, "--url", self.server.url, "--api-key", self.key],
            capture_output=True, text=True, env=env, timeout=_WAIT, check=False,
        )  # fmt: skip

    def new_key(self, name: str, **fields: Any) -> str:
        resp = self.call("POST", "/v1/admin/keys", {"name": name, "admin": True, **fields})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["key"])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    env = {
        "R1SERVE_ADMIN_KEY": ENV_ADMIN,
        "R1SERVE_DEPLOYMENT_CRASH_LIMIT": "2",
        "R1SERVE_DEPLOYMENT_CRASH_WINDOW": "600",
        "R1SERVE_DEPLOYMENT_GRACE_SECONDS": "600",  # streams here must finish, however slow the machine
        "R1SERVE_DEPLOYMENT_TICK_SECONDS": "0.25",
        "R1SERVE_DEPLOYMENT_BILL_SECONDS": "1",
        "R1SERVE_N_THREADS": "1",
    }
    live = LiveServer(tmp_path_factory.mktemp("lifecycle"), "lifecycle", env, ("--parallel", "2"))
    try:
        live.wait_ready()
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def api(server: LiveServer) -> Api:
    return Api(server, Api(server, ENV_ADMIN).new_key("ops"))


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _finished_cleanly(events: list[Any]) -> None:
    assert events and events[-1] == "[DONE]", events[-3:]
    assert not [e for e in events if isinstance(e, dict) and "error" in e], events[-3:]
    assert any(c["choices"] and c["choices"][0].get("finish_reason") for c in events[:-1] if c.get("choices"))


class Streamer(threading.Thread):
    """A stream to the endpoint URL in the background; ``started`` is set at its first event."""

    def __init__(self, url: str, headers: dict[str, str], **kw: Any) -> None:
        super().__init__(daemon=True)
        self.url, self.headers, self.kw = url, headers, kw
        self.events: list[Any] = []
        self.error: BaseException | None = None
        self.started = threading.Event()

    def run(self) -> None:
        body = {"messages": [{"role": "user", "content": self.kw.get("content", COUNT)}],
                "max_tokens": self.kw.get("max_tokens", 300), "temperature": 0, "stream": True}  # fmt: skip
        try:
            with httpx.stream(
                "POST", f"{self.url}/chat/completions", json=body, headers=self.headers, timeout=900
            ) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                        self.started.set()
        except BaseException as exc:  # surfaced by the test
            self.error = exc
        finally:
            self.started.set()

    def result(self) -> list[Any]:
        self.join(900)
        assert self.error is None, self.error
        return self.events


def _reasons(dep: dict[str, Any], replica: str | None = None) -> list[str]:
    return [e["reason"] for e in dep["events"] if replica is None or e.get("replica") == replica]


def test_start_while_stopping_is_409_and_the_stop_ends_every_replica(api: Api) -> None:
    """The race: a start that came while a stop was draining spawned replicas the stop then left
    running under a STOPPED deployment. Now it is a 409 naming STOPPING."""
    dep = api.running("race")
    url = dep["endpoints"][0]["url"]
    stream = Streamer(url, api.headers)
    stream.start()
    assert stream.started.wait(600)
    stopping: dict[str, Any] = {}
    stopper = threading.Thread(
        target=lambda: stopping.update(api.call("POST", f"/v1/deployments/{dep['id']}/stop").json())
    )
    stopper.start()
    api.until(dep["id"], lambda d: d["status"] == "STOPPING")
    started = api.call("POST", f"/v1/deployments/{dep['id']}/start")
    assert started.status_code == 409, started.text
    error = started.json()["error"]
    assert error["code"] == "deployment_state" and "STOPPING" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    scaled = api.call("PATCH", f"/v1/deployments/{dep['id']}", {"replicas": 2})
    assert scaled.status_code == 409 and "STOPPING" in scaled.json()["error"]["message"]
    _finished_cleanly(stream.result())  # the stream the stop drained
    stopper.join(900)
    assert stopping["status"] == "STOPPED"
    after = api.get(dep["id"])
    assert after["status"] == "STOPPED" and [r["status"] for r in after["replicas_detail"]] == ["STOPPED"]
    assert "START_REQUESTED" not in _reasons(after)
    assert all(_gone(r["pid"]) for r in after["replicas_detail"])
    # Once stopped, a start is fine, and it serves again.
    assert api.call("POST", f"/v1/deployments/{dep['id']}/start").status_code == 200
    api.until(dep["id"], lambda d: d["status"] == "RUNNING")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert api.call("POST", "/deployments/race/v1/chat/completions", chat).status_code == 200
    api.call("POST", f"/v1/deployments/{dep['id']}/stop").raise_for_status()


def test_the_timeout_lets_a_stream_in_flight_finish(api: Api) -> None:
    dep = api.running("expiring", timeout=0.5)  # thirty seconds from the create
    url = dep["endpoints"][0]["url"]
    # Streams one after another until one is in flight when the timeout comes: how long the model talks
    # before it ends on its own varies (a stream that ends before the deadline proves nothing here).
    in_flight: Streamer | None = None
    status = "RUNNING"
    while in_flight is None and status == "RUNNING":
        stream = Streamer(url, api.headers, max_tokens=2000, content="Count from 1 to 3000, one number per line.")
        stream.start()
        assert stream.started.wait(600)
        while stream.is_alive():
            status = api.get(dep["id"])["status"]
            if status == "STOPPING":
                in_flight = stream
                break
            time.sleep(0.25)
        status = api.get(dep["id"])["status"] if in_flight is None else status
    assert in_flight is not None, f"no stream was in flight at the timeout (status {status})"
    in_flight.join(900)
    _finished_cleanly(in_flight.result())
    dep = api.until(dep["id"], lambda d: d["status"] == "STOPPED")
    reasons = _reasons(dep)
    assert "TIMEOUT" in reasons and reasons.index("REPLICA_DRAINING") < reasons.index("REPLICA_STOPPED")


def test_extend_keeps_it_running_past_its_first_deadline(api: Api) -> None:
    dep = api.running("extended", timeout=0.5)
    first_deadline = dep["expires_at"]
    extended = api.cli("extend", "extended", "--minutes", "10")
    assert extended.returncode == 0, extended.stdout + extended.stderr
    assert "RUNNING" in extended.stdout and "timeout 10.5 min" in extended.stdout
    after = api.get(dep["id"])
    assert after["timeout"] == 10.5 and after["expires_at"] > first_deadline and "EXTENDED" in _reasons(after)
    # Past the first deadline (by the server's clock): still running, still answering.
    while not _tick_past(api, after, first_deadline):
        time.sleep(0.5)
    assert api.get(dep["id"])["status"] == "RUNNING"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert api.call("POST", "/deployments/extended/v1/chat/completions", chat).status_code == 200
    refused = api.cli("archive", "extended")  # running: archive needs it stopped first
    assert refused.returncode == 1 and "RUNNING" in refused.stderr, refused.stderr
    api.call("POST", f"/v1/deployments/{dep['id']}/stop").raise_for_status()
    archived = api.cli("archive", "extended")
    assert archived.returncode == 0 and "ARCHIVED" in archived.stdout, archived.stdout + archived.stderr
    assert "extended" not in api.cli("list").stdout
    again = api.cli("extend", "extended", "--minutes", "1")
    assert again.returncode == 1 and "ARCHIVED" in again.stderr


def _tick_past(api: Api, dep: dict[str, Any], when: str) -> bool:
    # A harmless change stamps updated_at with the server's time: a way to read its clock.
    api.call("PATCH", f"/v1/deployments/{dep['id']}", {"timeout": dep["timeout"]})
    return str(api.get(dep["id"])["updated_at"]) > when


def test_scale_two_to_one_drains_the_removed_replica(api: Api) -> None:
    dep = api.running("scaled", replicas=2)
    url = dep["endpoints"][0]["url"]
    streams = [Streamer(url, api.headers) for _ in range(2)]
    for s in streams:
        s.start()
        assert s.started.wait(600)
    busy = api.until(dep["id"], lambda d: all(r["outstanding"] == 1 for r in d["replicas_detail"]), wait=60)
    doomed = next(r for r in busy["replicas_detail"] if r["name"] == "replica-1")
    result: dict[str, Any] = {}
    scaler = threading.Thread(target=lambda: result.update(proc=api.cli("scale", "scaled", "1")))
    scaler.start()
    api.until(dep["id"], lambda d: "REPLICA_DRAINING" in _reasons(d, "replica-1"))
    # Out of routing first: a new request goes to replica-0 while replica-1 drains.
    before = {r["name"]: r["requests"] for r in api.get(dep["id"])["replicas_detail"]}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert api.call("POST", "/deployments/scaled/v1/chat/completions", chat).status_code == 200
    for s in streams:
        _finished_cleanly(s.result())  # the drained one too
    scaler.join(900)
    assert result["proc"].returncode == 0, result["proc"].stdout + result["proc"].stderr
    after = api.get(dep["id"])
    assert after["replicas"] == 1 and after["status"] == "RUNNING"
    assert [(r["name"], r["status"]) for r in after["replicas_detail"]] == [("replica-0", "READY")]
    assert after["replicas_detail"][0]["requests"] > before["replica-0"]
    reasons = _reasons(after, "replica-1")
    assert reasons.index("REPLICA_DRAINING") < reasons.index("REPLICA_STOPPED")
    assert _gone(doomed["pid"])
    api.call("POST", f"/v1/deployments/{dep['id']}/stop").raise_for_status()


def test_infinite_replaces_a_failed_replica(api: Api) -> None:
    dep = api.running("forever", strategy="INFINITE")
    pids = [dep["replicas_detail"][0]["pid"]]
    os.kill(pids[-1], signal.SIGKILL)  # restarted in place (crash 1 of the limit of 2)
    dep = api.until(dep["id"], lambda d: d["replicas_detail"][0]["status"] == "READY" and
                    d["replicas_detail"][0]["pid"] not in pids)  # fmt: skip
    pids.append(dep["replicas_detail"][0]["pid"])
    os.kill(pids[-1], signal.SIGKILL)  # crash 2: FAILED, and INFINITE puts a new replica in its place
    dep = api.until(dep["id"], lambda d: "REPLICA_REPLACED" in _reasons(d) and
                    d["replicas_detail"][0]["status"] == "READY" and d["replicas_detail"][0]["pid"] not in pids)  # fmt: skip
    assert dep["status"] == "RUNNING" and "ERROR" not in _reasons(dep)
    assert dep["replicas_detail"][0]["restarts"] == 0  # a fresh replica, a fresh crash history
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert api.call("POST", "/deployments/forever/v1/chat/completions", chat).status_code == 200
    api.call("POST", f"/v1/deployments/{dep['id']}/stop").raise_for_status()


def test_infinite_starts_the_successor_before_the_old_replica_goes(api: Api) -> None:
    dep = api.running("rotating", strategy="INFINITE", timeout=0.5)  # rotates 3 s before each half minute
    old = dep["replicas_detail"][0]
    statuses: list[str] = []
    ready_counts: list[int] = []

    def rotated(d: dict[str, Any]) -> bool:
        statuses.append(d["status"])
        ready_counts.append(sum(r["status"] == "READY" for r in d["replicas_detail"]))
        return "ROTATED" in _reasons(d)

    dep = api.until(dep["id"], rotated)
    assert set(statuses) == {"RUNNING"} and min(ready_counts) >= 1  # never without a ready replica
    new = dep["replicas_detail"][0]
    assert new["name"] != old["name"] and new["pid"] != old["pid"] and new["status"] == "READY"
    events = [(e["reason"], e.get("replica"), e["message"]) for e in dep["events"]]
    successor_ready = next(i for i, e in enumerate(events) if e[0] == "REPLICA_READY" and e[1] == new["name"])
    old_draining = next(i for i, e in enumerate(events) if e[0] == "REPLICA_DRAINING" and e[1] == old["name"])
    assert successor_ready < old_draining  # the new one was ready before the old one left
    assert _gone(old["pid"])
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert api.call("POST", "/deployments/rotating/v1/chat/completions", chat).status_code == 200
    api.call("POST", f"/v1/deployments/{dep['id']}/stop").raise_for_status()


def _ledger(server: LiveServer, target: str) -> list[tuple[str, int, str]]:
    path = server.log_path.parent / "data" / "accounts.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [
            (str(r[0]), int(r[1]), str(r[2]))
            for r in db.execute("SELECT key_id, cost_nanos, status FROM usage_ledger WHERE target = ?", (target,))
        ]


def _ledger_total(server: LiveServer, target: str, want: int) -> list[tuple[str, int, str]]:
    deadline = time.monotonic() + 60
    while True:  # the ledger is written in batches
        rows = _ledger(server, target)
        if sum(r[1] for r in rows) >= want or time.monotonic() > deadline:
            return rows
        time.sleep(0.25)


def test_cost_accrues_while_running_only_and_goes_to_the_owners_ledger(api: Api, server: LiveServer) -> None:
    dep = api.running("metered", price_per_hour=36.0)  # a cent a replica-second: easy to see
    assert dep["price_per_hour"] == 36.0
    running_cost = api.until(dep["id"], lambda d: d["cost"] > dep["cost"])["cost"]
    assert running_cost > 0
    stopped = api.call("POST", f"/v1/deployments/{dep['id']}/stop").json()
    final = stopped["cost"]
    assert final >= running_cost
    # Stopped: nothing more accrues, however many ticks pass (the updated_at of a no-op change reads
    # the server's clock: it has moved on by then).
    for _ in range(8):
        _tick_past(api, stopped, stopped["updated_at"])
    assert api.get(dep["id"])["cost"] == final
    rows = _ledger_total(server, "deployment:metered", round(final * 1e9))
    assert rows and {(r[0], r[2]) for r in rows} == {(rows[0][0], "deployment")}
    assert rows[0][0] != "admin-env"  # the owner: the managed key that created it
    assert sum(r[1] for r in rows) == round(final * 1e9)


def test_a_spent_budget_stops_the_deployment_with_insufficient_funds(api: Api, server: LiveServer) -> None:
    poor = Api(server, api.new_key("poor", budget_usd=0.02))
    dep = poor.create("unfunded", price_per_hour=36.0)  # two seconds of one replica
    dep = poor.until(dep["id"], lambda d: d["status"] == "INSUFFICIENT_FUNDS")
    event = next(e for e in dep["events"] if e["reason"] == "INSUFFICIENT_FUNDS")
    assert "budget" in event["message"]
    assert {r["status"] for r in dep["replicas_detail"]} == {"STOPPED"}
    assert all(_gone(r["pid"]) for r in dep["replicas_detail"])
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    resp = poor.call("POST", "/deployments/unfunded/v1/chat/completions", chat)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "deployment_stopped"
    again = poor.call("POST", f"/v1/deployments/{dep['id']}/start")
    assert again.status_code == 402 and again.json()["error"]["code"] == "insufficient_funds"
    rows = _ledger_total(server, "deployment:unfunded", 20_000_000)
    assert sum(r[1] for r in rows) >= 20_000_000  # at least the whole budget is on the ledger
    assert poor.get(dep["id"])["cost"] * 1e9 == pytest.approx(sum(r[1] for r in rows), abs=1)


def test_simple_extend_extends_while_the_budget_allows(api: Api, server: LiveServer) -> None:
    # 12-second periods at 1.5 USD per replica-hour: 0.005 a period; a budget of 0.012 pays for the
    # first period and one extension, not for a third period.
    owner = Api(server, api.new_key("thrifty", budget_usd=0.012))
    dep = owner.create("extending", strategy="SIMPLE-EXTEND", timeout=0.2, price_per_hour=1.5)
    dep = owner.until(dep["id"], lambda d: d["status"] in ("STOPPED", "INSUFFICIENT_FUNDS", "ERROR"))
    extensions = [e for e in dep["events"] if e["reason"] == "EXTENDED"]
    assert len(extensions) >= 1 and "SIMPLE-EXTEND" in extensions[0]["message"]
    assert dep["status"] == "STOPPED", dep["events"][-4:]
    timeout = next(e for e in dep["events"] if e["reason"] == "TIMEOUT")
    assert "budget does not cover another" in timeout["message"]
    assert dep["cost"] <= 0.012 + 1e-9


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.25)
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_killed_r1serve_comes_back_and_re_adopts_its_live_replicas(tmp_path: Path) -> None:
    servers: list[LiveServer] = []
    env = {"R1SERVE_ADMIN_KEY": ENV_ADMIN, "R1SERVE_N_THREADS": "1", "R1SERVE_DEPLOYMENT_ORPHAN_SECONDS": "120",
           "R1SERVE_DEPLOYMENT_TICK_SECONDS": "0.25"}  # fmt: skip

    def boot(name: str) -> Api:
        live = LiveServer(tmp_path, name, env, ("--parallel", "2"))  # the same workdir: the same data dir
        servers.append(live)
        live.wait_ready()
        return Api(live, ENV_ADMIN)

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        first = boot("first")
        kept = first.running("kept", replicas=2)
        stopped = first.running("parked")
        first.call("POST", "/v1/deployments/parked/stop").raise_for_status()
        pids = {r["name"]: r["pid"] for r in kept["replicas_detail"]}
        first.server.proc.kill()  # no clean shutdown: the replicas are left running, on their lease
        first.server.proc.wait()
        assert all(_alive(pid) for pid in pids.values())
        os.kill(pids["replica-1"], signal.SIGKILL)  # one of them dies while r1serve is down

        second = boot("second")
        dep = second.until("kept", lambda d: d["status"] == "RUNNING")
        now = {r["name"]: r for r in dep["replicas_detail"]}
        assert now["replica-0"]["pid"] == pids["replica-0"]  # re-adopted: the same process
        assert now["replica-1"]["pid"] != pids["replica-1"] and now["replica-1"]["status"] == "READY"  # restarted
        adopted = [e for e in dep["events"] if e["reason"] == "REPLICA_READY" and "re-adopted" in e["message"]]
        assert [e["replica"] for e in adopted] == ["replica-0"]
        for _ in range(4):  # both take traffic; the re-adopted one's output reaches the logs again
            assert second.call("POST", "/deployments/kept/v1/chat/completions", chat).status_code == 200
        assert all(r["requests"] >= 1 for r in second.get("kept")["replicas_detail"])
        since, lines = adopted[0]["time"], []
        deadline = time.monotonic() + 60
        while not any("/v1/chat/completions" in ln["line"] for ln in lines):  # access lines come in batches
            assert time.monotonic() < deadline, lines[-5:]
            time.sleep(0.25)
            logs = second.call("GET", f"/v1/deployments/{dep['id']}/logs", None).json()["data"]
            lines = [ln for ln in logs if ln["source"] == "replica-0" and ln["time"] > since]
        assert second.get("parked")["status"] == "STOPPED"  # stopped ones stay stopped
        assert second.get(stopped["id"])["replicas_detail"][0]["status"] == "STOPPED"

        # Killed again, and not back within the lease: the orphans end themselves.
        orphans = [r["pid"] for r in second.get("kept")["replicas_detail"]]
        second.server.proc.kill()
        second.server.proc.wait()
        assert all(_wait_gone(pid, 120 + 60) for pid in orphans)
        third = boot("third")
        dep = third.until("kept", lambda d: d["status"] == "RUNNING")
        assert not {r["pid"] for r in dep["replicas_detail"]} & set(orphans)  # started afresh
        assert third.call("POST", "/deployments/kept/v1/chat/completions", chat).status_code == 200
        third.call("POST", "/v1/deployments/kept/stop").raise_for_status()
    finally:
        for live in servers:
            live.stop()


def test_scheduled_starts_real_replicas_on_its_schedule(api: Api) -> None:
    # Every minute: the next run is at most a minute away (the fast tests move a clock instead).
    dep = api.create("cron", strategy="SCHEDULED", schedule="* * * * *", timeout=0.25)
    assert dep["status"] == "STOPPED" and dep["next_run_at"] and dep["replicas_detail"] == []
    due = dep["next_run_at"]
    dep = api.until(dep["id"], lambda d: d["status"] == "RUNNING")
    start = next(e for e in dep["events"] if e["reason"] == "SCHEDULED_START")
    assert start["time"] >= due and due in start["message"]
    assert dep["next_run_at"] > due and dep["replicas_detail"][0]["status"] == "READY"
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert api.call("POST", "/deployments/cron/v1/chat/completions", chat).status_code == 200
    pid = dep["replicas_detail"][0]["pid"]
    dep = api.until(dep["id"], lambda d: d["status"] == "STOPPED")  # fifteen seconds of run
    assert "TIMEOUT" in _reasons(dep) and _gone(pid) and dep["next_run_at"]  # waiting for the next minute
    paused = api.call("POST", f"/v1/deployments/{dep['id']}/stop").json()
    assert paused["next_run_at"] is None and paused["events"][-1]["reason"] == "SCHEDULE_PAUSED"
    assert api.call("POST", f"/v1/deployments/{dep['id']}/archive").json()["status"] == "ARCHIVED"
