"""`StoreCore`: what the :class:`storage.store.Store` mixins share -- the database, the node
name, the clock, the event writer and the checked series state change.

The queue, outbox and notice mixins inherit from it, so each of them says (and a type checker
sees) exactly what it relies on; :class:`storage.store.Store` sets the attributes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import CursorResult, Result, select
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
