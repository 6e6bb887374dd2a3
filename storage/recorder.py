"""The receiver's write-behind: 'stored' instance rows committed by one thread, in group commits.

Why: C-STORE Success means "kept", and what keeps an instance is its spool file, fsynced (in the
default durability) before Success is sent. The audit row does not make the instance any safer
-- the database runs ``synchronous=NORMAL``, and ``node.receiver.reconcile_spool`` re-indexes at
start-up every spool file whose row was lost -- so committing it need not hold up the sender.
The receiver queues the row here and answers; this thread commits whatever queued up meanwhile
in one transaction (:meth:`storage.Store.record_stored_batch`).

What callers can rely on:

- :meth:`InstanceRecorder.stored_digest` / :meth:`InstanceRecorder.known_instance` and
  :meth:`InstanceRecorder.series_identity` see queued rows, so duplicates, conflicts and
  identity conflicts (another study or patient under a known series UID) are detected exactly
  as if every row were committed;
- :meth:`InstanceRecorder.flush` returns once every row submitted before it is committed, or
  False after its timeout; the receiver flushes before it records an association's end (and
  before the A-RELEASE response; a flush that fails aborts the association instead),
  and the store calls it before deciding which series are complete
  (:meth:`storage.Store.set_completion_barrier`), so no series completes without rows of
  instances that were already acknowledged;
- :meth:`InstanceRecorder.stop` drains the queue;
- ``kill -9`` (or a power cut) before a commit loses only rows whose files are in the spool:
  ``reconcile_spool`` brings them back at the next start. A row the database keeps refusing
  after retries is dropped with an error log and comes back the same way.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from common.log import get_logger, redact
from storage.store import KnownInstance, SeriesIdentity, Store, StoredInstance

log = get_logger("storage.recorder")


class InstanceRecorder:
    """One writer thread for :class:`~storage.StoredInstance` rows (see the module docstring).

    Without :meth:`start` (or after :meth:`stop`), :meth:`submit` commits synchronously.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = 256,
        max_queued: int = 4096,
        linger_s: float = 0.05,
        max_unhashed: int = 64,
        retry_delays_s: tuple[float, ...] = (0.05, 0.2, 1.0, 3.0),
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.max_unhashed = max_unhashed
        # how long the writer waits for more rows before committing (one commit per several
        # rows of a sequential sender costs less CPU than one per row); a flush cuts it short
        self.linger_s = linger_s
        self._flushing = 0
        self.max_queued = max_queued
        self.retry_delays_s = retry_delays_s
        self.dropped = 0  # rows given up on (their spool files are re-indexed at start-up)
        self._cond = threading.Condition()
        self._queue: deque[StoredInstance] = deque()
        self._pending: dict[str, StoredInstance] = {}  # SOP Instance UID -> queued row
        # identities of queued rows: series UID -> [study UID, patient key, rows queued],
        # study UID -> [patient key, rows queued]
        self._pending_series: dict[str, list] = {}
        self._pending_studies: dict[str, list] = {}
        self._submitted = 0
        self._done = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: called with each row once the recorder is done with it (committed, or given up on
        #: after retries), from the writer thread or from :meth:`submit` when it commits
        #: synchronously; the receiver unpins the row's cross-process UID locks here
        self.on_done: Callable[[StoredInstance], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the writer thread and register :meth:`flush` as the store's completion barrier."""
        with self._cond:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="instance-recorder", daemon=True)
            self._thread.start()
        self.store.set_completion_barrier(self.flush)

    def stop(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then end the thread (rows after this commit synchronously)."""
        with self._cond:
            thread = self._thread
            self._stopping = True
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error(
                    "instance recorder did not drain in time; the spool files of rows "
                    "still queued are re-indexed at the next start",
                    queued=len(self._queue),
                )
        with self._cond:
            self._thread = None
        self.store.set_completion_barrier(None)

    # -- the receiver's side ------------------------------------------------------------------------
    def submit(self, row: StoredInstance) -> None:
        """Queue ``row`` (blocks while ``max_queued`` rows wait: back-pressure on the senders).

        A row may come with its data set instead of its sha256 (``row.data``): the writer
        hashes it before the commit, off the sender's path. Past ``max_unhashed`` queued rows
        it is hashed here, so a stalled database does not hold many data sets in memory."""
        if row.sha256 is None and self._submitted - self._done >= self.max_unhashed:
            row.digest()
        with self._cond:
            if self._thread is not None and not self._stopping:
                while len(self._queue) >= self.max_queued and self._thread is not None:
                    self._cond.wait()
                if self._thread is not None:
                    self._submitted += 1
                    self._queue.append(row)
                    h = row.header
                    if h.sop_instance_uid:
                        self._pending[h.sop_instance_uid] = row
                    if h.series_uid:
                        entry = self._pending_series.setdefault(
                            h.series_uid, [h.study_uid, h.patient_key, 0]
                        )
                        entry[2] += 1
                    if h.study_uid:
                        entry = self._pending_studies.setdefault(h.study_uid, [h.patient_key, 0])
                        entry[1] += 1
                    if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
                        self._cond.notify_all()  # the writer is idle, or its batch is full
                    return
        try:
            self.store.record_stored_batch([row])
        finally:
            self._finished([row])

    def _finished(self, rows: list[StoredInstance]) -> None:
        if self.on_done is None:
            return
        for row in rows:
            try:
                self.on_done(row)
            except Exception:  # noqa: BLE001 - the writer thread must go on
                log.exception("instance recorder: on_done failed")

    def stored_digest(self, sop_instance_uid: str) -> tuple[str | None, str | None] | None:
        """(sha256, spool_path) of the latest stored instance with this SOP UID, queued or
        committed (:meth:`storage.Store.stored_digest` plus the queue)."""
        known = self.known_instance(sop_instance_uid)
        return (known.sha256, known.spool_path) if known is not None else None

    def known_instance(self, sop_instance_uid: str) -> KnownInstance | None:
        """:meth:`storage.Store.known_instance`, queued rows included."""
        # queue first: a row leaves it only after its commit, so it is always in one of them
        row = self._pending.get(sop_instance_uid)
        if row is not None:
            return KnownInstance(row.digest(), row.spool_path, row.header.study_uid)
        return self.store.known_instance(sop_instance_uid)

    def series_identity(self, series_uid: str | None, study_uid: str | None) -> SeriesIdentity:
        """:meth:`storage.Store.series_identity`, queued rows included (they win: a queued
        row of a series is newer than its committed ones). Callers that act on the answer
        serialise per series and study themselves (the receiver's UID locks)."""
        series = self._pending_series.get(series_uid or "")
        study = self._pending_studies.get(study_uid or "")
        if series is not None and study is not None:
            return SeriesIdentity(series[0], series[1], study[0])
        known = self.store.series_identity(series_uid, study_uid)
        return SeriesIdentity(
            series[0] if series is not None else known.series_study_uid,
            series[1] if series is not None and series[1] else known.series_patient_key,
            study[0] if study is not None and study[0] else known.study_patient_key,
        )

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every row submitted before this call is committed (or given up on);
        False when ``timeout`` passed first."""
        with self._cond:
            target = self._submitted
            self._flushing += 1
            self._cond.notify_all()  # end the writer's linger
            try:
                return self._cond.wait_for(lambda: self._done >= target, timeout)
            finally:
                self._flushing -= 1

    def queued(self) -> int:
        """Rows submitted and not yet committed."""
        with self._cond:
            return self._submitted - self._done

    # -- the writer thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                deadline = time.monotonic() + self.linger_s
                while (
                    len(self._queue) < self.max_batch and not self._stopping and not self._flushing
                ):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not self._queue:
                    return
                batch = [
                    self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))
                ]
                self._cond.notify_all()  # room for blocked submitters
            self._commit(batch)
            self._finished(batch)
            with self._cond:
                for row in batch:
                    h = row.header
                    uid = h.sop_instance_uid
                    if uid and self._pending.get(uid) is row:
                        del self._pending[uid]
                    for table, uid, slot in (
                        (self._pending_series, h.series_uid, 2),
                        (self._pending_studies, h.study_uid, 1),
                    ):
                        key = uid or ""
                        entry = table.get(key)
                        if entry is not None:
                            entry[slot] -= 1
                            if entry[slot] <= 0:
                                del table[key]
                self._done += len(batch)
                self._cond.notify_all()

    def _commit(self, batch: list[StoredInstance]) -> None:
        """Commit ``batch``; retry it (the database may be locked or briefly unavailable), then
        row by row, dropping only rows that still fail."""
        for delay in (*self.retry_delays_s, None):
            try:
                self.store.record_stored_batch(batch)
                return
            except Exception as exc:  # noqa: BLE001 - the thread must outlive database errors
                if delay is None:
                    log.warning(
                        "group commit failed; writing rows one by one",
                        rows=len(batch),
                        error=f"{type(exc).__name__}: {redact(str(exc))}",
                    )
                    break
                time.sleep(delay)
        for row in batch:
            try:
                self.store.record_stored_batch([row])
            except Exception:  # noqa: BLE001
                self.dropped += 1
                log.exception(
                    "audit row of a stored instance could not be written; its spool "
                    "file is re-indexed at the next start",
                    sop_instance_uid=row.header.sop_instance_uid,
                    spool_path=row.spool_path,
                )


__all__ = ["InstanceRecorder"]
