"""The gateway through the real API: r1serve's app under uvicorn on loopback with a gateway registry,
fake upstreams on loopback, the openai SDK as the client. Also the configuration paths: the providers
file, ``--provider`` with a ``.env``, the one-off ``--upstream`` route."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fake_upstream import FakeUpstream, Reply, think_content

from r1serve.api import create_app
from r1serve.gateway import GatewayConfigError, GatewayOptions, build_from_config, load_gateway_config
from r1serve.models.catalog import R1_ALIASES
from r1serve.reasoning import split_reasoning
from r1serve.routing.build import close_registry
from r1serve.routing.registry import ModelRegistry
from r1serve.settings import Settings

REASONING = "The user greets me. I should greet back."
ANSWER = "Hello! How can I help you today?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serving(registry: ModelRegistry, **settings: Any) -> AsyncIterator[str]:
    app = create_app(Settings(_env_file=None, **settings), registry=registry)  # type: ignore[call-arg]
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        await close_registry(registry)


def providers_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return path


async def gateway(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ModelRegistry:
    config = load_gateway_config(
        GatewayOptions(providers_file=providers_file(tmp_path, text), env_file=None, health_interval=0), env=env or {}
    )
    assert config is not None
    return await build_from_config(config)


def two_targets(a: FakeUpstream, b: FakeUpstream) -> str:
    return f"""
[gateway]
retries = 0

[providers.primary]
base_url = "{a.base_url}"
model = "primary-r1"
dialect = "think_in_content"
api_key_env = "PRIMARY_KEY"
prices = {{ input = 1.0, output = 3.0 }}

[providers.backup]
preset = "aimlapi"
base_url = "{b.base_url}"
api_key_env = "BACKUP_KEY"

[[routes]]
name = "deepseek-r1"
aliases = ["deepseek-reasoner", "deepseek-ai/DeepSeek-R1"]
default = true
targets = [{{ provider = "primary" }}, {{ provider = "backup" }}]
"""


ENV = {"PRIMARY_KEY": "sk-primary-0123456789abcdef", "BACKUP_KEY": "sk-backup-0123456789abcdef"}


async def test_openai_sdk_non_streaming_and_streaming(tmp_path: Path) -> None:
    text = think_content(REASONING, ANSWER)
    async with FakeUpstream(default=Reply(fields=text, chunk=3, chunk_delay=0.01)) as a, FakeUpstream() as b:
        registry = await gateway(tmp_path, two_targets(a, b), ENV)
        async with serving(registry) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
            resp = await client.chat.completions.with_raw_response.create(
                model="deepseek-reasoner", messages=[{"role": "user", "content": "hi"}]
            )
            assert resp.headers["x-r1serve-model"] == "deepseek-r1"
            completion = resp.parse()
            assert completion.model == "deepseek-reasoner"
            message = completion.choices[0].message
            assert (message.model_extra or {})["reasoning_content"] == REASONING + "\n"
            assert split_reasoning(text[0][1], starts_in_reasoning=True) == (REASONING + "\n", ANSWER)
            assert message.content == ANSWER
            usage = completion.usage
            assert usage is not None and usage.completion_tokens > 0
            expected = (usage.prompt_tokens * 1.0 + usage.completion_tokens * 3.0) / 1e6
            assert (usage.model_extra or {})["estimated_cost"] == pytest.approx(expected)
            assert "estimated" not in (usage.model_extra or {})  # upstream sent usage

            stream = await client.chat.completions.create(
                model="deepseek-ai/DeepSeek-R1",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            reasoning, content, usage_chunks, finish = [], [], [], None
            async for chunk in stream:
                assert chunk.model == "deepseek-ai/DeepSeek-R1"
                if chunk.usage is not None:
                    usage_chunks.append(chunk)
                    assert chunk.choices == []
                    continue
                delta = chunk.choices[0].delta
                extra = delta.model_extra or {}
                if extra.get("reasoning_content"):
                    assert delta.content is None
                    reasoning.append(extra["reasoning_content"])
                elif delta.content:
                    content.append(delta.content)
                finish = chunk.choices[0].finish_reason or finish
            assert "".join(reasoning) == REASONING + "\n" and "".join(content) == ANSWER
            assert finish == "stop" and len(usage_chunks) == 1
            assert len(reasoning) > 3  # streamed in pieces, not in one block
        assert a.requests[0]["headers"]["Authorization"] == "Bearer sk-primary-0123456789abcdef"
        assert a.requests[0]["body"]["model"] == "primary-r1"
        assert a.requests[0]["body"]["temperature"] == 0.6  # R1's recommended default filled in
        assert not b.requests


async def test_failover_history_and_estimated_usage(tmp_path: Path) -> None:
    async with (
        FakeUpstream(default=Reply(kind="status", status=503, body="{}")) as a,
        FakeUpstream(default=Reply(fields=[("reasoning_content", "r"), ("content", "\nanswer")], usage=False)) as b,
    ):
        registry = await gateway(tmp_path, two_targets(a, b), ENV)
        async with serving(registry) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
            completion = await client.chat.completions.create(
                model="deepseek-r1",
                messages=[
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "content": "<think>old thoughts</think>\n\nold answer",
                        "reasoning_content": "old thoughts",
                    },  # type: ignore[typeddict-unknown-key]
                    {"role": "user", "content": "again"},
                ],
            )
            assert completion.choices[0].message.content == "answer"
            usage = completion.usage
            assert usage is not None and (usage.model_extra or {})["estimated"] is True
            health = (await httpx.AsyncClient().get(url + "/health")).json()
        assert len(a.requests) == 1 and len(b.requests) == 1
        sent = b.requests[0]["body"]
        assert sent["model"] == "deepseek/deepseek-r1"  # the preset's model id at AIML API
        assert sent["messages"][1] == {"role": "assistant", "content": "old answer"}
        assert "old thoughts" not in json.dumps(sent)
        assert health["status"] == "ok"
        (route,) = health["engines"]
        assert [t["name"] for t in route["targets"]] == ["primary", "backup"]
        assert route["targets"][0]["failures"] == 1
        assert "sk-" not in json.dumps(health)


async def test_errors_before_and_after_output(tmp_path: Path) -> None:
    drop = Reply(kind="drop", fields=[("content", "x" * 40)], drop_after=4, chunk=2, chunk_delay=0.05)
    async with FakeUpstream(default=drop) as a, FakeUpstream(default=Reply(kind="status", status=401, body="{}")) as b:
        text = two_targets(a, b).replace('dialect = "think_in_content"', 'dialect = "none"')
        registry = await gateway(tmp_path, text, ENV)
        async with serving(registry) as url, httpx.AsyncClient(base_url=url) as http:
            body = {"model": "deepseek-r1", "messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                events = [line async for line in resp.aiter_lines() if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]"
            error = json.loads(events[-2][6:])["error"]
            assert error["type"] == "upstream_error" and "dropped" in error["message"]
            assert any('"content":"xx"' in e for e in events[:-2])
            assert len(b.requests) == 0  # output had started: no failover

            # Before any output: the first target's drop is retried... on the next target, which says 401.
            a.default = Reply(kind="drop", drop_after=0)
            resp2 = await http.post("/v1/chat/completions", json={**body, "stream": False})
            assert resp2.status_code == 502
            err = resp2.json()["error"]
            assert err["type"] == "upstream_error"
            assert "sk-" not in resp2.text and "0123456789" not in resp2.text
            stream_resp = await http.post("/v1/chat/completions", json=body)
            assert stream_resp.status_code == 502  # no 200 stream was started


async def test_provider_preset_with_dotenv(tmp_path: Path) -> None:
    token = "hf_TutorialTokenFromDotEnv123456"
    (tmp_path / ".env").write_text(f'HUGGINGFACE_ACCESS_TOKEN="{token}"\n')
    async with FakeUpstream(default=Reply(fields=think_content("x", "y", open_tag=True)), api_key=token) as hf:
        # The preset's URL is HF's real router; only the base URL is pointed at the fake.
        path = providers_file(tmp_path, f'[providers.huggingface]\nbase_url = "{hf.base_url}"\n')
        options = GatewayOptions(
            providers_file=path, provider=("huggingface",), env_file=tmp_path / ".env", health_interval=0
        )
        config = load_gateway_config(options, env=None)
        assert config is not None
        assert token not in repr(config)
        registry = await build_from_config(config)
        route = registry.resolve(None)
        assert route.entry.id == "deepseek-ai/DeepSeek-R1@huggingface"
        for alias in R1_ALIASES:
            assert registry.resolve(alias) is route
        async with serving(registry) as url, httpx.AsyncClient(base_url=url) as http:
            # The Plumber tutorial's own endpoint, as its R client calls it.
            resp = await http.post("/deepseek_chat", data={"prompt": "hello"})
            assert resp.status_code == 200, resp.text
            assert resp.json()["choices"][0]["message"] == {
                "role": "assistant",
                "content": "y",
                "reasoning_content": "x\n",
            }
        assert hf.requests[0]["headers"]["Authorization"] == f"Bearer {token}"
        assert hf.requests[0]["body"]["model"] == "deepseek-ai/DeepSeek-R1"


def test_missing_key_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(GatewayConfigError) as info:
        load_gateway_config(GatewayOptions(provider=("huggingface",), env_file=tmp_path / "none"), env={})
    assert "HUGGINGFACE_ACCESS_TOKEN" in str(info.value) and "HF_TOKEN" in str(info.value)
    with pytest.raises(GatewayConfigError) as both:  # a fallback chain: every missing key at once
        load_gateway_config(GatewayOptions(provider=("deepinfra", "together"), env_file=tmp_path / "none"), env={})
    assert "'deepinfra'" in str(both.value) and "'together'" in str(both.value), str(both.value)
    with pytest.raises(GatewayConfigError):
        load_gateway_config(GatewayOptions(provider=("nonesuch",), env_file=None), env={})
    with pytest.raises(GatewayConfigError) as info:
        path = providers_file(tmp_path, '[providers.x]\nbase_url = "http://h/v1"\napi_key = "sk-inline"\n')
        load_gateway_config(GatewayOptions(providers_file=path, env_file=None), env={})
    assert "api_key_env" in str(info.value) and "sk-inline" not in str(info.value)


async def test_one_off_upstream_route(tmp_path: Path) -> None:
    """`r1serve serve --upstream URL --reasoning-dialect think_in_content`: every catalog alias through it."""
    async with FakeUpstream(
        default=Reply(fields=think_content("deep", "shallow")), model="DeepSeek-R1-Distill-Qwen-1.5B"
    ) as up:
        options = GatewayOptions(
            upstream=up.base_url,
            reasoning_dialect="think_in_content",
            served_name="qwen2.5-coder-0.5b-instruct",
            env_file=None,
            health_interval=0,
        )
        config = load_gateway_config(options, env={})
        assert config is not None
        registry = await build_from_config(config)
        route = registry.resolve(None)
        for name in (
            *R1_ALIASES,
            "qwen2.5-coder-0.5b-instruct",
            "Qwen/Qwen2.5-Coder-0.5B-Instruct",
            "DeepSeek-R1-Distill-Qwen-1.5B",
        ):
            assert registry.resolve(name) is route, name
        async with serving(registry) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
            completion = await client.chat.completions.create(
                model="qwen2.5-coder-0.5b-instruct", messages=[{"role": "user", "content": "hi"}]
            )
            assert completion.choices[0].message.content == "shallow"
            models = await client.models.list()
            assert any(m.id == "deepseek-reasoner" for m in models.data)
        assert up.requests[0]["body"]["model"] == "DeepSeek-R1-Distill-Qwen-1.5B"  # discovered from /models


def test_settings_options_are_read_when_present() -> None:
    from r1serve.gateway.config import options_from_settings

    class S:
        providers_file = None
        provider = "deepinfra, huggingface"
        upstream = None
        upstream_key_env = None
        upstream_model = None
        reasoning_dialect = None
        model = "m"
        upstream_idle_timeout = 5.0

    options = options_from_settings(S())
    assert options.provider == ("deepinfra", "huggingface")
    assert options.timeouts is not None and options.timeouts.idle == 5.0
    assert options.reasoning_dialect == "auto"
    assert not options_from_settings(Settings(_env_file=None)).configured  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[gateway]\nretries = "two"\n', "retries must be a number (got 'two')"),
        ("[gateway]\nretries = 1.5\n", "retries must be a whole number"),
        ("[gateway]\nretries = -1\n", "retries must be at least 0"),
        ("[gateway]\nbreaker_threshold = 0\n", "breaker_threshold must be at least 1"),
        ('[gateway]\nfirst_byte_timeout = "fast"\n', "first_byte_timeout must be a number"),
        ("[gateway]\nfirst_byte_timeout = 0\n", "first_byte_timeout must be above 0"),
        ("[gateway]\nconect_timeout = 5\n", "unknown key 'conect_timeout'"),
        ("[gatway]\nretries = 1\n", "unknown key 'gatway'"),
        (
            '[providers]\nfake = "http://127.0.0.1:9/v1"\n',
            'providers.fake must be a table, like [providers.fake] base_url = "..."',
        ),
        ('[providers.p]\nbase_url = "ftp://127.0.0.1:9/v1"\n', "base_url must be an http:// or https:// URL"),
        ('[providers.p]\nbase_url = "not-a-url"\n', "base_url must be an http:// or https:// URL"),
        ('[providers.p]\nbase_url = "http://h/v1"\nprices = { input = nan }\n', "input must be a number"),
        ('[providers.p]\nbase_url = "http://h/v1"\nprices = { outptu = 3 }\n', "unknown key 'outptu'"),
        ('[providers.p]\nbase_url = "http://h/v1"\ntokenizer = 5\n', "tokenizer must be the path"),
        ('[providers.p]\nbase_url = "http://h/v1"\ninclude_usage = "false"\n', "include_usage must be true or false"),
        ("[gateway]\nretries = 1e400\n", "retries must be a number"),
        ('[providers.p]\nbase_url = "http://h/v1"\ntimeout = 5\n', "unknown key 'timeout'"),
        ('[providers.p]\nbase_url = "http://h/v1"\neos_markers = "</s>"\n', "eos_markers must be a list of strings"),
        (
            '[providers.p]\nbase_url = "http://h/v1"\n[[routes]]\nname = "r"\ntargets = [{ provider = "p", weight = "heavy" }]\n',
            "weight must be a number",
        ),  # fmt: skip
        (
            '[providers.p]\nbase_url = "http://h/v1"\n[[routes]]\nname = "r"\ntargets = [{ provider = "p", priority = "high" }]\n',
            "priority must be a number",
        ),  # fmt: skip
        (
            '[providers.p]\nbase_url = "http://h/v1"\n[[routes]]\nname = "r"\ntargets = ["p"]\naliases = "deepseek-reasoner"\n',
            "aliases must be a list of strings",
        ),  # fmt: skip
        (
            '[providers.p]\nbase_url = "http://h/v1"\n[[routes]]\nname = "a"\ntargets = ["p"]\ndefault = true\n'
            '[[routes]]\nname = "b"\ntargets = ["p"]\ndefault = true\n',
            "more than one route is the default: a, b",
        ),  # fmt: skip
    ],
)
def test_providers_file_mistakes_are_named(tmp_path: Path, text: str, says: str) -> None:
    """Wrong types, ranges and misspelt keys are errors that say what to fix, not tracebacks or silence."""
    with pytest.raises(GatewayConfigError) as info:
        load_gateway_config(GatewayOptions(providers_file=providers_file(tmp_path, text), env_file=None), env={})
    assert says in str(info.value), str(info.value)


def test_a_base_url_with_credentials_is_not_repeated_in_the_error(tmp_path: Path) -> None:
    text = '[providers.p]\nbase_url = "ftp://user:sk-SECRET-123@h/v1"\n'
    with pytest.raises(GatewayConfigError) as info:
        load_gateway_config(GatewayOptions(providers_file=providers_file(tmp_path, text), env_file=None), env={})
    assert "sk-SECRET-123" not in str(info.value) and "base_url must be" in str(info.value)


def test_json_nulls_mean_defaults_and_the_flags_route_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "providers.json"
    path.write_text(json.dumps({
        "gateway": {"retries": None},
        "providers": {"p": {"base_url": "http://127.0.0.1:9/v1", "eos_markers": None}},
        "routes": [{"name": "r", "targets": ["p"], "context_length": None, "default": True}],
    }))  # fmt: skip
    config = load_gateway_config(GatewayOptions(providers_file=path, env_file=None), env={})
    assert config is not None and config.settings.retries == 1 and config.groups[0].context_length is None
    flagged = load_gateway_config(
        GatewayOptions(providers_file=path, upstream="http://127.0.0.1:9/v1", env_file=None), env={}
    )
    assert flagged is not None and [g.name for g in flagged.groups if g.default] == [flagged.groups[0].name]
    assert flagged.groups[0].name != "r"


def test_the_sample_in_the_config_docstring_loads(tmp_path: Path) -> None:
    """The documented file format is the one the loader takes."""
    import r1serve.gateway.providers_file as providers_file_module

    doc = providers_file_module.__doc__ or ""
    sample = doc.split("::\n", 1)[1].split("\n\nWith providers", 1)[0]
    text = "\n".join(line[4:] for line in sample.splitlines())
    env = {"GPU_BOX_KEY": "k", "DEEPINFRA_API_KEY": "k", "DEEPINFRA_TOKEN": "k"}
    config = load_gateway_config(GatewayOptions(providers_file=providers_file(tmp_path, text), env_file=None), env=env)
    assert config is not None and config.groups[0].name == "deepseek-r1" and len(config.groups[0].targets) == 3
