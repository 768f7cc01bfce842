"""Deployments at scale: how a deployment routes among its replicas, and its autoscaling policy (a JSON
object, or null for a fixed replica count).

Revision ID: 0005_deployment_scaling
Revises: 0004_deployment_lifecycle
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_deployment_scaling"
down_revision = "0004_deployment_lifecycle"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("routing", sa.String(32)))
        batch.add_column(sa.Column("autoscaling", sa.Text()))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        for column in ("autoscaling", "routing"):
            batch.drop_column(column)
