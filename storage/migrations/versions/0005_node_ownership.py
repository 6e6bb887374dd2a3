"""Ownership for several nodes on one database: node names and export leases.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Several molre-node processes may share one (PostgreSQL) database (docs/operations.md,
"Several nodes"). Each records its ``node.name`` on what it owns, so that recovery at start
touches only its own work: ``associations.node`` (the node that accepted it), ``jobs.node`` (the
node whose worker holds it). Exports are claimed like jobs: ``exports.claimed_by`` +
``exports.lease_expires_at`` -- exactly one delivery attempt at a time. Rows from before this
revision have NULL: they count as the starting node's own (one node upgraded in place).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("associations") as batch:
        batch.add_column(sa.Column("node", sa.String(128), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("node", sa.String(128), nullable=True))
    with op.batch_alter_table("exports") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("exports") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("claimed_by")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("node")
    with op.batch_alter_table("associations") as batch:
        batch.drop_column("node")
