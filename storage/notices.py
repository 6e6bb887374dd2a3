"""Critical-finding notifications (an outbox like exports) and shadow-model results.

Mixed into :class:`storage.store.Store`. Notifications follow the export discipline
(:mod:`storage.outbox`): the rows are written in the *same transaction* as the results they are
about (:meth:`storage.queue.QueueMixin.finish_job` calls :meth:`NoticeMixin._add_notifications`),
so a node killed at any point either has the result and its notifications, or neither; a
notifier claims due rows under a lease (one attempt at a time across every node), records every
attempt as an event ('delivered', 'attempt_failed', 'rejected'; 'reclaimed' when a lease
expired, 'late_attempt' after delivery) and retries with backoff forever. An HL7 receiver that
answers AR (it refuses the message itself) ends the row as 'rejected' -- visible, never silent.

Notifications: pending -> delivered | rejected.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.core import StoreCore
from storage.models import Notification, Series, ShadowResult, Study
from storage.records import FindingResult, NotFound


@dataclass(frozen=True)
class NotificationSpec:
    """What a matching rule asks for: one finding to one channel."""

    channel: str
    kind: str
    finding_key: str
    probability: float
    decision: bool
    rule: str = ""


@dataclass(frozen=True)
class NotificationClaim:
    """A claimed notification with what a channel needs to build its message."""

    id: int
    channel: str
    kind: str
    finding_key: str
    probability: float
    decision: bool
    rule: str | None
    model_name: str | None
    series_uid: str
    study_uid: str
    version: int
    report_sop_uid: str | None
    attempts: int
    created_at: dt.datetime
    accession_number: str | None
    patient_id: str | None  # NULL unless audit.store_phi
    patient_name: str | None  # NULL unless audit.store_phi
    study_description: str | None


class NoticeMixin(StoreCore):
    """Notifications and shadow results of :class:`storage.store.Store`."""

    def _add_notifications(
        self,
        s: Session,
        *,
        series: Series,
        job_id: int | None,
        version: int,
        specs: Sequence[NotificationSpec],
        model_name: str | None,
        report_sop_uid: str | None,
        now: dt.datetime,
    ) -> None:
        """Inside finish_job's transaction: one pending row + a 'created' event per spec."""
        for sp in specs:
            n = Notification(
                series_uid=series.series_uid,
                series_version=version,
                job_id=job_id,
                channel=sp.channel,
                kind=sp.kind,
                finding_key=sp.finding_key,
                probability=float(sp.probability),
                decision=bool(sp.decision),
                rule=sp.rule or None,
                model_name=model_name,
                report_sop_uid=report_sop_uid,
                state="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
            s.add(n)
            s.flush()
            self._event(
                s,
                "notification",
                n.id,
                "created",
                at=now,
                to_state="pending",
                study_uid=series.study_uid,
                series_uid=series.series_uid,
                details={
                    "channel": sp.channel,
                    "kind": sp.kind,
                    "finding": sp.finding_key,
                    "rule": sp.rule,
                    "probability": round(float(sp.probability), 6),
                },
            )

    def claim_notifications(
        self, lease_s: float = 120.0, limit: int = 10, now: dt.datetime | None = None
    ) -> list[NotificationClaim]:
        """Take up to ``limit`` due notifications for one attempt each, under a lease (same
        rules as :meth:`storage.outbox.OutboxMixin.claim_exports`)."""
        now = now or self.now()
        with self.db.session() as s:
            claims: list[NotificationClaim] = []
            for n, series in self._claim_due(
                s, Notification, "notification", "channel", now=now, limit=limit, lease_s=lease_s
            ):
                study = s.execute(
                    select(Study).where(Study.study_uid == series.study_uid)
                ).scalar_one()
                claims.append(
                    NotificationClaim(
                        id=n.id,
                        channel=n.channel,
                        kind=n.kind,
                        finding_key=n.finding_key,
                        probability=n.probability,
                        decision=n.decision,
                        rule=n.rule,
                        model_name=n.model_name,
                        series_uid=n.series_uid,
                        study_uid=series.study_uid,
                        version=n.series_version,
                        report_sop_uid=n.report_sop_uid,
                        attempts=n.attempts,
                        created_at=n.created_at,
                        accession_number=study.accession_number,
                        patient_id=study.patient_id,
                        patient_name=study.patient_name,
                        study_description=study.study_description,
                    )
                )
            return claims

    def record_notification_attempt(
        self,
        notification_id: int,
        *,
        ok: bool,
        status: str | None,
        error: str | None = None,
        next_attempt_at: dt.datetime | None = None,
        final: bool = False,
    ) -> None:
        """One delivery attempt (ends this node's claim). ok -> delivered; not ok -> pending
        with ``next_attempt_at`` (default now + 60 s); ``final`` (the receiver rejected the
        message itself, HL7 AR) -> rejected. Never deleted."""
        now = self.now()
        with self.db.session() as s:
            n = s.execute(
                select(Notification).where(Notification.id == notification_id).with_for_update()
            ).scalar_one_or_none()
            if n is None:
                raise NotFound(f"notification {notification_id} is not in the audit database")
            study_uid = s.execute(
                select(Series.study_uid).where(Series.series_uid == n.series_uid)
            ).scalar_one()
            common: dict[str, Any] = dict(at=now, study_uid=study_uid, series_uid=n.series_uid)
            if self._end_claim(
                s,
                n,
                "notification",
                "channel",
                study_uid=study_uid,
                now=now,
                ok=ok,
                status=status,
                error=error,
            ):
                return
            n.attempts += 1
            n.last_status = status
            details = {
                "channel": n.channel,
                "kind": n.kind,
                "attempt": n.attempts,
                "status": status,
                "node": self.node,
            }
            if ok:
                n.state, n.delivered_at, n.last_error, n.next_attempt_at = (
                    "delivered",
                    now,
                    None,
                    None,
                )
                self._event(
                    s,
                    "notification",
                    n.id,
                    "delivered",
                    from_state="pending",
                    to_state="delivered",
                    **common,
                    details=details,
                )
            elif final:
                n.state, n.last_error, n.next_attempt_at = "rejected", error, None
                self._event(
                    s,
                    "notification",
                    n.id,
                    "rejected",
                    from_state="pending",
                    to_state="rejected",
                    **common,
                    details={**details, "error": error},
                )
            else:
                n.last_error = error
                n.next_attempt_at = next_attempt_at or now + dt.timedelta(seconds=60)
                self._event(
                    s,
                    "notification",
                    n.id,
                    "attempt_failed",
                    from_state="pending",
                    to_state="pending",
                    **common,
                    details={**details, "error": error, "next_attempt_at": n.next_attempt_at},
                )

    def notifications(
        self, *, pending: bool = False, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """The notification outbox, newest first."""
        with self.db.session(write=False) as s:
            q = select(Notification).order_by(
                Notification.created_at.desc(), Notification.id.desc()
            )
            if pending:
                q = q.where(Notification.state == "pending")
            if limit:
                q = q.limit(limit)
            return [
                {
                    "id": n.id,
                    "series_uid": n.series_uid,
                    "version": n.series_version,
                    "channel": n.channel,
                    "kind": n.kind,
                    "finding": n.finding_key,
                    "probability": round(n.probability, 6),
                    "decision": n.decision,
                    "rule": n.rule,
                    "state": n.state,
                    "attempts": n.attempts,
                    "last_status": n.last_status,
                    "last_error": n.last_error,
                    "next_attempt_at": n.next_attempt_at,
                    "delivered_at": n.delivered_at,
                    "created_at": n.created_at,
                }
                for n in s.execute(q).scalars()
            ]

    def record_shadow_results(
        self,
        *,
        job_id: int | None,
        series_uid: str,
        version: int,
        model_name: str,
        model_version: str | None,
        checkpoint_hash: str | None,
        results: Sequence[FindingResult],
    ) -> None:
        """A shadow model's findings for one series version (+ a 'shadow_recorded' event)."""
        now = self.now()
        with self.db.session() as s:
            study_uid = s.execute(
                select(Series.study_uid).where(Series.series_uid == series_uid)
            ).scalar_one()
            for r in results:
                s.add(
                    ShadowResult(
                        job_id=job_id,
                        series_uid=series_uid,
                        series_version=version,
                        model_name=model_name,
                        model_version=model_version,
                        checkpoint_hash=checkpoint_hash,
                        finding_key=r.key,
                        probability=float(r.probability),
                        decision=bool(r.decision),
                        created_at=now,
                    )
                )
            self._event(
                s,
                "series",
                series_uid,
                "shadow_recorded",
                at=now,
                study_uid=study_uid,
                series_uid=series_uid,
                details={
                    "model": model_name,
                    "model_version": model_version,
                    "version": version,
                    "job_id": job_id,
                    "findings": len(results),
                    "positives": sum(1 for r in results if r.decision),
                },
            )


__all__ = ["NoticeMixin", "NotificationClaim", "NotificationSpec"]
