"""Initial schema: associations, studies, series, instances, jobs, results, exports, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("calling_ae", sa.String(16)),
        sa.Column("called_ae", sa.String(16)),
        sa.Column("peer_host", sa.String(255)),
        sa.Column("peer_port", sa.Integer()),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime()),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reject_reason", sa.Text()),
        sa.Column("n_stored", sa.Integer(), nullable=False),
        sa.Column("n_duplicate", sa.Integer(), nullable=False),
        sa.Column("n_ignored", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=False),
    )
    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_uid", UID, nullable=False, unique=True),
        sa.Column("accession_number", sa.String(64)),
        sa.Column("study_date", sa.String(8)),
        sa.Column("study_description", sa.String(255)),
        sa.Column("patient_name", sa.String(255)),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("patient_birth_date", sa.String(8)),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_studies_accession_number", "studies", ["accession_number"])
    op.create_table(
        "series",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_uid", UID, nullable=False, unique=True),
        sa.Column("study_uid", UID, sa.ForeignKey("studies.study_uid"), nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("description", sa.String(255)),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("instance_count", sa.Integer(), nullable=False),
        sa.Column("first_instance_at", sa.DateTime()),
        sa.Column("last_instance_at", sa.DateTime()),
        sa.Column("completed_at", sa.DateTime()),
        sa.Column("reported_at", sa.DateTime()),
        sa.Column("delivered_at", sa.DateTime()),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("meta", sa.JSON()),
    )
    op.create_index("ix_series_study_uid", "series", ["study_uid"])
    op.create_index("ix_series_state", "series", ["state"])
    op.create_table(
        "instances",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sop_instance_uid", UID),
        sa.Column("sop_class_uid", UID),
        sa.Column("study_uid", UID),
        sa.Column("series_uid", UID),
        sa.Column("series_version", sa.Integer()),
        sa.Column("instance_number", sa.Integer()),
        sa.Column("transfer_syntax", UID),
        sa.Column("spool_path", sa.Text()),
        sa.Column("size", sa.Integer()),
        sa.Column("sha256", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text()),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("association_id", sa.Integer(), sa.ForeignKey("associations.id")),
        sa.Column("meta", sa.JSON()),
    )
    op.create_index("ix_instances_sop_instance_uid", "instances", ["sop_instance_uid"])
    op.create_index("ix_instances_received_at", "instances", ["received_at"])
    op.create_index("ix_instances_association_id", "instances", ["association_id"])
    op.create_index("ix_instances_series_status", "instances", ["series_uid", "status"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_uid", UID, sa.ForeignKey("series.series_uid"), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(128)),
        sa.Column("lease_expires_at", sa.DateTime()),
        sa.Column("not_before", sa.DateTime()),
        sa.Column("enqueued_at", sa.DateTime(), nullable=False),
        sa.Column("claimed_at", sa.DateTime()),
        sa.Column("started_at", sa.DateTime()),
        sa.Column("finished_at", sa.DateTime()),
        sa.Column("error", sa.Text()),
    )
    op.create_index("ix_jobs_series_uid", "jobs", ["series_uid"])
    op.create_index("ix_jobs_state", "jobs", ["state", "not_before"])
    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id")),
        sa.Column("series_uid", UID, sa.ForeignKey("series.series_uid"), nullable=False),
        sa.Column("series_version", sa.Integer(), nullable=False),
        sa.Column("finding_key", sa.String(64), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("decision", sa.Boolean(), nullable=False),
        sa.Column("checkpoint_hash", sa.String(64)),
        sa.Column("model_name", sa.String(128)),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_results_series_uid", "results", ["series_uid"])
    op.create_index("ix_results_finding", "results", ["finding_key", "probability"])
    op.create_table(
        "exports",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("series_uid", UID, sa.ForeignKey("series.series_uid"), nullable=False),
        sa.Column("series_version", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), sa.ForeignKey("jobs.id")),
        sa.Column("destination", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_status", sa.String(32)),
        sa.Column("last_error", sa.Text()),
        sa.Column("next_attempt_at", sa.DateTime()),
        sa.Column("delivered_at", sa.DateTime()),
        sa.Column("report_path", sa.Text()),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_exports_series_uid", "exports", ["series_uid"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("entity", sa.String(16), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("from_state", sa.String(16)),
        sa.Column("to_state", sa.String(16)),
        sa.Column("study_uid", UID),
        sa.Column("series_uid", UID),
        sa.Column("details", sa.JSON()),
    )
    op.create_index("ix_events_at", "events", ["at"])
    op.create_index("ix_events_entity_id", "events", ["entity_id"])
    op.create_index("ix_events_study_uid", "events", ["study_uid"])
    op.create_index("ix_events_series_uid", "events", ["series_uid"])


def downgrade() -> None:
    for table in (
        "events",
        "exports",
        "results",
        "jobs",
        "instances",
        "series",
        "studies",
        "associations",
    ):
        op.drop_table(table)
