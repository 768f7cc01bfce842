"""The accounts layer as one object the API (and the CLI) use: keys, limits, prices, ledger.

Request path, all in memory except the limit check for keys that have limits on the database
backend (see limiter.py), and the ledger commit the response waits for::

    principal = accounts.authenticate(token)            # dict lookup + HMAC
    accounts.check_model(principal, asked, served)       # scope
    admission = await accounts.admit(principal, ...)     # reserve the worst case, or 429
    ... generate ...
    settled = accounts.finish(admission, record)         # settle + queue the ledger row
    await settled.committed                              # the row is durable (group commit, ledger.py)
    ... the end of the response goes out ...
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine

from r1serve.engines.base import EngineUsage
from r1serve.errors import PermissionDenied
from r1serve.models.catalog import Prices
from r1serve.settings import Settings

from . import db
from .keys import KeyHasher, load_secret
from .ledger import LedgerWriter, SeriesBy, UsageRecord, spent_since, usage_by_day, usage_series
from .limiter import Admission, Limiter, LocalLimiter, SqlLimiter, period_bounds
from .prices import PriceBook, PriceVersion, cost_nanos
from .store import OPEN, KeyStore, Principal

log = logging.getLogger("r1serve.accounts")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "") or host.startswith("localhost."):
        return host != ""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def estimate_prompt_tokens(texts: Sequence[str], messages: int = 1) -> int:
    """An upper bound on prompt tokens before tokenizing: byte-level BPE never makes more tokens than
    UTF-8 bytes; plus the chat template's few tokens per message. Only used to reserve."""
    return sum(len(t.encode()) for t in texts) + 8 * max(1, messages) + 16


@dataclass
class Settlement:
    """What finishing a request produced (returned so the API can report cost)."""

    cost_nanos: int
    price: PriceVersion
    # Resolved once the ledger row is committed (None off an event loop, or when already settled).
    committed: asyncio.Future[None] | None = None


class Accounts:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        limiter: Limiter,
        store: KeyStore,
        prices: PriceBook,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.limiter = limiter
        self.store = store
        self.prices = prices
        self.ledger = LedgerWriter(
            engine,
            limiter,
            # Rows are committed as they come (group commit); this is now the back-off after a failed write.
            retry_interval=float(getattr(settings, "ledger_flush_interval", 0.5)),
        )
        self._refresh_interval = float(getattr(settings, "keys_refresh_interval", 2.0))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, settings: Settings, *, migrate: bool | None = None, backend: str | None = None) -> Accounts:
        """Connect, migrate (the embedded default migrates itself; others need ``r1serve db upgrade``
        unless ``migrate=True``), check the key secret, load keys. Blocking."""
        url = db.database_url(settings)
        engine = db.make_engine(url)
        if migrate if migrate is not None else db.is_default_database(settings):
            db.upgrade(engine)
        else:
            db.check_schema(engine)
        hasher = KeyHasher(load_secret(settings))
        store = KeyStore(engine, hasher, static_keys=settings.api_keys, admin_key=settings.admin_key)
        store.check_secret()
        choice = backend or getattr(settings, "limits_backend", "auto")
        if choice == "auto":
            choice = "memory" if db.is_sqlite(url) else "database"
        limiter: Limiter
        if choice == "memory":
            limiter = LocalLimiter()
        elif choice == "database":
            limiter = SqlLimiter(engine, reservation_ttl=float(getattr(settings, "reservation_ttl", 3600.0)))
        else:
            raise ValueError(f"unknown limits backend {choice!r} (auto, memory or database)")
        accounts = cls(settings, engine, limiter=limiter, store=store, prices=PriceBook.from_settings(settings))
        accounts.refresh(force=True)
        log.info("accounts: %s, limits in %s", db.safe_url(url), choice)
        return accounts

    def start(self) -> None:
        """Background threads: the ledger writer, key refresh and reservation sweeps."""
        self.ledger.start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._maintain, name="r1serve-accounts", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.ledger.close()
        self.limiter.close()
        self.engine.dispose()

    def _maintain(self) -> None:
        last_sweep = 0.0
        while not self._stop.wait(self._refresh_interval):
            try:
                self.refresh()
                self.ledger.checkpoint()
                if time.monotonic() - last_sweep > 30:
                    last_sweep = time.monotonic()
                    released = self.limiter.sweep()
                    if released:
                        log.warning("released %d expired budget reservations", released)
            except Exception:
                log.exception("accounts maintenance failed")

    def refresh(self, *, force: bool = False) -> None:
        """Reload keys if they changed (blocking); seed the in-memory limiter's spend."""
        changed = self.store.refresh(force=force)
        if (changed or force) and isinstance(self.limiter, LocalLimiter):
            now = time.time()
            budgets = [
                (p.key_id, period_bounds(p.budget_period, now)[0])
                for p in (c.principal for c in self.store._cache.values())
                if p.budget_nanos is not None
            ]
            if budgets:
                self.limiter.preload(spent_since(self.engine, budgets))

    # ------------------------------------------------------------------ auth

    def auth_required(self, host: str | None = None) -> bool:
        """Open only on loopback with no key at all (like Ollama and llama-server)."""
        host = host if host is not None else self.settings.host
        return self.store.auth_configured or not is_loopback(host)

    def authenticate(self, token: str | None, *, host: str | None = None) -> Principal:
        if not self.auth_required(host):
            return OPEN  # no key exists at all, so whatever was sent cannot be checked
        return self.store.authenticate(token)

    def ensure_admin_key(self, host: str | None = None) -> str | None:
        """Listening beyond loopback with no key at all: create an admin key and return it (print it
        once). None when not needed or when ``R1SERVE_ADMIN_KEY`` is set."""
        host = host if host is not None else self.settings.host
        if is_loopback(host) or self.store.auth_configured:
            return None
        key, _ = self.store.create("admin (created at first start)", admin=True)
        return key

    @staticmethod
    def check_model(principal: Principal, requested: str | None, served: str) -> None:
        if not principal.may_use(requested, served):
            raise PermissionDenied(
                f"This API key may not use the model `{requested or served}`.", param="model", code="model_not_allowed"
            )

    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.admin:
            raise PermissionDenied("This endpoint needs an admin API key.", code="admin_required")

    # ------------------------------------------------------------------ limits and the ledger

    def price(self, served: str, catalog: Prices | None = None, *, requested: str | None = None) -> PriceVersion:
        return self.prices.lookup(served, catalog, requested=requested)

    async def admit(self, principal: Principal, *, prompt_tokens: int, max_tokens: int, price: Prices) -> Admission:
        """Reserve the worst case (prompt + max_tokens at ``price``) or raise RateLimited (429)."""
        amount = cost_nanos(EngineUsage(prompt_tokens=prompt_tokens, completion_tokens=max_tokens), price)
        return await self.limiter.admit(principal, prompt_tokens + max_tokens, amount)

    def finish(
        self,
        admission: Admission | None,
        *,
        response_id: str,
        request_id: str | None = None,
        principal: Principal,
        model_served: str,
        usage: EngineUsage,
        price: PriceVersion,
        status: str = "ok",
        model_requested: str | None = None,
        target: str | None = None,
        latency_ms: float | None = None,
        ttft_ms: float | None = None,
    ) -> Settlement:
        """Settle a request and queue its ledger row. Never blocks: the returned settlement's
        ``committed`` resolves once the row is durable. Call exactly once per request (a second call
        for the same admission is ignored, and the ledger ignores a repeated id)."""
        cost = cost_nanos(usage, price.prices)
        if admission is not None:
            if admission.settled:
                return Settlement(cost, price)
            admission.settled = True
            self.limiter.settle_local(admission, usage.prompt_tokens + usage.completion_tokens, cost)
        committed = self.ledger.submit(
            UsageRecord(
                response_id=response_id,
                request_id=request_id,
                key_id=principal.key_id,
                model_served=model_served,
                usage=usage,
                cost_nanos=cost,
                status=status,
                model_requested=model_requested,
                target=target,
                price_version=price.version,
                latency_ms=latency_ms,
                ttft_ms=ttft_ms,
                admission=admission,
            )
        )
        return Settlement(cost, price, committed)

    # ------------------------------------------------------------------ reports (blocking)

    def usage(
        self, *, key_ids: Sequence[str] | None = None, since: dt.date | dt.datetime | None = None, by_key: bool = False
    ) -> list[dict[str, Any]]:
        # Read after the rows already submitted are committed: a response that has ended (a stream
        # cut by its client included) is in the totals, even one whose row was still in the queue.
        self.ledger.sync()
        return usage_by_day(self.engine, key_ids=key_ids, since=since, by_key=by_key)

    def usage_series(
        self, *, by: SeriesBy, key_ids: Sequence[str] | None = None, since: dt.date | dt.datetime | None = None
    ) -> list[dict[str, Any]]:
        """Per day and key or model, for charts (one grouped query; rows queued so far included)."""
        self.ledger.sync()
        return usage_series(self.engine, by=by, key_ids=key_ids, since=since)
