"""The usage ledger: one row per request, written off the request path by a batched writer.

:meth:`LedgerWriter.submit` only appends to an in-memory queue. A background thread writes what has
accumulated every ``flush_interval`` seconds (or sooner once ``batch_size`` rows wait) in one
transaction: the ledger rows (``INSERT … ON CONFLICT (request_id) DO NOTHING``, so a retried batch
never doubles a row), the daily roll-ups for the rows actually inserted, and the limiter's
settlements for those same rows. A failed flush keeps its batch and retries with back-off;
:meth:`close` flushes everything left (graceful shutdown).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, func, select

from r1serve.engines.base import EngineUsage

from .limiter import Admission, Limiter, _insert
from .models import UsageDaily, UsageRow, nanos_to_usd

log = logging.getLogger("r1serve.accounts")


@dataclass
class UsageRecord:
    request_id: str
    key_id: str
    model_served: str
    usage: EngineUsage = field(default_factory=EngineUsage)
    cost_nanos: int = 0
    status: str = "ok"
    model_requested: str | None = None
    target: str | None = None
    price_version: str | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    admission: Admission | None = None

    def row(self) -> dict[str, Any]:
        u = self.usage
        return {
            "request_id": self.request_id,
            "key_id": self.key_id,
            "created_at": self.created_at,
            "model_requested": self.model_requested,
            "model_served": self.model_served,
            "target": self.target,
            "prompt_tokens": u.prompt_tokens,
            "cached_tokens": u.cached_tokens,
            "completion_tokens": u.completion_tokens,
            "reasoning_tokens": u.reasoning_tokens,
            "cost_nanos": self.cost_nanos,
            "price_version": self.price_version,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "status": self.status,
        }


class LedgerWriter:
    def __init__(
        self,
        engine: Engine,
        limiter: Limiter,
        *,
        flush_interval: float = 0.5,
        batch_size: int = 500,
        max_pending: int = 1_000_000,
    ) -> None:
        self._engine = engine
        self._limiter = limiter
        self._insert = _insert(engine.dialect.name)
        self._interval = flush_interval
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._queue: deque[UsageRecord] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.failures = 0

    # ------------------------------------------------------------------ producer side (request path)

    def submit(self, record: UsageRecord) -> None:
        if len(self._queue) >= self._max_pending:
            dropped = self._queue.popleft()
            log.error("usage ledger backlog full: dropped the row of request %s", dropped.request_id)
        self._queue.append(record)
        if len(self._queue) >= self._batch_size:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ writer thread

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="r1serve-ledger", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        backoff = self._interval
        while not self._stop.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            try:
                self.flush()
                backoff = self._interval
            except Exception:
                self.failures += 1
                log.exception("writing the usage ledger failed; %d rows kept for retry", self.pending)
                backoff = min(30.0, backoff * 2)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread and write everything still queued."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        deadline = time.monotonic() + timeout
        while self._queue:
            try:
                self.flush()
            except Exception:
                if time.monotonic() > deadline:
                    log.exception("usage ledger: %d rows could not be written at shutdown", self.pending)
                    return
                time.sleep(0.5)

    def flush(self) -> int:
        """Write everything queued now (blocking). Returns the number of new ledger rows."""
        total = 0
        with self._flush_lock:
            while self._queue:
                batch = [self._queue[i] for i in range(min(self._batch_size, len(self._queue)))]
                total += self._write(batch)
                for _ in batch:  # only after the commit: a failed batch stays queued
                    self._queue.popleft()
        return total

    def _write(self, batch: Sequence[UsageRecord]) -> int:
        ledger, daily = UsageRow.__table__, UsageDaily.__table__
        with self._engine.begin() as conn:
            stmt = self._insert(ledger).on_conflict_do_nothing(index_elements=[ledger.c.request_id])
            inserted: set[str] = set()
            # One statement per row keeps RETURNING portable (SQLite cannot RETURN from executemany).
            for rec in batch:
                if conn.execute(stmt.values(**rec.row()).returning(ledger.c.request_id)).first() is not None:
                    inserted.add(rec.request_id)
            new = [r for r in batch if r.request_id in inserted]
            roll: dict[tuple[dt.date, str, str], list[int]] = {}
            for r in new:
                k = (r.created_at.astimezone(dt.UTC).date(), r.key_id, r.model_served)
                acc = roll.setdefault(k, [0, 0, 0, 0, 0, 0])
                u = r.usage
                for i, v in enumerate(
                    (1, u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.reasoning_tokens, r.cost_nanos)
                ):
                    acc[i] += v
            cols = ("requests", "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cost_nanos")
            for (day, key_id, model), acc in sorted(roll.items()):
                values = dict(zip(cols, acc, strict=True))
                conn.execute(
                    self._insert(daily)
                    .values(day=day, key_id=key_id, model=model, **values)
                    .on_conflict_do_update(
                        index_elements=[daily.c.day, daily.c.key_id, daily.c.model],
                        set_={c: daily.c[c] + v for c, v in values.items()},
                    )
                )
            settle = [
                (r.admission, r.usage.prompt_tokens + r.usage.completion_tokens, r.cost_nanos)
                for r in new
                if r.admission is not None
            ]
            if settle:
                self._limiter.settle_in(conn, settle)
        self.written += len(new)
        return len(new)


# --------------------------------------------------------------------------- reading


def _since_date(since: dt.datetime | dt.date | None) -> dt.date | None:
    if since is None:
        return None
    return since.date() if isinstance(since, dt.datetime) else since


def usage_by_day(
    engine: Engine,
    *,
    key_ids: Sequence[str] | None = None,
    since: dt.datetime | dt.date | None = None,
    by_key: bool = False,
) -> list[dict[str, Any]]:
    """Totals per day and model (and key, for admins) from the daily roll-ups."""
    d = UsageDaily.__table__
    group = [d.c.day, d.c.model] + ([d.c.key_id] if by_key else [])
    stmt = select(
        *group,
        func.sum(d.c.requests).label("requests"),
        func.sum(d.c.prompt_tokens).label("prompt_tokens"),
        func.sum(d.c.cached_tokens).label("cached_tokens"),
        func.sum(d.c.completion_tokens).label("completion_tokens"),
        func.sum(d.c.reasoning_tokens).label("reasoning_tokens"),
        func.sum(d.c.cost_nanos).label("cost_nanos"),
    ).group_by(*group).order_by(*group)
    if key_ids is not None:
        stmt = stmt.where(d.c.key_id.in_(list(key_ids)))
    since_day = _since_date(since)
    if since_day is not None:
        stmt = stmt.where(d.c.day >= since_day)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    out = []
    for r in rows:
        item: dict[str, Any] = {
            "date": r.day.isoformat() if hasattr(r.day, "isoformat") else str(r.day),
            "model": r.model,
            "requests": int(r.requests),
            "prompt_tokens": int(r.prompt_tokens),
            "cached_tokens": int(r.cached_tokens),
            "completion_tokens": int(r.completion_tokens),
            "reasoning_tokens": int(r.reasoning_tokens),
            "cost_usd": nanos_to_usd(int(r.cost_nanos)),
        }
        if by_key:
            item["key_id"] = r.key_id
        out.append(item)
    return out


def spent_since(engine: Engine, budgets: Sequence[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Settled spend per (key, period start) from the roll-ups: seeds the in-memory limiter."""
    d = UsageDaily.__table__
    out: dict[tuple[str, int], int] = {}
    with engine.connect() as conn:
        for key_id, start in budgets:
            day = dt.datetime.fromtimestamp(start, dt.UTC).date()
            total = conn.execute(
                select(func.coalesce(func.sum(d.c.cost_nanos), 0)).where(d.c.key_id == key_id, d.c.day >= day)
            ).scalar()
            out[(key_id, start)] = int(total or 0)
    return out


def ledger_rows(engine: Engine, *, key_id: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
    t = UsageRow.__table__
    stmt = select(t).order_by(t.c.id.desc()).limit(limit)
    if key_id is not None:
        stmt = stmt.where(t.c.key_id == key_id)
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]
