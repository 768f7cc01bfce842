"""A key limited to named deployments (its ``models`` scope), without a model: it calls and sees only
those deployments (403 on another's endpoint URL or as ``model`` on /v1, 404 on another's record and
logs, left out of the list); naming the deployment's underlying model is not enough; a user key cannot
manage deployments. Deployments of 0 replicas answer 503 ``deployment_not_ready`` once the key passes."""

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

ADMIN = "sk-admin-scope-test"
TEMPLATE = "qwen2.5-coder-0.5b-instruct"
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", key_secret="s" * 32, admin_key=ADMIN)
    accounts = Accounts.open(settings)
    accounts.start()
    try:
        app = create_app(settings, registry=ModelRegistry(), accounts=accounts)
        with TestClient(app, base_url="http://localhost") as c:
            yield c
    finally:
        accounts.close()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _key(client: TestClient, **fields: Any) -> str:
    resp = client.post("/v1/admin/keys", json={"name": "k", **fields}, headers=_auth(ADMIN))
    assert resp.status_code == 200, resp.text
    return str(resp.json()["key"])


def _code(resp: Any) -> tuple[int, str]:
    return resp.status_code, resp.json()["error"]["code"]


def test_a_key_limited_to_one_deployment(client: TestClient) -> None:
    for name in ("dep-a", "dep-b"):
        body = {"name": name, "template": TEMPLATE, "replicas": 0, "timeout": 60}
        assert client.post("/v1/deployments", json=body, headers=_auth(ADMIN)).status_code == 200
    limited = _auth(_key(client, models=["dep-a"]))
    by_model = _auth(_key(client, models=[TEMPLATE]))  # the model under both, not a deployment's name

    # Its own deployment: through, up to the fact that no replica is ready.
    assert _code(client.post("/deployments/dep-a/v1/chat/completions", json=CHAT, headers=limited)) == (
        503,
        "deployment_not_ready",
    )
    assert _code(client.post("/v1/chat/completions", json={**CHAT, "model": "dep-a"}, headers=limited))[0] == 503
    # Another one: 403 by URL and by model name, 404 for its record and logs, absent from the list.
    for resp in (
        client.post("/deployments/dep-b/v1/chat/completions", json=CHAT, headers=limited),
        client.post("/deployments/dep-b/v1/completions", json={"prompt": "Hi"}, headers=limited),
        client.get("/deployments/dep-b/v1/models", headers=limited),
        client.post("/v1/chat/completions", json={**CHAT, "model": "dep-b"}, headers=limited),
        client.post("/deployments/dep-a/v1/chat/completions", json=CHAT, headers=by_model),
    ):
        assert _code(resp) == (403, "model_not_allowed"), resp.text
        assert resp.json()["error"]["type"] == "permission_error"
    assert _code(client.get("/v1/deployments/dep-b", headers=limited)) == (404, "deployment_not_found")
    assert _code(client.get("/v1/deployments/dep-b/logs", headers=limited)) == (404, "deployment_not_found")
    assert [d["name"] for d in client.get("/v1/deployments", headers=limited).json()["data"]] == ["dep-a"]
    assert client.get("/v1/deployments/dep-a", headers=limited).status_code == 200
    # Admins and unrestricted keys see both.
    assert len(client.get("/v1/deployments", headers=_auth(ADMIN)).json()["data"]) == 2
    assert len(client.get("/v1/deployments", headers=_auth(_key(client))).json()["data"]) == 2

    # A user key, limited or not, cannot manage deployments, its own included; nothing changes.
    for headers in (limited, _auth(_key(client))):
        body = {"name": "dep-c", "template": TEMPLATE, "replicas": 0}
        assert _code(client.post("/v1/deployments", json=body, headers=headers)) == (403, "admin_required")
        assert _code(client.post("/v1/deployments/dep-a/stop", headers=headers)) == (403, "admin_required")
        assert _code(client.post("/v1/deployments/dep-a/start", headers=headers)) == (403, "admin_required")
        assert _code(client.post("/v1/deployments/dep-a/archive", headers=headers)) == (403, "admin_required")
        extend = client.post("/v1/deployments/dep-a/extend", json={"minutes": 5}, headers=headers)
        assert _code(extend) == (403, "admin_required")
        scale = client.post("/v1/deployments/dep-a/scale", json={"replicas": 2}, headers=headers)
        assert _code(scale) == (403, "admin_required")
        patch = client.patch("/v1/deployments/dep-a", json={"timeout": 5}, headers=headers)
        assert _code(patch) == (403, "admin_required")
    unchanged = client.get("/v1/deployments/dep-a", headers=_auth(ADMIN)).json()
    assert (unchanged["status"], unchanged["replicas"], unchanged["timeout"]) == ("RUNNING", 0, 60)
    assert len(client.get("/v1/deployments", headers=_auth(ADMIN)).json()["data"]) == 2
