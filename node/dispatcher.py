"""The dispatcher: sends reports from the persistent outbox to every destination.

Why an outbox in the database: a result must never be lost because a PACS was down or the node
restarted. `storage` keeps one export row per (report, destination); the dispatcher takes the
ones that are due, C-STOREs the report (plus its summary SC if there is one) over one association
per destination, and records every attempt. Exports are *claimed* with a lease
(`Store.claim_exports`), so dispatchers of several nodes on one database never send the same
report at once. A failed attempt is retried after
`min(retry.export_backoff_max_s, retry.export_backoff_base_s * 2 ** (attempts - 1))` seconds —
forever, with the ceiling; nothing is dropped. A destination removed from the config keeps its
pending exports (they fail with a clear error until it is configured again).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from pathlib import Path
from typing import Any

from common.log import get_logger, redact
from node.background import DrainLoop
from node.config import Destination, NodeConfig
from node.dicomnet import AssociationError, client_ssl_context, send_files
from node.interfaces import DispatcherMetrics, DispatcherStore
from storage.outbox import report_files
from storage.records import ExportClaim

log = get_logger("node.dispatcher")

#: Exports claimed per pass (each holds a lease until its attempt is recorded).
CLAIM_BATCH = 10


def backoff_s(attempts: int, base: float, ceiling: float) -> float:
    """Delay before the next attempt after `attempts` failed ones (exponential, capped)."""
    return float(min(ceiling, base * (2 ** max(0, attempts - 1))))


class Dispatcher(DrainLoop):
    """Background thread draining the outbox."""

    def __init__(
        self,
        config: NodeConfig,
        store: DispatcherStore,
        *,
        metrics: DispatcherMetrics | None = None,
        poll_s: float = 0.5,
    ) -> None:
        super().__init__("dispatcher", poll_s)
        self.config = config
        self.store = store
        self.metrics = metrics

    def _ssl(self, dest: Destination) -> Any:
        if not dest.tls:
            return None
        t = self.config.tls
        return client_ssl_context(t.ca or None, t.certificate or None, t.key or None)

    def lease_s(self) -> float:
        """How long a claim on a batch of exports lasts: every object of a full batch may take
        up to `network.dimse_timeout_s`, plus a margin (then another dispatcher may take it)."""
        return 60.0 + 2 * CLAIM_BATCH * self.config.network.dimse_timeout_s

    def tick(self) -> int:
        """Claim the due exports (one delivery attempt at a time across every dispatcher on the
        database) and attempt each once; returns how many were attempted."""
        due = self.store.claim_exports(lease_s=self.lease_s(), limit=CLAIM_BATCH)
        if not due:
            return 0
        by_dest: dict[str, list[ExportClaim]] = defaultdict(list)
        for e in due:
            by_dest[e.destination].append(e)
        for name, exports in by_dest.items():
            if self._stop.is_set():
                break
            self._send(name, exports)
        return len(due)

    def _fail(self, e: ExportClaim, status: int | None, error: str) -> None:
        r = self.config.retry
        error = redact(error, 1000)  # library texts may quote header values (the SR's too)
        delay = backoff_s(e.attempts + 1, r.export_backoff_base_s, r.export_backoff_max_s)
        nxt = self.store.now() + dt.timedelta(seconds=delay)
        self.store.record_export_attempt(
            e.id, ok=False, status=status, error=error[:1000], next_attempt_at=nxt
        )
        log.warning(
            "export failed",
            export_id=e.id,
            series_uid=e.series_uid,
            destination=e.destination,
            attempt=e.attempts + 1,
            error=error[:200],
            retry_in_s=delay,
        )
        if self.metrics is not None:
            self.metrics.exports.labels(outcome="failed").inc()

    def _send(self, name: str, exports: list[ExportClaim]) -> None:
        dest = self.config.destination(name)
        if dest is None:
            for e in exports:
                self._fail(
                    e,
                    None,
                    f"destination {name!r} is not in the configuration "
                    f"([[destinations]] name = {name!r})",
                )
            return
        batch: list[tuple[ExportClaim, list[Path]]] = []
        for e in exports:
            files = report_files(e.report_path) if e.report_path else []
            if not files or not files[0].exists():
                self._fail(e, None, f"report file missing: {e.report_path}")
                continue
            batch.append((e, files))
        if not batch:
            return
        all_files = [f for _, files in batch for f in files]
        calling = dest.calling_ae_title or self.config.network.ae_title
        try:
            result = send_files(
                all_files,
                dest.host,
                dest.port,
                dest.ae_title,
                calling_ae=calling,
                ssl_context=self._ssl(dest),
                timeout=self.config.network.dimse_timeout_s,
            )
        except (AssociationError, OSError, ValueError, RuntimeError) as exc:
            for e, _ in batch:
                self._fail(e, None, str(exc))
            return
        i = 0
        for e, files in batch:
            statuses = result.statuses[i : i + len(files)]
            errors = result.errors[i : i + len(files)]
            i += len(files)
            ok = all(s is not None and (s == 0 or 0xB000 <= s <= 0xBFFF) for s in statuses)
            status = next(
                (s for s in statuses if s not in (0, None)), statuses[0] if statuses else None
            )
            if ok:
                self.store.record_export_attempt(e.id, ok=True, status=status)
                log.info(
                    "export delivered",
                    export_id=e.id,
                    series_uid=e.series_uid,
                    destination=name,
                    attempt=e.attempts + 1,
                    objects=len(files),
                )
                if self.metrics is not None:
                    self.metrics.exports.labels(outcome="delivered").inc()
            else:
                err = "; ".join(x for x in errors if x) or (
                    f"C-STORE status 0x{status:04X}" if isinstance(status, int) else "failed"
                )
                self._fail(e, status, err)


__all__ = ["Dispatcher", "backoff_s"]
