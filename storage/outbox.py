"""The outbox: one export row per (report, destination), claimed under a lease, retried
forever with the dispatcher's backoff, never dropped.

Mixed into :class:`storage.store.Store`. Several dispatchers (threads, processes or nodes on one
database) may drain it at once: :meth:`OutboxMixin.claim_exports` hands each due export to
exactly one of them (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite)
with a lease (``claimed_by`` + ``lease_expires_at``); a dispatcher that dies mid-send loses its
claim when the lease expires, and the next claim is audited as 'reclaimed'. Every attempt is an
event ('delivered' / 'attempt_failed'; a send recorded after another one already delivered the
report is a 'late_attempt' event, never silent).

Exports: pending -> delivered.
"""

from __future__ import annotations

import datetime as dt
import glob
from pathlib import Path

from sqlalchemy import func, select

from storage.core import StoreCore, due_clause
from storage.models import Export, Series
from storage.records import ExportClaim, NotFound, SeriesState

S = SeriesState


def report_files(report_path: str | Path) -> list[Path]:
    """The SR plus the companion objects written beside it and sent with it: the summary image
    `<stem>.sc.dcm` and the evidence images `<stem>.evNNN.dcm` (node/evidence.py)."""
    p = Path(report_path)
    files = [p]
    sc = p.with_name(p.stem + ".sc.dcm")
    if sc.exists():
        files.append(sc)
    files += sorted(p.parent.glob(glob.escape(p.stem) + ".ev[0-9][0-9][0-9].dcm"))
    return files


def _export_claim(e: Export, study_uid: str) -> ExportClaim:
    return ExportClaim(
        id=e.id,
        series_uid=e.series_uid,
        destination=e.destination,
        report_path=e.report_path,
        attempts=e.attempts,
        study_uid=study_uid,
        version=e.series_version,
        report_sop_uid=e.report_sop_uid,
    )


class OutboxMixin(StoreCore):
    """Exports of :class:`storage.store.Store`."""

    def due_exports(self, now: dt.datetime | None = None, limit: int = 10) -> list[ExportClaim]:
        """Pending exports whose next attempt time has come and that no dispatcher holds, oldest
        due first (a read: :meth:`claim_exports` is what a dispatcher uses)."""
        now = now or self.now()
        with self.db.session(write=False) as s:
            rows = s.execute(
                select(Export, Series.study_uid)
                .join(Series, Series.series_uid == Export.series_uid)
                .where(due_clause(Export, now))
                .order_by(Export.next_attempt_at, Export.id)
                .limit(limit)
            ).all()
            return [_export_claim(e, study_uid) for e, study_uid in rows]

    def claim_exports(
        self, lease_s: float = 300.0, limit: int = 10, now: dt.datetime | None = None
    ) -> list[ExportClaim]:
        """Take up to ``limit`` due exports for one delivery attempt each, under a lease.

        An export is claimable when pending, due, and not held (no claim, or the claim's lease
        expired: that dispatcher died or hung mid-send -> a 'reclaimed' event names it). The
        claim records ``self.node``; :meth:`record_export_attempt` ends it. PostgreSQL: ``FOR
        UPDATE OF exports SKIP LOCKED``, so dispatchers of several nodes never take the same
        row; SQLite: the write transaction serialises them."""
        now = now or self.now()
        with self.db.session() as s:
            claimed = self._claim_due(
                s, Export, "export", "destination", now=now, limit=limit, lease_s=lease_s
            )
            return [_export_claim(e, series.study_uid) for e, series in claimed]

    def record_export_attempt(
        self,
        export_id: int,
        *,
        ok: bool,
        status: int | str | None,
        error: str | None = None,
        next_attempt_at: dt.datetime | None = None,
    ) -> None:
        """Record one C-STORE attempt of an export (and end this node's claim on it).

        ok -> delivered (+ ``delivered_at``); when every export of the series' current version is
        delivered, series reported -> delivered. Not ok -> stays pending with
        ``next_attempt_at`` (default: now + 60 s); never dropped. An attempt recorded after the
        export was already delivered (a dispatcher whose lease had expired) is a 'late_attempt'
        event: the destination may hold the report twice, and the audit trail says so.
        """
        now = self.now()
        with self.db.session() as s:
            exp = s.execute(
                select(Export).where(Export.id == export_id).with_for_update()
            ).scalar_one_or_none()
            if exp is None:
                raise NotFound(f"export {export_id} is not in the audit database")
            series = self._lock_series(s, exp.series_uid)
            if self._end_claim(
                s,
                exp,
                "export",
                "destination",
                study_uid=series.study_uid,
                now=now,
                ok=ok,
                status=status,
                error=error,
            ):
                return
            exp.attempts += 1
            exp.last_status = (
                None
                if status is None
                else (f"0x{status:04X}" if isinstance(status, int) else str(status))
            )
            if ok:
                exp.state, exp.delivered_at, exp.last_error = "delivered", now, None
                exp.next_attempt_at = None
                self._event(
                    s,
                    "export",
                    exp.id,
                    "delivered",
                    at=now,
                    from_state="pending",
                    to_state="delivered",
                    study_uid=series.study_uid,
                    series_uid=series.series_uid,
                    details={
                        "destination": exp.destination,
                        "attempts": exp.attempts,
                        "status": exp.last_status,
                        "node": self.node,
                    },
                )
                s.flush()
                undelivered = s.execute(
                    select(func.count())
                    .select_from(Export)
                    .where(
                        Export.series_uid == series.series_uid,
                        Export.series_version == series.version,
                        Export.state != "delivered",
                    )
                ).scalar_one()
                if (
                    undelivered == 0
                    and series.state == S.REPORTED.value
                    and exp.series_version == series.version
                ):
                    self._move(s, series, S.DELIVERED, at=now)
            else:
                exp.last_error = error
                exp.next_attempt_at = next_attempt_at or now + dt.timedelta(seconds=60)
                self._event(
                    s,
                    "export",
                    exp.id,
                    "attempt_failed",
                    at=now,
                    from_state=exp.state,
                    to_state=exp.state,
                    study_uid=series.study_uid,
                    series_uid=series.series_uid,
                    details={
                        "destination": exp.destination,
                        "attempt": exp.attempts,
                        "status": exp.last_status,
                        "error": error,
                        "node": self.node,
                        "next_attempt_at": exp.next_attempt_at,
                    },
                )
