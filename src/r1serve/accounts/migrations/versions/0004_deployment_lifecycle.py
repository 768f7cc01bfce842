"""Deployments' lifecycle: the cron schedule of SCHEDULED ones and its next run, the price per
replica-hour, the cost so far (and how much of it the ledger has), the time it was accrued to.

Revision ID: 0004_deployment_lifecycle
Revises: 0003_deployments
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_deployment_lifecycle"
down_revision = "0003_deployments"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    # batch: SQLite cannot add a NOT NULL column with ALTER TABLE alone in every version.
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("schedule", sa.String(200)))
        batch.add_column(sa.Column("next_run_at", _TS))
        batch.add_column(sa.Column("price_per_hour", sa.Float()))
        batch.add_column(sa.Column("cost_nanos", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("ledger_nanos", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("billed_until", _TS))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        for column in ("billed_until", "ledger_nanos", "cost_nanos", "price_per_hour", "next_run_at", "schedule"):
            batch.drop_column(column)
