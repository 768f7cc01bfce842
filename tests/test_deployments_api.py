"""Deployments' API without a model: bad input names its field, admin scope, persistence of the record.

Only deployments of 0 replicas are created here (no process starts); the real replicas are in
tests/test_deployments_live.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from r1serve.accounts import Accounts
from r1serve.api import create_app
from r1serve.routing import ModelRegistry
from r1serve.settings import Settings

ADMIN = "sk-admin-deployments"
TEMPLATE = "qwen2.5-coder-0.5b-instruct"


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", key_secret="s" * 32, deployment_max_replicas=4, **extra)


def _client(settings: Settings) -> Iterator[TestClient]:
    accounts = Accounts.open(settings)
    accounts.start()
    try:
        with TestClient(
            create_app(settings, registry=ModelRegistry(), accounts=accounts), base_url="http://localhost"
        ) as client:
            yield client
    finally:
        accounts.close()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(_settings(tmp_path))


def _create(client: TestClient, **fields: Any) -> Any:
    body = {"name": "r1", "template": TEMPLATE, "replicas": 0, "strategy": "SIMPLE", "timeout": 60, **fields}
    return client.post("/v1/deployments", json=body)


@pytest.mark.parametrize(
    ("fields", "param", "status"),
    [
        ({"template": "no-such-model"}, "template", 400),
        ({"template": None}, "template", 400),
        ({"replicas": -1}, "replicas", 400),
        ({"replicas": 5}, "replicas", 400),  # above deployment_max_replicas
        ({"timeout": 0}, "timeout", 400),
        ({"timeout": -5}, "timeout", 400),
        ({"timeout": 1e10}, "timeout", 400),  # overflowed the deadline: a 500 and a stuck name
        ({"strategy": "FOREVER"}, "strategy", 400),
        ({"strategy": "INFINITE"}, "strategy", 400),  # known, not supported yet
        ({"name": "Not_URL safe"}, "name", 400),
        ({"name": "-dash"}, "name", 400),
        ({"engine": "vllm"}, "engine", 400),
        ({"replicas": "two"}, "replicas", 400),
        ({"colour": "red"}, "colour", 400),
    ],
)
def test_bad_input_names_the_field(client: TestClient, fields: dict[str, Any], param: str, status: int) -> None:
    resp = _create(client, **fields)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert client.get("/v1/deployments").json()["data"] == []  # nothing was created


def test_unsupported_strategy_says_so(client: TestClient) -> None:
    error = _create(client, strategy="SIMPLE-EXTEND").json()["error"]
    assert error["code"] == "not_supported" and "not supported yet" in error["message"]


def test_duplicate_name_is_409_and_leaves_the_first_alone(client: TestClient) -> None:
    first = _create(client)
    assert first.status_code == 200, first.text
    dup = _create(client, replicas=1)
    assert dup.status_code == 409 and dup.json()["error"]["param"] == "name"
    listed = client.get("/v1/deployments").json()["data"]
    assert [(d["id"], d["replicas"], d["status"]) for d in listed] == [(first.json()["id"], 0, "RUNNING")]


def test_record_shape_stop_and_stopped_endpoint(client: TestClient) -> None:
    dep = _create(client).json()
    assert dep["name"] == "r1" and dep["strategy"] == "SIMPLE" and dep["timeout"] == 60
    assert dep["endpoints"][0]["url"].endswith("/deployments/r1/v1")
    assert [e["reason"] for e in dep["events"]][:2] == ["CREATED", "STARTING"]
    assert all(e["time"].endswith("Z") for e in dep["events"])
    assert client.get("/v1/deployments/r1").json()["id"] == dep["id"]  # by name too
    # Running with no replicas: the URL says there is nothing ready, and it is a retryable 503.
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    not_ready = client.post("/deployments/r1/v1/chat/completions", json=chat)
    assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "deployment_not_ready"
    stopped = client.post(f"/v1/deployments/{dep['id']}/stop").json()
    assert stopped["status"] == "STOPPED" and stopped["events"][-1]["reason"] == "STOPPED"
    resp = client.post("/deployments/r1/v1/chat/completions", json=chat)
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert error["code"] == "deployment_stopped" and "stopped" in error["message"]
    unknown = client.post("/deployments/nope/v1/chat/completions", json=chat)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "deployment_not_found"
    assert client.get("/v1/deployments/nope").status_code == 404


def test_logs_filters_and_bad_since(client: TestClient) -> None:
    dep = _create(client).json()
    lines = client.get(f"/v1/deployments/{dep['id']}/logs").json()["data"]
    assert lines and all(line["source"] == "supervisor" for line in lines)
    assert any("CREATED" in line["line"] for line in lines)
    assert client.get(f"/v1/deployments/{dep['id']}/logs", params={"replica": "0"}).json()["data"] == []
    assert client.get(f"/v1/deployments/{dep['id']}/logs", params={"tail": 1}).json()["data"] == lines[-1:]
    bad = client.get(f"/v1/deployments/{dep['id']}/logs", params={"since": "yesterday"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"


def test_managing_needs_an_admin_key(tmp_path: Path) -> None:
    settings = _settings(tmp_path, api_keys="sk-user-key", admin_key=ADMIN)
    for client in _client(settings):
        user = {"Authorization": "Bearer sk-user-key"}
        body = {"name": "r1", "template": TEMPLATE, "replicas": 0}
        denied = client.post("/v1/deployments", json=body, headers=user)
        assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
        assert client.post("/v1/deployments", json=body).status_code == 401
        made = client.post("/v1/deployments", json=body, headers={"Authorization": f"Bearer {ADMIN}"})
        assert made.status_code == 200, made.text
        assert client.post("/v1/deployments/r1/stop", headers=user).status_code == 403
        assert client.get("/v1/deployments/r1", headers=user).json()["status"] == "RUNNING"


def test_records_survive_a_restart(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    for client in _client(settings):
        kept = _create(client, name="kept").json()
        gone = _create(client, name="gone").json()
        client.post(f"/v1/deployments/{gone['id']}/stop")
    for client in _client(settings):
        by_name = {d["name"]: d for d in client.get("/v1/deployments").json()["data"]}
        assert by_name["kept"]["status"] == "RUNNING" and by_name["kept"]["id"] == kept["id"]
        assert by_name["kept"]["events"][-1]["reason"] == "RUNNING"  # restored: started again
        assert "RESTORED" in [e["reason"] for e in by_name["kept"]["events"]]
        assert by_name["gone"]["status"] == "STOPPED"
        assert "RESTORED" not in [e["reason"] for e in by_name["gone"]["events"]]


def test_the_name_is_a_model_name_on_v1(client: TestClient) -> None:
    _create(client, name="mine")
    chat = {"model": "mine", "messages": [{"role": "user", "content": "hi"}]}
    resp = client.post("/v1/chat/completions", json=chat)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "deployment_not_ready"  # its replicas: none
    client.post("/v1/deployments/mine/stop")
    assert client.post("/v1/chat/completions", json=chat).json()["error"]["code"] == "deployment_stopped"
    other = client.post("/v1/chat/completions", json={**chat, "model": "not-mine"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
