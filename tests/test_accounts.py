"""The accounts layer on its own (no HTTP, no model): keys, limits, ledger, prices, on SQLite and on a
real PostgreSQL server (tests/pg.py starts one on loopback)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pg import PostgresServer, postgres  # noqa: F401 - the fixture
from sqlalchemy import func, select, text

from r1serve.accounts import Accounts, PriceBook, Principal, cost_nanos, estimate_prompt_tokens, is_loopback
from r1serve.accounts import db as accounts_db
from r1serve.accounts.keys import KeyHasher, generate_key, key_prefix
from r1serve.accounts.ledger import LedgerUnavailable
from r1serve.accounts.limiter import SqlLimiter
from r1serve.accounts.models import BudgetCounter, Reservation, UsageDaily, UsageRow
from r1serve.engines.base import EngineUsage
from r1serve.errors import AuthenticationError, PermissionDenied, RateLimited
from r1serve.models.catalog import Prices
from r1serve.settings import Settings

# $1 per token in and out: costs are whole dollars, easy to reason about.
DOLLAR = Prices(input=1_000_000.0, output=1_000_000.0)

BACKENDS = [("sqlite", "memory"), ("sqlite", "database"), ("postgresql", "database")]


def make_settings(tmp_path: Path, url: str | None, **extra: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "database_url": url,
        "key_secret": "test-secret-0123456789abcdef",
        "ledger_flush_interval": 0.05,
        "keys_refresh_interval": 0.1,
    }
    return Settings(**{**values, **extra})  # type: ignore[arg-type]


@pytest.fixture(params=BACKENDS, ids=["-".join(b) for b in BACKENDS])
def backend(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def db_url(backend: tuple[str, str], request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None: the embedded default (a SQLite file in data_dir); else a fresh PostgreSQL database."""
    if backend[0] == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres")
    url = server.create_database()
    # Not the embedded default: migrated explicitly, as `r1serve db upgrade` does.
    engine = accounts_db.make_engine(accounts_db.database_url(Settings(database_url=url)))
    accounts_db.upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture
def accounts(backend: tuple[str, str], db_url: str | None, tmp_path: Path) -> Iterator[Accounts]:
    acc = Accounts.open(make_settings(tmp_path, db_url), backend=backend[1])
    acc.start()
    try:
        yield acc
    finally:
        acc.close()


def db_text(acc: Accounts, request: pytest.FixtureRequest) -> str:
    """Everything the database holds, as text: the SQLite files' bytes, or a pg_dump."""
    if acc.engine.dialect.name == "sqlite":
        path = Path(acc.engine.url.database or "")
        return "".join(p.read_bytes().decode("latin-1") for p in path.parent.glob(path.name + "*") if p.is_file())
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.dump(acc.engine.url.render_as_string(hide_password=False))


# ----------------------------------------------------------------------------- database and migrations


def test_default_database_is_sqlite_in_data_dir_wal(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, None)
    url = accounts_db.database_url(settings)
    assert url == f"sqlite:///{tmp_path / 'data' / 'accounts.db'}"
    acc = Accounts.open(settings)  # the embedded default migrates itself
    try:
        with acc.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert accounts_db.current_revision(acc.engine) == accounts_db.head_revision()
    finally:
        acc.close()


def test_postgres_url_uses_psycopg() -> None:
    assert accounts_db.database_url(Settings(database_url="postgres://u:p@h/db")) == "postgresql+psycopg://u:p@h/db"
    assert "p@" not in accounts_db.safe_url("postgresql+psycopg://u:p@h/db")


def test_postgres_needs_explicit_upgrade(postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    url = postgres.create_database()
    settings = make_settings(tmp_path, url)
    with pytest.raises(accounts_db.SchemaOutdated, match="r1serve db upgrade"):
        Accounts.open(settings)
    engine = accounts_db.make_engine(accounts_db.database_url(settings))
    accounts_db.upgrade(engine)
    accounts_db.upgrade(engine)  # idempotent
    assert accounts_db.current_revision(engine) == accounts_db.head_revision()
    engine.dispose()
    Accounts.open(settings).close()


def test_migrations_match_models(tmp_path: Path) -> None:
    """The hand-written migrations create exactly what the models describe (the deployments' table,
    defined above accounts in r1serve.deployments, shares the database and its Base)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import r1serve.deployments.store  # noqa: F401 - registers its table on Base.metadata
    from r1serve.accounts.models import Base

    engine = accounts_db.make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    accounts_db.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


# ----------------------------------------------------------------------------- keys


def test_key_format() -> None:
    new = generate_key()
    assert new.key.startswith("r1-" + new.prefix + "_") and len(new.prefix) == 8
    assert key_prefix(new.key) == new.prefix
    assert key_prefix("sk-something") is None and key_prefix("r1-short") is None
    h = KeyHasher(b"x" * 32)
    assert h.matches(new.key, h.hash(new.key)) and not h.matches(new.key + "x", h.hash(new.key))


def test_create_authenticate_revoke(
    accounts: Accounts, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key, info = accounts.store.create("alice", models=["qwen2.5-coder-0.5b-instruct"], rpm=5, budget_usd=2.5)
    assert info.prefix == key_prefix(key) and info.budget_usd == 2.5 and info.active
    p = accounts.authenticate(key)
    assert p.key_id == info.id and p.name == "alice" and p.rpm == 5 and not p.admin
    assert p.may_use("qwen2.5-coder-0.5b-instruct") and not p.may_use("deepseek-r1-distill-qwen-7b")
    accounts.check_model(p, "deepseek-reasoner", "qwen2.5-coder-0.5b-instruct")  # served model in scope
    with pytest.raises(PermissionDenied):
        accounts.check_model(p, "other", "other-model")

    errors = []
    for bad in (key[:-1] + ("A" if key[-1] != "A" else "B"), "r1-" + "a" * 8 + "_nope", "sk-junk", None):
        with pytest.raises(AuthenticationError) as e:
            accounts.authenticate(bad)
        errors.append(e.value.message)
    assert accounts.store.revoke(info.display) is not None
    with pytest.raises(AuthenticationError, match="revoked") as e:
        accounts.authenticate(key)
    errors.append(e.value.message)
    assert [k.active for k in accounts.store.list()] == [False]

    secret_part = key.split("_", 1)[1]
    assert all(secret_part not in m for m in errors)
    assert secret_part not in caplog.text and key not in caplog.text
    dumped = db_text(accounts, request)
    assert info.prefix in dumped  # the dump is real: the visible prefix is there ...
    assert key not in dumped and secret_part not in dumped  # ... the key is not


def test_expired_key(accounts: Accounts) -> None:
    key, _ = accounts.store.create("old", expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60))
    accounts.authenticate(key)
    with pytest.raises(AuthenticationError, match="expired"):
        accounts.store.authenticate(key, now=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=61))


def test_static_and_admin_keys(tmp_path: Path) -> None:
    acc = Accounts.open(make_settings(tmp_path, None, api_keys="sk-one,sk-two", admin_key="sk-admin-xyz"))
    try:
        assert acc.authenticate("sk-two").key_id == "static-1"
        assert not acc.authenticate("sk-one").admin
        assert acc.authenticate("sk-admin-xyz").admin
        with pytest.raises(AuthenticationError) as e:
            acc.authenticate("sk-three")
        assert "sk-three" not in e.value.message
        assert acc.auth_required("127.0.0.1")
    finally:
        acc.close()


def test_open_on_loopback_until_a_key_exists(tmp_path: Path) -> None:
    acc = Accounts.open(make_settings(tmp_path, None))
    try:
        assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
        assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
        assert not acc.auth_required("127.0.0.1") and acc.auth_required("0.0.0.0")
        assert acc.authenticate(None, host="127.0.0.1").kind == "open"
        with pytest.raises(AuthenticationError):
            acc.authenticate(None, host="0.0.0.0")
        assert acc.ensure_admin_key("127.0.0.1") is None
        admin = acc.ensure_admin_key("0.0.0.0")
        assert admin is not None and acc.authenticate(admin, host="0.0.0.0").admin
        assert acc.ensure_admin_key("0.0.0.0") is None  # only once
        assert acc.auth_required("127.0.0.1")  # a key exists now: loopback needs it too
    finally:
        acc.close()


def test_other_secret_is_refused(tmp_path: Path) -> None:
    Accounts.open(make_settings(tmp_path, None)).close()
    settings = make_settings(tmp_path, None).model_copy(update={"key_secret": "another-secret-0123456789"})
    with pytest.raises(RuntimeError, match="R1SERVE_KEY_SECRET"):
        Accounts.open(settings)


def test_secret_file_created_once(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d")
    from r1serve.accounts.keys import load_secret

    first = load_secret(settings)
    assert load_secret(settings) == first and len(first) == 64
    assert ((tmp_path / "d" / "key-secret").stat().st_mode & 0o777) == 0o600


# ----------------------------------------------------------------------------- prices


def test_price_versions_and_cost() -> None:
    book = PriceBook(
        {
            "r1-7b": [
                {"since": "2026-01-01", "input": 0.5, "output": 2.0},
                {"since": "2026-06-01", "input": 0.25, "cached_input": 0.05, "output": 1.0},
            ],
            "deepseek-reasoner": {"input": 0.55, "output": 2.19},
        }
    )
    jan = book.lookup("r1-7b", when=dt.datetime(2026, 2, 1, tzinfo=dt.UTC))
    jul = book.lookup("R1-7B", when=dt.datetime(2026, 7, 1, tzinfo=dt.UTC))
    assert (jan.prices.input, jan.version) == (0.5, "2026-01-01")
    assert (jul.prices.cached_input, jul.version) == (0.05, "2026-06-01")
    before = book.lookup("r1-7b", Prices(input=9.0), when=dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    assert before.version == "catalog" and before.prices.input == 9.0
    assert book.lookup("served-id", requested="deepseek-reasoner").prices.output == 2.19
    # 1000 prompt (200 cached) + 500 completion (incl. reasoning) at the July price:
    usage = EngineUsage(prompt_tokens=1000, cached_tokens=200, completion_tokens=500, reasoning_tokens=300)
    assert cost_nanos(usage, jul.prices) == round((800 * 0.25 + 200 * 0.05 + 500 * 1.0) * 1000)
    with pytest.raises(ValueError):
        PriceBook({"m": {"input": -1}})


def test_prices_from_settings(tmp_path: Path) -> None:
    f = tmp_path / "prices.toml"
    f.write_text("[m1]\ninput = 1.0\noutput = 2.0\n")
    book = PriceBook.from_settings(Settings(prices_file=f, prices='{"m2": {"output": 3}}'))
    assert book.lookup("m1").prices.output == 2.0 and book.lookup("m2").prices.output == 3.0


def test_prompt_estimate_is_an_upper_bound() -> None:
    assert estimate_prompt_tokens(["héllo"], 1) >= 6


# ----------------------------------------------------------------------------- limits


async def _admit_many(acc: Accounts, p: Principal, n: int, prompt: int, max_tokens: int) -> list[object]:
    return await asyncio.gather(
        *(acc.admit(p, prompt_tokens=prompt, max_tokens=max_tokens, price=DOLLAR) for _ in range(n)),
        return_exceptions=True,
    )


async def test_budget_50_parallel_admits_exactly_10(accounts: Accounts) -> None:
    # Worst case per request: 3 prompt + 2 max tokens = $5; budget $50 admits 10.
    key, _ = accounts.store.create("tight", budget_usd=50)
    p = accounts.authenticate(key)
    results = await _admit_many(accounts, p, 50, 3, 2)
    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, RateLimited)]
    assert len(admitted) == 10 and len(refused) == 40
    assert all(r.status == 429 and int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert {r.code for r in refused} == {"rate_limit_exceeded"}  # would fit once in-flight ones settle


async def test_settlement_frees_what_was_not_used(accounts: Accounts) -> None:
    key, info = accounts.store.create("settle", budget_usd=10)
    p = accounts.authenticate(key)
    adm = await accounts.admit(p, prompt_tokens=3, max_tokens=2, price=DOLLAR)  # reserves $5
    price = accounts.price("m", DOLLAR)
    # Cut early: 3 prompt + 1 completion token received -> $4.
    s = accounts.finish(
        adm, response_id="r-1", principal=p, model_served="m", usage=EngineUsage(3, 1), price=price, status="cancelled"
    )
    assert s.cost_nanos == 4_000_000_000
    accounts.finish(
        adm, response_id="r-1", principal=p, model_served="m", usage=EngineUsage(3, 1), price=price
    )  # ignored
    accounts.ledger.flush()
    # $6 left: one more $5 request fits, then a $5 one does not ($4 + $5 + $5 > $10).
    await accounts.admit(p, prompt_tokens=3, max_tokens=2, price=DOLLAR)
    with pytest.raises(RateLimited):
        await accounts.admit(p, prompt_tokens=3, max_tokens=2, price=DOLLAR)
    with accounts.engine.connect() as conn:
        rows = conn.execute(select(UsageRow)).all()
        assert len(rows) == 1 and rows[0].status == "cancelled" and rows[0].cost_nanos == 4_000_000_000
        assert rows[0].key_id == info.id and rows[0].price_version == "catalog"
    usage = accounts.usage(key_ids=[info.id])
    assert usage[0]["requests"] == 1 and usage[0]["cost_usd"] == 4.0 and usage[0]["completion_tokens"] == 1


async def test_budget_exhausted_is_insufficient_quota(accounts: Accounts) -> None:
    key, _ = accounts.store.create("spent", budget_usd=5, budget_period="day")
    p = accounts.authenticate(key)
    adm = await accounts.admit(p, prompt_tokens=3, max_tokens=2, price=DOLLAR)
    accounts.finish(
        adm, response_id="x", principal=p, model_served="m", usage=EngineUsage(3, 2), price=accounts.price("m", DOLLAR)
    )
    accounts.ledger.flush()
    with pytest.raises(RateLimited) as e:
        await accounts.admit(p, prompt_tokens=1, max_tokens=0, price=DOLLAR)
    assert e.value.code == "insufficient_quota"
    assert 1 <= int(e.value.headers["Retry-After"]) <= 86400


async def test_rpm_and_tpm(accounts: Accounts) -> None:
    key, _ = accounts.store.create("rpm", rpm=3)
    p = accounts.authenticate(key)
    results = await _admit_many(accounts, p, 10, 1, 1)
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    refusal = next(r for r in results if isinstance(r, RateLimited))
    assert refusal.code == "rate_limit_exceeded" and 1 <= int(refusal.headers["Retry-After"]) <= 60

    key, _ = accounts.store.create("tpm", tpm=100)
    p = accounts.authenticate(key)
    results = await _admit_many(accounts, p, 10, 10, 15)  # 25 tokens each -> 4 fit
    assert sum(not isinstance(r, BaseException) for r in results) == 4
    assert {r.code for r in results if isinstance(r, RateLimited)} == {"tokens_per_minute_exceeded"}
    with pytest.raises(RateLimited, match="too large"):
        await accounts.admit(p, prompt_tokens=50, max_tokens=60, price=DOLLAR)


async def test_unlimited_keys_never_wait(accounts: Accounts) -> None:
    key, _ = accounts.store.create("free")
    p = accounts.authenticate(key)
    results = await _admit_many(accounts, p, 200, 1000, 1000)
    assert not any(isinstance(r, BaseException) for r in results)


# ----------------------------------------------------------------------------- ledger


async def test_ledger_rows_rollups_no_doubles(accounts: Accounts) -> None:
    key, info = accounts.store.create("ledger")
    p = accounts.authenticate(key)
    price = accounts.price("m", Prices(input=1.0, output=2.0))
    for i in range(120):
        usage = EngineUsage(prompt_tokens=10, completion_tokens=5, reasoning_tokens=2, cached_tokens=4)
        accounts.finish(
            None,
            response_id=f"req-{i}",
            principal=p,
            model_served="m",
            model_requested="deepseek-reasoner",
            usage=usage,
            price=price,
            latency_ms=12.5,
            ttft_ms=3.0,
        )
    # The same request ids again (a retried flush): nothing doubles.
    for i in range(10):
        accounts.finish(
            None, response_id=f"req-{i}", principal=p, model_served="m", usage=EngineUsage(10, 5), price=price
        )
    accounts.ledger.flush()
    with accounts.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(UsageRow)).scalar() == 120
        daily = conn.execute(select(UsageDaily)).all()
    assert len(daily) == 1 and daily[0].requests == 120 and daily[0].cached_tokens == 480
    one = cost_nanos(EngineUsage(prompt_tokens=10, completion_tokens=5, cached_tokens=4), price.prices)
    assert daily[0].cost_nanos == 120 * one
    (summary,) = accounts.usage(key_ids=[info.id], since=dt.date.today() - dt.timedelta(days=1))
    assert summary["model"] == "m" and summary["reasoning_tokens"] == 240
    assert accounts.usage(key_ids=[info.id], since=dt.date.today() + dt.timedelta(days=1)) == []
    by_key = accounts.usage(by_key=True)
    assert by_key[0]["key_id"] == info.id


async def test_ledger_row_reads_back_as_written(accounts: Accounts) -> None:
    """The writer's own SQL (ledger.py) stores every column, as SQLAlchemy reads it back."""
    from r1serve.accounts.ledger import _LEDGER_COLUMNS, ledger_rows
    from r1serve.accounts.models import table

    assert set(_LEDGER_COLUMNS) == {c.name for c in table(UsageRow).c} - {"id"}
    p = Principal(key_id="k-cols", name="k", kind="static")
    usage = EngineUsage(prompt_tokens=7, completion_tokens=5, reasoning_tokens=2, cached_tokens=3)
    price = accounts.price("m", Prices(input=1.0, output=2.0))
    before = dt.datetime.now(dt.UTC)
    settled = accounts.finish(None, response_id="cols-1", request_id="req-cols", principal=p, model_served="m",
                              model_requested="alias", target="up", usage=usage, price=price, status="cancelled",
                              latency_ms=12.5, ttft_ms=3.25)  # fmt: skip
    assert settled.committed is not None
    await settled.committed  # the row is committed once this resolves: read it straight back
    (row,) = ledger_rows(accounts.engine, key_id="k-cols")
    when = row.pop("created_at")
    when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    assert before <= when <= dt.datetime.now(dt.UTC)
    row.pop("id")
    assert row == {
        "response_id": "cols-1", "request_id": "req-cols", "key_id": "k-cols", "model_requested": "alias",
        "model_served": "m", "target": "up", "prompt_tokens": 7, "cached_tokens": 3, "completion_tokens": 5,
        "reasoning_tokens": 2, "cost_nanos": settled.cost_nanos, "price_version": "catalog", "latency_ms": 12.5,
        "ttft_ms": 3.25, "status": "cancelled",
    }  # fmt: skip


async def test_sqlite_checkpoint_after_inline_commits(tmp_path: Path) -> None:
    """The inline commits leave WAL checkpoints to the maintenance thread; SQLite refuses one inside a
    transaction, which is where SQLAlchemy would have run it."""
    acc = Accounts.open(make_settings(tmp_path, None))
    acc.start()
    try:
        p = Principal(key_id="k", name="k", kind="static")
        for i in range(20):
            settled = acc.finish(
                None, response_id=f"w-{i}", principal=p, model_served="m", usage=EngineUsage(1, 1), price=acc.price("m")
            )
            assert settled.committed is not None
            await settled.committed
        acc.ledger.checkpoint()
        with acc.engine.connect() as conn:
            busy, log_frames, checkpointed = conn.connection.dbapi_connection.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchone()  # type: ignore[union-attr]
        assert busy == 0 and checkpointed == log_frames
    finally:
        acc.close()


async def test_sqlite_backlog_is_written_a_batch_per_loop_turn(tmp_path: Path) -> None:
    """Rows queued faster than one commit (a backlog after an outage) are committed a batch a turn, so
    the loop serves requests between batches instead of stalling for the whole backlog."""
    acc = Accounts.open(make_settings(tmp_path, None))
    acc.start()
    try:
        p = Principal(key_id="k", name="k", kind="static")
        futures = []
        for i in range(2500):  # the writer's batches are 1000 rows
            settled = acc.finish(
                None, response_id=f"b-{i}", principal=p, model_served="m", usage=EngineUsage(1, 1), price=acc.price("m")
            )
            futures.append(settled.committed)
        seen: list[int] = []
        asyncio.get_running_loop().call_soon(lambda: seen.append(acc.ledger.pending))  # after the first turn
        await asyncio.gather(*futures)
        assert seen == [1500] and acc.ledger.pending == 0
        with acc.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(UsageRow)).scalar() == 2500
    finally:
        acc.close()


def test_ledger_flushes_on_close(backend: tuple[str, str], db_url: str | None, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, db_url, ledger_flush_interval=3600)
    acc = Accounts.open(settings, backend=backend[1])
    acc.start()
    p = Principal(key_id="k", name="k", kind="static")
    for i in range(50):
        acc.finish(
            None, response_id=f"c-{i}", principal=p, model_served="m", usage=EngineUsage(1, 1), price=acc.price("m")
        )
    acc.close()
    acc = Accounts.open(settings, backend=backend[1])
    try:
        with acc.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(UsageRow)).scalar() == 50
    finally:
        acc.close()


def test_ledger_keeps_rows_when_the_database_fails(tmp_path: Path) -> None:
    acc = Accounts.open(make_settings(tmp_path, None))
    try:
        p = Principal(key_id="k", name="k", kind="static")
        acc.finish(None, response_id="a", principal=p, model_served="m", usage=EngineUsage(1, 1), price=acc.price("m"))
        with acc.engine.begin() as conn:
            conn.execute(text("ALTER TABLE usage_ledger RENAME TO usage_ledger_away"))
        with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises for a missing table
            acc.ledger.flush()
        assert acc.ledger.pending == 1
        with acc.engine.begin() as conn:
            conn.execute(text("ALTER TABLE usage_ledger_away RENAME TO usage_ledger"))
        assert acc.ledger.flush() == 1 and acc.ledger.pending == 0
    finally:
        acc.close()


async def test_ledger_outage_does_not_hold_responses_while_the_writer_backs_off(tmp_path: Path) -> None:
    acc = Accounts.open(make_settings(tmp_path, None, ledger_flush_interval=30))  # the writer's back-off
    acc.start()
    p = Principal(key_id="k", name="k", kind="static")

    def finish(rid: str) -> Any:
        return acc.finish(None, response_id=rid, principal=p, model_served="m", usage=EngineUsage(1, 1),
                          price=acc.price("m")).committed  # fmt: skip

    try:
        with acc.engine.begin() as conn:
            conn.execute(text("ALTER TABLE usage_ledger RENAME TO usage_ledger_away"))
        with pytest.raises(LedgerUnavailable):
            await asyncio.wait_for(finish("first"), 10)  # the thread's immediate retry failed too
        # The thread now sleeps 30 s before its next try: a row submitted meanwhile is not kept waiting.
        with pytest.raises(LedgerUnavailable):
            await asyncio.wait_for(finish("second"), 5)
        assert acc.ledger.pending == 2  # both kept for the retry
        with acc.engine.begin() as conn:
            conn.execute(text("ALTER TABLE usage_ledger_away RENAME TO usage_ledger"))
        await asyncio.wait_for(finish("third"), 10)  # the next inline commit writes all three
        assert acc.ledger.pending == 0
        with acc.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(UsageRow)).scalar() == 3
    finally:
        acc.close()


async def test_spend_survives_restart_in_memory_backend(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, None)
    acc = Accounts.open(settings, backend="memory")
    key, _ = acc.store.create("persist", budget_usd=10)
    p = acc.authenticate(key)
    adm = await acc.admit(p, prompt_tokens=3, max_tokens=5, price=DOLLAR)
    acc.finish(
        adm, response_id="p1", principal=p, model_served="m", usage=EngineUsage(3, 5), price=acc.price("m", DOLLAR)
    )
    acc.close()
    acc = Accounts.open(settings, backend="memory")
    try:
        p = acc.authenticate(key)
        with pytest.raises(RateLimited, match="exceeded your budget"):
            await acc.admit(p, prompt_tokens=1, max_tokens=2, price=DOLLAR)  # $8 + $3 > $10
        await acc.admit(p, prompt_tokens=1, max_tokens=1, price=DOLLAR)  # $8 + $2 = $10 fits
    finally:
        acc.close()


# ----------------------------------------------------------------------------- several processes, one PostgreSQL


def _stacks(postgres: PostgresServer, tmp_path: Path, n: int) -> tuple[str, list[Accounts]]:  # noqa: F811
    url = postgres.create_database()
    engine = accounts_db.make_engine(accounts_db.database_url(Settings(database_url=url)))
    accounts_db.upgrade(engine)
    engine.dispose()
    stacks = [Accounts.open(make_settings(tmp_path / f"s{i}", url)) for i in range(n)]
    for s in stacks:
        s.start()
    return url, stacks


async def test_two_stacks_share_limits_and_keys(postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    _, (a, b) = _stacks(postgres, tmp_path, 2)
    try:
        assert isinstance(a.limiter, SqlLimiter)
        key, info = a.store.create("shared", budget_usd=50, rpm=1000)
        b.refresh()  # the background poll does this within keys_refresh_interval
        pa, pb = a.authenticate(key), b.authenticate(key)
        results = await asyncio.gather(_admit_many(a, pa, 25, 3, 2), _admit_many(b, pb, 25, 3, 2))
        admitted = sum(not isinstance(r, BaseException) for rs in results for r in rs)
        assert admitted == 10

        key2, _ = b.store.create("rpm", rpm=7)
        await asyncio.sleep(0.5)  # a's poll picks the new key up
        p2 = a.authenticate(key2)
        results = await asyncio.gather(_admit_many(a, p2, 10, 1, 1), _admit_many(b, b.authenticate(key2), 10, 1, 1))
        assert sum(not isinstance(r, BaseException) for rs in results for r in rs) == 7

        b.store.revoke(info.id)
        await asyncio.sleep(0.5)
        with pytest.raises(AuthenticationError, match="revoked"):
            a.authenticate(key)
    finally:
        a.close()
        b.close()


async def test_expired_reservations_are_swept(postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    _, (a,) = _stacks(postgres, tmp_path, 1)
    try:
        key, info = a.store.create("crash", budget_usd=10)
        p = a.authenticate(key)
        adm = await a.admit(p, prompt_tokens=3, max_tokens=2, price=DOLLAR)
        assert isinstance(a.limiter, SqlLimiter)
        with a.engine.begin() as conn:  # the process that admitted it died long ago
            conn.execute(Reservation.__table__.update().values(expires_at=0))
        assert a.limiter.sweep() == 1
        with a.engine.connect() as conn:
            row = conn.execute(select(BudgetCounter).where(BudgetCounter.key_id == info.id)).one()
        assert (row.spent_nanos, row.reserved_nanos) == (0, 0)
        # A late settlement of the swept request still charges what it used, without releasing twice.
        a.finish(
            adm, response_id="late", principal=p, model_served="m", usage=EngineUsage(3, 1), price=a.price("m", DOLLAR)
        )
        a.ledger.flush()
        with a.engine.connect() as conn:
            row = conn.execute(select(BudgetCounter).where(BudgetCounter.key_id == info.id)).one()
        assert (row.spent_nanos, row.reserved_nanos) == (4_000_000_000, 0)
    finally:
        a.close()


_WORKER = textwrap.dedent(
    """
    import asyncio, json, sys
    from r1serve.accounts import Accounts
    from r1serve.models.catalog import Prices
    from r1serve.settings import Settings

    url, data_dir, key, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    price = Prices(input=1_000_000.0, output=1_000_000.0)

    async def main():
        acc = Accounts.open(Settings(database_url=url, data_dir=data_dir, key_secret="test-secret-0123456789abcdef"))
        acc.start()
        p = acc.authenticate(key)
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        sys.stdin.readline()  # start together
        results = await asyncio.gather(
            *(acc.admit(p, prompt_tokens=3, max_tokens=2, price=price) for _ in range(n)), return_exceptions=True
        )
        acc.close()
        print(json.dumps(sum(not isinstance(r, BaseException) for r in results)))

    asyncio.run(main())
    """
)


def test_two_processes_share_one_budget(postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    url, (a,) = _stacks(postgres, tmp_path, 1)
    key, _ = a.store.create("procs", budget_usd=50)
    a.close()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, str(tmp_path / f"p{i}"), key, "25"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    counts = [int(proc.communicate(timeout=120)[0].strip().splitlines()[-1]) for proc in procs]
    assert sum(counts) == 10, counts
