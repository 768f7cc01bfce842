"""Tables of the accounts database. Money is stored as integer nano-dollars (1e-9 USD): exact sums and
exact budget comparisons in SQL, with room for prices down to $0.001 per million tokens."""

from __future__ import annotations

import datetime as dt
from typing import cast

from sqlalchemy import BigInteger, Boolean, Date, DateTime, Float, Index, Integer, String, Table, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NANOS_PER_USD = 1_000_000_000


def usd_to_nanos(usd: float) -> int:
    return round(usd * NANOS_PER_USD)


def nanos_to_usd(nanos: int) -> float:
    return nanos / NANOS_PER_USD


def table(model: type[Base]) -> Table:
    """A mapped class's Table (SQLAlchemy types ``__table__`` as the wider FromClause)."""
    return cast(Table, model.__table__)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # The visible part of the key ("r1-" + prefix + "_" + secret): unique, used to find the row.
    prefix: Mapped[str] = mapped_column(String(16), unique=True, nullable=False)
    # HMAC-SHA256(server secret, whole key), hex. The key itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    # Comma-separated model ids / aliases the key may use; NULL: every model.
    models: Mapped[str | None] = mapped_column(Text)
    is_admin: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    budget_nanos: Mapped[int | None] = mapped_column(BigInteger)
    budget_period: Mapped[str] = mapped_column(String(8), nullable=False, default="total")  # total|day|month
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # Bumped on every change: other processes poll max(version) to refresh their caches.
    version: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class Meta(Base):
    __tablename__ = "accounts_meta"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, nullable=False)


class UsageRow(Base):
    """The ledger: one row per request. ``response_id`` (server-generated, the response's ``id``) is
    unique, so a retried flush never doubles a row; ``request_id`` is the log correlation id, which a
    client may choose (``x-request-id``) and so is not trusted to be unique."""

    __tablename__ = "usage_ledger"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    response_id: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(160))
    key_id: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    model_requested: Mapped[str | None] = mapped_column(String(200))
    model_served: Mapped[str] = mapped_column(String(200), nullable=False)
    target: Mapped[str | None] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    cached_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    cost_nanos: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    price_version: Mapped[str | None] = mapped_column(String(64))
    latency_ms: Mapped[float | None] = mapped_column(Float)
    ttft_ms: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(32), nullable=False)  # ok | cancelled | error | http status

    __table_args__ = (Index("ix_usage_ledger_key_time", "key_id", "created_at"),)


class UsageDaily(Base):
    """Daily roll-up per key and served model, kept in the same transaction as the ledger rows."""

    __tablename__ = "usage_daily"

    day: Mapped[dt.date] = mapped_column(Date, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    cost_nanos: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class RateWindow(Base):
    """Requests and tokens of one key in one fixed minute (shared limits across processes)."""

    __tablename__ = "rate_windows"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix seconds, multiple of 60
    requests: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class BudgetCounter(Base):
    """Spend of one key in one budget period: settled spend and outstanding reservations."""

    __tablename__ = "budget_counters"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    period_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # unix seconds; 0 for "total"
    spent_nanos: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    reserved_nanos: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class Reservation(Base):
    """An admitted request not yet settled; a crashed process's leftovers expire (see limiter.sweep)."""

    __tablename__ = "reservations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(64), nullable=False)
    period_start: Mapped[int] = mapped_column(BigInteger, nullable=False)
    amount_nanos: Mapped[int] = mapped_column(BigInteger, nullable=False)
    expires_at: Mapped[int] = mapped_column(BigInteger, nullable=False)  # unix seconds

    __table_args__ = (Index("ix_reservations_expires", "expires_at"),)
