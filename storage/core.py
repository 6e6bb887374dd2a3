"""`StoreCore`: what the :class:`storage.store.Store` mixins share -- the database, the node
name, the clock, the event writer and the checked series state change.

The queue, outbox and notice mixins inherit from it, so each of them says (and a type checker
sees) exactly what it relies on; :class:`storage.store.Store` sets the attributes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Result, and_, or_, select
from sqlalchemy.orm import Session

from common.jsonsafe import jsonable
from storage.db import Database
from storage.models import Event, Series
from storage.records import ALLOWED_TRANSITIONS, InvalidTransition, NotFound, SeriesState

S = SeriesState


def rowcount(result: Result[Any]) -> int | None:
    """Rows an UPDATE/DELETE matched. ``Session.execute`` is typed as returning ``Result``; for a
    DML statement it is a ``CursorResult``, which carries ``rowcount``."""
    return cast(CursorResult[Any], result).rowcount


def due_clause(model: Any, now: dt.datetime) -> ColumnElement[bool]:
    """A leased outbox row (export, notification) that a dispatcher may claim: pending, due,
    and not held by a live claim (no claim, or its lease expired)."""
    return and_(
        model.state == "pending",
        or_(model.next_attempt_at.is_(None), model.next_attempt_at <= now),
        or_(
            model.claimed_by.is_(None),
            model.lease_expires_at.is_(None),
            model.lease_expires_at < now,
        ),
    )


class StoreCore:
    """Attributes and helpers of :class:`storage.store.Store` that its mixins use."""

    db: Database
    #: ``node.name``: owner recorded on associations, jobs and claims
    node: str
    store_phi: bool
    _clock: Callable[[], dt.datetime]

    def now(self) -> dt.datetime:
        """The store's notion of now (aware UTC)."""
        return self._clock()

    @staticmethod
    def _event(
        s: Session,
        entity: str,
        entity_id: Any,
        kind: str,
        *,
        at: dt.datetime,
        from_state: str | None = None,
        to_state: str | None = None,
        study_uid: str | None = None,
        series_uid: str | None = None,
        details: dict | None = None,
    ) -> None:
        s.add(
            Event(
                at=at,
                entity=entity,
                entity_id=str(entity_id),
                kind=kind,
                from_state=str(from_state) if from_state is not None else None,
                to_state=str(to_state) if to_state is not None else None,
                study_uid=study_uid,
                series_uid=series_uid,
                details=jsonable(details) if details else None,
            )
        )

    def _lock_series(self, s: Session, series_uid: str) -> Series:
        row = s.execute(
            select(Series).where(Series.series_uid == series_uid).with_for_update()
        ).scalar_one_or_none()
        if row is None:
            raise NotFound(f"series {series_uid} is not in the audit database")
        return row

    def _move(
        self,
        s: Session,
        series: Series,
        to_state: SeriesState,
        *,
        at: dt.datetime,
        reason: str | None = None,
        details: dict | None = None,
        kind: str = "transition",
    ) -> None:
        """Apply one checked state change to a locked series row and write its event."""
        to_state = SeriesState(to_state)
        current = SeriesState(series.state)
        if to_state not in ALLOWED_TRANSITIONS[current]:
            raise InvalidTransition(
                f"series {series.series_uid}: {current.value} -> {to_state.value} is not allowed "
                f"(allowed: {sorted(x.value for x in ALLOWED_TRANSITIONS[current]) or 'none'})"
            )
        series.state = to_state.value
        series.updated_at = at
        if to_state in (S.SKIPPED, S.FAILED):
            series.reason = reason
        elif reason is not None:
            series.reason = reason
        if to_state is S.COMPLETE:
            series.completed_at = at
        elif to_state is S.REPORTED:
            series.reported_at = at
        elif to_state is S.DELIVERED:
            series.delivered_at = at
        ev_details = dict(details or {})
        if reason is not None:
            ev_details["reason"] = reason
        ev_details["version"] = series.version
        self._event(
            s,
            "series",
            series.series_uid,
            kind,
            at=at,
            from_state=current.value,
            to_state=to_state.value,
            study_uid=series.study_uid,
            series_uid=series.series_uid,
            details=ev_details,
        )

    # -- leased outboxes (exports, notifications) ----------------------------------------------
    def _claim_due(
        self,
        s: Session,
        model: Any,
        entity: str,
        detail: str,
        *,
        now: dt.datetime,
        limit: int,
        lease_s: float,
    ) -> list[tuple[Any, Series]]:
        """Claim up to ``limit`` due rows of a leased outbox for this node, oldest due first,
        each with its series. PostgreSQL: ``FOR UPDATE OF <table> SKIP LOCKED``, so dispatchers
        of several nodes never take the same row; SQLite: the write transaction serialises them.
        Taking a row whose previous claim's lease expired (that dispatcher died or hung
        mid-send) is a 'reclaimed' event naming the previous node; ``detail`` names the row's
        column (destination, channel) that the events carry."""
        rows = (
            s.execute(
                select(model)
                .where(due_clause(model, now))
                .order_by(model.next_attempt_at, model.id)
                .limit(limit)
                .with_for_update(skip_locked=True, of=model)
            )
            .scalars()
            .all()
        )
        claimed: list[tuple[Any, Series]] = []
        for row in rows:
            series = s.execute(
                select(Series).where(Series.series_uid == row.series_uid)
            ).scalar_one()
            if row.claimed_by is not None:
                self._event(
                    s,
                    entity,
                    row.id,
                    "reclaimed",
                    at=now,
                    from_state=row.state,
                    to_state=row.state,
                    study_uid=series.study_uid,
                    series_uid=series.series_uid,
                    details={
                        detail: getattr(row, detail),
                        "node": self.node,
                        "previous_node": row.claimed_by,
                        "lease_expired_at": row.lease_expires_at,
                    },
                )
            row.claimed_by = self.node
            row.lease_expires_at = now + dt.timedelta(seconds=lease_s)
            claimed.append((row, series))
        return claimed

    def _end_claim(
        self,
        s: Session,
        row: Any,
        entity: str,
        detail: str,
        *,
        study_uid: str,
        now: dt.datetime,
        ok: bool,
        status: Any,
        error: str | None,
    ) -> bool:
        """End this node's claim on a leased outbox row for one recorded attempt. True when the
        row is no longer pending (another dispatcher finished it after this one's lease
        expired): the attempt is then a 'late_attempt' event -- the receiver may hold the
        message twice, and the audit trail says so -- and nothing else changes."""
        if row.claimed_by == self.node:
            row.claimed_by, row.lease_expires_at = None, None
        if row.state == "pending":
            return False
        self._event(
            s,
            entity,
            row.id,
            "late_attempt",
            at=now,
            from_state=row.state,
            to_state=row.state,
            study_uid=study_uid,
            series_uid=row.series_uid,
            details={
                detail: getattr(row, detail),
                "node": self.node,
                "ok": bool(ok),
                "status": status,
                "error": error,
            },
        )
        return True
