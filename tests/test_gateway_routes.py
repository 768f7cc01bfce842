"""Model groups over several targets, against real HTTP servers on loopback: failover, retries, 429 and
Retry-After, circuit breakers, health checks, selection policies."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from fake_upstream import FakeUpstream, Reply

from r1serve.engines.base import Delta, Engine, EngineUsage, GenerationRequest
from r1serve.engines.upstream import Timeouts, UpstreamConfig, UpstreamEngine
from r1serve.errors import InvalidRequest, Overloaded, RateLimited, UpstreamError
from r1serve.gateway.group import CircuitBreaker, GroupEngine, Member, RetryPolicy, Target
from r1serve.protocol import ChatMessage

FAST = Timeouts(connect=1.0, first_byte=2.0, idle=1.0)
OK = Reply(fields=[("reasoning_content", "hmm"), ("content", "fine")])
ERR500 = Reply(kind="status", status=500, body='{"error": {"message": "internal"}}')


def chat() -> GenerationRequest:
    return GenerationRequest(request_id="r", messages=[ChatMessage(role="user", content="hi")])


def target(
    name: str, base_url: str, *, threshold: int = 5, cooldown: float = 15.0, health: float = 0, key: str | None = None
) -> Target:
    engine = UpstreamEngine(
        UpstreamConfig(name=name, base_url=base_url, model="m", dialect="reasoning_content", timeouts=FAST, api_key=key)
    )
    return Target(name, engine, breaker=CircuitBreaker(threshold, cooldown), health_interval=health)


def group(
    *targets: Target,
    policy: str = "priority",
    retries: int = 1,
    weights: list[float] | None = None,
    max_wait: float = 2.0,
) -> GroupEngine:
    members = [Member(t, weight=(weights[i] if weights else 1.0), priority=i) for i, t in enumerate(targets)]
    return GroupEngine(
        "r1", members, policy=policy, retry=RetryPolicy(retries=retries, backoff=0.01, max_retry_wait=max_wait)
    )  # type: ignore[arg-type]


async def answer(engine: GroupEngine) -> tuple[str, str]:
    deltas = [d async for d in engine.generate(chat())]
    assert deltas[-1].finish_reason == "stop"
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas)


async def test_priority_failover_after_retries() -> None:
    async with FakeUpstream(default=ERR500) as a, FakeUpstream(default=OK) as b:
        engine = group(target("a", a.base_url), target("b", b.base_url), retries=2)
        await engine.start()
        try:
            assert await answer(engine) == ("hmm", "fine")
            assert len(a.requests) == 3 and len(b.requests) == 1  # 1 try + 2 retries, then b
            assert await answer(engine) == ("hmm", "fine")
        finally:
            await engine.close()
        health = engine.health()
        assert health["status"] == "ok"
        ta, tb = health["targets"]
        assert (
            ta["failures"] == 5 and ta["circuit"] == "open"
        )  # threshold 5: the 6th try never went and ta["status"] == "down"
        assert ta["last_error"] == "upstream a failed (HTTP 500)"  # its body goes to the log only
        assert tb["requests"] == 2 and tb["failures"] == 0


async def test_retry_on_same_target_succeeds() -> None:
    async with FakeUpstream(default=OK) as a:
        a.push(ERR500, Reply(kind="drop", drop_after=0))
        engine = group(target("a", a.base_url), retries=2)
        await engine.start()
        assert await answer(engine) == ("hmm", "fine")
        await engine.close()
        assert len(a.requests) == 3


async def test_connect_error_fails_over() -> None:
    async with FakeUpstream(default=OK) as b:
        engine = group(target("dead", "http://127.0.0.1:9/v1"), target("b", b.base_url), retries=0)
        await engine.start()
        assert await answer(engine) == ("hmm", "fine")
        await engine.close()


async def test_429_fails_over_at_once_and_cools_down() -> None:
    limited = Reply(
        kind="status", status=429, headers={"Retry-After": "30"}, body='{"error": {"message": "slow down"}}'
    )
    async with FakeUpstream(default=limited) as a, FakeUpstream(default=OK) as b:
        engine = group(target("a", a.base_url), target("b", b.base_url), retries=3)
        await engine.start()
        assert await answer(engine) == ("hmm", "fine")
        assert await answer(engine) == ("hmm", "fine")
        await engine.close()
        assert len(a.requests) == 1  # cooling down: not asked again
        ta = engine.health()["targets"][0]
        assert ta["status"] == "cooling_down" and 25 < ta["cooling_down_s"] <= 30
        assert ta["circuit"] == "closed"  # a 429 is not a breaker failure


async def test_429_alone_honours_retry_after() -> None:
    limited = Reply(kind="status", status=429, headers={"Retry-After": "1"}, body="{}")
    async with FakeUpstream(default=OK) as a:
        a.push(limited)
        engine = group(target("a", a.base_url), retries=1)
        await engine.start()
        started = time.perf_counter()
        assert await answer(engine) == ("hmm", "fine")
        assert 0.9 < time.perf_counter() - started < 2.0
        await engine.close()


async def test_429_too_long_becomes_429_with_retry_after() -> None:
    limited = Reply(kind="status", status=429, headers={"Retry-After": "60"}, body="{}")
    async with FakeUpstream(default=limited) as a:
        engine = group(target("a", a.base_url), retries=1, max_wait=2)
        await engine.start()
        with pytest.raises(RateLimited) as info:
            await answer(engine)
        await engine.close()
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "60"


async def test_requests_during_a_rate_limit_cooldown_are_429_with_the_time_left() -> None:
    limited = Reply(kind="status", status=429, headers={"Retry-After": "30"}, body="{}")
    async with FakeUpstream(default=limited) as a:
        engine = group(target("a", a.base_url), retries=0)
        await engine.start()
        with pytest.raises(RateLimited):
            await answer(engine)
        with pytest.raises(RateLimited) as info:  # not asked again: the target is cooling down
            await answer(engine)
        await engine.close()
    assert len(a.requests) == 1
    assert info.value.status == 429 and 25 <= int(info.value.headers["Retry-After"]) <= 30


async def test_no_failover_once_text_was_sent() -> None:
    async with (
        FakeUpstream(default=Reply(kind="drop", drop_after=3, chunk=2, chunk_delay=0.05)) as a,
        FakeUpstream(default=OK) as b,
    ):
        engine = group(target("a", a.base_url), target("b", b.base_url), retries=2)
        await engine.start()
        got: list[Delta] = []
        with pytest.raises(UpstreamError) as info:
            async for d in engine.generate(chat()):
                got.append(d)
        await engine.close()
        assert got and info.value.status == 502
        assert len(a.requests) == 1 and len(b.requests) == 0
        assert engine.health()["targets"][0]["failures"] == 1


async def test_bad_request_is_not_failed_over() -> None:
    bad = Reply(kind="status", status=400, body='{"error": {"message": "max_tokens too large"}}')
    async with FakeUpstream(default=bad) as a, FakeUpstream(default=OK) as b:
        engine = group(target("a", a.base_url), target("b", b.base_url))
        await engine.start()
        with pytest.raises(InvalidRequest) as info:
            await answer(engine)
        await engine.close()
        assert "max_tokens too large" in info.value.message
        assert len(b.requests) == 0
        assert engine.health()["targets"][0]["circuit"] == "closed"


async def test_401_fails_over_and_hides_the_key() -> None:
    key = "sk-proj-ABCDEFGH12345678secret"
    async with FakeUpstream(default=OK, api_key="other") as a, FakeUpstream(default=ERR500) as b:
        engine = group(target("a", a.base_url, key=key), target("b", b.base_url), retries=0)
        await engine.start()
        with pytest.raises(UpstreamError) as info:
            await answer(engine)
        await engine.close()
        assert len(a.requests) == 1 and len(b.requests) == 1
        text = info.value.message + str(engine.health())
        assert key not in text and "ABCDEFGH" not in text


async def test_circuit_opens_then_half_opens() -> None:
    async with FakeUpstream(default=ERR500) as a, FakeUpstream(default=OK) as b:
        ta = target("a", a.base_url, threshold=2, cooldown=0.5)
        engine = group(ta, target("b", b.base_url), retries=0)
        await engine.start()
        await answer(engine)
        await answer(engine)
        assert ta.breaker.state == "open" and len(a.requests) == 2
        await answer(engine)
        assert len(a.requests) == 2  # skipped while open
        await asyncio.sleep(0.6)
        a.default = OK
        await answer(engine)  # the half-open trial goes to a and succeeds
        assert len(a.requests) == 3 and ta.breaker.state == "closed"
        await engine.close()


async def test_success_resets_failures_when_the_reader_stops_at_the_final_delta() -> None:
    """The API closes the stream as soon as it has the final delta; that is a success for the breaker."""
    async with FakeUpstream(default=ERR500) as a:
        ta = target("a", a.base_url, threshold=3)
        engine = group(ta, retries=0)
        await engine.start()
        try:
            with pytest.raises(UpstreamError):
                await answer(engine)
            assert ta.breaker.failures == 1
            a.default = OK
            stream = engine.generate(chat())
            async for d in stream:
                if d.finish_reason is not None:
                    break
            await stream.aclose()  # type: ignore[attr-defined]
            assert ta.breaker.failures == 0 and ta.breaker.state == "closed"
        finally:
            await engine.close()


async def test_every_circuit_open_is_503_with_retry_after() -> None:
    async with FakeUpstream(default=ERR500) as a:
        engine = group(target("a", a.base_url, threshold=1, cooldown=30), retries=0)
        await engine.start()
        with pytest.raises(UpstreamError):
            await answer(engine)
        with pytest.raises(UpstreamError) as info:
            await answer(engine)
        await engine.close()
    assert info.value.status == 503 and 1 <= int(info.value.headers["Retry-After"]) <= 30
    assert engine.health()["status"] == "down"


async def test_health_checks_mark_and_recover() -> None:
    async with FakeUpstream(default=OK) as a, FakeUpstream(default=OK) as b:
        ta, tb = target("a", a.base_url, health=0.1), target("b", b.base_url, health=0.1)
        engine = group(ta, tb)
        await engine.start()
        a.models_status = 503
        await asyncio.sleep(0.35)
        assert ta.healthy is False and tb.healthy is True and a.models_calls >= 2
        health = engine.health()
        assert health["status"] == "ok" and health["targets"][0]["status"] == "unhealthy"
        await answer(engine)
        assert len(a.requests) == 0 and len(b.requests) == 1  # unhealthy: tried after healthy ones
        a.models_status = 200
        await asyncio.sleep(0.3)
        assert ta.healthy is True
        await answer(engine)
        assert len(a.requests) == 1
        await engine.close()
        calls = a.models_calls
        await asyncio.sleep(0.25)
        assert a.models_calls == calls  # the loop stopped with the engine


async def test_weighted_policy_spreads_by_weight() -> None:
    async with FakeUpstream(default=OK) as a, FakeUpstream(default=OK) as b:
        engine = group(target("a", a.base_url), target("b", b.base_url), policy="weighted", weights=[3, 1])
        await engine.start()
        for _ in range(200):
            await answer(engine)
        await engine.close()
        share = len(a.requests) / 200
        assert 0.62 < share < 0.88, share


async def test_least_outstanding_prefers_the_idle_target() -> None:
    slow = Reply(fields=[("content", "x" * 10)], chunk=1, chunk_delay=0.05)
    async with FakeUpstream(default=slow) as a, FakeUpstream(default=slow) as b:
        engine = group(target("a", a.base_url), target("b", b.base_url), policy="least_outstanding")
        await engine.start()
        await asyncio.gather(*(answer(engine) for _ in range(10)))
        await engine.close()
        assert (len(a.requests), len(b.requests)) == (5, 5)


class Busy(Engine):
    """An embedded-like engine whose queue is full."""

    name = "busy"

    async def _gen(self, request: GenerationRequest) -> Any:
        raise Overloaded("queue full", headers={"Retry-After": "1"})
        yield  # pragma: no cover

    def generate(self, request: GenerationRequest) -> Any:
        return self._gen(request)


class Local(Engine):
    name = "local"

    async def _gen(self, request: GenerationRequest) -> Any:
        assert request.model is None
        yield Delta(content="local answer")
        yield Delta(finish_reason="stop", usage=EngineUsage(1, 2))

    def generate(self, request: GenerationRequest) -> Any:
        return self._gen(request)


async def test_embedded_targets_mix_with_upstreams() -> None:
    async with FakeUpstream(default=ERR500) as a:
        members = [
            Member(Target("busy", Busy(), health_interval=0), priority=0),
            Member(target("a", a.base_url), priority=1, model="provider-model"),
            Member(Target("local", Local(), health_interval=0), priority=2),
        ]
        engine = GroupEngine("mixed", members, retry=RetryPolicy(retries=0))
        await engine.start()
        assert await answer(engine) == ("", "local answer")
        await engine.close()
        assert a.requests[0]["body"]["model"] == "provider-model"
        kinds = [t["kind"] for t in engine.health()["targets"]]
        assert kinds == ["embedded", "upstream", "embedded"]


def test_breaker_state_machine() -> None:
    now = [0.0]
    b = CircuitBreaker(threshold=2, cooldown=10, clock=lambda: now[0])
    assert b.acquire()
    b.failure()
    assert b.state == "closed" and b.acquire()
    b.failure()
    assert b.state == "open" and not b.acquire() and b.retry_in() == 10
    now[0] = 10
    assert b.acquire() and b.state == "half_open"
    assert not b.acquire()  # one trial at a time
    b.failure()
    assert b.state == "open"
    now[0] = 15
    b.probe_ok()  # a passing health check: trial allowed now
    assert b.acquire()
    b.success()
    assert b.state == "closed" and b.failures == 0


async def test_a_timeout_fails_over_without_a_retry_on_the_same_target() -> None:
    """Waiting the same timeout again would double what the client waits; another target may answer."""
    slow = Reply(first_byte_delay=3)
    async with FakeUpstream(default=slow) as a, FakeUpstream(default=OK) as b:
        engine = group(target("a", a.base_url), target("b", b.base_url), retries=2)
        await engine.start()
        started = time.perf_counter()
        assert await answer(engine) == ("hmm", "fine")
        elapsed = time.perf_counter() - started
        await engine.close()
    assert len(a.requests) == 1 and len(b.requests) == 1
    assert elapsed < 2 * FAST.first_byte, elapsed  # one first-byte timeout, not three


async def test_an_upstream_without_a_model_is_asked_again_once_its_health_check_passes() -> None:
    """`--upstream` to a server that was down at start-up: its model is adopted when it comes up, instead
    of every request going without one."""
    async with FakeUpstream(default=OK, model="served-model") as up:
        engine = UpstreamEngine(UpstreamConfig(name="up", base_url=up.base_url, dialect="auto", timeouts=FAST))
        t = Target("up", engine, breaker=CircuitBreaker(5, 15.0), health_interval=0)
        up.models_status = 503
        assert await t.check_health() is False and engine.config.model is None
        up.models_status = 200
        assert await t.check_health() is True
        assert engine.config.model == "served-model"
        r = group(t)
        await r.start()
        await answer(r)
        await r.close()
    assert up.requests[-1]["body"]["model"] == "served-model"


def test_a_group_scores_prompts_only_when_every_member_can() -> None:
    class Scoring(Local):
        scores_prompts = True

    scoring, local = Target("s", Scoring(), health_interval=0), Target("l", Local(), health_interval=0)
    assert GroupEngine("r", [Member(scoring), Member(Target("s2", Scoring(), health_interval=0))]).scores_prompts
    assert not GroupEngine("r", [Member(scoring), Member(local)]).scores_prompts
