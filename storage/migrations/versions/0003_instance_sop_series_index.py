"""Index instances by (SOP Instance UID, series, status).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

Every received instance bumps its series' counters unless its SOP Instance UID is already stored
in that series (``Store._hot()["bump"]``). Without this index SQLite answered that check through
``ix_instances_series_status`` -- every stored instance of the series, one by one -- so each
instance cost time in proportion to the series' size so far (quadratic per series). With it the
check is one index lookup.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_instances_sop_series_status", "instances", ["sop_instance_uid", "series_uid", "status"]
    )


def downgrade() -> None:
    op.drop_index("ix_instances_sop_series_status", table_name="instances")
