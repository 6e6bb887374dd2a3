"""The service lifecycle: start every part in the right order, stop them cleanly.

Start (why this order): the database is migrated and crash leftovers are recovered *before* the
listener opens, so nothing new races with recovery; the receiver opens next (a PACS should not
wait for a model to load); then the assembler (which also re-decides series left 'complete' and
completes series left 'receiving' by quiet time), the workers (loading the checkpoint in their
inference processes) and the dispatcher (resending pending exports).

Stop (SIGTERM/SIGINT): stop accepting associations, let running ones finish (up to
`network.dimse_timeout_s`, then they are aborted), let the assembler finish its pass, let
workers finish the job in flight (up to `model.job_timeout_s`; a job cut off is requeued at the
next start), let the dispatcher finish its send; exit 0. The whole stop is bounded by
:func:`stop_grace_s`; past it a watchdog ends the process (exit 1) -- nothing acknowledged is
lost that way either: instances are durable before Success and unfinished jobs are requeued.

Least privilege: the data directory is made 0700 and the SQLite database files 0600 whatever
the umask (the database holds accession numbers, and names with `audit.store_phi`); a node on a
non-loopback address refuses to start with an empty allow-list unless
`network.allow_any_caller = true` (:func:`node.config.check_exposure`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.log import banner, get_logger
from node.config import NodeConfig

if TYPE_CHECKING:  # the parts are imported when started (the CLI stays light)
    from node.assembler import Assembler
    from node.dashboard import Dashboard
    from node.dispatcher import Dispatcher
    from node.metrics import Metrics
    from node.notify import Notifier
    from node.receiver import Receiver
    from node.receiver_pool import ReceiverPool
    from node.worker import WorkerPool
    from storage import Database, Spool, Store

log = get_logger("node.service")


#: Seconds on top of the summed stop timeouts before the watchdog ends the process.
STOP_MARGIN_S = 10.0
#: With a shared database, spool temp files younger than this may be another node's write.
SHARED_TEMP_AGE_S = 3600.0


def stop_grace_s(config: NodeConfig) -> float:
    """How long a SIGTERM may take at most: associations (`dimse_timeout_s`), the job in
    flight (`model.job_timeout_s`), the dispatcher's send (`dimse_timeout_s`), plus a margin."""
    return 2 * config.network.dimse_timeout_s + config.model.job_timeout_s + STOP_MARGIN_S


def _private(path: Path, mode: int) -> None:
    try:
        os.chmod(path, mode)
    except OSError as exc:  # not ours (a shared mount): say so, keep going
        log.warning(
            "cannot restrict permissions", path=str(path), mode=oct(mode), error=exc.strerror
        )


def secure_data_dir(config: NodeConfig) -> None:
    """Data dir 0700, SQLite database (+ -wal/-shm/-journal) 0600, whatever the umask.

    The database file is created 0600 before SQLite opens it: SQLite gives its -wal and -shm
    files the permissions of the database file."""
    data = config.data_dir
    data.mkdir(parents=True, exist_ok=True)
    _private(data, 0o700)
    if config.storage.database_url:
        url = config.storage.database_url
        if not url.startswith("sqlite:///"):
            return
        db_path = Path(url.removeprefix("sqlite:///")).expanduser()
    else:
        db_path = data / "molre.db"
    if not db_path.exists():
        db_path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(db_path, os.O_CREAT | os.O_WRONLY, 0o600))
    for suffix in ("", "-wal", "-shm", "-journal"):
        f = db_path.with_name(db_path.name + suffix)
        if f.exists():
            _private(f, 0o600)


def open_storage(config: NodeConfig) -> tuple[Spool, Database, Store]:
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

    secure_data_dir(config)
    spool = Spool(config.spool_dir)
    db = Database(config.database_url, synchronous="NORMAL")
    # a database other nodes may share (PostgreSQL): the spool may be shared too, so only temp
    # files nobody touched for an hour are crash leftovers (docs/operations.md, "Several nodes")
    spool.clean_temp(min_age_s=SHARED_TEMP_AGE_S if db.dialect == "postgresql" else 0.0)
    db.upgrade()
    store = Store(db, store_phi=config.audit.store_phi, node=config.node_name)
    return spool, db, store


class NodeService:
    """The running node. `run()` blocks until SIGTERM/SIGINT; `start()`/`stop()` for embedding."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        # each part exists only on a node whose roles ask for it (None otherwise)
        self.store: Store | None = None
        self.spool: Spool | None = None
        self.db: Database | None = None
        self.metrics: Metrics | None = None
        self.receiver: Receiver | ReceiverPool | None = None
        self.assembler: Assembler | None = None
        self.workers: WorkerPool | None = None
        self.dispatcher: Dispatcher | None = None
        self.notifier: Notifier | None = None
        self.dashboard: Dashboard | None = None
        self.port: int | None = None
        self._stop_event = threading.Event()
        self._stopped = False

    def _check_checkpoint(self) -> str:
        """Cheap start-up check of `model.checkpoint` (the full load happens in the inference
        process, so the node process never imports torch in process isolation)."""
        from common.errors import ConfigError
        from node.config import DEMO_CHECKPOINT

        path = self.config.model.checkpoint
        if not path or path == DEMO_CHECKPOINT:  # the config keeps "demo" only for that one
            return "packaged demo checkpoint"
        from pathlib import Path

        if not Path(path).exists():
            raise ConfigError(
                f"model.checkpoint: {path} does not exist; pass a checkpoint "
                f"directory (model.json + adapter.safetensors) or leave it empty "
                f"for the demo checkpoint"
            )
        return path

    def start(self) -> None:
        from node.assembler import Assembler
        from node.config import check_exposure
        from node.dispatcher import Dispatcher
        from node.metrics import Metrics
        from node.receiver import Receiver, reconcile_spool
        from node.worker import WorkerPool

        cfg = self.config
        check_exposure(cfg)
        checkpoint = self._check_checkpoint()
        spool, self.db, store = open_storage(cfg)
        spool, self.store = spool, store
        # rows a power cut took from the database (synchronous=NORMAL) come back from the spool
        # before recovery and before the listener opens
        from storage.identity import load_patient_keyer

        reconciled = {"reindexed": 0, "conflicts": 0}
        if cfg.has_role("receive"):  # the spool files this node received
            reconciled = reconcile_spool(store, spool, load_patient_keyer(cfg.data_dir))
        recovered = store.recover_on_start()
        self.metrics = metrics = Metrics()
        if cfg.metrics.port:
            metrics.serve(cfg.metrics.port, cfg.metrics.host)
        # roles (node.roles / serve --roles): each part runs only where it is asked for; the
        # parts of other nodes are reached through the shared database (their loops poll it)
        if cfg.has_role("dispatch"):
            self.dispatcher = Dispatcher(cfg, store, metrics=metrics)
            if cfg.notifications.enabled or cfg.notifications.channels:
                from node.notify import Notifier  # drains rows even after rules were removed

                self.notifier = Notifier(cfg, self.store)
        if cfg.has_role("infer"):
            if not cfg.destinations and not cfg.has_role("dispatch"):
                # the worker creates one export per configured destination name: an infer-only
                # node without [[destinations]] reports what no dispatcher will ever send
                log.warning(
                    "infer role without [[destinations]]: this node's reports get no "
                    "exports; list the dispatchers' destinations here too "
                    "(docs/operations.md, 'Several nodes')"
                )
            self.workers = WorkerPool(
                cfg,
                store,
                spool,
                metrics=metrics,
                on_reported=self.dispatcher.wake if self.dispatcher else None,
            )
        if cfg.has_role("assemble"):
            self.assembler = Assembler(
                cfg,
                store,
                metrics=metrics,
                on_enqueued=self.workers.wake if self.workers else None,
                spool=spool,
            )
        if cfg.has_role("receive"):
            from node.receiver_pool import ReceiverPool, receiver_processes

            # network.receiver_processes > 1: associations served by receiver processes fed
            # by an acceptor here (node/receiver_pool.py), so they do not share one GIL
            rx_class = ReceiverPool if receiver_processes(cfg) > 1 else Receiver
            self.receiver = rx_class(
                cfg,
                store,
                spool,
                metrics=metrics,
                on_release=self.assembler.wake if self.assembler else None,
            )
            self.port = self.receiver.start()
        for part in (self.assembler, self.workers, self.dispatcher, self.notifier):
            if part is not None:
                part.start()
        self._start_dashboard(store)
        store.log_event(
            "node",
            cfg.node_name,
            "started",
            details={
                "roles": list(cfg.node.roles),
                "node": cfg.node_name,
                "ae_title": cfg.network.ae_title,
                "port": self.port,
                "checkpoint": checkpoint,
                "recovered": recovered,
                "reindexed": reconciled["reindexed"] + reconciled["conflicts"],
                "durability": cfg.storage.durability,
                "destinations": [d.name for d in cfg.destinations],
            },
        )
        listening = (
            f"serving AE {cfg.network.ae_title} on {cfg.network.host}:{self.port}"
            if self.receiver is not None
            else "not receiving"
        )
        line = (
            f"molre-node {cfg.node_name} [{','.join(cfg.node.roles)}] {listening}"
            f"{' (TLS)' if cfg.tls.enabled else ''} | checkpoint {checkpoint} | device "
            f"{cfg.model.device} x{cfg.model.workers} ({cfg.model.isolation}) | data "
            f"{cfg.data_dir} | destinations "
            f"{', '.join(f'{d.name}={d.ae_title}@{d.host}:{d.port}' for d in cfg.destinations) or 'none'}"
            f"{f' | metrics :{cfg.metrics.port}' if cfg.metrics.port else ''}"
            f"{f' | dashboard http://{cfg.dashboard.host}:{self.dashboard.port}/' if self.dashboard else ''}"
        )
        banner(line)  # a JSON record when logging is JSON: every stderr line parses
        log.info(
            "node started",
            ae_title=cfg.network.ae_title,
            port=self.port,
            checkpoint=checkpoint,
            data_dir=str(cfg.data_dir),
            recovered=recovered,
        )

    def _start_dashboard(self, store: Store) -> None:
        """The read-only dashboard (node/dashboard.py); a port it cannot bind is an error in
        the log and the audit trail, never a reason for the node not to serve DICOM."""
        d = self.config.dashboard
        if not (d.enabled and d.port):
            return
        from node.dashboard import Dashboard

        try:
            dash = Dashboard(self.config, store, service=self)
            dash.start()
            self.dashboard = dash
        except OSError as exc:
            log.error("dashboard not started", host=d.host, port=d.port, error=exc.strerror)
            store.log_event(
                "node",
                self.config.node_name,
                "dashboard_failed",
                details={"host": d.host, "port": d.port, "error": exc.strerror or str(exc)},
            )

    def request_stop(self, *_: Any) -> None:
        if not self._stop_event.is_set():
            self._arm_watchdog()
        self._stop_event.set()

    def _arm_watchdog(self) -> None:
        """SIGTERM ends the process within :func:`stop_grace_s`, whatever part hangs."""
        grace = stop_grace_s(self.config)

        def watchdog() -> None:
            time.sleep(grace)
            log.error("stop did not finish within the grace; exiting", grace_s=grace)
            sys.stderr.flush()
            os._exit(1)

        threading.Thread(target=watchdog, name="stop-watchdog", daemon=True).start()

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
        if self.notifier is not None:
            self.notifier.stop(
                timeout=max([c.timeout_s for c in cfg.notifications.channels] or [10.0]) + 1.0
            )
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.metrics is not None:
            self.metrics.stop()
        if self.store is not None:
            try:
                self.store.log_event(
                    "node",
                    cfg.node_name,
                    "stopped",
                    details={"seconds": round(time.monotonic() - t0, 3)},
                )
            except Exception:  # noqa: BLE001
                pass
        log.info("node stopped", seconds=round(time.monotonic() - t0, 3))

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit status (0 after a clean stop)."""
        previous = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
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
