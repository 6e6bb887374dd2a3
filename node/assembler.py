"""The assembler: decides when a series is complete and whether the model reads it.

Why a polling loop over the database rather than in-memory timers: the database is the only
state that survives kill -9. A series in 'receiving' is complete when no instance arrived for
`assembler.quiet_time_s`, or `assembler.release_grace_s` after every association that carried it
was released (storage computes both). Complete series are then judged by the selection rules
(node.selection) one study at a time, so that "prefer the thinnest soft-tissue series" can see
the siblings; while a sibling series of the same study is still receiving, the decision waits
for it (at most its quiet time). Every skip has a reason in the audit log.

After a restart, series left in 'complete' are simply decided again by the same loop, and series
still in 'receiving' complete by quiet time (their associations died with the old process).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Callable

from common.log import get_logger
from node.background import BackgroundLoop
from node.config import NodeConfig
from node.interfaces import AssemblerMetrics, AssemblerStore, PruneSpool
from node.selection import SeriesSummary, choose_preferred, evaluate, summarize

log = get_logger("node.assembler")

_DECIDED_SELECTED = ("selected", "queued", "inferring", "reported", "delivered")


class Assembler(BackgroundLoop):
    """Background thread: receiving -> complete -> selected/queued or skipped."""

    def __init__(
        self,
        config: NodeConfig,
        store: AssemblerStore,
        *,
        metrics: AssemblerMetrics | None = None,
        on_enqueued: Callable[[], None] | None = None,
        spool: PruneSpool | None = None,
    ) -> None:
        super().__init__("assembler")
        self.config = config
        self.store = store
        self.metrics = metrics
        self.on_enqueued = on_enqueued
        self.spool = spool
        self._last_prune = 0.0

    # -- lifecycle -------------------------------------------------------------------------------
    def _run(self) -> None:
        a = self.config.assembler
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - keep assembling whatever one tick did
                log.exception("assembler tick failed")
            self._wake.wait(a.poll_interval_s)
            if self._wake.is_set():
                # a release: wait out the grace period so storage sees the series as due
                self._wake.clear()
                self._stop.wait(min(a.release_grace_s + 0.05, a.quiet_time_s))

    # -- one pass ----------------------------------------------------------------------------------
    def tick(self, now: dt.datetime | None = None) -> dict[str, int]:
        """One pass: complete due series, then decide complete ones. Returns counts.

        Several nodes with the assemble role on one database: a pass runs under
        ``Store.exclusive("assembler")``, so one assembler at a time takes series (the others
        skip the pass; whichever polls next continues)."""
        with self.store.exclusive("assembler") as mine:
            if not mine:
                return {"completed": 0, "selected": 0, "skipped": 0}
            return self._tick(now)

    def _tick(self, now: dt.datetime | None = None) -> dict[str, int]:
        a = self.config.assembler
        counts = {"completed": 0, "selected": 0, "skipped": 0}
        for uid in self.store.series_due_for_completion(a.quiet_time_s, a.release_grace_s, now=now):
            try:
                rec = self.store.get_series(uid)
                self.store.transition(uid, "complete", details={"instances": rec.instance_count})
                counts["completed"] += 1
                log.info(
                    "series complete",
                    series_uid=uid,
                    instances=rec.instance_count,
                    version=rec.version,
                )
            except Exception as exc:  # noqa: BLE001 - raced with a late instance: next tick
                log.info("series completion deferred", series_uid=uid, error=str(exc))
        complete = self.store.series_in_state("complete")
        by_study: dict[str, list[str]] = defaultdict(list)
        for uid in complete:
            try:
                by_study[self.store.get_series(uid).study_uid].append(uid)
            except Exception:  # noqa: BLE001
                log.exception("cannot read series", series_uid=uid)
        for study_uid, uids in by_study.items():
            try:
                sel, skip = self._decide_study(study_uid, uids)
                counts["selected"] += sel
                counts["skipped"] += skip
            except Exception:  # noqa: BLE001 - one bad study never blocks the others
                log.exception("selection failed", study_uid=study_uid)
        if self.metrics is not None:
            try:
                self.metrics.queue_depth.set(len(self.store.series_in_state("queued")))
            except Exception:  # noqa: BLE001
                pass
        self._maybe_prune()
        return counts

    def _summary(self, uid: str, study_uid: str) -> SeriesSummary:
        metas = [inst.meta for inst in self.store.series_instances(uid)]
        return summarize(uid, metas, study_uid=study_uid)

    def _decide_study(self, study_uid: str, uids: list[str]) -> tuple[int, int]:
        rules = self.config.selection
        siblings = self.store.series(study_uid=study_uid, limit=None)
        if rules.prefer != "all" and any(
            s["state"] == "receiving" for s in siblings if s["series_uid"] not in uids
        ):
            return 0, 0  # wait until the whole study is in (bounded by the quiet time)
        selected = skipped = 0
        candidates: list[SeriesSummary] = []
        for uid in uids:
            summary = self._summary(uid, study_uid)
            decision = evaluate(summary, rules)
            if decision.selected:
                candidates.append(summary)
            else:
                self._skip(uid, decision.reason or "rules")
                skipped += 1
        if not candidates:
            return selected, skipped
        earlier = [
            self._summary(s["series_uid"], study_uid)
            for s in siblings
            if s["state"] in _DECIDED_SELECTED and s["series_uid"] not in uids
        ]
        chosen, reasons = choose_preferred(candidates + earlier, rules)
        chosen_uids = {c.series_uid for c in chosen}
        for c in candidates:
            if c.series_uid in chosen_uids:
                self._select(c)
                selected += 1
            else:
                self._skip(c.series_uid, reasons.get(c.series_uid, "preference"))
                skipped += 1
        return selected, skipped

    def _skip(self, uid: str, reason: str) -> None:
        self.store.transition(uid, "skipped", reason=reason)
        log.info("series skipped", series_uid=uid, reason=reason)
        if self.metrics is not None:
            self.metrics.series.labels(outcome="skipped").inc()

    def _select(self, summary: SeriesSummary) -> None:
        uid = summary.series_uid
        self.store.transition(
            uid,
            "selected",
            details={
                "slices": summary.slices,
                "slice_thickness": summary.slice_thickness,
                "slice_thickness_values": summary.slice_thickness_values,
                "kernel": summary.kernel,
            },
        )
        job_id = self.store.enqueue_job(uid)
        log.info("series selected", series_uid=uid, job_id=job_id, slices=summary.slices)
        if self.metrics is not None:
            self.metrics.series.labels(outcome="selected").inc()
        if self.on_enqueued is not None:
            self.on_enqueued()

    # -- retention ---------------------------------------------------------------------------------
    def _maybe_prune(self) -> None:
        days = self.config.audit.retention_days
        if days <= 0 or time.monotonic() - self._last_prune < 3600:
            return
        self._last_prune = time.monotonic()
        try:
            result = self.store.prune(dt.timedelta(days=days), spool=self.spool)
            log.info("retention prune", retention_days=days, result=str(result)[:200])
        except Exception:  # noqa: BLE001
            log.exception("retention prune failed")


__all__ = ["Assembler"]
