"""``r1serve keys …``, ``r1serve usage`` and ``r1serve db upgrade`` (registered by r1serve.cli)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from r1serve.errors import R1ServeError
from r1serve.settings import Settings

from . import db
from .service import Accounts

out = Console()
err = Console(stderr=True, soft_wrap=True)  # not wrapped at 80 columns in a log or pipe: one message, one line

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
db_app = typer.Typer(help="The accounts database.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/bold red] {message}", highlight=False)
    return typer.Exit(1)


def _open() -> Accounts:
    try:
        return Accounts.open(Settings())
    except db.SchemaOutdated as exc:
        raise _fail(str(exc)) from None


def _date(value: str | None, name: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise _fail(f"{name} must be a date or date-time (YYYY-MM-DD[THH:MM])") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")],
    models: Annotated[str | None, typer.Option(help="Comma-separated model ids or aliases; default: all.")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute (prompt + max_tokens reserved).")] = None,
    budget: Annotated[float | None, typer.Option(help="Spend budget in USD per period.")] = None,
    period: Annotated[str, typer.Option(help="Budget period: total, day or month.")] = "total",
    expires: Annotated[str | None, typer.Option(help="Expiry date (UTC), e.g. 2026-12-31.")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May manage keys and see all usage.")] = False,
) -> None:
    """Create a key and print it (once: it cannot be shown again)."""
    accounts = _open()
    try:
        key, info = accounts.store.create(
            name,
            models=models.split(",") if models else None,
            rpm=rpm,
            tpm=tpm,
            budget_usd=budget,
            budget_period=period,
            expires_at=_date(expires, "--expires"),
            admin=admin,
        )
    except R1ServeError as exc:
        raise _fail(exc.message) from None
    finally:
        accounts.close()
    err.print(f"Created key {info.display} ({info.name}). It is shown only now; store it safely:", highlight=False)
    print(key)


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List keys (never the keys themselves: their visible prefix)."""
    accounts = _open()
    try:
        keys = accounts.store.list()
    finally:
        accounts.close()
    if as_json:
        print(json.dumps([k.as_dict() for k in keys], indent=2))
        return
    table = Table(title_justify="left")
    for col in ("key", "name", "models", "admin", "rpm", "tpm", "budget", "expires", "status"):
        table.add_column(col, no_wrap=col in ("key", "status"))
    for k in keys:
        status = "revoked" if k.revoked_at else ("active" if k.active else "expired")
        table.add_row(
            k.display,
            k.name,
            ",".join(k.models) if k.models else "all",
            "yes" if k.admin else "",
            str(k.rpm or ""),
            str(k.tpm or ""),
            f"${k.budget_usd:g}/{k.budget_period}" if k.budget_usd is not None else "",
            k.expires_at.date().isoformat() if k.expires_at else "",
            status,
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="The key's prefix (r1-abcd1234) or id.")]) -> None:
    """Revoke a key; every server sharing the database refuses it within seconds."""
    accounts = _open()
    try:
        info = accounts.store.revoke(key)
    finally:
        accounts.close()
    if info is None:
        raise _fail(f"no key {key!r}")
    err.print(f"Revoked {info.display} ({info.name}).", highlight=False)


def usage_command(
    key: Annotated[str | None, typer.Option(help="Only this key (prefix or id).")] = None,
    since: Annotated[str | None, typer.Option(help="From this date (YYYY-MM-DD).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Usage by day, key and model, with cost."""
    accounts = _open()
    try:
        key_ids = None
        names = {k.id: k.display for k in accounts.store.list()}
        if key is not None:
            info = accounts.store.get(key)
            key_ids = [info.id if info is not None else key]
        when = _date(since, "--since")
        rows = accounts.usage(key_ids=key_ids, since=when.date() if when else None, by_key=True)
    finally:
        accounts.close()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title_justify="left")
    for col in ("date", "key", "model", "requests", "prompt", "completion", "reasoning", "cost (USD)"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(
            r["date"],
            names.get(r["key_id"], r["key_id"]),
            r["model"],
            str(r["requests"]),
            str(r["prompt_tokens"]),
            str(r["completion_tokens"]),
            str(r["reasoning_tokens"]),
            f"{r['cost_usd']:.6f}",
        )
    out.print(table)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the accounts database (R1SERVE_DATABASE_URL, default: SQLite in the data dir)."""
    settings = Settings()
    url = db.database_url(settings)
    engine = db.make_engine(url)
    try:
        before = db.current_revision(engine)
        db.upgrade(engine)
        after = db.current_revision(engine)
    finally:
        engine.dispose()
    err.print(f"{db.safe_url(url)}: {before or 'empty'} -> {after}", highlight=False)
