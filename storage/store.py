"""`Store`: the node's durable queue and audit trail as a handful of short transactions.

Where things live: the state machine and value objects in :mod:`storage.records`, the job queue
in :mod:`storage.queue`, the outbox in :mod:`storage.outbox` (both mixed into :class:`Store`),
the audit queries in :mod:`storage.queries`; this module keeps associations, instances (the
receiver's hot path), series transitions and events.

Every public method is exactly one transaction (``Database.session()``), so the receiver, the
assembler, the worker and the dispatcher can call it from any thread or process without sharing
sessions, and a ``kill -9`` at any point leaves the database consistent: the node picks up again
with :meth:`Store.recover_on_start`.

Series state machine (each change writes one ``events`` row; illegal moves raise
:class:`InvalidTransition`)::

    receiving -> complete -> selected -> queued -> inferring -> reported -> delivered
                        \\-> skipped(reason)          |   ^         |
                                                      v   |(retry)  v
                                                     failed(reason) <-+
    any state but receiving --(late instance: version += 1, event 'reopened')--> receiving

Jobs: queued -> running -> done | failed | (queued again on retry) ; superseded when the series
is reopened before the job finished. Exports: pending -> delivered, retried forever with the
backoff the dispatcher computes (``next_attempt_at``).
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import (
    String,
    Table,
    and_,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.orm import Session

from common.jsonsafe import jsonable
from common.log import get_logger
from storage import queries
from storage.core import StoreCore, rowcount
from storage.db import Database, utcnow
from storage.models import Association, Base, Event, Instance, Job, Series, Study
from storage.notices import NoticeMixin
from storage.outbox import OutboxMixin
from storage.queue import QueueMixin, claim_statement  # noqa: F401 - re-exported

# the records are part of this module's API (``from storage.store import SeriesState`` ...)
from storage.records import (  # noqa: F401 - re-exported
    _CONTROL,
    _COUNT_COLUMN,
    ALLOWED_TRANSITIONS,
    FINAL_STATES,
    INSTANCE_STATUSES,
    ExportClaim,
    FindingResult,
    InstanceHeader,
    InstanceRecord,
    InvalidTransition,
    JobClaim,
    KnownInstance,
    NotFound,
    S,
    SeriesIdentity,
    SeriesRecord,
    SeriesState,
    StoredInstance,
    _instance_record,
    _series_record,
    _short,
)

log = get_logger("storage.store")


def default_node_name() -> str:
    """``node.name`` when the config leaves it empty: the host name (stable across restarts)."""
    return socket.gethostname() or "molre-node"


#: Columns the receiver's group commit writes (explicit, so a column added later keeps its
#: default).
_HOT_INSTANCE_COLUMNS = (
    "sop_instance_uid",
    "sop_class_uid",
    "study_uid",
    "series_uid",
    "series_version",
    "instance_number",
    "transfer_syntax",
    "spool_path",
    "size",
    "sha256",
    "status",
    "reason",
    "received_at",
    "association_id",
    "meta",
)


def _stored_values(
    h: InstanceHeader,
    series_version: int,
    assoc_id: int | None,
    received_at: dt.datetime,
    *,
    spool_path: str | Path | None,
    size: int | None,
    sha256: str | None,
) -> dict[str, Any]:
    """Bind values of one 'stored' instance row (`_HOT_INSTANCE_COLUMNS`) for the prepared
    insert of :meth:`Store.record_stored_batch`."""
    return dict(
        sop_instance_uid=h.sop_instance_uid,
        sop_class_uid=h.sop_class_uid,
        study_uid=h.study_uid,
        series_uid=h.series_uid,
        series_version=series_version,
        instance_number=h.instance_number,
        transfer_syntax=h.transfer_syntax,
        spool_path=str(spool_path) if spool_path is not None else None,
        size=size,
        sha256=sha256,
        status="stored",
        reason=None,
        received_at=received_at,
        association_id=assoc_id,
        meta=jsonable(h.meta or {}),
    )


def _table(model: type[Base]) -> Table:
    """A mapped class's table (declarative typing says ``FromClause``; ours are all tables)."""
    table = model.__table__
    if not isinstance(table, Table):
        raise TypeError(f"{model.__name__} is not mapped to a table")
    return table


class _Prepared:
    """A Core statement built once; on SQLite also compiled once and run straight on the DBAPI
    connection of the caller's transaction.

    Why: the receiver records every instance; building, cache-keying and compiling the same
    statements each time cost more CPU than SQLite needs to run them. Bind values still go
    through the columns' types (UTC datetimes, JSON), so rows are identical to ORM-written ones.
    Only explicit ``bindparam`` names are parameters; literal binds keep their compiled value.
    Other dialects (PostgreSQL) run the same pre-built statement through ``Connection.execute``,
    i.e. SQLAlchemy's normal (cached) compilation and type handling.
    """

    def __init__(self, stmt: Any, dialect: Any) -> None:
        self.stmt = stmt
        self.raw = dialect.name == "sqlite"
        if not self.raw:
            return
        compiled = stmt.compile(dialect=dialect)
        self.sql = compiled.string
        self.positional = bool(compiled.positional)
        self.names = list(compiled.positiontup or []) if self.positional else list(compiled.binds)
        self.defaults: dict[str, Any] = {}
        self.processors: dict[str, Callable[[Any], Any]] = {}
        for name, bind in compiled.binds.items():
            proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                self.processors[name] = proc
            if not bind.required:
                value = bind.effective_value
                self.defaults[name] = proc(value) if proc is not None else value

    def bind(self, values: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """DBAPI parameters for ``values`` (types' bind processors applied, defaults added)."""
        params = dict(self.defaults)
        procs = self.processors
        for name, value in values.items():
            proc = procs.get(name)
            params[name] = proc(value) if proc is not None and value is not None else value
        return tuple(params[n] for n in self.names) if self.positional else params

    def run(self, conn: Any, **values: Any) -> Any:
        """Execute on ``conn`` (inside its transaction); the result has ``fetchone()``.

        SQLite: straight on the DBAPI connection -- SQLAlchemy's per-statement execution
        context costs more than SQLite's work for these one-row statements."""
        if not self.raw:
            return conn.execute(self.stmt, values)
        return conn.connection.driver_connection.execute(self.sql, self.bind(values))

    def run_many(self, conn: Any, rows: Sequence[dict[str, Any]]) -> None:
        """The statement once per row of bind values, as one ``executemany``."""
        if not self.raw:
            conn.execute(self.stmt, list(rows))
            return
        conn.connection.driver_connection.executemany(self.sql, [self.bind(v) for v in rows])


class Store(QueueMixin, OutboxMixin, NoticeMixin, StoreCore):
    """Facade over the audit database used by every part of the node.

    ``Store(db, store_phi=False)``; ``clock`` (returns aware UTC) exists for tests that need to
    move time (lease expiry, quiet time) without sleeping.
    """

    def __init__(
        self,
        db: Database,
        store_phi: bool = False,
        clock: Callable[[], dt.datetime] | None = None,
        *,
        node: str | None = None,
    ) -> None:
        self.db = db
        self.store_phi = bool(store_phi)
        #: ``node.name``: recorded on the associations, jobs and export claims this process
        #: owns; recovery at start touches only those (several nodes may share one database)
        self.node = node or default_node_name()
        self._clock = clock or utcnow
        self._prepared_hot: dict[str, _Prepared] | None = None
        self._completion_barrier: Callable[[], bool] | None = None
        self._lookup: Any = None  # DBAPI connection of stored_digest (SQLite file databases)
        self._lookup_lock = threading.Lock()

    def set_completion_barrier(self, barrier: Callable[[], bool] | None) -> None:
        """Register what :meth:`series_due_for_completion` must call first: the receiver's
        write-behind flush (True = every row queued so far is committed).

        Why: the receiver answers Success once the file is durable and commits the row a few
        milliseconds later; a series must not complete (by quiet time or release) while rows of
        instances that were already acknowledged are still queued."""
        self._completion_barrier = barrier

    def _hot(self) -> dict[str, _Prepared]:
        """The receiver's per-instance statements, compiled once (see :class:`_Prepared`)."""
        if self._prepared_hot is None:
            series_t, inst_t, assoc_t = (_table(Series), _table(Instance), _table(Association))
            already = (
                select(inst_t.c.id)
                .where(
                    inst_t.c.series_uid == bindparam("b_series"),
                    inst_t.c.sop_instance_uid == bindparam("b_sop"),
                    inst_t.c.status == "stored",
                )
                .exists()
            )
            bump = (
                update(series_t)
                .where(
                    series_t.c.series_uid == bindparam("b_series"),
                    series_t.c.state == S.RECEIVING.value,
                )
                .values(
                    instance_count=series_t.c.instance_count + case((already, 0), else_=1),
                    last_instance_at=bindparam("b_now", type_=series_t.c.last_instance_at.type),
                    first_instance_at=func.coalesce(
                        series_t.c.first_instance_at,
                        bindparam("b_now", type_=series_t.c.first_instance_at.type),
                    ),
                    patient_key=func.coalesce(
                        series_t.c.patient_key,
                        bindparam("b_key", type_=series_t.c.patient_key.type),
                    ),
                )
                .returning(series_t.c.version)
            )
            cols = [inst_t.c[name] for name in _HOT_INSTANCE_COLUMNS]
            add_many = insert(inst_t).values({c: bindparam(c.name, type_=c.type) for c in cols})
            count = (
                update(assoc_t)
                .where(assoc_t.c.id == bindparam("b_assoc"))
                .values(n_stored=assoc_t.c.n_stored + bindparam("b_n", 1))
            )
            find = (
                select(inst_t.c.sha256, inst_t.c.spool_path, inst_t.c.study_uid)
                .where(inst_t.c.sop_instance_uid == bindparam("b_sop"), inst_t.c.status == "stored")
                .order_by(inst_t.c.id.desc())
                .limit(1)
            )
            study_t = _table(Study)
            # who the series and the study belong to, in one round trip
            identity = union_all(
                select(literal(1).label("k"), series_t.c.study_uid, series_t.c.patient_key).where(
                    series_t.c.series_uid == bindparam("b_series")
                ),
                select(literal(2).label("k"), study_t.c.study_uid, study_t.c.patient_key).where(
                    study_t.c.study_uid == bindparam("b_study")
                ),
            )
            d = self.db.engine.dialect
            self._prepared_hot = {
                "bump": _Prepared(bump, d),
                "add_many": _Prepared(add_many, d),
                "count": _Prepared(count, d),
                "find": _Prepared(find, d),
                "identity": _Prepared(identity, d),
            }
        return self._prepared_hot

    def _insert_ignore(self, s: Session, model, **values) -> bool:
        """INSERT … ON CONFLICT DO NOTHING, so two receivers creating one study never collide.

        Returns True when the row was created by this call: decided by ``RETURNING`` (a row
        comes back only for an insert that happened), not by ``rowcount``, which psycopg
        reports as -1 for this statement through the ORM session."""
        dialect = pg_dialect if self.db.dialect == "postgresql" else sqlite_dialect
        stmt = (
            dialect.insert(model)
            .values(**values)
            .on_conflict_do_nothing()
            .returning(model.__table__.c.id)
        )
        return s.execute(stmt).first() is not None

    # -- associations --------------------------------------------------------------------------
    def begin_association(
        self,
        calling_ae: str | None,
        called_ae: str | None,
        peer_host: str | None,
        peer_port: int | None,
    ) -> int:
        """Record an accepted association; returns its id for record_instance/end_association."""
        return self._new_association(calling_ae, called_ae, peer_host, peer_port, "open")

    def end_association(self, assoc_id: int, outcome: str) -> None:
        """Close an association ('released' | 'aborted'); a release lets series complete early."""
        if outcome not in ("released", "aborted"):
            raise ValueError(
                f"association outcome must be 'released' or 'aborted', not {outcome!r}"
            )
        now = self.now()
        with self.db.session() as s:
            row = s.get(Association, assoc_id)
            if row is None:
                raise NotFound(f"association {assoc_id} is not in the audit database")
            previous = row.outcome
            row.outcome = outcome
            row.ended_at = now
            self._event(
                s,
                "association",
                row.id,
                outcome,
                at=now,
                from_state=previous,
                to_state=outcome,
                details={
                    "stored": row.n_stored,
                    "duplicate": row.n_duplicate,
                    "ignored": row.n_ignored,
                    "failed": row.n_failed,
                },
            )

    def record_rejected_association(
        self,
        calling_ae: str | None,
        called_ae: str | None,
        peer_host: str | None,
        peer_port: int | None,
        reason: str,
    ) -> int:
        """Record an association the node refused (AE not allowed, disk full, ...)."""
        return self._new_association(
            calling_ae, called_ae, peer_host, peer_port, "rejected", reason
        )

    def _new_association(
        self,
        calling_ae: str | None,
        called_ae: str | None,
        peer_host: str | None,
        peer_port: int | None,
        outcome: str,
        reason: str | None = None,
    ) -> int:
        """One association row ('open', or 'rejected' with its reason) and its event."""
        now = self.now()
        with self.db.session() as s:
            row = Association(
                calling_ae=calling_ae,
                called_ae=called_ae,
                peer_host=peer_host,
                peer_port=peer_port,
                started_at=now,
                ended_at=now if outcome == "rejected" else None,
                outcome=outcome,
                reject_reason=reason,
                node=self.node,
            )
            s.add(row)
            s.flush()
            details: dict[str, Any] = {
                "calling_ae": calling_ae,
                "called_ae": called_ae,
                "peer": f"{peer_host}:{peer_port}",
            }
            if reason is not None:
                details["reason"] = reason
            self._event(
                s,
                "association",
                row.id,
                "opened" if outcome == "open" else outcome,
                at=now,
                to_state=outcome,
                details=details,
            )
            return row.id

    # -- instances -----------------------------------------------------------------------------
    def find_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The latest *stored* instance with this SOP Instance UID (duplicate/conflict check).

        Core query on a plain connection: the receiver asks this for every instance."""
        t = Instance.__table__
        with self.db.connection(write=False) as c:
            row = c.execute(
                select(t)
                .where(t.c.sop_instance_uid == sop_instance_uid, t.c.status == "stored")
                .order_by(t.c.id.desc())
                .limit(1)
            ).first()
        if row is None:
            return None
        m = row._mapping
        return InstanceRecord(
            id=m["id"],
            sop_instance_uid=m["sop_instance_uid"],
            series_uid=m["series_uid"],
            sha256=m["sha256"],
            spool_path=m["spool_path"],
            status=m["status"],
            meta=dict(m["meta"] or {}),
            study_uid=m["study_uid"],
            sop_class_uid=m["sop_class_uid"],
            instance_number=m["instance_number"],
            transfer_syntax=m["transfer_syntax"],
            size=m["size"],
            series_version=m["series_version"],
            received_at=m["received_at"],
        )

    def _lookup_rows(self, name: str, **binds: Any) -> list[tuple[Any, ...]]:
        """Rows of one of the receiver's prepared lookups (it runs them for every instance)."""
        stmt = self._hot()[name]
        if stmt.raw and not self.db.in_memory:
            # one autocommit read on a connection kept for it: no pool checkout, no BEGIN/COMMIT
            with self._lookup_lock:
                if self._lookup is None:
                    self._lookup = self.db.engine.raw_connection()
                return list(
                    self._lookup.driver_connection.execute(stmt.sql, stmt.bind(binds)).fetchall()
                )
        with self.db.connection(write=False) as c:
            return [tuple(r) for r in stmt.run(c, **binds).fetchall()]

    def known_instance(self, sop_instance_uid: str) -> KnownInstance | None:
        """sha256, spool path and study of the latest stored instance with this SOP UID, or
        None: :meth:`find_instance` reduced to what the receiver's checks need."""
        rows = self._lookup_rows("find", b_sop=sop_instance_uid)
        return KnownInstance(rows[0][0], rows[0][1], rows[0][2]) if rows else None

    def stored_digest(self, sop_instance_uid: str) -> tuple[str | None, str | None] | None:
        """(sha256, spool_path) of the latest stored instance with this SOP UID, or None."""
        known = self.known_instance(sop_instance_uid)
        return (known.sha256, known.spool_path) if known is not None else None

    def series_identity(self, series_uid: str | None, study_uid: str | None) -> SeriesIdentity:
        """The study and patient key recorded for a series, and the study's patient key."""
        series_study = series_key = study_key = None
        for k, study, key in self._lookup_rows(
            "identity", b_series=series_uid or "", b_study=study_uid or ""
        ):
            if k == 1:
                series_study, series_key = study, key
            else:
                study_key = key
        return SeriesIdentity(series_study, series_key, study_key)

    def indexed_spool_paths(self, paths: Iterable[str]) -> set[str]:
        """Which of ``paths`` some instance row points at (any status); start-up reconciliation
        re-indexes the spool files that are not."""
        found: set[str] = set()
        wanted = list(dict.fromkeys(str(p) for p in paths))
        with self.db.session(write=False) as s:
            for i in range(0, len(wanted), 500):
                found.update(
                    p
                    for p in s.execute(
                        select(Instance.spool_path).where(
                            Instance.spool_path.in_(wanted[i : i + 500])
                        )
                    ).scalars()
                    if p is not None
                )
        return found

    def last_prune_cutoff(self) -> dt.datetime | None:
        """The cutoff of the latest ``molre-node audit prune`` (None = never pruned).

        Spool files older than it that have no row are prune leftovers (rows deleted, crash
        before the file was), not rows lost to a power cut; reconciliation must not revive them.
        """
        with self.db.session(write=False) as s:
            details = s.execute(
                select(Event.details)
                .where(Event.entity == "node", Event.kind == "pruned")
                .order_by(Event.id.desc())
                .limit(1)
            ).scalar_one_or_none()
        cutoff = (details or {}).get("cutoff")
        if not cutoff:
            return None
        value = dt.datetime.fromisoformat(str(cutoff))
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)

    def record_instance(
        self,
        assoc_id: int | None,
        header: InstanceHeader,
        *,
        spool_path: str | Path | None,
        size: int | None,
        sha256: str | None,
        status: str,
        reason: str | None = None,
        event_kind: str | None = None,
        details: dict | None = None,
    ) -> InstanceRecord:
        """Record one received instance, whatever its fate, in one transaction.

        For ``status='stored'`` the study and series rows are created or updated (series in
        'receiving', ``last_instance_at``, ``instance_count`` counting distinct SOP UIDs); a
        series that had moved past 'receiving' is reopened as a new report version
        (``version += 1``, event 'reopened', queued jobs of the old version superseded).
        Other statuses only add the instance row (+ an event: kind ``event_kind``, default the
        status, with ``details`` added) and the association count.
        """
        if status not in INSTANCE_STATUSES:
            raise ValueError(f"instance status must be one of {INSTANCE_STATUSES}, not {status!r}")
        now = self.now()
        with self.db.session() as s:
            return _instance_record(
                self._record_orm(
                    s,
                    assoc_id,
                    header,
                    now,
                    spool_path=spool_path,
                    size=size,
                    sha256=sha256,
                    status=status,
                    reason=reason,
                    event_kind=event_kind,
                    details=details,
                )
            )

    def record_duplicate(
        self,
        assoc_id: int | None,
        header: InstanceHeader,
        *,
        sha256: str,
        size: int | None,
        reason: str,
    ) -> InstanceRecord | None:
        """Record a byte-identical resend -- if a stored row with this SOP UID and ``sha256``
        still exists; None (nothing written) when it is gone.

        Why in one transaction: the receiver found the stored row a moment ago, but
        ``audit prune`` (another process, maybe) may have removed it and be deleting its file.
        Checked under the write lock, either the row is still there -- and prune, which
        re-checks under the same lock, now sees a row newer than its cutoff and keeps the
        series -- or it is gone and the caller stores the resend as a new instance."""
        now = self.now()
        t = Instance.__table__
        with self.db.session() as s:
            path = s.execute(
                select(t.c.spool_path)
                .where(
                    t.c.sop_instance_uid == header.sop_instance_uid,
                    t.c.status == "stored",
                    t.c.sha256 == sha256,
                )
                .order_by(t.c.id.desc())
                .limit(1)
            ).scalar_one_or_none()
            if path is None or not Path(path).exists():
                return None
            return _instance_record(
                self._record_orm(
                    s,
                    assoc_id,
                    header,
                    now,
                    spool_path=path,
                    size=size,
                    sha256=sha256,
                    status="duplicate",
                    reason=reason,
                )
            )

    def _record_orm(
        self,
        s: Session,
        assoc_id: int | None,
        header: InstanceHeader,
        now: dt.datetime,
        *,
        spool_path: str | Path | None,
        size: int | None,
        sha256: str | None,
        status: str,
        reason: str | None,
        event_kind: str | None = None,
        details: dict | None = None,
    ) -> Instance:
        """:meth:`record_instance`'s general path inside the caller's session (flushed)."""
        series_version = None
        if status == "stored" and header.series_uid and header.study_uid:
            series_version = self._touch_series(s, header, now)
        row = Instance(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            study_uid=header.study_uid,
            series_uid=header.series_uid,
            series_version=series_version,
            instance_number=header.instance_number,
            transfer_syntax=header.transfer_syntax,
            spool_path=str(spool_path) if spool_path is not None else None,
            size=size,
            sha256=sha256,
            status=status,
            reason=_short(reason, 2000),
            received_at=now,
            association_id=assoc_id,
            meta=jsonable(header.meta or {}),
        )
        s.add(row)
        if assoc_id is not None:
            column = getattr(Association, _COUNT_COLUMN[status])
            s.execute(
                update(Association).where(Association.id == assoc_id).values({column: column + 1})
            )
        s.flush()
        if status != "stored":
            self._event(
                s,
                "instance",
                header.sop_instance_uid or f"#{row.id}",
                event_kind or status,
                at=now,
                to_state=status,
                study_uid=header.study_uid,
                series_uid=header.series_uid,
                details={
                    "reason": reason,
                    "association_id": assoc_id,
                    "instance_id": row.id,
                    **(details or {}),
                },
            )
            s.flush()
        return row

    def record_stored_batch(self, rows: Sequence[StoredInstance]) -> None:
        """Record 'stored' instances, in order, in one transaction (a group commit): the same
        rows, series effects and association counters as :meth:`record_instance` per row.

        Why: the receiver's write-behind commits whatever queued up while the previous commit
        ran; per row this is one series bump, the inserts go as one ``executemany`` and each
        association's counter is bumped once. A row whose series is new or must be reopened
        takes the ORM path inside the same transaction."""
        if not rows:
            return
        for r in rows:
            r.digest()  # deferred hashes: before the transaction, not while holding the lock
        hot = self._hot()
        with self.db.connection() as c:
            inserts: list[dict[str, Any]] = []
            queued: set[tuple[str | None, str | None]] = set()
            counts: dict[int, int] = {}

            def insert_queued() -> None:  # before anything that must see those rows
                if inserts:
                    hot["add_many"].run_many(c, inserts)
                    inserts.clear()
                    queued.clear()

            for r in rows:
                h = r.header
                key = (h.series_uid, h.sop_instance_uid)
                if key in queued:  # the bump's "already stored" check must see the first one
                    insert_queued()
                version = None
                if h.series_uid and h.study_uid:
                    got = (
                        hot["bump"]
                        .run(
                            c,
                            b_series=h.series_uid,
                            b_sop=h.sop_instance_uid,
                            b_now=r.received_at,
                            b_key=h.patient_key,
                        )
                        .fetchone()
                    )
                    version = got[0] if got is not None else None
                if version is None:  # new or reopened series: the general path, same transaction
                    insert_queued()
                    with Session(bind=c, join_transaction_mode="rollback_only") as s:
                        self._record_orm(
                            s,
                            r.assoc_id,
                            h,
                            r.received_at,
                            spool_path=r.spool_path,
                            size=r.size,
                            sha256=r.digest(),
                            status="stored",
                            reason=None,
                        )
                    continue
                inserts.append(
                    _stored_values(
                        h,
                        version,
                        r.assoc_id,
                        r.received_at,
                        spool_path=r.spool_path,
                        size=r.size,
                        sha256=r.digest(),
                    )
                )
                queued.add(key)
                if r.assoc_id is not None:
                    counts[r.assoc_id] = counts.get(r.assoc_id, 0) + 1
            insert_queued()
            for assoc_id, n in counts.items():
                hot["count"].run(c, b_assoc=assoc_id, b_n=n)

    def _touch_series(self, s: Session, h: InstanceHeader, now: dt.datetime) -> int:
        """Create/update study + series for a stored instance; returns the series version."""
        series_uid = h.series_uid
        if not series_uid:  # the callers record such an instance without a series
            raise ValueError("an instance without a Series Instance UID has no series row")
        meta = h.meta or {}
        series = s.execute(
            select(Series).where(Series.series_uid == series_uid).with_for_update()
        ).scalar_one_or_none()
        if series is None:  # first instance of this series: create study + series rows
            study_values: dict[str, Any] = {
                "study_uid": h.study_uid,
                "accession_number": h.accession_number,
                "study_date": _short(meta.get("StudyDate"), 8),
                "study_description": _short(meta.get("StudyDescription"), 255),
                "created_at": now,
            }
            if h.patient_key:
                study_values["patient_key"] = h.patient_key
            if self.store_phi and h.phi:
                study_values.update(
                    patient_name=_short(h.phi.get("PatientName"), 255),
                    patient_id=_short(h.phi.get("PatientID"), 64),
                    patient_birth_date=_short(h.phi.get("PatientBirthDate"), 8),
                )
            self._insert_ignore(s, Study, **study_values)
            if h.accession_number:
                s.execute(
                    update(Study)
                    .where(Study.study_uid == h.study_uid, Study.accession_number.is_(None))
                    .values(accession_number=h.accession_number)
                )
            if h.patient_key:  # a study row from before revision 0004 gets its key now
                s.execute(
                    update(Study)
                    .where(Study.study_uid == h.study_uid, Study.patient_key.is_(None))
                    .values(patient_key=h.patient_key)
                )
            created = self._insert_ignore(
                s,
                Series,
                series_uid=h.series_uid,
                study_uid=h.study_uid,
                modality=h.modality,
                description=_short(meta.get("SeriesDescription"), 255),
                state=S.RECEIVING.value,
                version=1,
                instance_count=0,
                first_instance_at=now,
                last_instance_at=now,
                created_at=now,
                updated_at=now,
                meta=jsonable(meta),
                priority=0,
                patient_key=h.patient_key,
            )
            series = self._lock_series(s, series_uid)
            if created:
                self._event(
                    s,
                    "series",
                    series.series_uid,
                    "created",
                    at=now,
                    to_state=S.RECEIVING.value,
                    study_uid=series.study_uid,
                    series_uid=series.series_uid,
                    details={"version": 1},
                )
        if series.state != S.RECEIVING.value:
            previous = series.state
            series.version += 1
            series.state = S.RECEIVING.value
            series.reason = None
            series.completed_at = series.reported_at = series.delivered_at = None
            series.updated_at = now
            superseded = rowcount(
                s.execute(
                    update(Job)
                    .where(
                        Job.series_uid == series.series_uid, Job.state.in_(("queued", "running"))
                    )
                    .values(
                        state="superseded",
                        finished_at=now,
                        error=f"series reopened as version {series.version}",
                    )
                )
            )
            self._event(
                s,
                "series",
                series.series_uid,
                "reopened",
                at=now,
                from_state=previous,
                to_state=S.RECEIVING.value,
                study_uid=series.study_uid,
                series_uid=series.series_uid,
                details={
                    "version": series.version,
                    "sop_instance_uid": h.sop_instance_uid,
                    "jobs_superseded": superseded,
                },
            )
        if series.patient_key is None and h.patient_key:
            series.patient_key = h.patient_key  # a series from before revision 0004
        new_sop = True
        if h.sop_instance_uid:
            new_sop = (
                s.execute(
                    select(Instance.id)
                    .where(
                        Instance.series_uid == series.series_uid,
                        Instance.sop_instance_uid == h.sop_instance_uid,
                        Instance.status == "stored",
                    )
                    .limit(1)
                ).first()
                is None
            )
        if new_sop:
            series.instance_count += 1
        series.last_instance_at = now
        if series.first_instance_at is None:
            series.first_instance_at = now
        return series.version

    def series_instances(self, series_uid: str) -> list[InstanceRecord]:
        """Stored instances of a series (latest row per SOP UID), by instance number then id."""
        with self.db.session(write=False) as s:
            latest = (
                select(func.max(Instance.id))
                .where(Instance.series_uid == series_uid, Instance.status == "stored")
                .group_by(func.coalesce(Instance.sop_instance_uid, cast(Instance.id, String)))
            )
            rows = (
                s.execute(
                    select(Instance)
                    .where(Instance.id.in_(latest))
                    .order_by(Instance.instance_number, Instance.id)
                )
                .scalars()
                .all()
            )
            return [_instance_record(r) for r in rows]

    # -- series --------------------------------------------------------------------------------
    def get_series(self, series_uid: str) -> SeriesRecord:
        """The series row; raises NotFound when the UID is unknown."""
        with self.db.session(write=False) as s:
            row = s.execute(
                select(Series, Study.accession_number)
                .join(Study, Study.study_uid == Series.study_uid)
                .where(Series.series_uid == series_uid)
            ).first()
            if row is None:
                raise NotFound(f"series {series_uid} is not in the audit database")
            return _series_record(row[0], row[1])

    def series_in_state(self, state: SeriesState | str) -> list[str]:
        """UIDs of series in one state (e.g. 'complete' ones to re-decide after a restart)."""
        with self.db.session(write=False) as s:
            return list(
                s.execute(
                    select(Series.series_uid)
                    .where(Series.state == SeriesState(state).value)
                    .order_by(Series.id)
                ).scalars()
            )

    def transition(
        self,
        series_uid: str,
        to_state: SeriesState | str,
        reason: str | None = None,
        details: dict | None = None,
    ) -> None:
        """Move a series to ``to_state`` (checked against ALLOWED_TRANSITIONS; writes an event)."""
        now = self.now()
        with self.db.session() as s:
            series = self._lock_series(s, series_uid)
            self._move(s, series, SeriesState(to_state), at=now, reason=reason, details=details)

    def series_due_for_completion(
        self, quiet_s: float, release_grace_s: float, now: dt.datetime | None = None
    ) -> list[str]:
        """Series in 'receiving' that can be considered complete.

        Either no instance arrived for ``quiet_s`` seconds, or every association that carried an
        instance of the current version was *released* (not aborted) more than
        ``release_grace_s`` ago — a sender that releases has said it is done.
        """
        barrier = self._completion_barrier
        if barrier is not None and not barrier():
            log.warning("instance rows still queued; series completion deferred")
            return []
        now = now or self.now()
        quiet_cutoff = now - dt.timedelta(seconds=quiet_s)
        grace_cutoff = now - dt.timedelta(seconds=release_grace_s)
        with self.db.session(write=False) as s:
            quiet = set(
                s.execute(
                    select(Series.series_uid).where(
                        Series.state == S.RECEIVING.value, Series.last_instance_at <= quiet_cutoff
                    )
                ).scalars()
            )
            released_ok = func.sum(
                case(
                    (
                        and_(
                            Association.outcome == "released", Association.ended_at <= grace_cutoff
                        ),
                        1,
                    ),
                    else_=0,
                )
            )
            released = set(
                s.execute(
                    select(Series.series_uid)
                    .join(
                        Instance,
                        and_(
                            Instance.series_uid == Series.series_uid,
                            Instance.series_version == Series.version,
                            Instance.status == "stored",
                        ),
                    )
                    .join(Association, Association.id == Instance.association_id)
                    .where(Series.state == S.RECEIVING.value)
                    .group_by(Series.series_uid)
                    .having(released_ok == func.count(Instance.id))
                ).scalars()
            )
            due = quiet | released
            order = s.execute(
                select(Series.series_uid)
                .where(Series.series_uid.in_(due))
                .order_by(Series.last_instance_at)
            ).scalars()
            return list(order)

    # -- events --------------------------------------------------------------------------------
    def log_event(
        self,
        entity: str,
        entity_id: Any,
        kind: str,
        details: dict | None = None,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
    ) -> None:
        """Append a free-form event (node start/stop, config reload, operator action...)."""
        now = self.now()
        with self.db.session() as s:
            if entity == "series" and series_uid is None:
                series_uid = str(entity_id)
            self._event(
                s,
                entity,
                entity_id,
                kind,
                at=now,
                study_uid=study_uid,
                series_uid=series_uid,
                details=details,
            )

    # -- several nodes ---------------------------------------------------------------------------
    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """``with store.exclusive("assembler") as mine:`` -- True for exactly one holder at a
        time across every node on the database (PostgreSQL: a session-level advisory lock on a
        connection kept for the block, released at its end or when the holder dies); SQLite
        (one node): always True. A False holder skips its pass; another node does it."""
        if self.db.dialect != "postgresql":
            yield True
            return
        key = zlib.crc32(f"molre:{name}".encode())
        with self.db.engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.rollback()
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    conn.commit()

    # -- audit queries (storage.queries does the work) -----------------------------------------
    def _read(self, query: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run one :mod:`storage.queries` function in a read-only session."""
        with self.db.session(write=False) as s:
            return query(s, *args, **kw)

    def studies(self, **kw: Any) -> list[dict[str, Any]]:
        """See :func:`storage.queries.studies`."""
        return self._read(queries.studies, **kw)

    def series(self, **kw: Any) -> list[dict[str, Any]]:
        """See :func:`storage.queries.series`."""
        return self._read(queries.series, **kw)

    def timeline(self, uid: str) -> list[dict[str, Any]]:
        """See :func:`storage.queries.timeline`."""
        return self._read(queries.timeline, uid)

    def events(self, **kw: Any) -> list[dict[str, Any]]:
        """See :func:`storage.queries.events`."""
        return self._read(queries.events, **kw)

    def findings(self, **kw: Any) -> list[dict[str, Any]]:
        """See :func:`storage.queries.findings`."""
        return self._read(queries.findings, **kw)

    def exports(self, **kw: Any) -> list[dict[str, Any]]:
        """See :func:`storage.queries.exports`."""
        return self._read(queries.exports, **kw)

    def stats(self) -> dict[str, Any]:
        """See :func:`storage.queries.stats`."""
        return self._read(queries.stats)

    def prune(
        self,
        older_than: dt.timedelta,
        *,
        dry_run: bool = False,
        spool: Any = None,
        now: dt.datetime | None = None,
    ) -> queries.PruneReport:
        """See :func:`storage.queries.prune`."""
        return queries.prune(self, older_than, dry_run=dry_run, spool=spool, now=now or self.now())
