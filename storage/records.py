"""Plain records of the audit database: the series state machine and the value objects the
:class:`storage.store.Store` API hands across (detached from any session), plus the JSON/text
cleaning every stored header value goes through.

Split out of ``storage/store.py`` so that the queue (:mod:`storage.queue`), the
outbox (:mod:`storage.outbox`), the audit queries (:mod:`storage.queries`) and the store import
these without importing each other.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from storage.models import Instance, Series


class SeriesState(str, enum.Enum):
    """States of a series; the value is what the ``series.state`` column holds."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    SELECTED = "selected"
    SKIPPED = "skipped"
    QUEUED = "queued"
    INFERRING = "inferring"
    REPORTED = "reported"
    DELIVERED = "delivered"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


S = SeriesState
#: Allowed moves of :meth:`Store.transition` (reopening by a late instance is separate).
ALLOWED_TRANSITIONS: dict[SeriesState, frozenset[SeriesState]] = {
    S.RECEIVING: frozenset({S.COMPLETE, S.FAILED}),
    S.COMPLETE: frozenset({S.SELECTED, S.SKIPPED, S.FAILED}),
    S.SELECTED: frozenset({S.QUEUED, S.SKIPPED, S.FAILED}),
    S.QUEUED: frozenset({S.INFERRING, S.FAILED}),
    S.INFERRING: frozenset({S.REPORTED, S.QUEUED, S.FAILED}),
    S.REPORTED: frozenset({S.DELIVERED, S.FAILED}),
    S.DELIVERED: frozenset(),
    S.SKIPPED: frozenset({S.SELECTED}),  # operator override: read it anyway
    S.FAILED: frozenset({S.QUEUED}),  # operator retry
}
#: States in which nothing more happens by itself (prune may remove them after retention).
FINAL_STATES: frozenset[SeriesState] = frozenset({S.DELIVERED, S.SKIPPED, S.FAILED, S.REPORTED})

#: control characters (C0, DEL, C1): never stored from a header value or an error text
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

INSTANCE_STATUSES = ("stored", "duplicate", "conflict", "ignored", "rejected")
_COUNT_COLUMN = {
    "stored": "n_stored",
    "duplicate": "n_duplicate",
    "ignored": "n_ignored",
    "conflict": "n_failed",
    "rejected": "n_failed",
}


class InvalidTransition(RuntimeError):
    """A state change the state machine does not allow (a bug in the caller, not user input)."""


class NotFound(LookupError):
    """The series / job / export / association asked for does not exist."""


# ---------------------------------------------------------------------------------------------
# Value objects handed across the API (plain data, detached from any session)
# ---------------------------------------------------------------------------------------------
@dataclass
class InstanceHeader:
    """What the receiver read from an instance's header (no pixel data).

    Any UID may be None for unreadable input. ``meta`` is JSON-able series/instance metadata the
    selection rules need (ImageType, BodyPartExamined, StudyDescription, SeriesDescription,
    ProtocolName, SliceThickness, ContrastBolusAgent, ConvolutionKernel, Rows, Columns, ...).
    ``phi`` (PatientName, PatientID, PatientBirthDate) is persisted only with store_phi=True.
    ``patient_key`` is the keyed hash of the PatientID (:mod:`storage.identity`): what the
    receiver's identity checks compare and what the study and series rows keep.
    """

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    modality: str | None = None
    transfer_syntax: str | None = None
    accession_number: str | None = None
    instance_number: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    phi: dict[str, Any] = field(default_factory=dict)
    patient_key: str | None = None


@dataclass(frozen=True)
class KnownInstance:
    """The latest *stored* instance with a SOP Instance UID, as the receiver's checks need it."""

    sha256: str | None
    spool_path: str | None
    study_uid: str | None


@dataclass(frozen=True)
class SeriesIdentity:
    """Who a series and a study belong to, as recorded (None = no such row / no key yet).

    ``series_study_uid`` is the study the series was first received in; the keys are
    :class:`storage.identity.PatientKeyer` hashes."""

    series_study_uid: str | None = None
    series_patient_key: str | None = None
    study_patient_key: str | None = None


@dataclass
class InstanceRecord:
    """One row of ``instances`` as the node needs it."""

    id: int
    sop_instance_uid: str | None
    series_uid: str | None
    sha256: str | None
    spool_path: str | None
    status: str
    meta: dict[str, Any]
    study_uid: str | None = None
    sop_class_uid: str | None = None
    instance_number: int | None = None
    transfer_syntax: str | None = None
    size: int | None = None
    series_version: int | None = None
    received_at: dt.datetime | None = None


@dataclass
class StoredInstance:
    """One 'stored' row queued by the receiver's write-behind
    (:class:`storage.recorder.InstanceRecorder`) for :meth:`Store.record_stored_batch`;
    ``received_at`` is when the instance was acknowledged, not when its row is committed."""

    assoc_id: int | None
    header: InstanceHeader
    spool_path: str
    size: int
    sha256: str | None
    received_at: dt.datetime
    #: the data set bytes, when ``sha256`` is left to :meth:`digest` (the write-behind hashes
    #: them off the sender's critical path); dropped once hashed
    data: bytes | None = field(default=None, repr=False, compare=False)

    def digest(self) -> str | None:
        """sha256 of the data set (computed from ``data`` on first use)."""
        if self.sha256 is None and self.data is not None:
            self.sha256 = hashlib.sha256(self.data).hexdigest()
            self.data = None
        return self.sha256


@dataclass
class SeriesRecord:
    """One row of ``series``. ``meta`` = header meta of the series' first stored instance."""

    uid: str
    study_uid: str
    state: SeriesState
    version: int
    reason: str | None
    instance_count: int
    first_instance_at: dt.datetime | None
    last_instance_at: dt.datetime | None
    modality: str | None = None
    description: str | None = None
    priority: int = 0
    accession_number: str | None = None
    completed_at: dt.datetime | None = None
    reported_at: dt.datetime | None = None
    delivered_at: dt.datetime | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class FindingResult:
    """One finding of a prediction: catalog key, probability in [0, 1], thresholded decision."""

    key: str
    probability: float
    decision: bool


@dataclass
class JobClaim:
    """A job handed to a worker; the worker owns it until ``lease_expires_at``."""

    id: int
    series_uid: str
    study_uid: str
    version: int
    attempts: int
    lease_expires_at: dt.datetime | None = None


@dataclass
class ExportClaim:
    """An export due for an attempt (report file + destination name from the node config)."""

    id: int
    series_uid: str
    destination: str
    report_path: str | None
    attempts: int
    study_uid: str | None = None
    version: int | None = None
    report_sop_uid: str | None = None


def _instance_record(row: Instance) -> InstanceRecord:
    return InstanceRecord(
        id=row.id,
        sop_instance_uid=row.sop_instance_uid,
        series_uid=row.series_uid,
        sha256=row.sha256,
        spool_path=row.spool_path,
        status=row.status,
        meta=dict(row.meta or {}),
        study_uid=row.study_uid,
        sop_class_uid=row.sop_class_uid,
        instance_number=row.instance_number,
        transfer_syntax=row.transfer_syntax,
        size=row.size,
        series_version=row.series_version,
        received_at=row.received_at,
    )


def _short(value: Any, n: int) -> str | None:
    if value is None:
        return None
    text = _CONTROL.sub(" ", str(value))
    return text[:n]


def _series_record(row: Series, accession: str | None = None) -> SeriesRecord:
    return SeriesRecord(
        uid=row.series_uid,
        study_uid=row.study_uid,
        state=SeriesState(row.state),
        version=row.version,
        reason=row.reason,
        instance_count=row.instance_count,
        first_instance_at=row.first_instance_at,
        last_instance_at=row.last_instance_at,
        modality=row.modality,
        description=row.description,
        priority=row.priority or 0,
        accession_number=accession,
        completed_at=row.completed_at,
        reported_at=row.reported_at,
        delivered_at=row.delivered_at,
        meta=dict(row.meta or {}),
    )
