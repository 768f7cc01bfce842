"""Every error the live server gives: status, OpenAI's exact body shape, the field named in ``param``."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from r1serve.models.catalog import DEFAULT_MODEL_ID

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "hi"}]


def _post(url: str, path: str = "/v1/chat/completions", **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", timeout=120, **kwargs)


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-request-id"]
    body = resp.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in resp.text
    return body["error"]


def test_bad_json(server_url: str) -> None:
    error = _error(_post(server_url, content=b'{"messages": [', headers={"content-type": "application/json"}), 400)
    assert error["type"] == "invalid_request_error"


def test_body_not_an_object(server_url: str) -> None:
    _error(_post(server_url, json=[1, 2]), 400)


def test_empty_messages(server_url: str) -> None:
    assert _error(_post(server_url, json={"messages": []}), 400)["param"] == "messages"


def test_missing_messages(server_url: str) -> None:
    error = _error(_post(server_url, json={"model": DEFAULT_MODEL_ID}), 400)
    assert error["param"] == "messages" and error["code"] == "missing_required_parameter"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 1.5}, "top_p"),
        ({"stream": {"yes": 1}}, "stream"),
        ({"stop": 7}, "stop"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
def test_wrong_types_and_ranges(server_url: str, extra: dict[str, Any], param: str) -> None:
    error = _error(_post(server_url, json={"messages": USER, **extra}), 400)
    assert error["param"] == param
    assert param in error["message"]


def test_messages_not_a_list(server_url: str) -> None:
    assert _error(_post(server_url, json={"messages": "hello"}), 400)["param"] == "messages"


def test_unknown_role(server_url: str) -> None:
    error = _error(_post(server_url, json={"messages": [{"role": "wizard", "content": "hi"}]}), 400)
    assert error["param"] == "messages[0].role"


def test_n_2(server_url: str) -> None:
    assert _error(_post(server_url, json={"messages": USER, "n": 2}), 400)["param"] == "n"


def test_unknown_model(server_url: str) -> None:
    error = _error(_post(server_url, json={"messages": USER, "model": "gpt-17"}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{server_url}/v1", api_key="x", max_retries=0).chat.completions.create(
            model="gpt-17",
            messages=USER,  # type: ignore[arg-type]
        )


def test_context_length_exceeded_by_prompt(server_url: str) -> None:
    long_prompt = "apple banana cherry " * 2000  # about 6000 tokens against a 4096 context
    error = _error(_post(server_url, json={"messages": [{"role": "user", "content": long_prompt}]}), 400)
    assert error["code"] == "context_length_exceeded"


def test_context_length_exceeded_by_max_tokens(server_url: str) -> None:
    error = _error(_post(server_url, json={"messages": USER, "max_tokens": 100_000}), 400)
    assert error["code"] == "context_length_exceeded"


def test_context_length_exceeded_when_streaming_is_still_a_400(server_url: str) -> None:
    error = _error(_post(server_url, json={"messages": USER, "max_tokens": 100_000, "stream": True}), 400)
    assert error["code"] == "context_length_exceeded"


def test_body_too_large(server_url: str) -> None:
    big = "x" * (5 * 1024 * 1024)
    error = _error(_post(server_url, json={"messages": [{"role": "user", "content": big}]}), 413)
    assert error["code"] == "request_too_large"


def test_completions_errors(server_url: str) -> None:
    assert _error(_post(server_url, "/v1/completions", json={"prompt": ["a", "b"]}), 400)["param"] == "prompt"
    assert _error(_post(server_url, "/v1/completions", json={}), 400)["param"] == "prompt"


def test_unknown_route_and_method(server_url: str) -> None:
    _error(httpx.get(f"{server_url}/v1/nothing-here", timeout=10), 404)
    _error(httpx.get(f"{server_url}/v1/chat/completions", timeout=10), 405)


def test_request_id_echoed_on_errors_and_successes(server_url: str) -> None:
    resp = _post(server_url, json={"messages": []}, headers={"x-request-id": "client-id-42"})
    assert resp.headers["x-request-id"] == "client-id-42"
    ok = httpx.get(f"{server_url}/v1/models", headers={"x-request-id": "client-id-43"}, timeout=10)
    assert ok.headers["x-request-id"] == "client-id-43"
