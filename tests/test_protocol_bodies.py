"""Every response body validates against r1serve's own protocol models, the ones /openapi.json and /docs
promise: whole bodies, every stream chunk, model lists and errors, with reasoning, logprobs and usage.

The bodies are built by hand for speed (api/bodies.py, api/chunks.py); this catches them drifting from
the models. A body passes when the model accepts it strictly and dumps back to exactly the same JSON
(a field the model does not know, or one of the wrong shape, fails).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from r1serve.api import create_app
from r1serve.engines.base import Delta, Engine, EngineUsage, GenerationRequest
from r1serve.models.catalog import LocalSource, ModelEntry, Prices
from r1serve.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
)
from r1serve.routing import ModelRegistry, ServedModel
from r1serve.settings import Settings


def _lp(token: str, logprob: float) -> list[TokenLogprob]:
    return [TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()),
                         top_logprobs=[TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))])]  # fmt: skip


class _R1Like(Engine):
    name = "scripted"

    async def generate(self, request: GenerationRequest) -> Any:
        want = request.logprobs is not None
        yield Delta()  # a heartbeat
        yield Delta(reasoning="Let me think.", logprobs=_lp("Let", -0.5) if want else [])
        yield Delta(reasoning=" Done.", content="It is 4.", logprobs=_lp("4", -0.1) if want else [])
        usage = EngineUsage(prompt_tokens=11, completion_tokens=9, reasoning_tokens=5, cached_tokens=3)
        yield Delta(finish_reason="length", reasoning_truncated=True, usage=usage)


def _app() -> Any:
    registry = ModelRegistry()
    entry = ModelEntry(id="m", source=LocalSource(path=Path("m.gguf")), prices=Prices(input=0.5, output=2.0))
    registry.add(ServedModel(entry=entry, engine=_R1Like()), default=True)
    registry.add_r1_aliases()
    return create_app(Settings(_env_file=None), registry=registry)  # type: ignore[call-arg]


def _exact(model: type[BaseModel], body: Any) -> None:
    parsed = model.model_validate_json(json.dumps(body), strict=True)
    assert parsed.model_dump(mode="json", exclude_unset=True) == body, (model.__name__, body)


def _chunks(text: str) -> list[Any]:
    events = [e for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


async def test_chat_and_completion_bodies_and_chunks_match_the_protocol_models() -> None:
    transport = httpx.ASGITransport(app=_app())
    chat = {"messages": [{"role": "user", "content": "2+2?"}], "logprobs": True, "top_logprobs": 1}
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        for extra in ({}, {"logprobs": False, "top_logprobs": None}):
            whole = await client.post("/v1/chat/completions", json={**chat, **extra})
            assert whole.status_code == 200, whole.text
            _exact(ChatCompletion, whole.json())
            options = {"stream": True, "stream_options": {"include_usage": True}}
            stream = await client.post("/v1/chat/completions", json={**chat, **extra, **options})
            chunks = _chunks(stream.text)
            assert len(chunks) >= 5  # role, reasoning, reasoning + answer, finish, usage
            for chunk in chunks:
                _exact(ChatCompletionChunk, chunk)
        for extra in ({}, {"logprobs": 1}, {"echo": True}):
            text = await client.post("/v1/completions", json={"prompt": "2+2=", **extra})
            assert text.status_code == 200, text.text
            _exact(Completion, text.json())
            stream = await client.post("/v1/completions", json={"prompt": "2+2=", "stream": True, **extra})
            for chunk in _chunks(stream.text):
                _exact(Completion, chunk)
        plumber = await client.post("/deepseek_chat", json={"prompt": "hi"})
        _exact(ChatCompletion, plumber.json())


async def test_model_lists_and_errors_match_the_protocol_models() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        models = (await client.get("/v1/models")).json()
        _exact(ModelList, models)
        assert any(card["id"] != card["root"] for card in models["data"])  # an alias is in the list
        _exact(ModelCard, (await client.get("/v1/models/m")).json())
        for resp in (
            await client.post("/v1/chat/completions", json={"messages": []}),
            await client.post("/v1/chat/completions", content=b"{nope"),
            await client.get("/v1/models/none"),
            await client.get("/nowhere"),
            await client.post("/deepseek_chat", json={}),
        ):
            assert resp.status_code >= 400
            _exact(ErrorResponse, resp.json())
