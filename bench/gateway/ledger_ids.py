"""What a ledger row costs to commit, by how response ids are made, once the ledger has a history.

    PYTHONPATH=src .venv/bin/python bench/gateway/ledger_ids.py [--history 100000] [--batch 16]

The ledger's ``response_id`` column has a unique index (a retried batch must not double a row). With
random ids every row of a commit lands on its own page of that index, and SQLite's WAL writes every
page a commit touched; with ids that grow with time (api/serving.py's ``new_id``) the rows of a commit
share the index's last page. The script fills a fresh SQLite accounts database (the server's pragmas,
migrations and writer, ``LedgerWriter._write_sqlite``) with ``--history`` rows, then times commits of
``--batch`` rows each way: CPU per row and the WAL grown.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from r1serve.accounts import db as accounts_db
from r1serve.accounts.ledger import LedgerWriter, UsageRecord
from r1serve.accounts.limiter import Limiter
from r1serve.api.serving import new_id
from r1serve.engines.base import EngineUsage
from r1serve.settings import Settings


def random_id(prefix: str) -> str:
    return prefix + os.urandom(16).hex()  # the ids before this change


def record(make_id: Callable[[str], str]) -> UsageRecord:
    return UsageRecord(
        response_id=make_id("chatcmpl-"), key_id="static-bench", model_served="deepseek-reasoner",
        usage=EngineUsage(prompt_tokens=9, completion_tokens=14, reasoning_tokens=9), cost_nanos=1234,
        request_id=os.urandom(8).hex(), model_requested="deepseek-reasoner", target="mock-r1", latency_ms=1.0,
    )  # fmt: skip


def measure(make_id: Callable[[str], str], history: int, batch: int, commits: int) -> tuple[float, int]:
    data = Path(tempfile.mkdtemp(prefix="r1serve-ledger-ids-"))
    engine = accounts_db.make_engine(accounts_db.database_url(Settings(_env_file=None, data_dir=data)))  # type: ignore[call-arg]
    accounts_db.upgrade(engine)
    writer = LedgerWriter(engine, Limiter())
    conn = writer._inline_connection()  # the event loop's connection: no autocheckpoint, as served
    for _ in range(history // batch):
        writer._write_sqlite([record(make_id) for _ in range(batch)], conn)
    conn.connection.dbapi_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # type: ignore[union-attr]
    batches = [[record(make_id) for _ in range(batch)] for _ in range(commits)]
    start = time.process_time()
    for b in batches:
        writer._write_sqlite(b, conn)
    cpu = time.process_time() - start
    wal = os.path.getsize(data / "accounts.db-wal")
    writer._close_inline()
    engine.dispose()
    return cpu / (commits * batch) * 1e6, wal // (commits * batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", type=int, default=100_000, help="rows already in the ledger")
    ap.add_argument("--batch", type=int, default=16, help="rows per commit (the group commit's size under load)")
    ap.add_argument("--commits", type=int, default=400)
    args = ap.parse_args()
    print("| ids | rows before | rows per commit | CPU per row | WAL bytes per row |\n|---|---:|---:|---:|---:|")
    for name, make in (("random (before)", random_id), ("time-ordered (new_id)", new_id)):
        us, wal = measure(make, args.history, args.batch, args.commits)
        print(f"| {name} | {args.history:,} | {args.batch} | {us:.1f} us | {wal:,} |", flush=True)


if __name__ == "__main__":
    main()
