"""The HTTP shell in process (no model): error bodies, request ids, body limit, auth, the 500 path.

Generation itself is tested against the live server (test_api_live.py); these run in milliseconds.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

from r1serve.api import create_app
from r1serve.routing.registry import ModelRegistry
from r1serve.settings import Settings

JSON = {"content-type": "application/json"}
ERROR_KEYS = {"message", "type", "param", "code"}


def _client(**settings: Any) -> tuple[httpx.AsyncClient, Any]:
    app = create_app(Settings(**settings), registry=ModelRegistry())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://localhost"), app


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
        error = _assert_error(await client.post("/v1/chat/completions", content=b"{not json", headers=JSON), 400)
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


# ----------------------------------------------------------------------------- the hot paths (api/hotpaths.py)


class _Scripted:
    """An engine that answers from a script, or hangs until cancelled; it records how each generation ended."""

    name = "scripted"
    scores_prompts = False

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang
        self.requests: list[Any] = []
        self.ended: list[str] = []

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    async def generate(self, request: Any) -> Any:
        from r1serve.engines.base import Delta, EngineUsage

        self.requests.append(request)
        how = "finished"
        try:
            if self.hang is True:
                await asyncio.sleep(3600)
            yield Delta(reasoning="Think.")
            if self.hang == "mid-stream":
                await asyncio.sleep(3600)
            yield Delta(
                content="Hi.",
                finish_reason="stop",
                usage=EngineUsage(prompt_tokens=3, completion_tokens=4, reasoning_tokens=2),
            )
        except BaseException as exc:
            how = type(exc).__name__
            raise
        finally:
            self.ended.append(how)


def _scripted_app(engine: Any, **settings: Any) -> Any:
    from r1serve.models.catalog import LocalSource, ModelEntry
    from r1serve.routing.registry import ServedModel

    registry = ModelRegistry()
    entry = ModelEntry(id="m", source=LocalSource(path=__import__("pathlib").Path("m.gguf")))
    registry.add(ServedModel(entry=entry, engine=engine), default=True)
    return create_app(Settings(**settings), registry=registry)


async def test_hot_path_serves_chat_and_completions_with_ids_usage_and_headers() -> None:
    engine = _Scripted()
    app = _scripted_app(engine, api_keys=["sk-a"])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    auth = {"Authorization": "Bearer sk-a", "x-request-id": "abc-1"}
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        resp = await client.post(
            "/v1/chat/completions", headers=auth, json={"messages": [{"role": "user", "content": "hi"}], "foo": 1}
        )
        stream = await client.post(
            "/v1/chat/completions", headers=auth, json={"messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
        text = await client.post("/v1/completions", headers=auth, json={"prompt": "2+2="})
        missing = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        bad = await client.post("/v1/chat/completions", headers=auth, json={"messages": []})
        metrics = (await client.get("/metrics")).text
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "abc-1"
    assert resp.headers["x-r1serve-unknown-fields"] == "foo" and resp.headers["x-r1serve-model"] == "m"
    body = resp.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi.", "reasoning_content": "Think."}
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 2 and "estimated_cost" in body["usage"]
    assert (
        engine.requests[0].stream is False and engine.requests[1].stream is True
    )  # the client's choice reaches the engine
    assert stream.headers["content-type"].startswith("text/event-stream") and stream.text.endswith("data: [DONE]\n\n")
    assert '"reasoning_content":"Think."' in stream.text and stream.headers["x-request-id"] == "abc-1"
    assert missing.headers["x-request-id"].startswith("req_")
    assert text.status_code == 200 and text.json()["choices"][0]["text"] == "Think.Hi."
    error = _assert_error(missing, 401)
    assert error["code"] == "invalid_api_key" and missing.headers["www-authenticate"] == "Bearer"
    assert _assert_error(bad, 400)["param"] == "messages"
    assert 'r1serve_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in metrics
    assert 'r1serve_http_requests_total{method="POST",route="/v1/completions",status="200"}' in metrics


async def test_a_middleware_added_with_add_middleware_sees_every_request_the_hot_paths_too() -> None:
    seen: list[tuple[str, str, int]] = []

    class Spy:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            async def spy_send(message: Any) -> None:
                if message["type"] == "http.response.start":
                    seen.append((scope["method"], scope["path"], message["status"]))
                    message["headers"] = [*message["headers"], (b"x-spy", b"1")]
                await send(message)

            await self.app(scope, receive, spy_send)

    app = _scripted_app(_Scripted())
    app.add_middleware(Spy)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        replies = [
            await client.post("/v1/chat/completions", json=chat),
            await client.post("/v1/chat/completions", json={**chat, "stream": True}),
            await client.post("/v1/completions", json={"prompt": "2+2="}),
            await client.post("/deepseek_chat", json={"prompt": "hi"}),
            await client.get("/v1/models"),
        ]
    assert [r.headers.get("x-spy") for r in replies] == ["1"] * 5
    assert seen == [
        ("POST", "/v1/chat/completions", 200), ("POST", "/v1/chat/completions", 200), ("POST", "/v1/completions", 200),
        ("POST", "/deepseek_chat", 200), ("GET", "/v1/models", 200),
    ]  # fmt: skip


def test_a_hot_route_needing_more_than_authentication_is_refused_at_start() -> None:
    from fastapi import APIRouter, Depends

    from r1serve.api.auth import authenticate
    from r1serve.api.hotpaths import hot_routes

    async def extra() -> None:
        pass

    router = APIRouter(dependencies=[Depends(authenticate), Depends(extra)])

    @router.post("/v1/chat/completions")
    async def chat() -> None:
        pass

    with pytest.raises(RuntimeError, match="runs only the authenticate dependency"):
        hot_routes(router.routes)


async def _disconnect_after(
    app: Any, body: dict[str, Any], delay: float, path: str = "/v1/chat/completions"
) -> list[dict[str, Any]]:
    """Drive the app like a server whose client hangs up ``delay`` seconds after sending the request."""
    import json as _json

    raw = _json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
    }  # fmt: skip
    messages = [{"type": "http.request", "body": raw, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.sleep(delay)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 5)
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_hot_path_client_disconnect_cancels_the_generation(
    stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    engine = _Scripted(hang=True)
    app = _scripted_app(engine)
    with caplog.at_level(logging.INFO, logger="r1serve.access"):
        sent = await _disconnect_after(app, {"messages": [{"role": "user", "content": "hi"}], "stream": stream}, 0.2)
    assert sent == []  # nothing to send to a client that left
    assert engine.ended == ["CancelledError"]
    assert any("POST /v1/chat/completions 499" in r.getMessage() for r in caplog.records)


async def test_hot_path_client_disconnect_on_deepseek_chat_cancels_the_generation() -> None:
    engine = _Scripted(hang=True)
    sent = await _disconnect_after(_scripted_app(engine), {"prompt": "hi"}, 0.2, path="/deepseek_chat")
    assert sent == [] and engine.ended == ["CancelledError"]


async def test_hot_path_client_disconnect_mid_stream_closes_the_generation() -> None:
    engine = _Scripted(hang="mid-stream")  # type: ignore[arg-type]
    app = _scripted_app(engine)
    sent = await _disconnect_after(app, {"messages": [{"role": "user", "content": "hi"}], "stream": True}, 0.2)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert b"Think." in b"".join(m.get("body", b"") for m in sent)
    assert engine.ended and engine.ended[0] in ("CancelledError", "GeneratorExit")


async def test_hot_path_leaves_other_methods_to_fastapi() -> None:
    client, _ = _client()
    async with client:
        resp = await client.get("/v1/chat/completions")
    assert _assert_error(resp, 405)["code"] == "method_not_allowed"


async def test_unknown_field_names_that_a_header_cannot_hold_are_percent_encoded() -> None:
    app = _scripted_app(_Scripted())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    body = {"messages": [{"role": "user", "content": "hi"}], "a\nb": 1, "ключ": 2, "x,y": 3, "ok_name": 4}
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        for stream in (False, True):
            resp = await client.post("/v1/chat/completions", json={**body, "stream": stream})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-r1serve-unknown-fields"] == "a%0Ab,ok_name,x%2Cy,%D0%BA%D0%BB%D1%8E%D1%87"


async def test_bodies_the_fast_parser_refuses_and_nothing_downstream_could_use_are_400() -> None:
    app = _scripted_app(_Scripted())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    chat = b'{"messages": [{"role": "user", "content": "%s"}], "x": %s}'
    cases = {
        "surrogate": (chat % (b"\\ud800 hi", b"1"), "surrogate pair"),
        "low surrogate": (chat % (b"\\udc00", b"1"), "surrogate pair"),
        "deep": (chat % (b"hi", b"[" * 100_000 + b"]" * 100_000), "too deeply"),
        "deep enough for a copy": (chat % (b"hi", b"[" * 600 + b"]" * 600), "too deeply"),
    }
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        for name, (raw, says) in cases.items():
            for path in ("/v1/chat/completions", "/deepseek_chat"):
                body = raw.replace(b'"messages": [{"role": "user", "content": ', b'"prompt": ').replace(b"}], ", b", ")
                resp = await client.post(path, content=raw if path != "/deepseek_chat" else body, headers=headers)
                assert resp.status_code == 400, (name, path, resp.text)
                error = resp.json()["error"]
                assert error["type"] == "invalid_request_error" and says in error["message"], (name, path, error)
        # A well-formed pair (an emoji escaped as two \u escapes) is text like any other.
        resp = await client.post("/v1/chat/completions", content=chat % (b"\\ud83d\\ude00", b"1"), headers=headers)
        assert resp.status_code == 200, resp.text


async def test_null_means_the_default_for_fields_openai_documents_as_nullable() -> None:
    engine = _Scripted()
    app = _scripted_app(engine)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    nulls = {"n": None, "stream": None, "logprobs": None, "include_reasoning": None, "temperature": None}
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        resp = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **nulls}
        )
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/json")  # stream: null is not a stream
        assert resp.json()["choices"][0]["message"]["reasoning_content"] == "Think."  # include_reasoning: null shows it
        assert "x-r1serve-unknown-fields" not in resp.headers
        text = await client.post("/v1/completions", json={"prompt": "2+2=", "echo": None, "n": None, "stream": None})
        assert text.status_code == 200, text.text
        assert not text.json()["choices"][0]["text"].startswith("2+2=")  # echo: null does not echo
        inf = await client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}], '
                                b'"repetition_penalty": Infinity}', headers={"Content-Type": "application/json"})  # fmt: skip
        assert inf.status_code == 400 and inf.json()["error"]["param"] == "repetition_penalty", inf.text


async def test_echo_with_logprobs_needs_an_engine_that_scores_prompts() -> None:
    engine = _Scripted()
    transport = httpx.ASGITransport(app=_scripted_app(engine), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        both = {"prompt": "2+2=", "echo": True, "logprobs": 1}
        for stream in (False, True):
            error = _assert_error(await client.post("/v1/completions", json={**both, "stream": stream}), 400)
            assert error["param"] == "echo" and error["code"] == "unsupported_value"
            assert "scripted" in error["message"]
        assert not engine.requests  # refused before the engine saw it
        echoed = await client.post("/v1/completions", json={"prompt": "2+2=", "echo": True})
        assert echoed.status_code == 200 and echoed.json()["choices"][0]["text"].startswith("2+2=")
        scored = await client.post("/v1/completions", json={"prompt": "2+2=", "logprobs": 1})
        assert scored.status_code == 200, scored.text
