"""Per-key limits: requests per minute, tokens per minute, and a spend budget per period.

Admission reserves the worst case: one request, ``prompt + max_tokens`` tokens, and that many tokens
at the model's price. Settlement (after the response, including a stream the client cut) replaces
the reservation with what was actually used. Concurrent requests therefore cannot overspend: a
request is admitted only if everything already admitted could use its whole allowance too.

Two backends with the same behaviour:

* :class:`LocalLimiter` keeps the counters in memory: admission costs no I/O at all. Right for one
  process (the default SQLite set-up). Budget spend is seeded from the daily roll-ups at start.
* :class:`SqlLimiter` keeps them in the database, so several r1serve processes sharing one PostgreSQL
  share every limit. Admission is one short transaction, run in a thread pool: an upsert on the
  key's minute window guarded by ``requests + 1 <= rpm AND tokens + n <= tpm``, an upsert on the
  key's budget row guarded by ``spent + reserved + amount <= budget`` (both ``RETURNING``, so the
  check and the increment are one atomic statement under the row lock), and a reservation row.
  That is a database round trip per admission, but only for keys that have limits: unlimited keys,
  static keys and open servers never touch the database. Settlement is not on the request path: the
  batched ledger writer applies it in the same transaction that writes the ledger row, so spend and
  ledger always agree and a retried flush cannot settle twice. Reservations of a process that died
  expire after ``reservation_ttl`` and are released by :meth:`SqlLimiter.sweep`.

Rate windows are fixed calendar minutes (a burst can straddle a boundary); refusals carry the
seconds until the window or period ends in ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from r1serve.errors import RateLimited

from .models import BudgetCounter, RateWindow, Reservation, nanos_to_usd, table
from .store import Principal

WINDOW = 60


def window_start(now: float) -> int:
    return int(now) // WINDOW * WINDOW


def period_bounds(period: str, now: float) -> tuple[int, int | None]:
    """Start and end (unix seconds, UTC) of the budget period containing ``now``; "total" never ends."""
    if period == "total":
        return 0, None
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + dt.timedelta(days=1)
    elif period == "month":
        start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown budget period {period!r}")
    return int(start.timestamp()), int(end.timestamp())


@dataclass
class Admission:
    """An admitted request: what was reserved, so settlement can undo exactly that."""

    principal: Principal
    tokens: int = 0  # reserved against tpm
    amount_nanos: int = 0  # reserved against the budget
    window_start: int = 0
    period_start: int = 0
    reservation_id: str | None = None
    settled: bool = field(default=False, repr=False)

    @property
    def key_id(self) -> str:
        return self.principal.key_id


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def rpm_refusal(p: Principal, now: float) -> RateLimited:
    return RateLimited(
        f"Rate limit reached for requests per minute: limit {p.rpm}. Try again in a moment.",
        headers=_retry_after(window_start(now) + WINDOW - now),
    )


def tpm_refusal(p: Principal, tokens: int, now: float) -> RateLimited:
    if p.tpm is not None and tokens > p.tpm:
        return RateLimited(
            f"Request too large for tokens per minute: limit {p.tpm}, this request may use {tokens} "
            "(prompt + max_tokens). Lower max_tokens or the prompt.",
            code="tokens_per_minute_exceeded",
            headers=_retry_after(WINDOW),
        )
    return RateLimited(
        f"Rate limit reached for tokens per minute: limit {p.tpm}, this request may use {tokens} tokens.",
        code="tokens_per_minute_exceeded",
        headers=_retry_after(window_start(now) + WINDOW - now),
    )


def budget_refusal(p: Principal, spent: int, reserved: int, amount: int, now: float) -> RateLimited:
    assert p.budget_nanos is not None
    budget = p.budget_nanos
    if spent + amount <= budget:
        # It fits once requests in flight settle: a short wait, not an exhausted quota.
        return RateLimited(
            f"Budget in use by requests in flight: ${nanos_to_usd(budget - spent):.6f} left of "
            f"${nanos_to_usd(budget):.6f}, this request may cost ${nanos_to_usd(amount):.6f}.",
            code="rate_limit_exceeded",
            headers=_retry_after(1),
        )
    _, end = period_bounds(p.budget_period, now)
    wait = (end - now) if end is not None else 86400
    return RateLimited(
        f"You exceeded your budget: ${nanos_to_usd(spent):.6f} spent of ${nanos_to_usd(budget):.6f} "
        f"({p.budget_period}); this request may cost up to ${nanos_to_usd(amount):.6f} "
        "(prompt + max_tokens at the model's price).",
        code="insufficient_quota",
        headers=_retry_after(wait),
    )


class Limiter:
    """Interface shared by both backends."""

    async def admit(self, principal: Principal, tokens: int, amount_nanos: int) -> Admission:
        raise NotImplementedError

    def settle_local(self, admission: Admission, tokens: int, cost_nanos: int) -> None:
        """Settlement that needs no database (the in-memory backend)."""

    def settle_in(self, conn: Connection, admissions: list[tuple[Admission, int, int]]) -> None:
        """Settlement inside the ledger writer's transaction (the database backend)."""

    def sweep(self) -> int:
        return 0

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- in memory


class LocalLimiter(Limiter):
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, list[int]] = {}  # key -> [window_start, requests, tokens]
        self._budgets: dict[tuple[str, int], list[int]] = {}  # (key, period_start) -> [spent, reserved]

    def preload(self, spent: dict[tuple[str, int], int]) -> None:
        """Seed settled spend (from the ledger roll-ups) for periods not counted in memory yet."""
        with self._lock:
            for k, v in spent.items():
                self._budgets.setdefault(k, [v, 0])

    async def admit(self, principal: Principal, tokens: int, amount_nanos: int) -> Admission:
        return self.admit_now(principal, tokens, amount_nanos)

    def admit_now(self, p: Principal, tokens: int, amount_nanos: int) -> Admission:
        now = self._clock()
        ws = window_start(now)
        ps, _ = period_bounds(p.budget_period, now)
        adm = Admission(principal=p, window_start=ws, period_start=ps)
        if not p.limited:
            return adm
        with self._lock:
            w = self._windows.get(p.key_id)
            if w is None or w[0] != ws:
                w = [ws, 0, 0]
            if p.rpm is not None and w[1] + 1 > p.rpm:
                raise rpm_refusal(p, now)
            if p.tpm is not None and w[2] + tokens > p.tpm:
                raise tpm_refusal(p, tokens, now)
            if p.budget_nanos is not None:
                b = self._budgets.setdefault((p.key_id, ps), [0, 0])
                if b[0] + b[1] + amount_nanos > p.budget_nanos:
                    raise budget_refusal(p, b[0], b[1], amount_nanos, now)
                b[1] += amount_nanos
                adm.amount_nanos = amount_nanos
            w[1] += 1
            if p.tpm is not None:
                w[2] += tokens
                adm.tokens = tokens
            self._windows[p.key_id] = w
        return adm

    def settle_local(self, admission: Admission, tokens: int, cost_nanos: int) -> None:
        p = admission.principal
        with self._lock:
            w = self._windows.get(p.key_id)
            if admission.tokens and w is not None and w[0] == admission.window_start:
                w[2] = max(0, w[2] - admission.tokens + tokens)
            if p.budget_nanos is not None or admission.amount_nanos:
                b = self._budgets.setdefault((p.key_id, admission.period_start), [0, 0])
                b[1] = max(0, b[1] - admission.amount_nanos)
                b[0] += cost_nanos


# --------------------------------------------------------------------------- in the database


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


class SqlLimiter(Limiter):
    def __init__(
        self,
        engine: Engine,
        *,
        reservation_ttl: float = 3600.0,
        workers: int = 8,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._insert = _insert(engine.dialect.name)
        self._ttl = reservation_ttl
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r1serve-limits")

    async def admit(self, principal: Principal, tokens: int, amount_nanos: int) -> Admission:
        if not principal.limited:
            now = self._clock()
            return Admission(
                principal=principal,
                window_start=window_start(now),
                period_start=period_bounds(principal.budget_period, now)[0],
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.admit_now, principal, tokens, amount_nanos)

    def admit_now(self, p: Principal, tokens: int, amount_nanos: int) -> Admission:
        now = self._clock()
        ws = window_start(now)
        ps, _ = period_bounds(p.budget_period, now)
        adm = Admission(principal=p, window_start=ws, period_start=ps)
        if not p.limited:
            return adm
        # Refusals decidable without the database (a request bigger than the whole allowance).
        if p.rpm is not None and p.rpm < 1:
            raise rpm_refusal(p, now)
        if p.tpm is not None and tokens > p.tpm:
            raise tpm_refusal(p, tokens, now)
        if p.budget_nanos is not None and amount_nanos > p.budget_nanos:
            raise budget_refusal(p, 0, 0, amount_nanos, now)
        with self._engine.begin() as conn:  # an exception rolls everything back
            if p.rpm is not None or p.tpm is not None:
                t = table(RateWindow)
                counted = tokens if p.tpm is not None else 0
                stmt = self._insert(t).values(key_id=p.key_id, window_start=ws, requests=1, tokens=counted)
                guard = []
                if p.rpm is not None:
                    guard.append(t.c.requests + 1 <= p.rpm)
                if p.tpm is not None:
                    guard.append(t.c.tokens + counted <= p.tpm)
                stmt = stmt.on_conflict_do_update(
                    index_elements=[t.c.key_id, t.c.window_start],
                    set_={"requests": t.c.requests + 1, "tokens": t.c.tokens + counted},
                    where=guard[0] if len(guard) == 1 else (guard[0] & guard[1]),
                ).returning(t.c.requests)
                if conn.execute(stmt).first() is None:
                    row = conn.execute(
                        select(t.c.requests, t.c.tokens).where(t.c.key_id == p.key_id, t.c.window_start == ws)
                    ).one()
                    if p.rpm is not None and row.requests + 1 > p.rpm:
                        raise rpm_refusal(p, now)
                    raise tpm_refusal(p, tokens, now)
                adm.tokens = counted
            if p.budget_nanos is not None:
                b = table(BudgetCounter)
                stmt = (
                    self._insert(b)
                    .values(key_id=p.key_id, period_start=ps, spent_nanos=0, reserved_nanos=amount_nanos)
                    .on_conflict_do_update(
                        index_elements=[b.c.key_id, b.c.period_start],
                        set_={"reserved_nanos": b.c.reserved_nanos + amount_nanos},
                        where=b.c.spent_nanos + b.c.reserved_nanos + amount_nanos <= p.budget_nanos,
                    )
                    .returning(b.c.spent_nanos)
                )
                if conn.execute(stmt).first() is None:
                    row = conn.execute(
                        select(b.c.spent_nanos, b.c.reserved_nanos).where(
                            b.c.key_id == p.key_id, b.c.period_start == ps
                        )
                    ).one()
                    raise budget_refusal(p, row.spent_nanos, row.reserved_nanos, amount_nanos, now)
                adm.amount_nanos = amount_nanos
                adm.reservation_id = uuid.uuid4().hex
                conn.execute(
                    table(Reservation)
                    .insert()
                    .values(
                        id=adm.reservation_id,
                        key_id=p.key_id,
                        period_start=ps,
                        amount_nanos=amount_nanos,
                        expires_at=int(now + self._ttl),
                    )
                )
        return adm

    def settle_in(self, conn: Connection, admissions: list[tuple[Admission, int, int]]) -> None:
        """Apply settlements in the caller's transaction; rate rows first, then budgets, each in key
        order, the same lock order as admission, so concurrent flushes and admissions never deadlock."""
        t, b, r = table(RateWindow), table(BudgetCounter), table(Reservation)
        for adm, tokens, _cost in sorted(
            (a for a in admissions if a[0].tokens), key=lambda a: (a[0].key_id, a[0].window_start)
        ):
            conn.execute(
                update(t)
                .where(t.c.key_id == adm.key_id, t.c.window_start == adm.window_start)
                .values(tokens=t.c.tokens - adm.tokens + tokens)
            )
        budgeted = [a for a in admissions if a[0].reservation_id is not None or a[0].principal.budget_nanos is not None]
        for adm, _tokens, cost in sorted(budgeted, key=lambda a: (a[0].key_id, a[0].period_start)):
            released = 0
            if adm.reservation_id is not None:
                row = conn.execute(delete(r).where(r.c.id == adm.reservation_id).returning(r.c.amount_nanos)).first()
                released = row.amount_nanos if row is not None else 0  # else: already expired and swept
            stmt = (
                self._insert(b)
                .values(key_id=adm.key_id, period_start=adm.period_start, spent_nanos=cost, reserved_nanos=0)
                .on_conflict_do_update(
                    index_elements=[b.c.key_id, b.c.period_start],
                    set_={
                        "spent_nanos": b.c.spent_nanos + cost,
                        "reserved_nanos": b.c.reserved_nanos - released,
                    },
                )
            )
            conn.execute(stmt)

    def sweep(self) -> int:
        """Release reservations past their expiry (a process died mid-request) and drop old windows."""
        now = self._clock()
        r, b, t = table(Reservation), table(BudgetCounter), table(RateWindow)
        with self._engine.begin() as conn:  # its own transaction: lock order stays rate, then budget
            conn.execute(delete(t).where(t.c.window_start < window_start(now) - 5 * WINDOW))
        with self._engine.begin() as conn:
            expired = conn.execute(
                delete(r).where(r.c.expires_at < int(now)).returning(r.c.key_id, r.c.period_start, r.c.amount_nanos)
            ).all()
            for row in sorted(expired, key=lambda x: (x.key_id, x.period_start)):
                conn.execute(
                    update(b)
                    .where(b.c.key_id == row.key_id, b.c.period_start == row.period_start)
                    .values(reserved_nanos=b.c.reserved_nanos - row.amount_nanos)
                )
        return len(expired)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
