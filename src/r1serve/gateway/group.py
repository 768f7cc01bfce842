"""A model group: one model name served by several targets, with a selection policy, retries with
backoff, failover, circuit breakers, and active health checks. :class:`GroupEngine` is itself an
:class:`~r1serve.engines.base.Engine`, so the router and the API see one engine per model group and need
nothing new. (A group is a ``[[routes]]`` table in the providers file; see :mod:`.config`.)

Retry rule: a target's attempt may be retried or failed over only while nothing has been yielded, which
is exactly "before any byte has gone to the client" because the API sends no headers until the first
delta. Upstream engines only yield deltas with text (or the final one), so role-only chunks, keep-alive
comments and the like do not commit a request to a target.

Per failure kind (see :class:`~r1serve.engines.upstream.AttemptFailed`):

* connect error, timeout, 5xx, invalid or truncated response before any text: retried on the same
  target up to ``retries`` times with exponential backoff and jitter, then the next target;
* 429: the target cools down for ``Retry-After`` seconds (1 s when absent) and the next target is tried;
  with no other target, the wait is honoured when it is at most ``max_retry_wait``, else the client gets
  429 with the same ``Retry-After``;
* 401 / 403 / 404 from upstream: the next target, no retry (a configuration problem at that target);
* the embedded engine's 503 (queue full): the next target;
* anything else (400 from upstream, context too long...): straight to the client.

Circuit breaker per target: ``threshold`` consecutive failures open it; after ``cooldown`` seconds one
trial request is let through (half-open); its success closes the circuit, its failure reopens it. A
passing health check also lets a trial through early. Health checks (``GET {base}/models``) mark a target
unhealthy; unhealthy targets are tried only after healthy ones (a check can be wrong, e.g. a server
without ``/models``), targets with an open circuit or cooling down not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from r1serve.engines.base import Delta, Engine, GenerationRequest
from r1serve.engines.upstream import AttemptFailed, UpstreamEngine
from r1serve.errors import R1ServeError, RateLimited, UpstreamError

log = logging.getLogger("r1serve.gateway")

Policy = Literal["priority", "weighted", "least_outstanding"]
CircuitState = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    def __init__(self, threshold: int = 5, cooldown: float = 15.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = max(1, threshold)
        self.cooldown = cooldown
        self._clock = clock
        self.state: CircuitState = "closed"
        self.failures = 0  # consecutive
        self._opened_at = 0.0
        self._trial = False  # a half-open trial is in flight

    def available(self) -> bool:
        """Could a request go now (without claiming the half-open trial)."""
        if self.state == "closed":
            return True
        if self.state == "open":
            return self._clock() - self._opened_at >= self.cooldown
        return not self._trial

    def acquire(self) -> bool:
        """Claim the right to send one request."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() - self._opened_at < self.cooldown:
                return False
            self.state = "half_open"
            self._trial = False
        if self._trial:
            return False
        self._trial = True
        return True

    def release(self) -> None:
        """The claimed request ended without a verdict (client gone, bad request)."""
        self._trial = False

    def success(self) -> None:
        self.state = "closed"
        self.failures = 0
        self._trial = False

    def failure(self) -> None:
        self.failures += 1
        self._trial = False
        if self.state == "half_open" or self.failures >= self.threshold:
            if self.state != "open":
                log.warning("circuit opened after %d consecutive failures", self.failures)
            self.state = "open"
            self._opened_at = self._clock()

    def probe_ok(self) -> None:
        """A health check passed: an open circuit may try a request now."""
        if self.state == "open":
            self._opened_at = self._clock() - self.cooldown

    def retry_in(self) -> float:
        if self.state != "open":
            return 0.0
        return max(0.0, self.cooldown - (self._clock() - self._opened_at))


@dataclass
class TargetStats:
    requests: int = 0
    failures: int = 0
    outstanding: int = 0


class Target:
    """One place a model group can send a request: an upstream provider, or the embedded engine.

    Shared by every group that uses it (its breaker, health and outstanding count are per target).
    """

    def __init__(
        self,
        name: str,
        engine: Engine,
        *,
        breaker: CircuitBreaker | None = None,
        health_interval: float = 15.0,
    ) -> None:
        self.name = name
        self.engine = engine
        self.breaker = breaker or CircuitBreaker()
        self.stats = TargetStats()
        self.health_interval = health_interval
        self.healthy: bool | None = None  # None: not checked yet
        self.last_check: float | None = None
        self.last_error: str | None = None
        self.cooldown_until = 0.0
        self._task: asyncio.Task[None] | None = None
        self._users = 0

    @property
    def is_upstream(self) -> bool:
        return isinstance(self.engine, UpstreamEngine)

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        self._users += 1
        if self._users > 1:
            return
        await self.engine.start()
        if self.is_upstream and self.health_interval > 0:
            self._task = asyncio.create_task(self._health_loop(), name=f"health:{self.name}")

    async def close(self) -> None:
        if self._users == 0:
            return
        self._users -= 1
        if self._users:
            return
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.engine.close()

    async def _health_loop(self) -> None:
        while True:
            await self.check_health()
            await asyncio.sleep(self.health_interval)

    async def check_health(self) -> bool:
        """One active check: ``GET {base}/models`` for an upstream; the engine's own state otherwise."""
        self.last_check = time.time()
        if isinstance(self.engine, UpstreamEngine):
            try:
                models = await self.engine.list_models()
                if models and self.engine.config.model is None:
                    # Start-up could not ask (the upstream was down): adopt its model now, as start-up would.
                    self.engine.set_model(models[0])
                    log.info("%s serves %s", self.name, models[0])
            except AttemptFailed as exc:
                # A server without /models (404) is reachable: not a health failure.
                ok = exc.upstream_status == 404
                if not ok:
                    self.last_error = exc.message
            except Exception as exc:  # noqa: BLE001 - a health check never takes the loop down
                ok = False
                self.last_error = f"health check error: {type(exc).__name__}"
            else:
                ok = True
        else:
            ok = self.engine.health().get("status") == "ok"
        if ok and self.healthy is False:
            log.info("target %s is healthy again", self.name)
        elif not ok and self.healthy is not False:
            log.warning("target %s failed its health check: %s", self.name, self.last_error)
        self.healthy = ok
        if ok:
            self.breaker.probe_ok()
        return ok

    # ------------------------------------------------------------------ selection

    def blocked(self, now: float) -> bool:
        return now < self.cooldown_until or not self.breaker.available()

    def unblocked_in(self, now: float) -> float:
        return max(self.cooldown_until - now, self.breaker.retry_in(), 0.0)

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = {
            "name": self.name,
            "status": self.status(now),
            "circuit": self.breaker.state,
            "healthy": self.healthy,
            "outstanding": self.stats.outstanding,
            "requests": self.stats.requests,
            "failures": self.stats.failures,
        }
        if self.cooldown_until > now:
            out["cooling_down_s"] = round(self.cooldown_until - now, 1)
        if self.last_check is not None:
            out["checked_s_ago"] = round(time.time() - self.last_check, 1)
        if self.last_error:
            out["last_error"] = self.last_error
        engine = self.engine.health()
        if isinstance(self.engine, UpstreamEngine):
            out.update({k: engine[k] for k in ("base_url", "model", "dialect")})
            out["kind"] = "upstream"
        else:
            out["kind"] = "embedded"
            out["engine"] = engine
        return out

    def status(self, now: float) -> str:
        if self.breaker.state == "open" and not self.breaker.available():
            return "down"
        if self.healthy is False:
            return "unhealthy"
        if now < self.cooldown_until:
            return "cooling_down"
        return "ok"


@dataclass(frozen=True)
class Member:
    """A target's place in one model group."""

    target: Target
    model: str | None = None  # the name the target knows the model by; None: its default
    weight: float = 1.0
    priority: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 1
    backoff: float = 0.1
    max_backoff: float = 2.0
    max_retry_wait: float = 5.0

    def delay(self, attempt: int) -> float:
        base: float = min(self.max_backoff, self.backoff * (2**attempt))
        return base * (0.5 + random.random() / 2)


class GroupEngine(Engine):
    """Several targets behind one model group, chosen by ``policy``."""

    def __init__(
        self,
        name: str,
        members: list[Member],
        *,
        policy: Policy = "priority",
        retry: RetryPolicy | None = None,
    ) -> None:
        if not members:
            raise ValueError("a model group needs at least one target")
        # "route:" as before: the name reaches error messages and usage records.
        self.name = f"route:{name}"
        self.group = name
        self.members = members
        # Any member may serve a request, so a prompt is scored only where every member can score it.
        self.scores_prompts = all(m.target.engine.scores_prompts for m in members)
        self.policy = policy
        self.retry = retry or RetryPolicy()
        self._rr = 0
        self._started = False

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        for m in self.members:
            await m.target.start()

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        for m in self.members:
            await m.target.close()

    # ------------------------------------------------------------------ selection

    def order(self) -> list[Member]:
        """Every member in the order to try them, per the policy (blocked ones are filtered later)."""
        members = self.members
        if len(members) == 1:
            return list(members)
        if self.policy == "weighted":
            # Weighted random order without replacement (Efraimidis-Spirakis keys).
            return sorted(members, key=lambda m: random.random() ** (1.0 / m.weight), reverse=True)
        if self.policy == "least_outstanding":
            self._rr += 1
            n, rr = len(members), self._rr
            indexed = list(enumerate(members))
            indexed.sort(key=lambda im: (im[1].target.stats.outstanding, (im[0] - rr) % n))
            return [m for _, m in indexed]
        return sorted(members, key=lambda m: m.priority)  # stable: file order breaks ties

    def candidates(self) -> list[Member]:
        now = time.monotonic()
        healthy: list[Member] = []
        unhealthy: list[Member] = []
        for m in self.order():
            if not m.target.blocked(now):
                (unhealthy if m.target.healthy is False else healthy).append(m)
        return healthy + unhealthy

    # ------------------------------------------------------------------ generation

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncGenerator[Delta, None]:
        errors: list[R1ServeError] = []
        rate_limited_wait: float | None = None
        candidates = self.candidates()
        if not candidates:
            raise self._unavailable(errors)
        for index, member in enumerate(candidates):
            target = member.target
            others_left = index < len(candidates) - 1
            attempt = 0
            while True:
                if not target.breaker.acquire():
                    break
                if time.monotonic() < target.cooldown_until:
                    target.breaker.release()
                    break
                stats = target.stats
                stats.requests += 1
                stats.outstanding += 1
                sub = replace(request, model=member.model) if member.model != request.model else request
                stream = target.engine.generate(sub)
                yielded = False
                verdict: bool | None = None  # True success, False failure, None: no verdict
                try:
                    async for delta in stream:
                        yielded = True
                        if delta.finish_reason is not None:
                            # The API stops reading at the final delta and closes this generator
                            # there: the attempt has succeeded already.
                            verdict = True
                        yield delta
                    verdict = True
                    return
                except AttemptFailed as exc:
                    if yielded:  # engines do not do this, but never retry after output
                        verdict = False
                        raise
                    error: AttemptFailed | R1ServeError = exc
                    verdict = False if exc.breaker else None
                except R1ServeError as exc:
                    if yielded:
                        verdict = False if exc.status >= 500 else None
                        raise
                    if exc.status < 500:
                        raise  # the request itself is at fault: no other target will like it better
                    error = exc
                    verdict = False
                finally:
                    stats.outstanding -= 1
                    if verdict is True:
                        target.breaker.success()
                    elif verdict is False:
                        stats.failures += 1
                        target.breaker.failure()
                    else:
                        target.breaker.release()
                    await stream.aclose()
                # Here only for an error before any output: decide retry / failover / give up.
                errors.append(error)
                target.last_error = error.message
                log.warning("target %s failed (attempt %d): %s", target.name, attempt + 1, error.message)
                if isinstance(error, AttemptFailed) and error.kind == "rate_limited":
                    wait = error.retry_after if error.retry_after is not None else 1.0
                    target.cooldown_until = time.monotonic() + wait
                    if others_left:
                        break
                    if wait <= self.retry.max_retry_wait and attempt < self.retry.retries:
                        target.cooldown_until = 0.0
                        await asyncio.sleep(wait)
                        attempt += 1
                        continue
                    rate_limited_wait = wait
                    break
                retryable = isinstance(error, AttemptFailed) and error.retryable
                if not retryable or attempt >= self.retry.retries:
                    break
                if isinstance(error, AttemptFailed) and error.retry_after:
                    delay = min(error.retry_after, self.retry.max_retry_wait)
                else:
                    delay = self.retry.delay(attempt)
                await asyncio.sleep(delay)
                attempt += 1
        if rate_limited_wait is not None and all(
            isinstance(e, AttemptFailed) and e.kind == "rate_limited" for e in errors
        ):
            raise _rate_limited(rate_limited_wait)
        raise self._unavailable(errors)

    def _unavailable(self, errors: list[R1ServeError]) -> R1ServeError:
        if errors:
            last = errors[-1]
            tried = len({e.message for e in errors})
            detail = last.message if tried == 1 else f"{last.message} (and {len(errors) - 1} more failed attempts)"
            return UpstreamError(f"No upstream could answer: {detail}", code="upstream_unavailable")
        now = time.monotonic()
        wait = min(m.target.unblocked_in(now) for m in self.members)
        if all(now < m.target.cooldown_until and m.target.breaker.available() for m in self.members):
            # Every target is waiting out an upstream's Retry-After: the client is being rate limited too.
            return _rate_limited(wait)
        seconds = max(1, round(wait))
        return UpstreamError(
            f"Every upstream for this model is unavailable (circuit open or cooling down); retry in {seconds}s.",
            status=503,
            code="upstream_unavailable",
            headers={"Retry-After": str(seconds)},
        )

    # ------------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        targets = [dict(m.target.health(), priority=m.priority, weight=m.weight) for m in self.members]
        for t, m in zip(targets, self.members, strict=True):
            if m.model:
                t["model"] = m.model
        states = [m.target.status(now) for m in self.members]
        if any(st in ("ok", "cooling_down") for st in states):
            status = "ok"
        elif any(st == "unhealthy" for st in states):
            status = "degraded"  # still tried, but every health check is failing
        else:
            status = "down"
        return {
            "status": status,
            "route": self.group,  # the /health key clients read
            "policy": self.policy,
            "targets": targets,
        }


def _rate_limited(wait: float) -> RateLimited:
    seconds = max(1, round(wait))
    return RateLimited(
        f"Every upstream for this model is rate limiting; retry after {seconds}s.",
        headers={"Retry-After": str(seconds)},
    )
