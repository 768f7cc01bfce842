"""The HTTP shell in process (no model): error bodies, request ids, body limit, auth, the 500 path.

Generation itself is tested against the live server (test_api_live.py); these run in milliseconds.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from r1serve.api import create_app
from r1serve.router import Router
from r1serve.settings import Settings

ERROR_KEYS = {"message", "type", "param", "code"}


def _client(**settings: Any) -> tuple[httpx.AsyncClient, Any]:
    app = create_app(Settings(**settings), router=Router())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test"), app


def _assert_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert resp.headers["x-request-id"]
    error: dict[str, Any] = body["error"]
    return error


async def test_unknown_route_and_method_are_openai_errors() -> None:
    client, _ = _client()
    async with client:
        _assert_error(await client.get("/v2/nothing"), 404)
        _assert_error(await client.delete("/v1/models"), 405)


async def test_request_id_generated_or_echoed() -> None:
    client, _ = _client()
    async with client:
        generated = (await client.get("/v1/models")).headers["x-request-id"]
        assert generated.startswith("req_")
        echoed = await client.get("/v1/models", headers={"x-request-id": "abc-123"})
        assert echoed.headers["x-request-id"] == "abc-123"
        # Not safe for a log line: replaced.
        odd = (await client.get("/v1/models", headers={"x-request-id": "a b\tc"})).headers["x-request-id"]
        assert odd.startswith("req_")


async def test_body_over_the_limit_is_413() -> None:
    client, _ = _client(max_body_bytes=1000)
    async with client:
        error = _assert_error(await client.post("/v1/chat/completions", content=b"x" * 2000), 413)
        assert error["code"] == "request_too_large"

        async def chunked() -> Any:  # no content-length: counted while reading
            for _ in range(4):
                yield b"y" * 400

        _assert_error(await client.post("/v1/chat/completions", content=chunked()), 413)


async def test_bad_json_before_anything_else() -> None:
    client, _ = _client()
    async with client:
        error = _assert_error(await client.post("/v1/chat/completions", content=b"{not json"), 400)
        assert error["type"] == "invalid_request_error"


async def test_no_model_served_is_404() -> None:
    client, _ = _client()
    async with client:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        assert _assert_error(await client.post("/v1/chat/completions", json=body), 404)["param"] == "model"


async def test_auth_protects_api_not_docs_health_metrics() -> None:
    client, _ = _client(api_keys=["sk-right-key-1", "sk-other-key-2"])
    async with client:
        error = _assert_error(await client.get("/v1/models"), 401)
        assert error["code"] == "invalid_api_key"
        _assert_error(await client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-key"}), 401)
        _assert_error(await client.get("/v1/models", headers={"Authorization": "Basic sk-right-key-1"}), 401)
        _assert_error(await client.post("/deepseek_chat", json={"prompt": "hi"}), 401)
        for key in ("sk-right-key-1", "sk-other-key-2"):
            assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code == 200
        assert (await client.get("/docs")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/health")).status_code == 200


async def test_an_unexpected_exception_is_a_500_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    client, app = _client()

    async def boom() -> None:
        raise RuntimeError("secret internals")

    app.add_api_route("/boom", boom)
    async with client:
        with caplog.at_level(logging.ERROR, logger="r1serve.api"):
            resp = await client.get("/boom")
    error = _assert_error(resp, 500)
    assert "secret" not in resp.text and error["type"] == "server_error"
    # Logged server-side, with the traceback.
    assert any("secret internals" in (r.exc_text or "") or r.exc_info for r in caplog.records)


async def test_openapi_documents_bodies_and_no_422() -> None:
    client, _ = _client()
    async with client:
        schema = (await client.get("/openapi.json")).json()
    assert "ChatCompletionRequest" in schema["components"]["schemas"]
    assert "/v1/chat/completions" in schema["paths"]
    assert "422" not in str(schema["paths"])


async def test_metrics_count_requests_by_route() -> None:
    client, _ = _client()
    async with client:
        await client.get("/v1/models")
        text = (await client.get("/metrics")).text
    assert 'r1serve_http_requests_total{method="GET",route="/v1/models",status="200"}' in text
    assert "r1serve_http_request_duration_seconds_bucket" in text
