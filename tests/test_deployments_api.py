"""Deployments' API without a model: bad input names its field, admin scope, persistence of the record.

Only deployments of 0 replicas are created here (no process starts); the real replicas are in
tests/test_deployments_live.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from r1serve.accounts import Accounts
from r1serve.api import create_app
from r1serve.deployments import DeploymentStore
from r1serve.deployments.schedule import Cron, ManualClock
from r1serve.models.catalog import find_entry
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
        ({"strategy": "SCHEDULED"}, "schedule", 400),  # SCHEDULED without its schedule
        ({"strategy": "SCHEDULED", "schedule": "61 * * * *"}, "schedule", 400),
        ({"strategy": "SCHEDULED", "schedule": "* * *"}, "schedule", 400),
        ({"strategy": "SCHEDULED", "schedule": "*/0 * * * *"}, "schedule", 400),
        ({"strategy": "SCHEDULED", "schedule": "0 9 * * funday"}, "schedule", 400),
        ({"strategy": "SCHEDULED", "schedule": "0 " + "1," * 200 + "1 * * *"}, "schedule", 400),
        ({"strategy": "SCHEDULED", "schedule": "5-1 * * * *"}, "schedule", 400),
        ({"schedule": "0 9 * * *"}, "schedule", 400),  # a schedule on a SIMPLE deployment
        ({"price_per_hour": -1}, "price_per_hour", 400),
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


def test_the_endpoint_url_takes_the_hot_path_not_fastapis_router(client: TestClient) -> None:
    """POST /deployments/NAME/v1/chat/completions (and /v1/completions) go straight to their handlers
    (api/hotpaths.py), as /v1/chat/completions does: FastAPI's router cost the deployment URL a third
    more CPU than /v1 (BENCHMARKS.md, Deployments). What the router still serves is counted here."""
    from r1serve.api.hotpaths import HotPaths

    _create(client)
    stack: Any = client.app.middleware_stack  # type: ignore[attr-defined]
    while not isinstance(stack, HotPaths):
        stack = stack.app
    routed: list[tuple[str, str]] = []
    router = stack.app

    async def spy(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            routed.append((scope["method"], scope["path"]))
        await router(scope, receive, send)

    stack.app = spy
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    # The handler ran, with the name from the URL: no replica of r1 is ready.
    assert _error(client.post("/deployments/r1/v1/chat/completions", json=chat), 503)["code"] == "deployment_not_ready"
    assert _error(client.post("/deployments/r1/v1/completions", json={"prompt": "x"}), 503)["code"] == (
        "deployment_not_ready"
    )
    assert _error(client.post("/deployments/nope/v1/chat/completions", json=chat), 404)["code"] == (
        "deployment_not_found"
    )
    assert routed == []
    # Not an endpoint URL's generation: FastAPI's router, as before (a name is one path segment).
    assert client.get("/deployments/r1/v1/models").status_code == 503  # served() says: no replica ready
    assert client.post("/deployments/r1/x/v1/chat/completions", json=chat).status_code == 404
    assert client.post("/deployments//v1/chat/completions", json=chat).status_code == 404
    assert routed == [
        ("GET", "/deployments/r1/v1/models"),
        ("POST", "/deployments/r1/x/v1/chat/completions"),
        ("POST", "/deployments//v1/chat/completions"),
    ]
    # The metrics' route label is the route's template, as FastAPI's router sets it.
    label = 'route="/deployments/{name}/v1/chat/completions",status="503"'
    assert label in client.get("/metrics").text


def test_templates_list_the_catalog_with_local_weights_marked(tmp_path: Path) -> None:
    settings = _settings(tmp_path, models_dir=tmp_path / "models", deployment_price_per_hour=0.25)
    for client in _client(settings):
        data = client.get("/v1/deployment-templates").json()["data"]
        ids = [t["id"] for t in data]
        assert TEMPLATE in ids and "deepseek-r1-distill-qwen-1.5b" in ids
        r1 = next(t for t in data if t["id"] == "deepseek-r1-distill-qwen-1.5b")
        assert "deepseek-r1:1.5b" in r1["aliases"] and r1["reasoning_format"] == "deepseek_r1"
        # An empty models directory: nothing is here yet, and the server's default price applies.
        assert {t["local"] for t in data} == {False}
        for t in data:
            own = find_entry(t["id"]).price_per_replica_hour  # type: ignore[union-attr]
            assert t["price_per_hour"] == (own if own is not None else 0.25)
        # Every template listed is one a deployment can be created from.
        assert _create(client, template=r1["id"]).status_code == 200


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


def _error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_an_operation_the_status_forbids_is_409_naming_the_status(client: TestClient) -> None:
    dep = _create(client).json()
    error = _error(client.post(f"/v1/deployments/{dep['id']}/start"), 409)
    assert error["code"] == "deployment_state" and "RUNNING" in error["message"]
    error = _error(client.post(f"/v1/deployments/{dep['id']}/archive"), 409)
    assert "RUNNING" in error["message"]
    client.post(f"/v1/deployments/{dep['id']}/stop").raise_for_status()
    error = _error(client.post(f"/v1/deployments/{dep['id']}/stop"), 409)
    assert error["code"] == "deployment_state" and "STOPPED" in error["message"]
    assert client.post(f"/v1/deployments/{dep['id']}/start").json()["status"] == "RUNNING"


def test_archive_hides_it_and_refuses_every_operation(client: TestClient) -> None:
    dep = _create(client).json()
    client.post(f"/v1/deployments/{dep['id']}/stop").raise_for_status()
    archived = client.post(f"/v1/deployments/{dep['id']}/archive").json()
    assert archived["status"] == "ARCHIVED" and archived["events"][-1]["reason"] == "ARCHIVED"
    for op, body in (("start", None), ("stop", None), ("archive", None), ("extend", {"minutes": 5}),
                     ("scale", {"replicas": 1})):  # fmt: skip
        error = _error(client.post(f"/v1/deployments/{dep['id']}/{op}", json=body), 409)
        assert error["code"] == "deployment_archived" and "ARCHIVED" in error["message"], op
    error = _error(client.patch(f"/v1/deployments/{dep['id']}", json={"timeout": 5}), 409)
    assert error["code"] == "deployment_archived"
    assert client.get("/v1/deployments").json()["data"] == []
    assert [d["id"] for d in client.get("/v1/deployments", params={"archived": "true"}).json()["data"]] == [dep["id"]]
    assert client.get(f"/v1/deployments/{dep['id']}").json()["status"] == "ARCHIVED"  # still readable
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert _error(client.post("/deployments/r1/v1/chat/completions", json=chat), 404)["code"] == "deployment_stopped"
    assert _error(_create(client), 409)["param"] == "name"  # the name stays taken


def test_raising_the_timeout_extends_lowering_applies_next_start(client: TestClient) -> None:
    dep = _create(client, timeout=60).json()
    expires = dt.datetime.fromisoformat(dep["expires_at"])
    raised = client.patch(f"/v1/deployments/{dep['id']}", json={"timeout": 90}).json()
    assert raised["timeout"] == 90
    assert dt.datetime.fromisoformat(raised["expires_at"]) - expires == dt.timedelta(minutes=30)
    lowered = client.patch(f"/v1/deployments/{dep['id']}", json={"timeout": 10}).json()
    assert lowered["timeout"] == 10 and lowered["expires_at"] == raised["expires_at"]  # what runs keeps its time
    extended = client.post(f"/v1/deployments/{dep['id']}/extend", json={"minutes": 15}).json()
    assert extended["timeout"] == 25
    assert dt.datetime.fromisoformat(extended["expires_at"]) - expires == dt.timedelta(minutes=45)
    assert [e["reason"] for e in extended["events"]][-3:] == ["EXTENDED", "TIMEOUT_CHANGED", "EXTENDED"]


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("patch", "", {"timeout": 0}, "timeout"),
        ("patch", "", {"timeout": 1e10}, "timeout"),
        ("patch", "", {"replicas": 9}, "replicas"),
        ("patch", "", {"replicas": -1}, "replicas"),
        ("patch", "", {"schedule": "0 9 * * *"}, "schedule"),  # SIMPLE has no schedule
        ("patch", "", {"colour": "red"}, "colour"),
        ("patch", "", {"timeout": "long"}, "timeout"),
        ("post", "/extend", {"minutes": 0}, "minutes"),
        ("post", "/extend", {"minutes": -3}, "minutes"),
        ("post", "/extend", {}, "minutes"),
        ("post", "/extend", {"minutes": 1e10}, "minutes"),
        ("post", "/extend", {"minutes": 525_590}, "timeout"),  # the sum is over the limit
        ("post", "/scale", {"replicas": 99}, "replicas"),
        ("post", "/scale", {"replicas": "many"}, "replicas"),
    ],
)
def test_bad_changes_name_the_field_and_change_nothing(
    client: TestClient, method: str, path: str, body: dict[str, Any], param: str
) -> None:
    dep = _create(client).json()
    error = _error(getattr(client, method)(f"/v1/deployments/{dep['id']}{path}", json=body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    after = client.get(f"/v1/deployments/{dep['id']}").json()
    assert (after["timeout"], after["replicas"], after["expires_at"], after["status"]) == (
        dep["timeout"], dep["replicas"], dep["expires_at"], "RUNNING"
    )  # fmt: skip


def test_changes_need_an_admin_key(tmp_path: Path) -> None:
    settings = _settings(tmp_path, api_keys="sk-user-key", admin_key=ADMIN)
    for client in _client(settings):
        admin, user = {"Authorization": f"Bearer {ADMIN}"}, {"Authorization": "Bearer sk-user-key"}
        client.post("/v1/deployments", json={"name": "r1", "template": TEMPLATE, "replicas": 0}, headers=admin)
        for method, path, body in (("patch", "", {"timeout": 5}), ("post", "/extend", {"minutes": 5}),
                                   ("post", "/scale", {"replicas": 1}), ("post", "/archive", None)):  # fmt: skip
            resp = getattr(client, method)(f"/v1/deployments/r1{path}", json=body, headers=user)
            assert resp.status_code == 403, (path, resp.text)
        assert client.get("/v1/deployments/r1", headers=user).json()["timeout"] == 60


def test_scheduled_starts_on_its_schedule_and_runs_for_the_timeout(client: TestClient) -> None:
    supervisor = client.app.state.deployments  # type: ignore[attr-defined]
    clock = ManualClock(dt.datetime(2030, 1, 7, 8, 0, tzinfo=dt.UTC))  # a Monday
    supervisor.clock = clock
    dep = _create(client, strategy="SCHEDULED", schedule="30 9 * * mon-fri", timeout=45).json()
    assert dep["status"] == "STOPPED" and dep["next_run_at"] == "2030-01-07T09:30:00.000Z"
    assert dep["events"][-1]["reason"] == "SCHEDULED"

    def tick_at(**when: int) -> dict[str, Any]:
        clock.set(dt.datetime(2030, 1, 7, tzinfo=dt.UTC).replace(**when))
        client.portal.call(supervisor.tick)  # type: ignore[union-attr]
        client.portal.call(supervisor.settled)  # type: ignore[union-attr]
        return client.get(f"/v1/deployments/{dep['id']}").json()  # type: ignore[no-any-return]

    assert tick_at(hour=9, minute=29)["status"] == "STOPPED"  # not yet
    running = tick_at(hour=9, minute=30)
    assert running["status"] == "RUNNING" and "SCHEDULED_START" in [e["reason"] for e in running["events"]]
    assert running["expires_at"] == "2030-01-07T10:15:00.000Z"  # the timeout counts from the start
    assert running["next_run_at"] == "2030-01-08T09:30:00.000Z"
    assert tick_at(hour=10, minute=14)["status"] == "RUNNING"
    stopped = tick_at(hour=10, minute=15)
    assert stopped["status"] == "STOPPED" and "TIMEOUT" in [e["reason"] for e in stopped["events"]]
    assert stopped["next_run_at"] == "2030-01-08T09:30:00.000Z"  # and it waits for the next run
    # A new schedule: weekends only. Bad cron is a 400 naming schedule, and changes nothing.
    assert _error(client.patch(f"/v1/deployments/{dep['id']}", json={"schedule": "0 25 * * *"}), 400)["param"] == (
        "schedule"
    )
    changed = client.patch(f"/v1/deployments/{dep['id']}", json={"schedule": "0 12 * * sat,sun"}).json()
    assert changed["next_run_at"] == "2030-01-12T12:00:00.000Z"
    # stop on a waiting SCHEDULED deployment pauses its schedule; start runs it now and resumes it.
    paused = client.post(f"/v1/deployments/{dep['id']}/stop").json()
    assert paused["next_run_at"] is None and paused["events"][-1]["reason"] == "SCHEDULE_PAUSED"
    assert tick_at(hour=23, minute=0)["status"] == "STOPPED"


def test_cron_parser() -> None:
    at = dt.datetime(2030, 1, 7, 8, 0, 30, tzinfo=dt.UTC)  # Monday
    assert Cron.parse("* * * * *").next_after(at) == at.replace(minute=1, second=0)
    assert Cron.parse("*/15 8 * * *").next_after(at) == at.replace(minute=15, second=0)
    assert Cron.parse("0 0 1 jan *").next_after(at) == dt.datetime(2031, 1, 1, tzinfo=dt.UTC)
    assert Cron.parse("0 6 * * 0").next_after(at) == dt.datetime(2030, 1, 13, 6, tzinfo=dt.UTC)  # Sunday
    assert Cron.parse("0 6 * * 7").next_after(at) == dt.datetime(2030, 1, 13, 6, tzinfo=dt.UTC)  # 7 is Sunday too
    # Both day fields restricted: either matches (the 10th, or a Wednesday).
    assert Cron.parse("0 0 10 * wed").next_after(at) == dt.datetime(2030, 1, 9, tzinfo=dt.UTC)
    assert Cron.parse("0 0 30 2 *").next_after(at) is None  # never
    assert Cron.parse("5-10/5 1,2 * * *").next_after(at) == dt.datetime(2030, 1, 8, 1, 5, tzinfo=dt.UTC)


def test_price_per_hour_is_the_deployments_else_the_templates_else_the_servers(tmp_path: Path) -> None:
    for client in _client(_settings(tmp_path, deployment_price_per_hour=0.5)):
        assert _create(client, name="plain").json()["price_per_hour"] == 0.5  # the server's default
        assert _create(client, name="own", price_per_hour=1.25).json()["price_per_hour"] == 1.25
        supervisor = client.app.state.deployments  # type: ignore[attr-defined]
        for name in ("plain", "own"):  # as if the template carried a price
            dep = supervisor.get(name)
            dep.entry = dataclasses.replace(dep.entry, price_per_replica_hour=2.0)
        assert client.get("/v1/deployments/plain").json()["price_per_hour"] == 2.0
        assert client.get("/v1/deployments/own").json()["price_per_hour"] == 1.25  # the override wins
        assert client.get("/v1/deployments/own").json()["cost"] == 0  # no replica ran


def test_a_restart_after_the_deadline_stops_simple_and_renews_infinite(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    for client in _client(settings):
        _create(client, name="simple")
        _create(client, name="forever", strategy="INFINITE")
    # As if r1serve had been down past their deadlines.
    accounts = Accounts.open(settings)
    try:
        store = DeploymentStore(accounts.engine)
        for record in store.load_all():
            record["expires_at"] = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
            store.save(record)
    finally:
        accounts.close()
    for client in _client(settings):
        simple = client.get("/v1/deployments/simple").json()
        assert simple["status"] == "STOPPED" and simple["events"][-1]["reason"] == "TIMEOUT"
        forever = client.get("/v1/deployments/forever").json()
        assert forever["status"] == "RUNNING" and "RESTORED" in [e["reason"] for e in forever["events"]]
        assert dt.datetime.fromisoformat(forever["expires_at"]) > dt.datetime.now(dt.UTC)  # a new period
