"""Audit queries behind ``molre-node audit`` (read-only, except :func:`prune`).

Each function takes an open session and returns plain dicts (JSON-able after the CLI turns
datetimes into ISO strings), so the CLI can print them as a table, JSON or CSV without knowing
the ORM. PHI columns are left out unless ``include_phi`` is asked for.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, delete, func, or_, select
from sqlalchemy.orm import Session

from common.log import get_logger
from storage.models import (
    Association,
    Event,
    Export,
    Instance,
    Job,
    Notification,
    Result,
    Series,
    ShadowResult,
    Study,
)
from storage.records import FINAL_STATES, NotFound, SeriesState

if TYPE_CHECKING:
    from storage.spool import Spool
    from storage.store import Store

log = get_logger("storage.queries")

_CHUNK = 500


def _chunks(items: Sequence[Any], n: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# -- listings ---------------------------------------------------------------------------------
def studies(
    s: Session,
    *,
    since: dt.datetime | None = None,
    accession: str | None = None,
    limit: int | None = 100,
    include_phi: bool = False,
) -> list[dict[str, Any]]:
    """Studies, newest first, with their series count and the states of those series."""
    q = (
        select(Study, func.count(Series.id), func.max(Series.updated_at))
        .outerjoin(Series, Series.study_uid == Study.study_uid)
        .group_by(Study.id)
        .order_by(Study.created_at.desc(), Study.id.desc())
    )
    if since is not None:
        q = q.where(Study.created_at >= since)
    if accession is not None:
        q = q.where(Study.accession_number == accession)
    if limit:
        q = q.limit(limit)
    rows = s.execute(q).all()
    states: dict[str, dict[str, int]] = {}
    uids = [r[0].study_uid for r in rows]
    for chunk in _chunks(uids):
        for study_uid, state, n in s.execute(
            select(Series.study_uid, Series.state, func.count())
            .where(Series.study_uid.in_(chunk))
            .group_by(Series.study_uid, Series.state)
        ):
            states.setdefault(study_uid, {})[state] = n
    out = []
    for study, n_series, last_activity in rows:
        row = {
            "study_uid": study.study_uid,
            "accession_number": study.accession_number,
            "study_date": study.study_date,
            "description": study.study_description,
            "series": n_series,
            "states": " ".join(
                f"{k}:{v}" for k, v in sorted(states.get(study.study_uid, {}).items())
            ),
            "first_seen": study.created_at,
            "last_activity": last_activity,
        }
        if include_phi:
            row.update(
                patient_name=study.patient_name,
                patient_id=study.patient_id,
                patient_birth_date=study.patient_birth_date,
            )
        out.append(row)
    return out


def series(
    s: Session,
    *,
    state: str | None = None,
    study_uid: str | None = None,
    since: dt.datetime | None = None,
    limit: int | None = 100,
) -> list[dict[str, Any]]:
    """Series, most recently active first, optionally one state or one study."""
    q = (
        select(Series, Study.accession_number)
        .join(Study, Study.study_uid == Series.study_uid)
        .order_by(Series.updated_at.desc(), Series.id.desc())
    )
    if state is not None:
        q = q.where(Series.state == SeriesState(state).value)
    if study_uid is not None:
        q = q.where(Series.study_uid == study_uid)
    if since is not None:
        q = q.where(Series.last_instance_at >= since)
    if limit:
        q = q.limit(limit)
    return [
        {
            "series_uid": r.series_uid,
            "study_uid": r.study_uid,
            "accession_number": acc,
            "modality": r.modality,
            "description": r.description,
            "state": r.state,
            "version": r.version,
            "reason": r.reason,
            "instances": r.instance_count,
            "priority": r.priority,
            "first_instance_at": r.first_instance_at,
            "last_instance_at": r.last_instance_at,
            "reported_at": r.reported_at,
            "delivered_at": r.delivered_at,
            "updated_at": r.updated_at,
        }
        for r, acc in s.execute(q).all()
    ]


def timeline(s: Session, uid: str) -> list[dict[str, Any]]:
    """Every event of a study or series (or accession number), oldest first.

    Includes the open/release events of the associations that carried its instances, so the
    timeline starts where the PACS connected.
    """
    study_hit = s.execute(select(Study.study_uid).where(Study.study_uid == uid)).first()
    series_hit = s.execute(select(Series.series_uid).where(Series.series_uid == uid)).first()
    if study_hit is None and series_hit is None:
        acc = s.execute(select(Study.study_uid).where(Study.accession_number == uid)).first()
        if acc is not None:
            uid = acc[0]
    carried = (
        select(Instance.association_id)
        .where(
            or_(Instance.study_uid == uid, Instance.series_uid == uid),
            Instance.association_id.is_not(None),
        )
        .distinct()
    )
    assoc_ids = [str(a) for a in s.execute(carried).scalars()]
    cond = or_(
        Event.study_uid == uid,
        Event.series_uid == uid,
        and_(Event.entity.in_(("series", "study", "instance")), Event.entity_id == uid),
    )
    if assoc_ids:
        cond = or_(cond, and_(Event.entity == "association", Event.entity_id.in_(assoc_ids)))
    rows = s.execute(select(Event).where(cond).order_by(Event.at, Event.id)).scalars().all()
    if not rows:
        raise NotFound(f"no study, series or accession number {uid!r} in the audit database")
    return [_event_row(e) for e in rows]


def _event_row(e: Event) -> dict[str, Any]:
    return {
        "at": e.at,
        "entity": e.entity,
        "entity_id": e.entity_id,
        "kind": e.kind,
        "from_state": e.from_state,
        "to_state": e.to_state,
        "series_uid": e.series_uid,
        "details": e.details or {},
    }


def events(
    s: Session,
    *,
    entity: str | None = None,
    kind: str | None = None,
    since: dt.datetime | None = None,
    limit: int | None = 100,
) -> list[dict[str, Any]]:
    """Audit events across the node, newest first, filtered by entity ('node', 'association',
    'export', ...), kind ('process_died', 'rejected', 'reclaimed', ...) and time -- the events
    that belong to no single study (start-up recovery, receiver processes, refused associations)
    are found here."""
    q = select(Event).order_by(Event.at.desc(), Event.id.desc())
    if entity:
        q = q.where(Event.entity == entity)
    if kind:
        q = q.where(Event.kind == kind)
    if since is not None:
        q = q.where(Event.at >= since)
    if limit:
        q = q.limit(limit)
    return [_event_row(e) for e in s.execute(q).scalars()]


def findings(
    s: Session,
    *,
    key: str | None = None,
    min_prob: float | None = None,
    since: dt.datetime | None = None,
    positive_only: bool = False,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Per-finding results, newest first: which series had finding ``key`` at >= ``min_prob``."""
    q = (
        select(Result, Series.study_uid, Study.accession_number)
        .join(Series, Series.series_uid == Result.series_uid)
        .join(Study, Study.study_uid == Series.study_uid)
        .order_by(Result.created_at.desc(), Result.id.desc())
    )
    if key is not None:
        q = q.where(Result.finding_key == key)
    if min_prob is not None:
        q = q.where(Result.probability >= float(min_prob))
    if since is not None:
        q = q.where(Result.created_at >= since)
    if positive_only:
        q = q.where(Result.decision.is_(True))
    if limit:
        q = q.limit(limit)
    return [
        {
            "at": r.created_at,
            "study_uid": study_uid,
            "accession_number": acc,
            "series_uid": r.series_uid,
            "version": r.series_version,
            "finding": r.finding_key,
            "probability": round(r.probability, 6),
            "decision": bool(r.decision),
            "model": r.model_name,
            "checkpoint_hash": r.checkpoint_hash,
        }
        for r, study_uid, acc in s.execute(q).all()
    ]


def exports(
    s: Session, *, pending: bool = False, failed: bool = False, limit: int | None = None
) -> list[dict[str, Any]]:
    """The outbox. ``pending``: not delivered yet; ``failed``: not delivered and the last
    attempt failed (exports are never dropped, so "failed" means "still retrying")."""
    q = (
        select(Export, Series.study_uid)
        .join(Series, Series.series_uid == Export.series_uid)
        .order_by(Export.created_at.desc(), Export.id.desc())
    )
    if pending or failed:
        q = q.where(Export.state == "pending")
    if failed:
        q = q.where(Export.attempts > 0, Export.last_error.is_not(None))
    if limit:
        q = q.limit(limit)
    return [
        {
            "id": e.id,
            "series_uid": e.series_uid,
            "study_uid": study_uid,
            "version": e.series_version,
            "destination": e.destination,
            "state": e.state,
            "attempts": e.attempts,
            "last_status": e.last_status,
            "last_error": e.last_error,
            "next_attempt_at": e.next_attempt_at,
            "delivered_at": e.delivered_at,
            "report_sop_uid": e.report_sop_uid,
            "report_path": e.report_path,
            "created_at": e.created_at,
        }
        for e, study_uid in s.execute(q).all()
    ]


# -- stats ------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no data."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _latency(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        **{
            f"p{q}_s": (None if (v := percentile(values, q)) is None else round(v, 3))
            for q in (50, 90, 99)
        },
    }


def stats(s: Session) -> dict[str, Any]:
    """Counts per state and latency percentiles (seconds).

    received = the series' last instance (of its current version); reported = SR written;
    delivered = every export of that version acknowledged by its destination.
    """

    def counts(col) -> dict[str, int]:
        return {k: n for k, n in s.execute(select(col, func.count()).group_by(col)).all()}

    out: dict[str, Any] = {
        "series": counts(Series.state),
        "jobs": counts(Job.state),
        "exports": counts(Export.state),
        "instances": counts(Instance.status),
        "associations": counts(Association.outcome),
        "studies": s.execute(select(func.count()).select_from(Study)).scalar_one(),
    }
    rr, rd, rdl = [], [], []
    for last, reported, delivered in s.execute(
        select(Series.last_instance_at, Series.reported_at, Series.delivered_at).where(
            Series.reported_at.is_not(None)
        )
    ):
        if reported is None:  # excluded by the query; narrows the type
            continue
        if last is not None:
            rr.append((reported - last).total_seconds())
        if delivered is not None:
            rd.append((delivered - reported).total_seconds())
            if last is not None:
                rdl.append((delivered - last).total_seconds())
    out["latency"] = {
        "received_to_reported": _latency(rr),
        "reported_to_delivered": _latency(rd),
        "received_to_delivered": _latency(rdl),
    }
    return out


# -- prune ------------------------------------------------------------------------------------
@dataclass
class PruneReport:
    """What prune removed (or, with dry_run, would remove)."""

    cutoff: dt.datetime
    dry_run: bool
    series: list[str] = field(default_factory=list)
    studies: list[str] = field(default_factory=list)
    instances: int = 0
    jobs: int = 0
    results: int = 0
    exports: int = 0
    events: int = 0
    associations: int = 0
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    missing_files: int = 0
    #: files another write replaced after prune decided to remove them (a resend): kept
    rewritten_files: int = 0
    #: write transactions the removal took (it commits in batches)
    batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


def _eligible(cutoff: dt.datetime):
    """Series in a final state, untouched since ``cutoff``, with no pending export or live job
    and no instance row (of any status) received since ``cutoff``: a resend acknowledged a
    moment ago -- even a duplicate -- keeps its series."""
    final = [st.value for st in FINAL_STATES]
    pending_export = (
        select(Export.id)
        .where(Export.series_uid == Series.series_uid, Export.state != "delivered")
        .exists()
    )
    live_job = (
        select(Job.id)
        .where(Job.series_uid == Series.series_uid, Job.state.in_(("queued", "running")))
        .exists()
    )
    pending_notice = (
        select(Notification.id)
        .where(Notification.series_uid == Series.series_uid, Notification.state == "pending")
        .exists()
    )
    recent = (
        select(Instance.id)
        .where(Instance.series_uid == Series.series_uid, Instance.received_at >= cutoff)
        .exists()
    )
    return (
        select(Series.series_uid)
        .where(
            Series.state.in_(final),
            Series.updated_at < cutoff,
            or_(Series.last_instance_at.is_(None), Series.last_instance_at < cutoff),
            ~pending_export,
            ~live_job,
            ~pending_notice,
            ~recent,
        )
        .order_by(Series.id)
    )


def _eligible_series(s: Session, cutoff: dt.datetime) -> list[str]:
    """The scan: every series prune may remove (read-only; re-checked batch by batch)."""
    return list(s.execute(_eligible(cutoff)).scalars())


class _DryRun(Exception):
    """Rolls back the dry run's transaction."""


@dataclass
class _Removal:
    """Files a committed batch leaves to delete, with the identity each had under the lock."""

    files: dict[str, tuple[int, int] | None] = field(default_factory=dict)


def prune(
    store: Store,
    older_than: dt.timedelta,
    *,
    dry_run: bool = False,
    spool: Spool | None = None,
    now: dt.datetime | None = None,
    batch_series: int = 20,
) -> PruneReport:
    """Remove audit rows and files older than the retention; never pending work, never a file
    a newer row refers to.

    Removed: series in a final state (delivered, skipped, failed, reported without pending
    exports) whose last change, last instance and every instance row are older than the
    cutoff, with their instances (rows + spool files), jobs, results, exports (+ report files)
    and events; studies left without series; instances that never made a series
    (ignored/rejected) past the cutoff; ended associations past the cutoff no longer
    referenced; node events past the cutoff.

    How, so that the node keeps receiving meanwhile and loses nothing: the scan reads without
    the write lock; then ``batch_series`` series at a time, one short write transaction
    re-checks them, notes which file each row points at (and its inode) and deletes the rows;
    after its commit the files go -- each only if it is still the file noted (a resend of the
    study may have written a new one under the same name once the rows were gone: kept,
    counted in ``rewritten_files``) and no kept row points at it. A crash between a commit and
    the deletions leaves orphan files (older than the cutoff recorded in the 'pruned' event,
    so start-up reconciliation does not revive them), never a row pointing at nothing. A dry
    run does the same in one transaction that is rolled back, and touches no file.
    """
    if older_than.total_seconds() < 0:
        raise ValueError("older_than must not be negative")
    now = now or store.now()
    cutoff = now - older_than
    report = PruneReport(cutoff=cutoff, dry_run=dry_run)
    with store.db.session(write=False) as s:
        candidates = _eligible_series(s, cutoff)
    batch_series = max(1, int(batch_series))
    if dry_run:
        try:
            with store.db.session() as s:
                for chunk in _chunks(candidates, batch_series):
                    _prune_batch(s, chunk, cutoff, report)
                _prune_rest(store, s, cutoff, now, report)
                raise _DryRun
        except _DryRun:
            pass
        _finish(report)
        return report
    for chunk in _chunks(candidates, batch_series):
        with store.db.session() as s:
            removal = _prune_batch(s, chunk, cutoff, report)
        report.batches += 1
        _remove_files(removal, spool, report)
    with store.db.session() as s:
        removal = _prune_rest(store, s, cutoff, now, report)
    report.batches += 1
    _remove_files(removal, spool, report)
    _finish(report)
    log.info(
        "pruned audit data",
        cutoff=cutoff.isoformat(),
        series=len(report.series),
        instances=report.instances,
        files=len(report.files),
        batches=report.batches,
        rewritten_files=report.rewritten_files,
    )
    return report


def _finish(report: PruneReport) -> None:
    report.series.sort()
    report.studies.sort()
    report.files.sort()


def _kept_paths(
    s: Session, column: Any, id_column: Any, paths: Iterable[str], removed: set[int]
) -> set[str]:
    """Which of ``paths`` a row outside ``removed`` points at."""
    kept: set[str] = set()
    for chunk in _chunks(sorted(set(paths))):
        for rid, path in s.execute(select(id_column, column).where(column.in_(chunk))):
            if rid not in removed:
                kept.add(path)
    return kept


def _note_files(
    s: Session,
    inst_ids: list[int],
    report_paths: set[str],
    export_ids: list[int],
    report: PruneReport,
) -> _Removal:
    """The files of the rows about to go (minus those a kept row points at), with identities."""
    from storage.outbox import report_files
    from storage.spool import file_identity

    removal = _Removal()
    paths: dict[str, int] = {}
    for chunk in _chunks(inst_ids):
        for path, size in s.execute(
            select(Instance.spool_path, Instance.size).where(
                Instance.id.in_(chunk), Instance.spool_path.is_not(None)
            )
        ):
            if path is not None:  # excluded by the query; narrows the type
                paths[path] = size or 0
    for path in _kept_paths(s, Instance.spool_path, Instance.id, paths, set(inst_ids)):
        paths.pop(path, None)
    report_paths = report_paths - _kept_paths(
        s, Export.report_path, Export.id, report_paths, set(export_ids)
    )
    # the summary and evidence images written beside each report go with it
    report_paths = {
        str(f)
        for rp in report_paths
        for f in (report_files(rp) if Path(rp).is_absolute() else [Path(rp)])
    }
    for path in [*paths, *sorted(report_paths)]:
        removal.files[path] = file_identity(path) if Path(path).is_absolute() else None
    report.files += list(paths) + sorted(report_paths)
    report.bytes += sum(paths.values())
    return removal


def _prune_batch(
    s: Session, chunk: Sequence[str], cutoff: dt.datetime, report: PruneReport
) -> _Removal:
    """One write transaction: re-check ``chunk`` under the lock, delete the rows of those still
    eligible (and of studies they leave empty); returns the files to delete after commit."""
    p_series = list(s.execute(_eligible(cutoff).where(Series.series_uid.in_(chunk))).scalars())
    if not p_series:
        return _Removal()
    report.series += p_series
    inst_ids = list(
        s.execute(select(Instance.id).where(Instance.series_uid.in_(p_series))).scalars()
    )
    job_ids = list(s.execute(select(Job.id).where(Job.series_uid.in_(p_series))).scalars())
    result_ids = list(s.execute(select(Result.id).where(Result.series_uid.in_(p_series))).scalars())
    export_ids: list[int] = []
    report_paths: set[str] = set()
    for eid, rpath in s.execute(
        select(Export.id, Export.report_path).where(Export.series_uid.in_(p_series))
    ):
        export_ids.append(eid)
        if rpath:
            report_paths.add(rpath)
    removal = _note_files(s, inst_ids, report_paths, export_ids, report)
    study_uids = set(
        s.execute(select(Series.study_uid).where(Series.series_uid.in_(p_series))).scalars()
    )
    event_ids = set(s.execute(select(Event.id).where(Event.series_uid.in_(p_series))).scalars())
    for notice in (ShadowResult, Notification):  # tables that reference jobs and series
        s.execute(delete(notice).where(notice.series_uid.in_(p_series)))
    for ids, model in (
        (result_ids, Result),
        (export_ids, Export),
        (job_ids, Job),
        (inst_ids, Instance),
    ):
        for part in _chunks(ids):
            s.execute(delete(model).where(model.id.in_(part)))
    s.execute(delete(Series).where(Series.series_uid.in_(p_series)))
    report.instances += len(inst_ids)
    report.jobs += len(job_ids)
    report.results += len(result_ids)
    report.exports += len(export_ids)
    # studies left without any series
    left = sorted(
        study_uids
        - set(s.execute(select(Series.study_uid).where(Series.study_uid.in_(study_uids))).scalars())
    )
    if left:
        event_ids.update(s.execute(select(Event.id).where(Event.study_uid.in_(left))).scalars())
        s.execute(delete(Study).where(Study.study_uid.in_(left)))
        report.studies += left
    for part in _chunks(sorted(event_ids)):
        s.execute(delete(Event).where(Event.id.in_(part)))
    report.events += len(event_ids)
    return removal


def _prune_rest(
    store: Store, s: Session, cutoff: dt.datetime, now: dt.datetime, report: PruneReport
) -> _Removal:
    """The last transaction: instances that never made a series, studies without series,
    associations nothing refers to, old node events; and the 'pruned' event."""
    has_series = select(Series.id).where(Series.series_uid == Instance.series_uid).exists()
    orphan_ids = list(
        s.execute(select(Instance.id).where(~has_series, Instance.received_at < cutoff)).scalars()
    )
    removal = _note_files(s, orphan_ids, set(), [], report)
    for part in _chunks(orphan_ids):
        s.execute(delete(Instance).where(Instance.id.in_(part)))
    report.instances += len(orphan_ids)
    studies = list(
        s.execute(
            select(Study.study_uid).where(
                Study.created_at < cutoff,
                ~select(Series.id).where(Series.study_uid == Study.study_uid).exists(),
            )
        ).scalars()
    )
    referenced = select(Instance.id).where(Instance.association_id == Association.id).exists()
    assoc_ids = list(
        s.execute(
            select(Association.id).where(
                Association.outcome != "open",
                func.coalesce(Association.ended_at, Association.started_at) < cutoff,
                ~referenced,
            )
        ).scalars()
    )
    ev_conds: list[ColumnElement[bool]] = [Event.study_uid.in_(c) for c in _chunks(studies)]
    ev_conds += [
        and_(Event.entity == "association", Event.entity_id.in_(c))
        for c in _chunks([str(a) for a in assoc_ids])
    ]
    ev_conds.append(
        and_(
            Event.series_uid.is_(None),
            Event.study_uid.is_(None),
            Event.entity.in_(("node", "instance")),
            Event.at < cutoff,
        )
    )
    event_ids: set[int] = set()
    for cond in ev_conds:
        event_ids.update(s.execute(select(Event.id).where(cond)).scalars())
    for part in _chunks(sorted(event_ids)):
        s.execute(delete(Event).where(Event.id.in_(part)))
    for part in _chunks(studies):
        s.execute(delete(Study).where(Study.study_uid.in_(part)))
    for part in _chunks(assoc_ids):
        s.execute(delete(Association).where(Association.id.in_(part)))
    report.studies += studies
    report.associations += len(assoc_ids)
    report.events += len(event_ids)
    store._event(
        s,
        "node",
        "prune",
        "pruned",
        at=now,
        details={
            "cutoff": cutoff,
            "series": len(report.series),
            "studies": len(report.studies),
            "instances": report.instances,
            "files": len(report.files),
            "batches": report.batches + 1,
        },
    )
    return removal


def _remove_files(removal: _Removal, spool: Spool | None, report: PruneReport) -> None:
    for path, identity in removal.files.items():
        outcome = _remove_file(path, identity, spool)
        if outcome == "missing":
            report.missing_files += 1
        elif outcome == "changed":
            report.rewritten_files += 1
            log.warning(
                "file rewritten after prune decided to remove it (a resend); kept", path=path
            )


def _remove_file(path: str, identity: tuple[int, int] | None, spool: Spool | None) -> str:
    """Delete one file if it is still the one noted: "removed", "missing" or "changed"."""
    from storage.spool import file_identity, remove_if_same

    p = Path(path)
    if spool is not None:
        full = p if p.is_absolute() else spool.root / p
        if spool.root in full.resolve().parents:
            if identity is None and not p.is_absolute():
                identity = file_identity(full)
            return spool.remove_if_same(full, identity)
    if not p.is_absolute():
        log.warning("relative spool path without a spool root; file kept", path=path)
        return "missing"
    return remove_if_same(p, identity)
