"""The Ray executor without a cluster: the resource fields' checks (API and spec), how a deployment's
resources are kept, and the actor class run as a plain object (it is plain Python: Ray only places it).
The executor with a real Ray head is in tests/test_deployments_ray_live.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from r1serve.accounts import Accounts
from r1serve.api import create_app
from r1serve.deployments.ray_actor import ReplicaProcess
from r1serve.deployments.ray_executor import Resources, actor_name, resources_of
from r1serve.deployments.spec import DeploymentCreate, check_resources
from r1serve.errors import InvalidRequest
from r1serve.routing import ModelRegistry
from r1serve.settings import Settings

TEMPLATE = "qwen2.5-coder-0.5b-instruct"


def _client(tmp_path: Path, **extra: Any) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", key_secret="s" * 32, **extra)
    accounts = Accounts.open(settings)
    accounts.start()
    try:
        app = create_app(settings, registry=ModelRegistry(), accounts=accounts)
        with TestClient(app, base_url="http://localhost") as client:
            yield client
    finally:
        accounts.close()


@pytest.fixture
def local(tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(tmp_path)


@pytest.fixture
def on_ray(tmp_path: Path) -> Iterator[TestClient]:
    # 0 replicas: nothing is placed, so no cluster is needed (Ray connects on the first replica).
    yield from _client(tmp_path, deployment_executor="ray", ray_address="127.0.0.1:1")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once it is closed


def test_an_unreachable_ray_cluster_fails_the_replica_with_the_reason(tmp_path: Path) -> None:
    address = f"127.0.0.1:{_closed_port()}"
    for client in _client(tmp_path, deployment_executor="ray", ray_address=address, deployment_crash_limit=1):
        dep = client.post("/v1/deployments", json=_body(replicas=1)).json()
        deadline = time.monotonic() + 120
        while (dep := client.get(f"/v1/deployments/{dep['id']}").json())["status"] != "ERROR":
            assert time.monotonic() < deadline, dep
            time.sleep(0.1)
        replica = dep["replicas_detail"][0]
        assert (
            replica["status"] == "FAILED" and f"Cannot connect to the Ray cluster at {address}" in replica["last_error"]
        )


def _body(**fields: Any) -> dict[str, Any]:
    return {"name": "r1", "template": TEMPLATE, "replicas": 0, "timeout": 60, **fields}


@pytest.mark.parametrize("field,value", [("num_cpus", 1), ("num_gpus", 1), ("accelerator_type", "A100")])
def test_resources_on_the_local_executor_are_400_naming_the_field(local: TestClient, field: str, value: Any) -> None:
    resp = local.post("/v1/deployments", json=_body(**{field: value}))
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == field and "ray" in error["message"].lower() and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "field,value",
    [("num_cpus", 0), ("num_cpus", 2000), ("num_gpus", -0.5), ("num_gpus", 100), ("accelerator_type", "A100 x")],
)
def test_bad_resources_on_ray_are_400_naming_the_field(on_ray: TestClient, field: str, value: Any) -> None:
    resp = on_ray.post("/v1/deployments", json=_body(**{field: value}))
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == field


def test_resources_are_kept_and_shown(on_ray: TestClient) -> None:
    resp = on_ray.post("/v1/deployments", json=_body(num_cpus=2, num_gpus=0.5, accelerator_type="L4"))
    assert resp.status_code == 200, resp.text
    dep = resp.json()
    assert dep["executor"] == "ray"
    assert dep["resources"] == {"num_cpus": 2.0, "num_gpus": 0.5, "accelerator_type": "L4"}
    assert on_ray.get(f"/v1/deployments/{dep['id']}").json()["resources"] == dep["resources"]


def test_resources_of_a_record() -> None:
    created = {"reason": "CREATED", "resources": {"num_gpus": 1, "accelerator_type": "H100"}}
    res = resources_of({"events": [created]})
    assert res == Resources(num_cpus=1.0, num_gpus=1.0, accelerator_type="H100")
    assert res.options() == {"num_cpus": 1.0, "num_gpus": 1.0, "accelerator_type": "H100"}
    assert resources_of({"events": []}) == Resources()  # one CPU, no GPU: Ray's own default for an actor
    assert Resources().options() == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert actor_name("r1", "replica-0") == "r1serve/r1/replica-0"


def test_check_resources_returns_only_what_was_given() -> None:
    assert check_resources(DeploymentCreate(name="a", num_gpus=1), "ray") == {"num_gpus": 1}
    assert check_resources(DeploymentCreate(name="a"), "local") == {}
    with pytest.raises(InvalidRequest):
        check_resources(DeploymentCreate(name="a", num_cpus=1), "local")


def _wait_output(proc: ReplicaProcess, text: str) -> bytes:
    deadline = time.monotonic() + 60
    info = proc.info()
    while text.encode() not in (out := proc.read(info["instance"], info["gen"], 0)):
        assert time.monotonic() < deadline, out
        time.sleep(0.05)
    return out


def test_the_actor_runs_a_process_reports_it_and_ends_it(tmp_path: Path) -> None:
    script = (
        "import sys, time; print('up on {host}:{port} with {model} x{threads} {other}', flush=True); time.sleep(60)"
    )
    proc = ReplicaProcess(["{python}", "-c", script], {"R1SERVE_X": "1"}, str(tmp_path / "w"), {"model": "m"})
    assert proc.info()["pid"] is None and proc.info()["gen"] == 0  # nothing runs until r1serve asks
    info = proc.spawn()
    assert info["gen"] == 1 and info["host"] == "127.0.0.1" and info["returncode"] is None and info["port"] > 0
    out = _wait_output(proc, "up on")
    # Known placeholders filled in on the node (threads was not given: left as written), others untouched.
    assert f"up on 127.0.0.1:{info['port']} with m x{{threads}} {{other}}".encode() in out
    assert proc.read("another-instance", 1, 0) == b""  # not this actor's process: nothing
    assert proc.read(info["instance"], 1, 4) == out[4:]

    again = proc.spawn()  # a restart: the old process ends, a new one (new generation) starts
    assert again["gen"] == 2 and again["pid"] != info["pid"]
    assert proc.read(info["instance"], 1, 0) == b""  # the old generation's output is no longer served
    _wait_output(proc, "up on")
    assert proc.stop(5.0) == -15  # SIGTERM
    assert proc.info()["returncode"] == -15


def test_an_actor_nobody_calls_ends_its_process(tmp_path: Path) -> None:
    proc = ReplicaProcess(["{python}", "-c", "import time; time.sleep(60)"], {}, str(tmp_path / "w"), {}, 0.5)
    proc.spawn()
    assert proc.proc is not None
    assert proc.proc.wait(30) == -9  # the watchdog: no call for 0.5 s (outside Ray there is no actor to kill)
