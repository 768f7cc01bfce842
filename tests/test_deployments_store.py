"""The deployments' table on SQLite and on a real PostgreSQL server (tests/pg.py starts one): migration
0003 then 0004 and 0005 over a row written before 0004, records round-tripped, models and migrations equal, and
0004's downgrade."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from pg import PostgresServer, postgres  # noqa: F401 - the fixture
from sqlalchemy import Engine, text

from r1serve.accounts import db as accounts_db
from r1serve.deployments.store import DeploymentStore
from r1serve.settings import Settings

T0 = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'deployments.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        url = accounts_db.database_url(Settings(database_url=server.create_database()))
    eng = accounts_db.make_engine(url)
    yield eng
    eng.dispose()


def _record(**extra: Any) -> dict[str, Any]:
    return {
        "id": "dep_0123456789abcdef", "name": "r1", "template": "qwen2.5-coder-0.5b-instruct", "engine": "embedded",
        "replicas": 2, "strategy": "SIMPLE", "timeout_minutes": 60.0, "threads": None, "status": "RUNNING",
        "owner_key_id": "open", "events": [{"time": "2026-12-02T12:00:00.000Z", "reason": "CREATED", "message": "x"}],
        "replicas_detail": [], "started_at": T0, "expires_at": T0 + dt.timedelta(hours=1), "created_at": T0,
        "updated_at": T0, **extra,
    }  # fmt: skip


def _insert_0003_row(engine: Engine) -> None:
    # As r1serve at 0003 wrote it: the columns that migration made, nothing more.
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO deployments (id, name, template, engine, replicas, strategy, timeout_minutes, status,"
                " owner_key_id, events, replicas_detail, started_at, expires_at, created_at, updated_at)"
                " VALUES ('dep_old', 'old', 'qwen2.5-coder-0.5b-instruct', 'embedded', 1, 'SIMPLE', 30, 'STOPPED',"
                " NULL, '[]', '[]', NULL, NULL, :t, :t)"
            ),
            {"t": T0},
        )


def test_0003_then_0004_keeps_old_rows_and_round_trips_new_fields(engine: Engine) -> None:
    accounts_db.upgrade(engine, "0003_deployments")
    assert accounts_db.current_revision(engine) == "0003_deployments"
    _insert_0003_row(engine)
    accounts_db.upgrade(engine)
    assert accounts_db.current_revision(engine) == accounts_db.head_revision() == "0005_deployment_scaling"
    store = DeploymentStore(engine)
    (old,) = store.load_all()
    assert (old["name"], old["status"], old["cost_nanos"], old["ledger_nanos"], old["schedule"]) == (
        "old", "STOPPED", 0, 0, None
    )  # fmt: skip
    assert (old["routing"], old["autoscaling"]) == (None, None)  # 0005: the defaults, a fixed replica count
    assert old["created_at"] == T0 and old["created_at"].tzinfo is not None
    nxt = T0 + dt.timedelta(days=1)
    store.save(
        _record(
            strategy="SCHEDULED",
            schedule="0 9 * * mon-fri",
            next_run_at=nxt,
            price_per_hour=1.25,
            cost_nanos=12_345_678_901,
            ledger_nanos=12_000_000_000,
            billed_until=T0,
            routing="cache_aware",
            autoscaling={"min_replicas": 0, "max_replicas": 3},
        )  # fmt: skip
    )
    scaled = {r["name"]: r for r in store.load_all()}["r1"]
    assert (scaled["routing"], scaled["autoscaling"]) == ("cache_aware", {"min_replicas": 0, "max_replicas": 3})
    store.save(_record(status="STOPPED", cost_nanos=12_345_678_999))  # replaced, not added
    by_name = {r["name"]: r for r in store.load_all()}
    new = by_name["r1"]
    assert new["status"] == "STOPPED" and new["cost_nanos"] == 12_345_678_999  # beyond 32 bits
    assert new["events"][0]["reason"] == "CREATED" and new["expires_at"] == T0 + dt.timedelta(hours=1)


def test_models_match_migrations_and_0004_downgrades(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from r1serve.accounts.models import Base

    accounts_db.upgrade(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    _insert_0003_row(engine)
    cfg = accounts_db.alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003_deployments")
    assert accounts_db.current_revision(engine) == "0003_deployments"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM deployments")).scalars().all() == ["old"]
    accounts_db.upgrade(engine)
    assert [r["name"] for r in DeploymentStore(engine).load_all()] == ["old"]
