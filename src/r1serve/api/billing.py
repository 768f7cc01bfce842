"""The API's side of accounts: who is calling (managed keys) and metering each generation.

Thin on purpose: every decision (key checks, limits, prices, the ledger) is in r1serve.accounts.

* :class:`AccountsAuth` replaces ``StaticKeys`` as ``app.state.authenticator`` once the accounts
  database is open (see app.py's lifespan); ``R1SERVE_API_KEYS`` keep working through it.
* :class:`Meter` wraps an engine's delta stream: :meth:`Meter.admit` reserves the worst case before
  generation (429 when a limit says no); the wrapper watches the deltas and, however the stream
  ends (finished, failed, or closed early because the client hung up), settles once and queues
  the ledger row. A stream that finishes or fails holds its last delta (or its error) until the
  row is committed, so the end of the response (the finish and ``[DONE]`` events, the whole JSON
  body, the error) reaches the client only once its usage is durable. A cut stream is billed once,
  for the prompt and the text handed to the client: the prompt tokens and the received text are
  counted with the model's own tokenizer when the engine has one (the embedded engine), else
  estimated; its row is committed in the next group commit (nobody is left to wait for it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from r1serve.accounts import Accounts, Principal, estimate_prompt_tokens
from r1serve.accounts.limiter import Admission
from r1serve.accounts.prices import PriceVersion
from r1serve.api.auth import Caller, bearer_token
from r1serve.engines.base import Delta, Engine, EngineUsage, GenerationRequest
from r1serve.errors import AuthenticationError
from r1serve.models.catalog import Prices
from r1serve.routing.registry import ServedModel

log = logging.getLogger("r1serve.api")


@dataclass(frozen=True)
class AccountCaller(Caller):
    principal: Principal | None = None


class AccountsAuth:
    """Managed keys, static keys and the admin key, all checked in memory."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    async def __call__(self, request: Request) -> Caller:
        return self._caller(request, self.accounts.authenticate(bearer_token(request)))

    async def resume(self, request: Request, caller: Caller) -> Caller:
        """A console session's caller, with its key's current scope and limits; revoked or expired: 401."""
        principal = getattr(caller, "principal", None)
        if principal is not None and principal.kind == "managed":
            principal = self.accounts.store.current(principal.key_id)
        if principal is None or (principal.kind == "open" and self.accounts.auth_required()):
            raise AuthenticationError(
                "The API key of this console session was revoked or has expired: sign in again.",
                code="session_expired",
            )
        return self._caller(request, principal)

    @staticmethod
    def _caller(request: Request, principal: Principal) -> Caller:
        request.state.principal = principal
        return AccountCaller(
            key_id=None if principal.kind == "open" else principal.key_id, admin=principal.admin, principal=principal
        )


def accounts_of(request: Request) -> Accounts | None:
    return getattr(request.app.state, "accounts", None)


def principal_of(request: Request) -> Principal | None:
    return getattr(request.state, "principal", None)


def _texts(gen: GenerationRequest) -> tuple[list[str], int]:
    if gen.prompt is not None:
        return [gen.prompt], 1
    texts: list[str] = []
    for m in gen.messages or []:
        content: Any = m.content
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(getattr(p, "text", "") or "" for p in content)
    return texts, len(gen.messages or [])


def open_meter(
    request: Request, served: ServedModel, gen: GenerationRequest, *, model_name: str, response_id: str
) -> Meter | None:
    """The request's :class:`Meter`, or None when there is nothing to meter: no accounts database, or a
    caller the accounts layer did not identify (then ``Meter.active`` would be False, and every one of its
    methods a no-op)."""
    if accounts_of(request) is None or principal_of(request) is None:
        return None
    return Meter(request, served, gen, model_name=model_name, response_id=response_id)


class Meter:
    """One request's accounting. Create, ``await admit()``, then ``wrap()`` the engine's stream."""

    def __init__(
        self, request: Request, served: ServedModel, gen: GenerationRequest, *, model_name: str, response_id: str
    ) -> None:
        self.accounts = accounts_of(request)
        self.principal = principal_of(request)
        self.served = served
        self.gen = gen
        self.model_name = model_name
        self.response_id = response_id
        self.request_id = getattr(request.state, "request_id", None)
        self.price: PriceVersion | None = None
        self.admission: Admission | None = None
        self._started = time.monotonic()
        self._ttft: float | None = None
        self._received: list[str] = []
        self._usage: EngineUsage | None = None
        self._prompt: int | None = None
        self._done = False
        self._counted = False  # in the ledger's count of requests generating
        # The hot path settles through this when the client left before the
        # generation even started (the wrapper never ran, so its finally cannot).
        request.state.meter = self

    @property
    def active(self) -> bool:
        return self.accounts is not None and self.principal is not None

    def prices(self, default: Prices) -> Prices:
        return self.price.prices if self.price is not None else default

    async def admit(self) -> None:
        if not self.active:
            return
        assert self.accounts is not None and self.principal is not None
        entry = self.served.entry
        self.accounts.check_model(self.principal, self.model_name, entry.id)
        self.price = self.accounts.price(entry.id, entry.prices, requested=self.model_name)
        # Exact where the engine can count (the embedded engine renders and tokenizes once, off the event
        # loop, and its generation reuses that); kept for billing a stream that is cut.
        engine = self.served.engine
        if type(engine).count_prompt_tokens is not Engine.count_prompt_tokens:  # the base counts nothing
            self._prompt = await engine.count_prompt_tokens(self.gen)
        if not self.principal.limited:
            return
        prompt = self._prompt_tokens()
        room = max(0, entry.context_length - prompt)
        max_tokens = self.gen.max_tokens if self.gen.max_tokens is not None else self._default_max_tokens()
        self.admission = await self.accounts.admit(
            self.principal,
            prompt_tokens=prompt,
            max_tokens=min(max_tokens, room) or max_tokens,
            price=self.price.prices,
        )

    def _default_max_tokens(self) -> int:
        return self.served.engine.default_max_tokens or self.served.entry.context_length

    def _prompt_tokens(self) -> int:
        """Exact when the engine counted them, else an upper bound from the text."""
        if self._prompt is not None:
            return self._prompt
        texts, n = _texts(self.gen)
        return estimate_prompt_tokens(texts, n)

    def _count(self, text: str) -> int:
        if not text:
            return 0
        counted = self.served.engine.count_tokens(text)
        return counted if counted is not None else max(1, len(text.encode()) // 4)

    async def wrap(self, stream: AsyncGenerator[Delta, None]) -> AsyncGenerator[Delta, None]:
        status = "error"
        ledger = self.accounts.ledger if self.accounts is not None and self.active else None
        if ledger is not None:
            ledger.in_flight += 1  # its row will come: the ledger's group commit waits a moment for it
            self._counted = True
        try:
            async for delta in stream:
                if (delta.reasoning or delta.content) and self._ttft is None:
                    self._ttft = time.monotonic() - self._started
                if delta.reasoning:
                    self._received.append(delta.reasoning)
                if delta.content:
                    self._received.append(delta.content)
                if delta.finish_reason is not None:
                    self._usage = delta.usage or EngineUsage()
                    status = "ok"
                    await self.settle(status)  # durable before the client can read the end
                yield delta
                if status == "ok":
                    return
        except GeneratorExit:
            # Closed by the consumer: after the final delta that is the normal end (the API stops
            # reading at the finish and closes the stream), before it the client went away.
            if status != "ok":
                status = "cancelled"
            raise
        except asyncio.CancelledError:
            status = "cancelled"  # the client hung up (api/disconnect.py) or the server is stopping
            raise
        except BaseException:
            status = "cancelled" if self._received else "error"
            await stream.aclose()
            await self.settle(status)  # the error the client gets comes after its row is durable
            raise
        finally:
            await stream.aclose()
            if status == "error" and self._received:
                status = "cancelled"
            self.finish(status)  # no-op when settled above; else nobody waits for the commit

    async def settle(self, status: str) -> None:
        """Settle and wait until the ledger row is committed. A database that refuses the write does
        not hold the answer back: the row stays queued for retry, and the failure is logged."""
        committed = self.finish(status)
        if committed is None:
            return
        try:
            await committed
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("usage of %s not committed before its response ended: %s", self.response_id, exc)

    def finish(self, status: str) -> asyncio.Future[None] | None:
        """Settle once (later calls are no-ops) and queue the ledger row; returns what resolves when
        the row is committed."""
        if self._done or not self.active:
            return None
        self._done = True
        assert self.accounts is not None
        if self._counted:
            self.accounts.ledger.in_flight -= 1
        assert self.accounts is not None and self.principal is not None
        usage = self._usage
        if usage is None:
            # Cut or failed before the final delta: bill the prompt (if any text came, it was read)
            # and the text the client was handed.
            usage = EngineUsage(
                prompt_tokens=self._prompt_tokens() if self._received else 0,
                completion_tokens=sum(self._count(t) for t in self._received),
                estimated=True,
            )
        try:
            return self.accounts.finish(
                self.admission,
                response_id=self.response_id,
                request_id=self.request_id,
                principal=self.principal,
                model_served=self.served.entry.id,
                model_requested=self.model_name,
                target=self.served.engine_model or self.served.engine.name,
                usage=usage,
                price=self.price or self.accounts.price(self.served.entry.id, self.served.entry.prices),
                status=status,
                latency_ms=(time.monotonic() - self._started) * 1000,
                ttft_ms=None if self._ttft is None else self._ttft * 1000,
            ).committed
        except Exception:
            log.exception("recording usage failed")
            return None
