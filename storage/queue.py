"""The durable inference queue: jobs claimed under a lease, retried, released, recovered.

Mixed into :class:`storage.store.Store`; what it uses of the store (``db``, ``node``, ``now()``,
``_event``, ``_lock_series``, ``_move``) is declared by :class:`storage.core.StoreCore`, and
:meth:`QueueMixin.finish_job` writes notifications through :class:`storage.notices.NoticeMixin`.
Every method is one transaction.

Several nodes may share one (PostgreSQL) database: a job records the ``node`` whose worker
holds it; :meth:`QueueMixin.recover_on_start` requeues only the starting node's own running jobs
(a job of another node comes back only through its expired lease, in :meth:`claim_job`), and a
worker that cannot read a series' files :meth:`releases <QueueMixin.release_job>` its job for
another node instead of failing the series.

Jobs: queued -> running -> done | failed | (queued again on retry / release / recovery);
superseded when the series is reopened before the job finished.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from common.log import get_logger
from storage.core import StoreCore, rowcount
from storage.models import Association, Export, Job, Notification, Result, Series
from storage.notices import NoticeMixin
from storage.records import FindingResult, InvalidTransition, JobClaim, NotFound, SeriesState

log = get_logger("storage.queue")
S = SeriesState


class QueueMixin(NoticeMixin, StoreCore):
    """Jobs of :class:`storage.store.Store`."""

    def enqueue_job(self, series_uid: str) -> int:
        """Queue inference of the series' current version; idempotent while a job is live."""
        now = self.now()
        with self.db.session() as s:
            series = self._lock_series(s, series_uid)
            live = s.execute(
                select(Job.id).where(
                    Job.series_uid == series_uid,
                    Job.version == series.version,
                    Job.state.in_(("queued", "running")),
                )
            ).scalar_one_or_none()
            if live is not None:
                return live
            self._move(s, series, S.QUEUED, at=now)
            return self._new_job(s, series, now)

    def claim_job(
        self, worker_id: str, lease_s: float = 600, *, max_attempts: int | None = None
    ) -> JobClaim | None:
        """Atomically take the next runnable job (highest series priority, then oldest).

        Runnable = queued and past its retry delay, or running with an expired lease (its
        worker died). SQLite serialises claimers with BEGIN IMMEDIATE; PostgreSQL uses
        ``FOR UPDATE OF jobs SKIP LOCKED`` so claimers never wait on or share a row. With
        ``max_attempts``, an expired job that already used them all fails its series instead of
        looping forever (a crash that kills every worker that tries it).
        """
        now = self.now()
        with self.db.session() as s:
            while True:
                job = s.execute(claim_statement(now)).scalar_one_or_none()
                if job is None:
                    return None
                series = self._lock_series(s, job.series_uid)
                reclaimed = job.state == "running"
                if series.version != job.version:
                    job.state, job.finished_at = "superseded", now
                    job.error = f"series is at version {series.version}"
                    self._event(
                        s,
                        "job",
                        job.id,
                        "superseded",
                        at=now,
                        from_state="queued",
                        to_state="superseded",
                        study_uid=series.study_uid,
                        series_uid=series.series_uid,
                    )
                    continue
                if reclaimed and max_attempts is not None and job.attempts >= max_attempts:
                    error = (
                        f"lease expired after {job.attempts} attempt(s) (worker {job.worker_id})"
                    )
                    job.state, job.finished_at, job.error = "failed", now, error
                    self._event(
                        s,
                        "job",
                        job.id,
                        "failed",
                        at=now,
                        from_state="running",
                        to_state="failed",
                        study_uid=series.study_uid,
                        series_uid=series.series_uid,
                        details={"error": error},
                    )
                    self._move(s, series, S.FAILED, at=now, reason=error)
                    continue
                previous_worker = job.worker_id
                job.state = "running"
                job.worker_id = worker_id
                job.node = self.node
                job.attempts += 1
                job.claimed_at = job.started_at = now
                job.lease_expires_at = now + dt.timedelta(seconds=lease_s)
                job.finished_at = None
                self._event(
                    s,
                    "job",
                    job.id,
                    "reclaimed" if reclaimed else "claimed",
                    at=now,
                    from_state="running" if reclaimed else "queued",
                    to_state="running",
                    study_uid=series.study_uid,
                    series_uid=series.series_uid,
                    details={
                        "worker": worker_id,
                        "node": self.node,
                        "attempt": job.attempts,
                        "previous_worker": previous_worker if reclaimed else None,
                    },
                )
                if series.state == S.QUEUED.value:
                    self._move(s, series, S.INFERRING, at=now, details={"job_id": job.id})
                return JobClaim(
                    id=job.id,
                    series_uid=series.series_uid,
                    study_uid=series.study_uid,
                    version=job.version,
                    attempts=job.attempts,
                    lease_expires_at=job.lease_expires_at,
                )

    def release_job(
        self, job_id: int, worker_id: str, reason: str, *, delay_s: float = 0.0
    ) -> bool:
        """Give a claimed job back without counting an attempt: this node cannot run it (e.g.
        the series' instance files are not visible from here), another node may. The job is
        'queued' again (``not_before`` = now + ``delay_s``), its series inferring -> queued, and
        a 'released' event names the node and the reason. False when the job is no longer this
        worker's."""
        now = self.now()
        with self.db.session() as s:
            job, series = self._running_job(s, job_id)
            if job.state != "running" or job.worker_id != worker_id:
                return False
            job.state, job.worker_id, job.lease_expires_at = "queued", None, None
            job.attempts = max(0, job.attempts - 1)
            job.not_before = now + dt.timedelta(seconds=delay_s) if delay_s > 0 else None
            self._event(
                s,
                "job",
                job.id,
                "released",
                at=now,
                from_state="running",
                to_state="queued",
                study_uid=series.study_uid,
                series_uid=series.series_uid,
                details={
                    "node": self.node,
                    "worker": worker_id,
                    "reason": reason,
                    "not_before": job.not_before,
                },
            )
            if series.state == S.INFERRING.value and series.version == job.version:
                self._move(s, series, S.QUEUED, at=now, details={"released_job": job.id})
            return True

    def retry_series(self, series_uid: str, *, by: str = "operator") -> int:
        """Re-queue a *failed* series (``molre-node audit retry``): failed -> queued with a new
        job (attempts from 0); returns the job id. Raises :class:`InvalidTransition` when the
        series is not failed, :class:`NotFound` when it is unknown."""
        now = self.now()
        with self.db.session() as s:
            series = self._lock_series(s, series_uid)
            if series.state != S.FAILED.value:
                raise InvalidTransition(
                    f"series {series_uid} is {series.state}, not failed: only a failed series "
                    "can be retried"
                )
            previous = series.reason
            self._move(
                s, series, S.QUEUED, at=now, details={"retry_by": by, "previous_reason": previous}
            )
            series.reason = None
            return self._new_job(s, series, now, retry_by=by)

    def _new_job(self, s: Session, series: Series, now: dt.datetime, **details: Any) -> int:
        """Queue one job for the series' current version (its 'enqueued' event carries
        ``details``); the series is already locked and moved to queued."""
        job = Job(
            series_uid=series.series_uid,
            version=series.version,
            state="queued",
            attempts=0,
            enqueued_at=now,
        )
        s.add(job)
        s.flush()
        self._event(
            s,
            "job",
            job.id,
            "enqueued",
            at=now,
            to_state="queued",
            study_uid=series.study_uid,
            series_uid=series.series_uid,
            details={"version": series.version, **details},
        )
        return job.id

    def _running_job(self, s: Session, job_id: int) -> tuple[Job, Series]:
        job = s.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one_or_none()
        if job is None:
            raise NotFound(f"job {job_id} is not in the audit database")
        return job, self._lock_series(s, job.series_uid)

    def finish_job(
        self,
        job_id: int,
        *,
        results: Sequence[FindingResult],
        checkpoint_hash: str | None,
        model_name: str | None,
        report_path: str | Path | None,
        report_sop_uid: str | None,
        destinations: Iterable[str],
        notifications: Sequence[Any] = (),
    ) -> bool:
        """Store results, mark the job done, series -> reported, one export per destination.

        Returns False (nothing stored but a 'superseded' / 'late_finish' event; series
        untouched) when the series was reopened by a late instance meanwhile (a newer version
        will be reported) or when another worker already finished this job after this worker's
        lease expired.
        """
        now = self.now()
        with self.db.session() as s:
            job, series = self._running_job(s, job_id)
            if job.state != "running":
                # another worker finished it after this one's lease expired: first one wins
                self._event(
                    s,
                    "job",
                    job.id,
                    "late_finish",
                    at=now,
                    from_state=job.state,
                    to_state=job.state,
                    study_uid=series.study_uid,
                    series_uid=series.series_uid,
                    details={"findings": len(results)},
                )
                return False
            job.finished_at = now
            job.lease_expires_at = None
            if series.version != job.version:
                job.state = "superseded"
                self._event(
                    s,
                    "job",
                    job.id,
                    "superseded",
                    at=now,
                    from_state="running",
                    to_state="superseded",
                    study_uid=series.study_uid,
                    series_uid=series.series_uid,
                    details={
                        "job_version": job.version,
                        "findings": len(results),
                        "series_version": series.version,
                    },
                )
                return False
            for r in results:
                s.add(
                    Result(
                        job_id=job.id,
                        series_uid=job.series_uid,
                        series_version=job.version,
                        finding_key=r.key,
                        probability=float(r.probability),
                        decision=bool(r.decision),
                        checkpoint_hash=checkpoint_hash,
                        model_name=model_name,
                        created_at=now,
                    )
                )
            job.state = "done"
            self._event(
                s,
                "job",
                job.id,
                "finished",
                at=now,
                from_state="running",
                to_state="done",
                study_uid=series.study_uid,
                series_uid=series.series_uid,
                details={
                    "findings": len(results),
                    "positives": sum(1 for r in results if r.decision),
                    "checkpoint_hash": checkpoint_hash,
                    "model": model_name,
                    "report_sop_uid": report_sop_uid,
                },
            )
            self._move(s, series, S.REPORTED, at=now, details={"job_id": job.id})
            for dest in destinations:
                exp = Export(
                    series_uid=series.series_uid,
                    series_version=job.version,
                    job_id=job.id,
                    destination=dest,
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    report_path=str(report_path) if report_path is not None else None,
                    report_sop_uid=report_sop_uid,
                    created_at=now,
                )
                s.add(exp)
                s.flush()
                self._event(
                    s,
                    "export",
                    exp.id,
                    "created",
                    at=now,
                    to_state="pending",
                    study_uid=series.study_uid,
                    series_uid=series.series_uid,
                    details={"destination": dest},
                )
            if notifications:  # same transaction as the results (storage.notices)
                self._add_notifications(
                    s,
                    series=series,
                    job_id=job.id,
                    version=job.version,
                    specs=notifications,
                    model_name=model_name,
                    report_sop_uid=report_sop_uid,
                    now=now,
                )
            return True

    def fail_job(self, job_id: int, error: str, *, max_attempts: int, retry_delay_s: float) -> bool:
        """Record a failed attempt. True = requeued (after ``retry_delay_s``); False = given up
        (series -> failed with ``error`` as reason) or the job was superseded meanwhile."""
        now = self.now()
        with self.db.session() as s:
            job, series = self._running_job(s, job_id)
            if job.state != "running":  # finished or failed by a worker that reclaimed it
                return False
            job.error = error
            job.lease_expires_at = None
            if series.version != job.version:
                job.state, job.finished_at = "superseded", now
                return False
            if job.attempts < max_attempts:
                job.state = "queued"
                job.not_before = now + dt.timedelta(seconds=retry_delay_s)
                self._event(
                    s,
                    "job",
                    job.id,
                    "retry",
                    at=now,
                    from_state="running",
                    to_state="queued",
                    study_uid=series.study_uid,
                    series_uid=series.series_uid,
                    details={"error": error, "attempt": job.attempts, "not_before": job.not_before},
                )
                if series.state == S.INFERRING.value:
                    self._move(s, series, S.QUEUED, at=now, details={"retry_of_job": job.id})
                return True
            job.state, job.finished_at = "failed", now
            self._event(
                s,
                "job",
                job.id,
                "failed",
                at=now,
                from_state="running",
                to_state="failed",
                study_uid=series.study_uid,
                series_uid=series.series_uid,
                details={"error": error, "attempts": job.attempts},
            )
            self._move(s, series, S.FAILED, at=now, reason=error)
            return False

    def recover_on_start(self) -> dict[str, int]:
        """Undo what a crash of *this node* left half-done; call once before workers start.

        Only this node's own work is touched (``self.node``; rows from before revision 0005,
        with no node recorded, count as its own): other nodes on the same database keep their
        running jobs and open associations. Its jobs still 'running' -> 'queued' (attempts
        kept, so a job that crashes the node each time still reaches max_attempts); their series
        inferring -> queued. Its export claims are dropped. Series left 'selected' without a job
        get one (whoever recovers first). Returns counts: ``jobs_requeued``,
        ``series_enqueued``, ``complete_pending`` (series in 'complete' the assembler must
        decide again; see :meth:`series_in_state`), ``associations_aborted`` (left 'open' by a
        crash, now 'aborted' with a 'node restarted' event), ``exports_released``.
        """
        now = self.now()
        counts = {
            "jobs_requeued": 0,
            "series_enqueued": 0,
            "complete_pending": 0,
            "associations_aborted": 0,
            "exports_released": 0,
        }
        mine_assoc = or_(Association.node == self.node, Association.node.is_(None))
        mine_job = or_(Job.node == self.node, Job.node.is_(None))
        with self.db.session() as s:
            # Associations cut off by a crash would stay 'open' in the audit trail forever; this
            # node is not listening yet, so its 'open' associations belong to its previous run.
            # (Their series still complete by quiet time: the sender may resend.)
            for row in (
                s.execute(
                    select(Association)
                    .where(Association.outcome == "open", mine_assoc)
                    .with_for_update(skip_locked=True)
                )
                .scalars()
                .all()
            ):
                row.outcome, row.ended_at = "aborted", now
                self._event(
                    s,
                    "association",
                    row.id,
                    "aborted",
                    at=now,
                    from_state="open",
                    to_state="aborted",
                    details={"reason": "node restarted", "stored": row.n_stored},
                )
                counts["associations_aborted"] += 1
            running = (
                s.execute(
                    select(Job)
                    .where(Job.state == "running", mine_job)
                    .with_for_update(skip_locked=True)
                )
                .scalars()
                .all()
            )
            for job in running:
                series = self._lock_series(s, job.series_uid)
                job.state, job.worker_id, job.lease_expires_at = "queued", None, None
                self._event(
                    s,
                    "job",
                    job.id,
                    "recovered",
                    at=now,
                    from_state="running",
                    to_state="queued",
                    study_uid=series.study_uid,
                    series_uid=series.series_uid,
                )
                if series.state == S.INFERRING.value and series.version == job.version:
                    self._move(s, series, S.QUEUED, at=now, details={"recovered_job": job.id})
                counts["jobs_requeued"] += 1
            counts["exports_released"] = (
                rowcount(
                    s.execute(
                        update(Export)
                        .where(Export.claimed_by == self.node, Export.state == "pending")
                        .values(claimed_by=None, lease_expires_at=None)
                    )
                )
                or 0
            )
            # notifications this node had claimed (storage.notices): due again at once
            counts["notifications_released"] = (
                rowcount(
                    s.execute(
                        update(Notification)
                        .where(
                            Notification.claimed_by == self.node, Notification.state == "pending"
                        )
                        .values(claimed_by=None, lease_expires_at=None)
                    )
                )
                or 0
            )
            selected = (
                s.execute(select(Series.series_uid).where(Series.state == S.SELECTED.value))
                .scalars()
                .all()
            )
            for uid in selected:
                series = self._lock_series(s, uid)
                if series.state != S.SELECTED.value:  # another node enqueued it meanwhile
                    continue
                self._move(s, series, S.QUEUED, at=now, details={"recovered": True})
                self._new_job(s, series, now, recovered=True)
                counts["series_enqueued"] += 1
            counts["complete_pending"] = s.execute(
                select(func.count()).select_from(Series).where(Series.state == S.COMPLETE.value)
            ).scalar_one()
            self._event(s, "node", self.node, "recovered", at=now, details=counts)
        if any(counts.values()):
            log.info("recovered unfinished work", **counts)
        return counts


def claim_statement(now: dt.datetime):
    """The SELECT that picks the next job; separate so its PostgreSQL SQL can be unit-tested."""
    runnable = or_(
        and_(Job.state == "queued", or_(Job.not_before.is_(None), Job.not_before <= now)),
        and_(Job.state == "running", Job.lease_expires_at < now),
    )
    return (
        select(Job)
        .join(Series, Series.series_uid == Job.series_uid)
        .where(runnable)
        .order_by(Series.priority.desc(), Job.id)
        .limit(1)
        .with_for_update(skip_locked=True, of=Job)
    )
