"""Series priority (claim order), the report's SOP Instance UID on exports, due-export index.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

``series.priority`` lets an operator (or a selection rule) push a series ahead of the queue;
``exports.report_sop_uid`` ties an export to the SR it sends so a PACS-side query can be matched
to the audit row; ``ix_exports_due`` keeps the dispatcher's poll an index scan.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("exports") as batch:
        batch.add_column(sa.Column("report_sop_uid", sa.String(64)))
    op.create_index("ix_exports_due", "exports", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_exports_due", table_name="exports")
    with op.batch_alter_table("exports") as batch:
        batch.drop_column("report_sop_uid")
    with op.batch_alter_table("series") as batch:
        batch.drop_column("priority")
