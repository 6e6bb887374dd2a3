"""storage: spool of received instances, SQLAlchemy models, durable queue and audit queries.

The node uses exactly these names (contract: docs/architecture.md, "storage"):

- :class:`Database` — engine + sessions; ``.upgrade()`` migrates to head (call at start).
- :class:`Spool` — atomic, fsynced writes of received files.
- :class:`Store` — every queue / audit operation as one short transaction.
- :class:`InstanceRecorder` — the receiver's write-behind: 'stored' rows in group commits.
- :class:`SeriesState`, :class:`InstanceHeader`, records (:class:`InstanceRecord`,
  :class:`SeriesRecord`, :class:`JobClaim`, :class:`ExportClaim`, :class:`FindingResult`).

Audit queries behind `molre-node audit` live in :mod:`storage.queries` (also reachable as
``Store.studies/series/timeline/findings/exports/stats/prune``). Schema and example SQL:
docs/audit.md.
"""

from storage.db import Database, utcnow
from storage.recorder import InstanceRecorder
from storage.spool import Spool
from storage.store import (
    ALLOWED_TRANSITIONS,
    FINAL_STATES,
    ExportClaim,
    FindingResult,
    InstanceHeader,
    InstanceRecord,
    InvalidTransition,
    JobClaim,
    NotFound,
    SeriesRecord,
    SeriesState,
    Store,
    StoredInstance,
)

__all__ = [
    "ALLOWED_TRANSITIONS",
    "FINAL_STATES",
    "Database",
    "ExportClaim",
    "FindingResult",
    "InstanceHeader",
    "InstanceRecord",
    "InvalidTransition",
    "JobClaim",
    "InstanceRecorder",
    "NotFound",
    "SeriesRecord",
    "SeriesState",
    "Spool",
    "Store",
    "StoredInstance",
    "utcnow",
]
