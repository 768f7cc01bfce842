"""A live server started with R1SERVE_API_KEYS: the API needs a Bearer key; health, docs, metrics do not."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "Say hi."}]


def _error(resp: httpx.Response) -> dict[str, str]:
    assert resp.status_code == 401, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "invalid_api_key"
    assert resp.headers["x-request-id"]
    return body["error"]


def test_missing_key(auth_server_url: str) -> None:
    _error(httpx.post(f"{auth_server_url}/v1/chat/completions", json={"messages": USER}, timeout=30))
    _error(httpx.get(f"{auth_server_url}/v1/models", timeout=30))
    _error(httpx.post(f"{auth_server_url}/deepseek_chat", json={"prompt": "hi"}, timeout=30))


def test_wrong_key(auth_server_url: str) -> None:
    headers = {"Authorization": "Bearer sk-not-the-key"}
    url = f"{auth_server_url}/v1/chat/completions"
    error = _error(httpx.post(url, json={"messages": USER}, headers=headers, timeout=30))
    assert "sk-not-the-key" not in error["message"]  # never echo a key back whole
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{auth_server_url}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_right_key(auth_server_url: str, api_keys: tuple[str, ...]) -> None:
    client = openai.OpenAI(base_url=f"{auth_server_url}/v1", api_key=api_keys[0], max_retries=0, timeout=120)
    completion = client.chat.completions.create(model="deepseek-reasoner", messages=USER, max_tokens=8)  # type: ignore[arg-type]
    assert completion.choices[0].message.content
    second = openai.OpenAI(base_url=f"{auth_server_url}/v1", api_key=api_keys[1], max_retries=0)
    assert second.models.list().data
    resp = httpx.post(
        f"{auth_server_url}/deepseek_chat",
        params={"prompt": "Say hi."},
        headers={"Authorization": f"Bearer {api_keys[0]}"},
        timeout=120,
    )
    assert resp.status_code == 200


def test_open_endpoints(auth_server_url: str) -> None:
    for path in ("/health", "/docs", "/openapi.json", "/metrics"):
        assert httpx.get(f"{auth_server_url}{path}", timeout=30).status_code == 200, path
