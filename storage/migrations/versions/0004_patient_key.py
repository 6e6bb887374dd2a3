"""Keyed hash of the PatientID on studies and series (identity checks on ingest).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

The receiver refuses an instance whose patient differs from the one its series (or study) was
first received for (docs/conformance.md). It compares ``storage.identity.PatientKeyer`` keys --
an HMAC of the PatientID under a secret kept in the data dir -- so no PHI is stored. Rows from
before this revision have NULL keys: the first instance received for them afterwards sets it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("patient_key", sa.String(64), nullable=True))
    with op.batch_alter_table("series") as batch:
        batch.add_column(sa.Column("patient_key", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series") as batch:
        batch.drop_column("patient_key")
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("patient_key")
