"""What each node stage needs of the store, the spool and the metrics, as protocols.

A stage's constructor names the narrow protocol it uses instead of ``Any``, so its dependencies
are visible where it is built and a test may hand it a fake. :class:`storage.Store`,
:class:`storage.Spool` and :class:`node.metrics.Metrics` satisfy every protocol here; mypy checks
that in ``_conformance`` at the end of this module.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from storage.db import Database
    from storage.notices import NotificationClaim
    from storage.queries import PruneReport
    from storage.records import (
        ExportClaim,
        FindingResult,
        InstanceRecord,
        JobClaim,
        SeriesRecord,
        SeriesState,
    )
    from storage.spool import Chunks

# -- metrics (prometheus_client's Counter / Gauge / Histogram, or a forwarding stand-in) ---------


class CounterMetric(Protocol):
    def inc(self, amount: float = 1, /) -> None: ...


class OutcomeCounter(Protocol):
    """A counter with one ``outcome`` label."""

    def labels(self, *, outcome: str) -> CounterMetric: ...


class GaugeMetric(Protocol):
    def set(self, value: float, /) -> None: ...


class HistogramMetric(Protocol):
    def observe(self, amount: float, /) -> None: ...


class AssemblerMetrics(Protocol):
    @property
    def series(self) -> OutcomeCounter: ...
    @property
    def queue_depth(self) -> GaugeMetric: ...


class DispatcherMetrics(Protocol):
    @property
    def exports(self) -> OutcomeCounter: ...


class WorkerMetrics(Protocol):
    @property
    def jobs(self) -> OutcomeCounter: ...
    @property
    def inference_seconds(self) -> HistogramMetric: ...
    @property
    def end_to_end_seconds(self) -> HistogramMetric: ...
    @property
    def inference_ready(self) -> GaugeMetric: ...
    @property
    def inference_load_seconds(self) -> GaugeMetric: ...


class ListenerMetrics(Protocol):
    @property
    def associations_rejected(self) -> CounterMetric: ...


class ReceiverMetrics(ListenerMetrics, Protocol):
    @property
    def instances(self) -> OutcomeCounter: ...
    @property
    def store_seconds(self) -> HistogramMetric: ...
    @property
    def associations(self) -> CounterMetric: ...
    @property
    def disk_full(self) -> CounterMetric: ...


class RefusalLog(Protocol):
    """Where the listener records connections refused before acceptance: the node's
    :class:`node.listener.RefusalAudit`, or a receiver process's forwarder to it."""

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def record(
        self,
        host: str | None,
        port: int | None,
        reason: str,
        *,
        calling_ae: str | None = None,
        called_ae: str | None = None,
        kind: str = "refused",
        sync: bool = True,
    ) -> None: ...


# -- spool ----------------------------------------------------------------------------------------


class PruneSpool(Protocol):
    """What pruning needs to remove spool files (only files under ``root``)."""

    @property
    def root(self) -> Path: ...
    def remove_if_same(self, path: str | Path, identity: tuple[int, int] | None) -> str: ...


class ReportSpool(Protocol):
    """Where the worker writes reports and evidence images."""

    def write_atomic(
        self, relpath: str | Path, data: Chunks, *, durable: bool | None = None
    ) -> Path: ...


# -- store ----------------------------------------------------------------------------------------


class EventLog(Protocol):
    """The audit log's clock and free-form events."""

    def now(self) -> dt.datetime: ...
    def log_event(
        self,
        entity: str,
        entity_id: Any,
        kind: str,
        details: dict | None = None,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
    ) -> None: ...


class ListenerStore(EventLog, Protocol):
    def record_rejected_association(
        self,
        calling_ae: str | None,
        called_ae: str | None,
        peer_host: str | None,
        peer_port: int | None,
        reason: str,
    ) -> int: ...


class AssemblerStore(Protocol):
    def series_due_for_completion(
        self, quiet_s: float, release_grace_s: float, now: dt.datetime | None = None
    ) -> list[str]: ...
    def series_in_state(self, state: SeriesState | str) -> list[str]: ...
    def series_instances(self, series_uid: str) -> list[InstanceRecord]: ...
    def get_series(self, series_uid: str) -> SeriesRecord: ...
    def series(self, **kw: Any) -> list[dict[str, Any]]: ...
    def transition(
        self,
        series_uid: str,
        to_state: SeriesState | str,
        reason: str | None = None,
        details: dict | None = None,
    ) -> None: ...
    def enqueue_job(self, series_uid: str) -> int: ...
    def exclusive(self, name: str) -> AbstractContextManager[bool]: ...
    def prune(
        self,
        older_than: dt.timedelta,
        *,
        dry_run: bool = False,
        spool: PruneSpool | None = None,
        now: dt.datetime | None = None,
    ) -> PruneReport: ...


class DispatcherStore(Protocol):
    def now(self) -> dt.datetime: ...
    def claim_exports(
        self, lease_s: float = 300.0, limit: int = 10, now: dt.datetime | None = None
    ) -> list[ExportClaim]: ...
    def record_export_attempt(
        self,
        export_id: int,
        *,
        ok: bool,
        status: int | str | None,
        error: str | None = None,
        next_attempt_at: dt.datetime | None = None,
    ) -> None: ...


class NotifierStore(Protocol):
    def now(self) -> dt.datetime: ...
    def claim_notifications(
        self, lease_s: float = 120.0, limit: int = 10, now: dt.datetime | None = None
    ) -> list[NotificationClaim]: ...
    def record_notification_attempt(
        self,
        notification_id: int,
        *,
        ok: bool,
        status: str | None,
        error: str | None = None,
        next_attempt_at: dt.datetime | None = None,
        final: bool = False,
    ) -> None: ...


class DashboardStore(Protocol):
    """Read-only: the dashboard runs its own queries on ``db``."""

    @property
    def db(self) -> Database: ...
    def now(self) -> dt.datetime: ...
    def stats(self) -> dict[str, Any]: ...


class WorkerStore(EventLog, Protocol):
    @property
    def node(self) -> str: ...
    def claim_job(
        self, worker_id: str, lease_s: float = 600, *, max_attempts: int | None = None
    ) -> JobClaim | None: ...
    def release_job(
        self, job_id: int, worker_id: str, reason: str, *, delay_s: float = 0.0
    ) -> bool: ...
    def series_instances(self, series_uid: str) -> list[InstanceRecord]: ...
    def get_series(self, series_uid: str) -> SeriesRecord: ...
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
    ) -> bool: ...
    def fail_job(
        self, job_id: int, error: str, *, max_attempts: int, retry_delay_s: float
    ) -> bool: ...
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
    ) -> None: ...


if TYPE_CHECKING:
    from node.listener import RefusalAudit
    from node.metrics import Metrics
    from node.receiver_pool import ForwardedRefusals
    from storage.spool import Spool
    from storage.store import Store

    def _conformance(
        store: Store,
        spool: Spool,
        metrics: Metrics,
        audit: RefusalAudit,
        forwarded: ForwardedRefusals,
    ) -> None:
        """Never called: mypy checks here that the real classes satisfy the protocols."""
        a: AssemblerStore = store
        d: DispatcherStore = store
        n: NotifierStore = store
        b: DashboardStore = store
        w: WorkerStore = store
        e: EventLog = store
        ls: ListenerStore = store
        p: PruneSpool = spool
        r: ReportSpool = spool
        am: AssemblerMetrics = metrics
        dm: DispatcherMetrics = metrics
        wm: WorkerMetrics = metrics
        rm: ReceiverMetrics = metrics
        ra: RefusalLog = audit
        rf: RefusalLog = forwarded
        lm: ListenerMetrics = metrics
        checked: list[object] = [a, d, n, b, w, e, ls, p, r, am, dm, wm, rm, lm, ra, rf]
        del checked
