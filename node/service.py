"""The service lifecycle: start every part in the right order, stop them cleanly.

Start (why this order): the database is migrated and crash leftovers are recovered *before* the
listener opens, so nothing new races with recovery; the receiver opens next (a PACS should not
wait for a model to load); then the assembler (which also re-decides series left 'complete' and
completes series left 'receiving' by quiet time), the workers (loading the checkpoint in their
inference processes) and the dispatcher (resending pending exports).

Stop (SIGTERM/SIGINT): stop accepting associations, let running ones finish, let the assembler
finish its pass, let workers finish the job in flight (up to `model.job_timeout_s`; a job cut off
is requeued at the next start), let the dispatcher finish its send; exit 0.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from molre.log import banner, get_logger
from node.config import NodeConfig

log = get_logger("node.service")


def open_storage(config: NodeConfig) -> tuple[Any, Any, Any]:
    """Spool, Database and Store as the node runs them: (spool, db, store), schema migrated,
    crash leftovers of the spool removed.

    The spool fsyncs by default (reports, conflicts' directories...); the receiver applies
    `storage.durability` to received instances itself ("fsync": file + directory fsynced before
    Success; "os": no fsync). SQLite runs WAL with ``synchronous=NORMAL`` in both modes: a commit
    survives kill -9 of the process; rows lost to a power cut are rebuilt from the (fsynced)
    spool files by `node.receiver.reconcile_spool` at start-up, so the spool -- not the WAL --
    is what makes "Success = kept" hold.
    """
    from storage import Database, Spool, Store

    spool = Spool(config.spool_dir)
    spool.clean_temp()
    db = Database(config.database_url, synchronous="NORMAL")
    db.upgrade()
    store = Store(db, store_phi=config.audit.store_phi)
    return spool, db, store


class NodeService:
    """The running node. `run()` blocks until SIGTERM/SIGINT; `start()`/`stop()` for embedding."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store: Any = None
        self.spool: Any = None
        self.db: Any = None
        self.metrics: Any = None
        self.receiver: Any = None
        self.assembler: Any = None
        self.workers: Any = None
        self.dispatcher: Any = None
        self.port: int | None = None
        self._stop_event = threading.Event()
        self._stopped = False

    def _check_checkpoint(self) -> str:
        """Cheap start-up check of `model.checkpoint` (the full load happens in the inference
        process, so the node process never imports torch in process isolation)."""
        from molre.errors import ConfigError

        path = self.config.model.checkpoint
        if not path:
            return "packaged demo checkpoint"
        from pathlib import Path

        if not Path(path).exists():
            raise ConfigError(f"model.checkpoint: {path} does not exist; pass a checkpoint "
                              f"directory (model.json + adapter.safetensors) or leave it empty "
                              f"for the demo checkpoint")
        return path

    def start(self) -> None:
        from node.assembler import Assembler
        from node.dispatcher import Dispatcher
        from node.metrics import Metrics
        from node.receiver import Receiver, reconcile_spool
        from node.worker import WorkerPool

        cfg = self.config
        checkpoint = self._check_checkpoint()
        self.spool, self.db, self.store = open_storage(cfg)
        # rows a power cut took from the database (synchronous=NORMAL) come back from the spool
        # before recovery and before the listener opens
        from storage.identity import load_patient_keyer

        reconciled = reconcile_spool(self.store, self.spool, load_patient_keyer(cfg.data_dir))
        recovered = self.store.recover_on_start()
        self.metrics = Metrics()
        if cfg.metrics.port:
            self.metrics.serve(cfg.metrics.port, cfg.metrics.host)
        self.dispatcher = Dispatcher(cfg, self.store, metrics=self.metrics)
        self.workers = WorkerPool(cfg, self.store, self.spool, metrics=self.metrics,
                                  on_reported=self.dispatcher.wake)
        self.assembler = Assembler(cfg, self.store, metrics=self.metrics,
                                   on_enqueued=self.workers.wake, spool=self.spool)
        self.receiver = Receiver(cfg, self.store, self.spool, metrics=self.metrics,
                                 on_release=self.assembler.wake)
        self.port = self.receiver.start()
        self.assembler.start()
        self.workers.start()
        self.dispatcher.start()
        self.store.log_event("node", "node", "started", details={
            "ae_title": cfg.network.ae_title, "port": self.port, "checkpoint": checkpoint,
            "recovered": recovered,
            "reindexed": reconciled["reindexed"] + reconciled["conflicts"],
            "durability": cfg.storage.durability,
            "destinations": [d.name for d in cfg.destinations]})
        line = (f"molre-node serving AE {cfg.network.ae_title} on {cfg.network.host}:{self.port}"
                f"{' (TLS)' if cfg.tls.enabled else ''} | checkpoint {checkpoint} | device "
                f"{cfg.model.device} x{cfg.model.workers} ({cfg.model.isolation}) | data "
                f"{cfg.data_dir} | destinations "
                f"{', '.join(f'{d.name}={d.ae_title}@{d.host}:{d.port}' for d in cfg.destinations) or 'none'}"
                f"{f' | metrics :{cfg.metrics.port}' if cfg.metrics.port else ''}")
        banner(line)  # a JSON record when logging is JSON: every stderr line parses
        log.info("node started", ae_title=cfg.network.ae_title, port=self.port,
                 checkpoint=checkpoint, data_dir=str(cfg.data_dir), recovered=recovered)

    def request_stop(self, *_: Any) -> None:
        self._stop_event.set()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        log.info("node stopping")
        cfg = self.config
        if self.receiver is not None:
            self.receiver.stop(timeout=cfg.network.dimse_timeout_s)
        if self.assembler is not None:
            self.assembler.stop()
        if self.workers is not None:
            self.workers.stop(timeout=cfg.model.job_timeout_s)
        if self.dispatcher is not None:
            self.dispatcher.stop(timeout=cfg.network.dimse_timeout_s)
        if self.metrics is not None:
            self.metrics.stop()
        if self.store is not None:
            try:
                self.store.log_event("node", "node", "stopped",
                                     details={"seconds": round(time.monotonic() - t0, 3)})
            except Exception:  # noqa: BLE001
                pass
        log.info("node stopped", seconds=round(time.monotonic() - t0, 3))

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status (0 after a clean stop)."""
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM,
                                                                      signal.SIGINT)}
        try:
            self.start()
            while not self._stop_event.wait(1.0):
                pass
        finally:
            self.stop()
            for s, h in previous.items():
                signal.signal(s, h)
        return 0


__all__ = ["NodeService", "open_storage"]
