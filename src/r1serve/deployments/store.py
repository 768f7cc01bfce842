"""Deployments in the accounts database: one row each, its events and replicas as JSON.

JSON columns rather than tables of their own: they are read and written with their deployment, never
queried on their own, and the row stays portable between SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import BigInteger, DateTime, Engine, Float, Integer, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from r1serve.accounts.models import Base


class DeploymentRow(Base):
    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True, nullable=False)
    template: Mapped[str] = mapped_column(String(500), nullable=False)
    engine: Mapped[str] = mapped_column(String(32), nullable=False)
    replicas: Mapped[int] = mapped_column(Integer, nullable=False)
    strategy: Mapped[str] = mapped_column(String(32), nullable=False)
    timeout_minutes: Mapped[float] = mapped_column(Float, nullable=False)
    threads: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32), nullable=False)
    owner_key_id: Mapped[str | None] = mapped_column(String(64))
    events: Mapped[str] = mapped_column(Text, nullable=False, default="[]")
    replicas_detail: Mapped[str] = mapped_column(Text, nullable=False, default="[]")
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # Migration 0004_deployment_lifecycle: schedules and cost.
    schedule: Mapped[str | None] = mapped_column(String(200))
    next_run_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    price_per_hour: Mapped[float | None] = mapped_column(Float)
    cost_nanos: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    # How much of cost_nanos the ledger has rows for.
    ledger_nanos: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")
    billed_until: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Migration 0005_deployment_scaling: the routing policy among replicas (null: the default), and the
    # autoscaling policy as JSON (null: a fixed replica count).
    routing: Mapped[str | None] = mapped_column(String(32))
    autoscaling: Mapped[str | None] = mapped_column(Text)


_FIELDS = (
    "id", "name", "template", "engine", "replicas", "strategy", "timeout_minutes", "threads", "status",
    "owner_key_id", "started_at", "expires_at", "created_at", "updated_at",
    "schedule", "next_run_at", "price_per_hour", "cost_nanos", "ledger_nanos", "billed_until", "routing",
)  # fmt: skip
_DEFAULTS: dict[str, Any] = {"cost_nanos": 0, "ledger_nanos": 0}  # a record from before 0004's fields
_TIMES = ("started_at", "expires_at", "created_at", "updated_at", "next_run_at", "billed_until")


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    # SQLite returns naive datetimes even for timezone=True columns; every time stored here is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


class DeploymentStore:
    """Blocking reads and writes (the supervisor calls them in a worker thread)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def save(self, record: dict[str, Any]) -> None:
        """Insert or replace one deployment (``record`` as :meth:`load_all` returns them)."""
        with Session(self.engine) as session, session.begin():
            row = session.get(DeploymentRow, record["id"])
            if row is None:
                row = DeploymentRow(id=record["id"])
                session.add(row)
            for field in _FIELDS[1:]:
                setattr(row, field, record.get(field, _DEFAULTS.get(field)))
            row.events = json.dumps(record["events"])
            row.replicas_detail = json.dumps(record["replicas_detail"])
            autoscaling = record.get("autoscaling")
            row.autoscaling = None if autoscaling is None else json.dumps(autoscaling)

    def load_all(self) -> list[dict[str, Any]]:
        with Session(self.engine) as session:
            rows = session.scalars(select(DeploymentRow).order_by(DeploymentRow.created_at)).all()
            out = []
            for row in rows:
                record: dict[str, Any] = {f: getattr(row, f) for f in _FIELDS}
                for f in _TIMES:
                    record[f] = _aware(record[f])
                record["events"] = json.loads(row.events)
                record["replicas_detail"] = json.loads(row.replicas_detail)
                record["autoscaling"] = None if row.autoscaling is None else json.loads(row.autoscaling)
                out.append(record)
            return out
