"""Deployments: one row per deployment, its events and replicas as JSON text.

Revision ID: 0003_deployments
Revises: 0001_accounts
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_deployments"
down_revision = "0001_accounts"
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(63), nullable=False, unique=True),
        sa.Column("template", sa.String(500), nullable=False),
        sa.Column("engine", sa.String(32), nullable=False),
        sa.Column("replicas", sa.Integer(), nullable=False),
        sa.Column("strategy", sa.String(32), nullable=False),
        sa.Column("timeout_minutes", sa.Float(), nullable=False),
        sa.Column("threads", sa.Integer()),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("owner_key_id", sa.String(64)),
        sa.Column("events", sa.Text(), nullable=False),
        sa.Column("replicas_detail", sa.Text(), nullable=False),
        sa.Column("started_at", _TS),
        sa.Column("expires_at", _TS),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deployments")
