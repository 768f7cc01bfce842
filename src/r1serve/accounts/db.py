"""Database URL, engine and migrations.

* Default: a SQLite file ``accounts.db`` in ``settings.data_dir``, in WAL mode, migrated automatically
  on first use. Any other URL (PostgreSQL for real deployments) is migrated
  by ``r1serve db upgrade``.
* ``postgresql://`` and ``postgres://`` URLs use psycopg 3 (``postgresql+psycopg://``).
* SQLite transactions start with ``BEGIN IMMEDIATE`` so concurrent writers queue on the busy timeout
  instead of failing with "database is locked" when a reader upgrades to a writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from r1serve.settings import Settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class SchemaOutdated(RuntimeError):
    pass


def default_url(settings: Settings) -> str:
    return f"sqlite:///{Path(settings.data_dir).expanduser() / 'accounts.db'}"


def database_url(settings: Settings) -> str:
    url = settings.database_url or default_url(settings)
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def is_default_database(settings: Settings) -> bool:
    return not settings.database_url


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def safe_url(url: str) -> str:
    """The URL without its password, for logs."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy emit BEGIN itself (pysqlite's own transaction handling is off).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL, in WAL mode: a commit has been written to the WAL (the OS holds it) when it returns,
            # so it survives the process being killed (tests/test_ledger_live.py kills it under load);
            # a power cut may lose the last commits. FULL adds an fsync per commit, which on a shared
            # VM disk took 0.3 to 7 ms: more than a gateway request. PostgreSQL (synchronous_commit on)
            # is the database for power-cut durability.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (idempotent)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def check_schema(engine: Engine) -> None:
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaOutdated(
            f"the accounts database {safe_url(engine.url.render_as_string(hide_password=False))} is at revision "
            f"{current or 'none'}, this r1serve needs {head}: run `r1serve db upgrade`"
        )
