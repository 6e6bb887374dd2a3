"""ORM models of the audit database (SQLAlchemy 2.0 typed mappings).

These classes describe the schema at Alembic *head*; the migrations in ``storage/migrations``
create exactly this (a test compares them). Column meanings are documented in docs/audit.md so
users can query the file with ``sqlite3``. PHI columns on ``studies`` stay NULL unless the node
runs with ``audit.store_phi = true``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from storage.db import UTCDateTime, utcnow

UID = String(64)


class Base(DeclarativeBase):
    """Declarative base; its metadata is what Alembic's env.py targets."""

    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Association(Base):
    """One DICOM association (accepted or rejected) with per-outcome instance counts."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(primary_key=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16))
    peer_host: Mapped[str | None] = mapped_column(String(255))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime | None]
    # open | released | aborted | rejected
    outcome: Mapped[str] = mapped_column(String(16), default="open")
    reject_reason: Mapped[str | None] = mapped_column(Text)
    n_stored: Mapped[int] = mapped_column(default=0)
    n_duplicate: Mapped[int] = mapped_column(default=0)
    n_ignored: Mapped[int] = mapped_column(default=0)
    n_failed: Mapped[int] = mapped_column(default=0)
    # added in revision 0005: node.name of the node that accepted it (recovery scope)
    node: Mapped[str | None] = mapped_column(String(128))


class Study(Base):
    """A study seen by the node. Patient columns are PHI: NULL unless store_phi is on."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(255))
    patient_name: Mapped[str | None] = mapped_column(String(255))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # added in revision 0004: keyed hash of the PatientID (storage.identity), never the ID
    patient_key: Mapped[str | None] = mapped_column(String(64))


class Series(Base):
    """A series and its place in the state machine (see storage.store.SeriesState)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_uid"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), index=True)
    # report version: +1 each time a late instance reopens a series that moved past receiving
    version: Mapped[int] = mapped_column(default=1)
    reason: Mapped[str | None] = mapped_column(Text)
    instance_count: Mapped[int] = mapped_column(default=0)
    first_instance_at: Mapped[dt.datetime | None]
    last_instance_at: Mapped[dt.datetime | None]
    completed_at: Mapped[dt.datetime | None]
    reported_at: Mapped[dt.datetime | None]
    delivered_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    meta: Mapped[dict[str, Any] | None]
    # added in revision 0002: higher runs first
    priority: Mapped[int] = mapped_column(default=0, server_default="0")
    # added in revision 0004: keyed hash of the PatientID of the series' instances
    patient_key: Mapped[str | None] = mapped_column(String(64))


class Instance(Base):
    """Every instance offered to the node, whatever happened to it (status + reason)."""

    __tablename__ = "instances"
    __table_args__ = (
        Index("ix_instances_series_status", "series_uid", "status"),
        # the receiver's "already stored in this series?" check (revision 0003)
        Index("ix_instances_sop_series_status", "sop_instance_uid", "series_uid", "status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    study_uid: Mapped[str | None] = mapped_column(UID)
    series_uid: Mapped[str | None] = mapped_column(UID)
    series_version: Mapped[int | None]
    instance_number: Mapped[int | None]
    transfer_syntax: Mapped[str | None] = mapped_column(UID)
    spool_path: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int | None]
    sha256: Mapped[str | None] = mapped_column(String(64))
    # stored | duplicate | conflict | ignored | rejected
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"), index=True)
    meta: Mapped[dict[str, Any] | None]


class Job(Base):
    """A durable inference job for one series version (the worker queue)."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state", "state", "not_before"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, ForeignKey("series.series_uid"), index=True)
    version: Mapped[int]
    # queued | running | done | failed | superseded
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(default=0)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None]
    not_before: Mapped[dt.datetime | None]
    enqueued_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    claimed_at: Mapped[dt.datetime | None]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    # added in revision 0005: node.name of the node whose worker holds / last held it
    node: Mapped[str | None] = mapped_column(String(128))


class Result(Base):
    """One finding's probability and decision for one series version."""

    __tablename__ = "results"
    __table_args__ = (Index("ix_results_finding", "finding_key", "probability"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    series_uid: Mapped[str] = mapped_column(UID, ForeignKey("series.series_uid"), index=True)
    series_version: Mapped[int]
    finding_key: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    decision: Mapped[bool] = mapped_column(Boolean)
    checkpoint_hash: Mapped[str | None] = mapped_column(String(64))
    model_name: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Export(Base):
    """The outbox: one row per (report, destination); retried until delivered, never dropped."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, ForeignKey("series.series_uid"), index=True)
    series_version: Mapped[int]
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    destination: Mapped[str] = mapped_column(String(128))
    # pending | delivered
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    last_status: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[dt.datetime | None]
    delivered_at: Mapped[dt.datetime | None]
    report_path: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # added in revision 0002
    report_sop_uid: Mapped[str | None] = mapped_column(UID)
    # added in revision 0005: the dispatcher attempting it now (one attempt at a time) + lease
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None]


Index("ix_exports_due", Export.state, Export.next_attempt_at)  # revision 0002


class Event(Base):
    """Append-only audit trail: every state change of every entity.

    ``entity`` is series | job | export | association | instance | study | node; ``entity_id`` the
    UID or row id as text. ``study_uid``/``series_uid`` are filled whenever known so a study's
    whole timeline is one indexed query.
    """

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    entity: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    study_uid: Mapped[str | None] = mapped_column(UID, index=True)
    series_uid: Mapped[str | None] = mapped_column(UID, index=True)
    details: Mapped[dict[str, Any] | None]


class ShadowResult(Base):
    """One finding of a shadow model (`[[model.shadow]]`) for one series version (revision
    0006). Recorded for validation only: never reported, never exported."""

    __tablename__ = "shadow_results"
    __table_args__ = (
        Index("ix_shadow_results_series", "series_uid", "series_version"),
        Index("ix_shadow_results_model", "model_name", "finding_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    series_uid: Mapped[str] = mapped_column(UID, ForeignKey("series.series_uid"))
    series_version: Mapped[int]
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str | None] = mapped_column(String(128))
    checkpoint_hash: Mapped[str | None] = mapped_column(String(64))
    finding_key: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    decision: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Notification(Base):
    """The notification outbox (revision 0006): one row per (result, rule match, channel);
    claimed under a lease, retried with backoff until delivered, never dropped; an HL7 AR
    (the receiver refuses the message itself) ends it as 'rejected'."""

    __tablename__ = "notifications"
    __table_args__ = (Index("ix_notifications_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, ForeignKey("series.series_uid"), index=True)
    series_version: Mapped[int]
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    channel: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    finding_key: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    decision: Mapped[bool] = mapped_column(Boolean)
    rule: Mapped[str | None] = mapped_column(Text)
    model_name: Mapped[str | None] = mapped_column(String(128))
    report_sop_uid: Mapped[str | None] = mapped_column(UID)
    # pending | delivered | rejected
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    last_status: Mapped[str | None] = mapped_column(String(32))
    last_error: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[dt.datetime | None]
    delivered_at: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None]
