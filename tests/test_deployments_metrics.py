"""/metrics for deployments without a model: the deployment's status and its replicas by state are
scraped as Prometheus text (the live replicas' series are in tests/test_deployments_replicas_live.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from r1serve.accounts import Accounts
from r1serve.api import create_app
from r1serve.routing import ModelRegistry
from r1serve.settings import Settings


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples named ``name`` in a scrape, by their sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", key_secret="s" * 32)
    accounts = Accounts.open(settings)
    accounts.start()
    try:
        with TestClient(
            create_app(settings, registry=ModelRegistry(), accounts=accounts), base_url="http://localhost"
        ) as c:
            yield c
    finally:
        accounts.close()


def test_deployment_status_and_replica_states_are_scraped(tmp_path: Path) -> None:
    for client in _client(tmp_path):
        body = {"name": "scraped", "template": "qwen2.5-coder-0.5b-instruct", "replicas": 0, "timeout": 60}
        assert client.post("/v1/deployments", json=body).status_code == 200
        text = client.get("/metrics").text
        status = samples(text, "r1serve_deployment_status")
        assert status[(("deployment", "scraped"), ("status", "RUNNING"))] == 1.0
        assert status[(("deployment", "scraped"), ("status", "STOPPED"))] == 0.0
        replicas = samples(text, "r1serve_deployment_replicas")
        assert replicas[(("deployment", "scraped"), ("state", "READY"))] == 0.0
        assert len([k for k in replicas if ("deployment", "scraped") in k]) == 7  # every state, zeros too
        client.post("/v1/deployments/scraped/stop")
        status = samples(client.get("/metrics").text, "r1serve_deployment_status")
        assert status[(("deployment", "scraped"), ("status", "STOPPED"))] == 1.0
    # The app is gone: its supervisor left the collector, its series with it.
    for client in _client(tmp_path / "other"):
        assert not any(
            ("deployment", "scraped") in k for k in samples(client.get("/metrics").text, "r1serve_deployment_status")
        )
