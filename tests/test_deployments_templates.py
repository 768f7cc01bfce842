"""Templates and the command engine without a model: the names users type resolve, unknown ones are a
400 naming ``template``, command lines are checked (each 400 names ``command`` or ``readiness_path``),
and a command deployment keeps its command across a restart of r1serve."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from r1serve.accounts import Accounts
from r1serve.api import create_app
from r1serve.deployments.templates import expand, find_template, launch_of, parse_command, resolve_template
from r1serve.errors import InvalidRequest
from r1serve.routing import ModelRegistry
from r1serve.settings import Settings

LLAMA_CPP = "{python} -m llama_cpp.server --model {model} --port {port} --host 127.0.0.1"


@pytest.mark.parametrize(
    ("name", "entry_id"),
    [
        ("deepseek-r1", "deepseek-r1-distill-qwen-1.5b"),
        ("deepseek-r1:latest", "deepseek-r1-distill-qwen-1.5b"),
        ("DeepSeek-R1", "deepseek-r1-distill-qwen-1.5b"),
        ("deepseek-reasoner", "deepseek-r1-distill-qwen-1.5b"),
        ("deepseek/deepseek-r1", "deepseek-r1-distill-qwen-1.5b"),
        ("deepseek-r1:1.5b", "deepseek-r1-distill-qwen-1.5b"),
        ("deepseek-r1:7b", "deepseek-r1-distill-qwen-7b"),
        ("deepseek-r1:8b", "deepseek-r1-distill-llama-8b"),
        ("deepseek-r1:7b-qwen-distill-q4_K_M", "deepseek-r1-distill-qwen-7b"),  # Ollama's long tag
        ("ollama/deepseek-r1:1.5b", "deepseek-r1-distill-qwen-1.5b"),  # LiteLLM config names
        ("ollama_chat/deepseek-r1:7b", "deepseek-r1-distill-qwen-7b"),
        ("huggingface/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-r1-distill-qwen-7b"),
        ("unsloth/DeepSeek-R1-Distill-Qwen-1.5B-GGUF", "deepseek-r1-distill-qwen-1.5b"),  # the hub repo
        ("deepseek-r1-distill-qwen-1.5b", "deepseek-r1-distill-qwen-1.5b"),
        ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct"),  # the embedded default
        ("qwen2.5-coder:0.5b", "qwen2.5-coder-0.5b-instruct"),
    ],
)
def test_names_users_type_resolve(name: str, entry_id: str) -> None:
    entry = find_template(name)
    assert entry is not None and entry.id == entry_id


@pytest.mark.parametrize("name", ["deepseek-r2", "ollama/llama3", "deepseek-r1:3b", "nothing.gguf", ""])
def test_unknown_templates_are_a_400_naming_template(name: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        resolve_template(name)
    assert caught.value.param == "template" and caught.value.status == 400


def test_the_command_engine_takes_a_model_only_its_command_knows() -> None:
    entry = resolve_template("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B-AWQ", "command")  # vLLM's hub id
    assert entry.id == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B-AWQ" and entry.reasoning_format == "deepseek_r1"


def test_placeholders_expand_and_other_braces_stay() -> None:
    argv = parse_command("vllm serve {model} --port {port} --override '{\"a\": 1}' -t {threads}")
    out = expand(argv, port=8123, model="deepseek-ai/X", threads=3)
    assert out == ["vllm", "serve", "deepseek-ai/X", "--port", "8123", "--override", '{"a": 1}', "-t", "3"]


ADMIN = "sk-admin-templates"


def _settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", key_secret="s" * 32, deployment_max_replicas=4)


def _client(settings: Settings) -> Iterator[TestClient]:
    accounts = Accounts.open(settings)
    accounts.start()
    try:
        app = create_app(settings, registry=ModelRegistry(), accounts=accounts)
        with TestClient(app, base_url="http://localhost") as client:
            yield client
    finally:
        accounts.close()


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(_settings(tmp_path))


def _create(client: TestClient, **fields: Any) -> Any:
    body = {"name": "t1", "template": "deepseek-r1", "replicas": 0, "timeout": 60, **fields}
    return client.post("/v1/deployments", json=body)


def test_a_deployment_from_an_ollama_name(client: TestClient) -> None:
    resp = _create(client, template="deepseek-r1:7b")
    assert resp.status_code == 200, resp.text
    assert resp.json()["template"] == "deepseek-r1:7b" and resp.json()["model"] == "deepseek-r1-distill-qwen-7b"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"template": "deepseek-r2"}, "template"),
        ({"engine": "command"}, "command"),  # no command
        ({"engine": "command", "command": "vllm serve {model}"}, "command"),  # no {port}
        ({"engine": "command", "command": "serve --port {port} --gpu {gpu}"}, "command"),  # unknown placeholder
        ({"engine": "command", "command": "serve --port {port} 'unclosed"}, "command"),
        ({"command": LLAMA_CPP}, "command"),  # a command for the embedded engine
        ({"engine": "command", "command": LLAMA_CPP, "readiness_path": "health"}, "readiness_path"),
        ({"engine": "docker"}, "engine"),
    ],
)
def test_bad_templates_and_commands_name_the_field(client: TestClient, fields: dict[str, Any], param: str) -> None:
    resp = _create(client, **fields)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and set(error) == {"message", "type", "param", "code"}
    assert client.get("/v1/deployments").json()["data"] == []  # nothing was created


def test_a_command_deployment_keeps_its_command_across_a_restart(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    for client in _client(settings):
        resp = _create(client, engine="command", command=LLAMA_CPP, readiness_path="/health")
        assert resp.status_code == 200, resp.text
    for client in _client(settings):
        record = client.app.state.deployments.by_name("t1").record  # type: ignore[attr-defined]
        assert launch_of(record) == (LLAMA_CPP, "/health")
        assert client.get("/v1/deployments/t1").json()["engine"] == "command"


def test_template_prices_by_any_of_their_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("R1SERVE_DEPLOYMENT_TEMPLATE_PRICES", '{"deepseek-r1:7b": 0.4}')
    settings = Settings(data_dir=tmp_path / "data", key_secret="s" * 32, deployment_price_per_hour=0.05)
    assert settings.deployment_template_prices == {"deepseek-r1:7b": 0.4}
    for client in _client(settings):
        priced = _create(client, name="priced", template="ollama/deepseek-r1:7b").json()
        assert priced["price_per_hour"] == 0.4  # the template's, named by another of its names
        default = _create(client, name="default", template="deepseek-r1").json()
        assert default["price_per_hour"] == 0.05  # no template price: the server's default
        own = _create(client, name="own", template="deepseek-r1-distill-qwen-7b", price_per_hour=1.5).json()
        assert own["price_per_hour"] == 1.5  # the deployment's own wins
