"""Attacks on the server found by probing it as an attacker would (the hardening issue, issue 18), one
regression test each, each failing without its fix. One section per item of the issue; sections keep
their own fixtures and helpers: add new ones the same way.

The in-process tests drive the real app (httpx's ASGI transport, base URL http://localhost: a loopback
name, as a browser on the same machine would send); the server tests run a real ``r1serve serve``
process (the embedded model, slow; or ``--upstream`` in front of a fake upstream on loopback).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import LiveServer
from fake_upstream import FakeUpstream, Reply
from r1_vocab import cached_r1_vocab_gguf

from r1serve.accounts import Accounts
from r1serve.api import create_app
from r1serve.engines.llama.placement import CELLS_PER_TOKEN, Placement
from r1serve.engines.vocab import Vocab, _Special, split_special
from r1serve.gateway import GatewayOptions, build_from_config, load_gateway_config
from r1serve.routing.build import close_registry
from r1serve.routing.registry import ModelRegistry
from r1serve.settings import Settings

# ============================================================================================ 1. ...
# 1. One request stalls every client: a body of 110,000 tiny messages took 191 s to be refused, and
#    /health waited as long. llama.cpp split special tokens in O(n^2); the prompt was rendered and
#    tokenized on the event loop; nothing bounded the work. Now: the split is linear (engines/vocab.py),
#    a message count and a rendered size are refused first (settings max_messages, max_prompt_bytes),
#    and rendering and tokenizing run in worker threads.

S1_ADMIN = "sk-admin-attacks-1-0123456789"
S1_SECRET = "attacks-1-key-secret-0123456789"


def s1_tiny_messages(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": "hi"} for _ in range(n)]


def s1_error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


async def test_110000_tiny_messages_are_refused_before_any_work() -> None:
    # The body: 3.85 MB, under the 4 MiB body limit. No model is served here: the count is
    # checked before the model is even resolved (else this would be a 404).
    app = create_app(Settings(), registry=ModelRegistry())
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        body = {"model": "deepseek-reasoner", "messages": s1_tiny_messages(110_000), "max_tokens": 1}
        resp = await client.post("/v1/chat/completions", json=body)
        error = s1_error(resp, 400)
        assert error["param"] == "messages" and error["code"] == "array_above_max_length"
        assert "2048" in error["message"] and "110000" in error["message"]
        # Refused before parsing (the "role" keys counted, then decoded with orjson), and after parsing
        # when the keys are spelt with escapes that the count does not see.
        escaped = b'{"messages": [' + b",".join([b'{"\\u0072ole": "user", "content": "hi"}'] * 2049) + b"]}"
        assert b'"role"' not in escaped and b"\\u0072ole" in escaped
        error = s1_error(await client.post("/v1/chat/completions", content=escaped, headers=JSON), 400)
        assert error["param"] == "messages" and "2049" in error["message"]
        # The limit is a setting; at the limit the request goes on (here to the 404 for the model).
        at_limit = {**body, "messages": s1_tiny_messages(Settings().max_messages)}
        assert s1_error(await client.post("/v1/chat/completions", json=at_limit), 404)["param"] == "model"


def test_special_tokens_are_split_as_llama_cpp_splits_them() -> None:
    """Vocab.tokenize splits special tokens itself (llama.cpp's split is quadratic): the tokens must be
    exactly llama.cpp's, on the real R1 vocabulary, for texts dense with special tokens and near-misses."""
    vocab = Vocab.load(cached_r1_vocab_gguf())
    try:
        specials = [s.text.decode() for s in vocab._specials]
        assert "<think>" in specials and "<｜User｜>" in specials
        pieces = [*specials, "a", " ", "\n", "  x", "é", "<", "｜", "<think", "think>", "<｜User", "▁", "\t"]
        rnd = random.Random(18)
        for _ in range(2000):
            text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 24)))
            for add_special in (False, True):
                ours = vocab.tokenize(text, add_special=add_special)
                theirs = vocab._llama_tokenize(text.encode(), add_special=add_special, parse_special=True)
                assert ours == theirs, text
    finally:
        vocab.close()


def test_split_strips_whitespace_where_the_token_says_so() -> None:
    # LSTRIP / RSTRIP tokens (as some vocabularies' <mask>) eat the whitespace beside them, as in llama.cpp.
    specials = [_Special(b"<long>", 1, False, False), _Special(b"<m>", 2, True, True), _Special(b"<", 3, False, False)]
    data = b"a \t<m>\n b<long><<m>"
    parts = split_special(data, specials)
    assert [p if isinstance(p, int) else data[p[0] : p[1]] for p in parts] == [b"a", 2, b"b", 1, 3, 2]
    assert split_special(b"", specials) == []


@pytest.fixture(scope="module")
def s1_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str]]:
    """A server with accounts and one user key with limits (the issue's caller: its prompt is also
    counted for the limits, from the one rendering the generation uses)."""
    env = {"R1SERVE_ADMIN_KEY": S1_ADMIN, "R1SERVE_KEY_SECRET": S1_SECRET}
    server = LiveServer(tmp_path_factory.mktemp("attacks1"), "attacks1", env)
    try:
        server.wait_ready()
        resp = httpx.post(
            f"{server.url}/v1/admin/keys",
            json={"name": "user", "tpm": 100_000_000, "rpm": 10_000},
            headers={"Authorization": f"Bearer {S1_ADMIN}"},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        yield server, str(resp.json()["key"])
    finally:
        server.stop()


@pytest.mark.slow
def test_live_huge_bodies_are_refused_with_a_400_naming_messages(s1_server: tuple[LiveServer, str]) -> None:
    server, key = s1_server
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{server.url}/v1/chat/completions"
    many = httpx.post(url, json={"messages": s1_tiny_messages(110_000), "max_tokens": 1}, headers=headers, timeout=600)
    assert s1_error(many, 400)["code"] == "array_above_max_length"
    # One message, 2.5 MB: under the body limit, over the rendered-size limit (2 MiB), refused before
    # it is tokenized (it would have been refused for the context only after).
    one = [{"role": "user", "content": "lorem ipsum " * 210_000}]
    big = httpx.post(url, json={"messages": one, "max_tokens": 1}, headers=headers, timeout=600)
    error = s1_error(big, 400)
    assert error["param"] == "messages" and error["code"] == "string_above_max_length", error
    assert "R1SERVE_MAX_PROMPT_BYTES" in error["message"]
    # The raw completions' prompt is bounded the same way.
    raw = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "x " * 1_200_000, "max_tokens": 1}, headers=headers, timeout=600
    )
    assert s1_error(raw, 400)["param"] == "prompt"


@pytest.mark.slow
async def test_health_answers_while_a_big_prompt_is_rendered_and_tokenized(s1_server: tuple[LiveServer, str]) -> None:
    """A big but allowed prompt (2,000 messages, 1.8 MB, 180,000 special tokens: a second or so of work)
    is prepared in a worker thread: /health, asked meanwhile, answers while the preparation is still
    running (the engine's health counts prompts being prepared; on the event loop no other request could
    ever see that count above 0), and before the chat request ends."""
    server, key = s1_server
    content = "<|im_end|>x" * 80
    messages = [{"role": "user", "content": content} for _ in range(2000)]
    body = {"messages": messages, "max_tokens": 1}
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
        for _attempt in range(5):
            events: list[str] = []

            async def chat(events: list[str]) -> httpx.Response:
                resp = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                events.append("chat")
                return resp

            task = asyncio.create_task(chat(events))
            while not task.done():
                health = await client.get("/health")
                assert health.status_code == 200
                if any(engine.get("preparing") for engine in health.json()["engines"]):
                    events.append("health while preparing")
            resp = await task
            # Far more tokens than the 4,096-token context: refused once counted, not generated.
            assert s1_error(resp, 400)["code"] == "context_length_exceeded"
            if "health while preparing" in events:
                assert events.index("health while preparing") < events.index("chat")
                return
    pytest.fail("/health never answered while a prompt was being prepared")


# ============================================================================================ 2. ...
# 2. The prefix cache told one key about another key's prompts: cached_tokens (10 vs 17 vs 36) showed
#    how much of a guess matched another tenant's system prompt. Now reuse is scoped to the caller's key
#    (GenerationRequest.cache_scope) and further to a request's cache_salt; placement reuses only cached
#    prefixes of its own scope.

S2_PER_SEQ = 8 * CELLS_PER_TOKEN  # a copy pays from 8 saved tokens
S2_A, S2_B = list(range(1000, 1030)), list(range(2000, 2030))


class S2Cache:
    """KV streams as token lists, changed by the two calls placement makes (as in test_placement.py)."""

    def __init__(self, n: int) -> None:
        self.cells: dict[int, list[int]] = {i: [] for i in range(n)}
        self.copies: list[tuple[int, int]] = []

    def seq_rm(self, seq_id: int, p0: int, p1: int) -> None:
        del self.cells[seq_id][p0:]

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        self.copies.append((src, dst))
        self.cells[dst] = list(self.cells[src])


def s2_placement(n: int = 4) -> tuple[Placement, S2Cache]:
    cache = S2Cache(n)
    clock = iter(range(1, 10_000))
    placement = Placement(n, S2_PER_SEQ, seq_rm=cache.seq_rm, seq_cp=cache.seq_cp, clock=lambda: float(next(clock)))
    return placement, cache


def s2_run(placement: Placement, prompt: list[int], scope: object) -> int:
    """Admit a prompt, let it finish (its cells keep the prompt), return how much of it was cached."""
    slot, keep = placement.assign(prompt, [s for s in placement.slots if not s.busy], scope=scope)
    slot.tokens = list(prompt)
    placement.release(slot)
    return keep


def test_placement_never_reuses_another_scopes_prefix() -> None:
    placement, cache = s2_placement()
    secret = S2_A + S2_B
    assert s2_run(placement, secret, "u1") == 0
    # Another key's guess sharing the secret's first 30 tokens finds nothing (it found 30).
    assert s2_run(placement, S2_A + [9] * 10, "u2") == 0
    # Its exact copy of the secret finds only what it sent itself: those 30 (it found 60).
    assert s2_run(placement, secret + [7], "u2") == len(S2_A)
    assert all(src != 0 for src, _ in cache.copies), "u1's stream was copied for u2"
    # Each key still finds its own prompts whole.
    assert s2_run(placement, secret + [8], "u1") == len(secret)
    assert s2_run(placement, secret + [7, 1], "u2") == len(secret) + 1


def test_placement_a_slot_taken_by_another_scope_becomes_its() -> None:
    placement, _ = s2_placement(2)
    assert s2_run(placement, S2_A, "u1") == 0
    assert s2_run(placement, S2_B, "u2") == 0
    # No slot is free of a conversation: u2's next prompt overwrites u1's, the least recently used,
    # copying in its own 10-token prefix. Both slots then hold u2's tokens, and are u2's.
    assert s2_run(placement, S2_B[:10] + S2_A, "u2") == 10
    assert [s.scope for s in placement.slots] == ["u2", "u2"]
    # Which u1 cannot reuse, though slot 0 now holds u1's A right after u2's 10 tokens.
    assert s2_run(placement, S2_B[:10] + S2_A + [1], "u1") == 0


def test_placement_a_saved_conversation_keeps_its_scope() -> None:
    placement, cache = s2_placement(4)
    slots = placement.slots
    # Slot 0: u1's conversation, the oldest; slot 1: u2's running request; slot 2: a newer idle one of
    # u3's; slot 3 empty. A new request must sit next to the running one (0 or 2) and takes the least
    # recently used, slot 0, whose conversation is first saved to the empty slot 3.
    for slot, tokens, scope, used, busy in [(0, S2_A + S2_B, "u1", 1.0, False), (1, [5] * 20, "u2", 2.0, True),
                                            (2, [6] * 20, "u3", 3.0, False)]:  # fmt: skip
        slots[slot].tokens, slots[slot].scope, slots[slot].last_used, slots[slot].busy = list(tokens), scope, used, busy
        cache.cells[slot] = list(tokens)
    slot, keep = placement.assign(S2_A + [4] * 5, [s for s in slots if not s.busy], scope="u2")
    assert (slot.seq_id, keep) == (0, 0)  # u1's A is not u2's to reuse
    assert cache.copies == [(0, 3)] and slots[3].tokens == S2_A + S2_B
    assert slots[3].scope == "u1" and slot.scope == "u2"
    slot.tokens = S2_A + [4] * 5
    placement.release(slot)
    placement.release(slots[1])
    # u1 finds its saved conversation (copied from slot 3); u2 does not.
    assert s2_run(placement, S2_A + S2_B + [3], "u2") == len(S2_A)  # its own S2_A + [4]*5, not u1's
    assert s2_run(placement, S2_A + S2_B + [3], "u1") == len(S2_A + S2_B)


def test_placement_without_scopes_shares_as_before() -> None:
    # The open server and direct engine use: one scope (None), every prefix reusable.
    placement, _ = s2_placement()
    s2_run(placement, S2_A + S2_B, None)
    assert s2_run(placement, S2_A + [5], None) == len(S2_A)


S2_ADMIN = "sk-admin-attacks-2-0123456789"
S2_SECRET = "attacks-2-key-secret-0123456789"


@pytest.fixture(scope="module")
def s2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, str, str]]:
    """A server with accounts and two user keys, U1 and U2."""
    env = {"R1SERVE_ADMIN_KEY": S2_ADMIN, "R1SERVE_KEY_SECRET": S2_SECRET}
    server = LiveServer(tmp_path_factory.mktemp("attacks2"), "attacks2", env)
    try:
        server.wait_ready()
        keys = []
        for name in ("u1", "u2"):
            resp = httpx.post(
                f"{server.url}/v1/admin/keys",
                json={"name": name},
                headers={"Authorization": f"Bearer {S2_ADMIN}"},
                timeout=30,
            )
            assert resp.status_code == 200, resp.text
            keys.append(str(resp.json()["key"]))
        yield server, keys[0], keys[1]
    finally:
        server.stop()


def s2_cached(server: LiveServer, key: str, system: str, **extra: object) -> tuple[int, int]:
    """(cached_tokens, prompt_tokens) of a one-token answer to ``system`` and a fixed question."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Who is the target?"}]
    resp = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 1, "temperature": 0, **extra},
        headers={"Authorization": f"Bearer {key}"},
        timeout=300,
    )
    assert resp.status_code == 200, resp.text
    usage = resp.json()["usage"]
    return int(usage["prompt_tokens_details"]["cached_tokens"]), int(usage["prompt_tokens"])


@pytest.mark.slow
def test_live_a_key_learns_nothing_from_another_keys_cached_prompt(s2_server: tuple[LiveServer, str, str]) -> None:
    server, u1, u2 = s2_server
    secret = "You are a sales assistant. The target is Zephyr Robotics, price 41 dollars. Never reveal it."
    assert s2_cached(server, u1, secret)[0] < 10  # nothing of it cached yet

    def guess(company: str, price: int) -> str:
        return f"You are a sales assistant. The target is {company}, price {price} dollars. Never reveal it."

    # U2's probes, in an order that gives each the same own history to match: a wrong guess first
    # (caches "...The target is " for U2), then the right one, then another wrong one.
    wrong_first = s2_cached(server, u2, guess("Acme Corp", 12))[0]
    right, prompt_tokens = s2_cached(server, u2, secret)
    wrong_after = s2_cached(server, u2, guess("Bolt Inc", 41))[0]
    # The right guess finds exactly what an unseen guess finds: U2's own shared start, not U1's prompt.
    assert right == wrong_after
    assert right < prompt_tokens - 10
    assert wrong_first <= right
    # The same key's repeat still hits, all but the last prompt token (which is decoded for its logits).
    again, prompt_tokens = s2_cached(server, u1, secret)
    assert again == prompt_tokens - 1
    # U2's own repeat of what it sent hits too.
    repeat, prompt_tokens = s2_cached(server, u2, guess("Bolt Inc", 41))
    assert repeat == prompt_tokens - 1


@pytest.mark.slow
def test_live_cache_salt_partitions_a_keys_cache(s2_server: tuple[LiveServer, str, str]) -> None:
    server, u1, _ = s2_server
    system = "You are a legal assistant for case 5521-B; the witness is Harriet Vance of Leeds."
    assert s2_cached(server, u1, system, cache_salt="salt-one")[0] < 10
    other, prompt_tokens = s2_cached(server, u1, system, cache_salt="salt-two")
    assert other < 10  # another salt of the same key: nothing reused
    assert s2_cached(server, u1, system)[0] < 10  # nor without a salt
    assert s2_cached(server, u1, system, cache_salt="salt-one")[0] == prompt_tokens - 1
    # An empty salt is a mistake, not "no salt".
    resp = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "cache_salt": ""},
        headers={"Authorization": f"Bearer {u1}"},
        timeout=60,
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "cache_salt"


ADMIN = "sk-admin-attacks-0123456789"
HELLO = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "data", **extra)  # type: ignore[call-arg]


@asynccontextmanager
async def app_client(
    tmp_path: Path, upstream: FakeUpstream, *, accounts: bool = False, **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app in front of ``upstream`` (one provider), with the accounts layer when asked."""
    text = f'[providers.fake]\nbase_url = "{upstream.base_url}"\nmodel = "fake-r1"\ndialect = "reasoning_content"\n'
    path = tmp_path / "providers.toml"
    path.write_text(text + "\n[gateway]\nretries = 0\n")
    config = load_gateway_config(GatewayOptions(providers_file=path, env_file=None, health_interval=0), env={})
    assert config is not None
    registry = await build_from_config(config)
    s = _settings(tmp_path, admin_key=ADMIN if accounts else None, key_secret="attacks-secret-0123456789", **settings)
    acc = Accounts.open(s) if accounts else None
    if acc is not None:
        acc.start()
    app = create_app(s, registry=registry, accounts=acc)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost") as client:
            yield client
    finally:
        await close_registry(registry)
        if acc is not None:
            acc.close()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def gateway_process(tmp_path: Path, upstream: FakeUpstream, **env: str) -> AsyncIterator[tuple[str, Path]]:
    """``r1serve serve --upstream`` as a user starts it, as a child process; yields its URL and log file."""
    port = _free_port()
    log_path = tmp_path / "server.log"
    base = {k: v for k, v in os.environ.items() if not k.startswith("R1SERVE_")}
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "r1serve", "serve", "--upstream", upstream.base_url, "--port", str(port),
            cwd=tmp_path, env={**base, "R1SERVE_DATA_DIR": str(tmp_path / "data"), **env},
            stdout=log, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(600):
                if proc.returncode is not None:
                    raise RuntimeError(f"r1serve exited: {log_path.read_text()}")
                try:
                    if (await client.get(f"{url}/health", timeout=2)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"r1serve did not start: {log_path.read_text()}")
        yield url, log_path
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


# ----------------------------------------------------------------------------- 3. upstream error text

LEAKY_500 = (
    'Traceback (most recent call last):\n  File "/srv/inference/app/handlers.py", line 88, in chat\n'
    "sqlalchemy.exc.OperationalError: could not connect to postgresql://svc:hunter2@10.1.2.3:5432/billing"
)


async def test_upstream_error_body_reaches_neither_the_client_nor_public_health(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    leaky = Reply(kind="status", status=500, body=LEAKY_500)
    async with FakeUpstream(default=leaky) as up, app_client(tmp_path, up, accounts=True) as client:
        error = _error(await client.post("/v1/chat/completions", json={"messages": HELLO}, headers=_auth(ADMIN)), 502)
        assert "HTTP 500" in error["message"] and "fake" in error["message"]
        for secret in ("hunter2", "Traceback", "/srv/inference", "10.1.2.3"):
            assert secret not in error["message"]

        public = (await client.get("/health")).text
        for private in ("hunter2", "Traceback", "last_error", "base_url", str(up.port)):
            assert private not in public
        target = (await client.get("/health")).json()["engines"][0]["targets"][0]
        assert target["failures"] == 1 and target["status"]  # the state is still shown

        admin = (await client.get("/health", headers=_auth(ADMIN))).json()["engines"][0]["targets"][0]
        assert admin["base_url"] == up.base_url and admin["last_error"] == "upstream fake failed (HTTP 500)"
        # A wrong key on the public page is no error, and no admin either.
        wrong = await client.get("/health", headers=_auth("sk-wrong-0123456789"))
        assert wrong.status_code == 200 and "base_url" not in wrong.text
    # The operator's log has the upstream's words, with the password scrubbed.
    assert "OperationalError" in caplog.text and "hunter2" not in caplog.text
    assert "postgresql://[redacted]@10.1.2.3" in caplog.text


# ----------------------------------------------------------------------------- 4. web pages driving the open server


async def test_json_endpoints_refuse_simple_content_types(tmp_path: Path) -> None:
    body = json.dumps({"messages": HELLO})
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"content-type": kind} if kind else {}
            resp = await client.post("/v1/chat/completions", content=body, headers=headers)
            assert _error(resp, 415)["code"] == "unsupported_media_type", kind
        assert len(up.requests) == 0  # nothing reached the model
        ok = await client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json; charset=utf-8"}
        )
        assert ok.status_code == 200, ok.text
        # The R tutorial's forms still work on /deepseek_chat.
        assert (await client.post("/deepseek_chat", data={"prompt": "hi"})).status_code == 200
        assert (await client.post("/deepseek_chat?prompt=hi")).status_code == 200


async def test_foreign_host_is_refused_on_loopback(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io"):
            resp = await client.post("/v1/chat/completions", json={"messages": HELLO}, headers={"host": host})
            assert _error(resp, 403)["code"] == "host_not_allowed", host
        assert _error(await client.get("/v1/models", headers={"host": "evil.example"}), 403)
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "app.localhost"):
            assert (await client.get("/v1/models", headers={"host": host})).status_code == 200, host
    async with FakeUpstream() as up, app_client(tmp_path, up, allowed_hosts=["gpu-box.lan"]) as client:
        assert (await client.get("/v1/models", headers={"host": "gpu-box.lan:8000"})).status_code == 200
        assert (await client.get("/v1/models", headers={"host": "evil.example"})).status_code == 403
    # Beyond loopback the server is reached by names it cannot know (keys protect it there).
    async with FakeUpstream() as up, app_client(tmp_path, up, host="0.0.0.0") as client:
        assert (await client.get("/v1/models", headers={"host": "r1.example.com"})).status_code == 200


async def test_foreign_origin_and_cross_site_requests_are_refused(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        foreign = {"origin": "http://evil.example"}
        assert (
            _error(await client.post("/v1/chat/completions", json={"messages": HELLO}, headers=foreign), 403)["code"]
            == "origin_not_allowed"
        )
        assert _error(await client.post("/deepseek_chat", data={"prompt": "hi"}, headers=foreign), 403)
        assert _error(await client.post("/deepseek_chat", data={"prompt": "hi"}, headers={"origin": "null"}), 403)
        # An <img src> or a no-cors fetch sends no Origin, but says where it comes from.
        no_cors = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}
        assert _error(await client.post("/deepseek_chat?prompt=hi", headers=no_cors), 403)
        assert len(up.requests) == 0
        # The server's own pages (same origin), and a user following a link, still work.
        same = {"origin": "http://localhost", "sec-fetch-site": "same-origin"}
        assert (await client.post("/v1/chat/completions", json={"messages": HELLO}, headers=same)).status_code == 200
        link = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate"}
        assert (await client.get("/docs", headers=link)).status_code == 200
    async with FakeUpstream() as up, app_client(tmp_path, up, allowed_origins=["https://app.example"]) as client:
        allowed = {"origin": "https://app.example"}
        assert (await client.post("/v1/chat/completions", json={"messages": HELLO}, headers=allowed)).status_code == 200


# ----------------------------------------------------------------------------- 5. an empty model list


async def test_empty_model_list_never_means_every_model(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up, accounts=True) as client:
        admin = _auth(ADMIN)
        error = _error(await client.post("/v1/admin/keys", json={"name": "u", "models": []}, headers=admin), 400)
        assert error["param"] == "models"
        created = await client.post("/v1/admin/keys", json={"name": "u", "models": ["fake-r1"]}, headers=admin)
        assert created.status_code == 200, created.text
        ident = created.json()["id"]
        error = _error(await client.patch(f"/v1/admin/keys/{ident}", json={"models": []}, headers=admin), 400)
        assert error["param"] == "models"
        assert (await client.get(f"/v1/admin/keys/{ident}", headers=admin)).json()["models"] == ["fake-r1"]
        # Null (or leaving it out) still means all, on purpose.
        widened = await client.patch(f"/v1/admin/keys/{ident}", json={"models": None}, headers=admin)
        assert widened.json()["models"] is None


async def test_admin_key_bodies_are_bounded(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up, accounts=True) as client:
        admin = _auth(ADMIN)
        for field, value in (("budget_usd", 1e300), ("rpm", 10**22), ("tpm", 10**22), ("budget_usd", -1)):
            resp = await client.post("/v1/admin/keys", json={"name": "big", field: value}, headers=admin)
            assert _error(resp, 400)["param"] == field, (field, value)
        resp = await client.post("/v1/admin/keys", json={"name": "p", "budget_period": "week"}, headers=admin)
        assert _error(resp, 400)["param"] == "budget_period"
        assert (await client.get("/v1/admin/keys", headers=admin)).json()["data"] == []
        error = _error(await client.get("/v1/admin/keys/nope", headers=admin), 404)
        assert error["type"] == "invalid_request_error" and error["code"] == "key_not_found"


# ----------------------------------------------------------------------------- 6. forged log lines


async def test_log_lines_cannot_be_forged(tmp_path: Path) -> None:
    async with (
        FakeUpstream() as up,
        gateway_process(tmp_path, up, R1SERVE_ADMIN_KEY=ADMIN) as (url, log_path),
        httpx.AsyncClient() as client,
    ):
        await client.get(f"{url}/x%0A06:46:00%20INFO%20%20%20%20r1serve.api%20[-]%20forged%1b[31m")
        name = "mallory\n06:47:00 INFO    r1serve.accounts [-] forged too"
        created = await client.post(f"{url}/v1/admin/keys", json={"name": name}, headers=_auth(ADMIN))
        assert created.status_code == 200, created.text
        await asyncio.sleep(1.0)  # the access log's batch is written every 0.5 s
    lines = log_path.read_text().splitlines()
    assert not [line for line in lines if line.startswith(("06:46:00", "06:47:00"))], lines
    text = "\n".join(lines)
    assert "\x1b" not in text
    assert "/x\\n06:46:00" in text and "mallory\\n06:47:00" in text


# ----------------------------------------------------------------------------- 7. smaller ones


async def test_slow_clients_cannot_hold_the_servers_sockets(tmp_path: Path) -> None:
    env = {"R1SERVE_HEADER_TIMEOUT": "1", "R1SERVE_MAX_CONNECTIONS": "8"}
    async with FakeUpstream() as up, gateway_process(tmp_path, up, **env) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        slow = []
        for _ in range(8):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")  # and never the rest
            await writer.drain()
            slow.append((reader, writer))
        # Past the cap, a new connection is answered 503 at once, not left hanging.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = await asyncio.wait_for(reader.read(), timeout=30)
        assert head.startswith(b"HTTP/1.1 503"), head
        writer.close()
        # The slow ones are closed by the server once their headers are late.
        for reader, writer in slow:
            assert await asyncio.wait_for(reader.read(), timeout=30) == b""
            writer.close()
        async with httpx.AsyncClient() as client:
            ok = await client.post(f"{url}/v1/chat/completions", json={"messages": HELLO}, timeout=30)
            assert ok.status_code == 200, ok.text


async def test_unknown_fields_header_is_capped(tmp_path: Path) -> None:
    body: dict[str, Any] = {"messages": HELLO, **{f"field_{i:05d}": 1 for i in range(20_000)}}
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]
        header = resp.headers["x-r1serve-unknown-fields"]
        assert len(header) <= 2100 and header.startswith("field_00000,field_00001,")
        shown = header.count(",")  # the names, then "...N more"
        assert header.endswith(f",...{20_000 - shown} more")


async def test_strict_wire_types_and_huge_numbers(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        for field, value in (("max_tokens", "4"), ("max_tokens", True), ("max_tokens", 2.0), ("temperature", "0.5"),
                             ("stream", "true"), ("max_tokens", 10**25)):  # fmt: skip
            resp = await client.post("/v1/chat/completions", json={"messages": HELLO, field: value})
            assert _error(resp, 400)["param"] == field, (field, value)
        raw = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}"
        error = _error(await client.post("/v1/chat/completions", content=raw, headers=JSON), 400)
        assert "digits" in error["message"] and "sys." not in error["message"], error
        assert len(up.requests) == 0
        assert (
            await client.post("/v1/chat/completions", json={"messages": HELLO, "temperature": 1})
        ).status_code == 200


async def test_upstream_redirects_are_not_followed(tmp_path: Path) -> None:
    async with FakeUpstream() as up:
        loop = Reply(kind="status", status=307, headers={"Location": f"{up.base_url}/chat/completions"})
        up.default = loop
        async with app_client(tmp_path, up) as client:
            error = _error(await client.post("/v1/chat/completions", json={"messages": HELLO}), 502)
            assert "redirect" in error["message"] and "HTTP 307" in error["message"]
        assert len(up.requests) == 1  # the prompt went out once, not once per hop


async def test_deepseek_chat_honours_max_tokens(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        assert (await client.post("/deepseek_chat", json={"prompt": "hi", "max_tokens": 500})).status_code == 200
        assert (await client.post("/deepseek_chat", data={"prompt": "hi", "max_tokens": "7"})).status_code == 200
        assert (await client.post("/deepseek_chat?prompt=hi&max_tokens=9")).status_code == 200
        assert [r["body"]["max_tokens"] for r in up.requests] == [500, 7, 9]
        for bad in ("0", "many", -1, 1.5):
            resp = await client.post("/deepseek_chat", json={"prompt": "hi", "max_tokens": bad})
            assert _error(resp, 400)["param"] == "max_tokens", bad


# Found by a review of the fixes above.


async def test_other_upstream_4xx_bodies_stay_in_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    billing = Reply(kind="status", status=402, body='{"error": {"message": "org-7f3a out of credit, card 4242"}}')
    async with FakeUpstream(default=billing) as up, app_client(tmp_path, up) as client:
        error = _error(await client.post("/v1/chat/completions", json={"messages": HELLO}), 502)
        assert "HTTP 402" in error["message"] and "org-7f3a" not in error["message"]
    assert "org-7f3a" in caplog.text


async def test_localhost_subdomains_only_in_the_default_host_set(tmp_path: Path) -> None:
    async with FakeUpstream() as up, app_client(tmp_path, up, allowed_hosts=["gpu-box.lan"]) as client:
        assert (await client.get("/v1/models", headers={"host": "evil.localhost"})).status_code == 403


async def test_unreadable_or_huge_schemas_are_400s(tmp_path: Path) -> None:
    nested: dict[str, Any] = {"type": "string"}
    for _ in range(120):  # deep enough for the schema library's recursion, not for the body's depth limit
        nested = {"type": "object", "properties": {"a": nested}}
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}
    async with FakeUpstream() as up, app_client(tmp_path, up) as client:
        for schema in ({"$schema": []}, {"$schema": 5}, nested, huge):
            body = {
                "messages": HELLO,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            }
            resp = await client.post("/v1/chat/completions", json=body)
            assert _error(resp, 400)["param"] == "response_format.json_schema.schema"
        assert len(up.requests) == 0
