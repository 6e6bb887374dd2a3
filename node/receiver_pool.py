"""Ingest across cores: one acceptor, several receiver processes (``network.receiver_processes``).

Why: pynetdicom runs every association in threads of one interpreter, so a node receiving from
several PACS at once got one core's worth of ingest (the GIL), however many cores it had.

How: the node process keeps the listening socket and accepts; each accepted connection is
handed (``SCM_RIGHTS``, :func:`socket.send_fds`) to the receiver process with the fewest open
connections, which serves it with the same :class:`node.receiver.Receiver` as one process does
(a :class:`node.listener.FedServer`: no listening socket of its own). An acceptor rather than
``SO_REUSEPORT`` so that the limits stay in one place, with the same semantics as before:

- **per-host limit** (``network.max_associations_per_host``): counted and refused by the
  acceptor at accept, before any byte is read, with the same audit row as one process;
- **max associations** (``network.max_associations``): the acceptor counts open connections
  across all processes; a connection past the limit is still handed over, marked, and its
  receiver answers the A-ASSOCIATE-RQ with the rejection pynetdicom gives in one process
  (rejected-transient, local limit exceeded) after the allow-list check;
- **allow-list, TLS, deadlines, size caps**: unchanged -- each receiver process runs them;
- **audit**: every association, instance and refusal row is written by the process that saw it
  into the same database. Refusal rows are rate-limited per process
  (``network.refusal_audit_per_minute`` each);
- **write-before-ack, duplicates, identity conflicts**: the file is durable before Success as
  before, and its 'stored' row goes through the receiver process's write-behind as in one
  process. The UID locks that serialise "new, duplicate, conflict or identity conflict?" become
  cross-process (:class:`ProcessUIDLocks`: POSIX byte-range locks on ``receiver.locks`` in the
  data dir, one byte per hashed UID); threads of one process see its queued rows, but another
  process decides from the database, so a stored instance's study, series and SOP keys stay
  locked for other processes until its row is committed (``pin`` / ``unpin``). A sender that
  resends the same UIDs to another process at that moment waits the write-behind's linger
  (~50 ms), not a commit per instance.

A receiver process that dies is replaced; its connections are lost (their senders see the
connection drop; what they were answered Success for is in the spool and the database).
Metrics of the receiver processes are forwarded to the node's registry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from common.errors import MolreError
from common.log import get_logger
from node.listener import RefusalAudit, peer_host
from node.receiver import UIDLocks

log = get_logger("node.receiver_pool")

#: ``network.receiver_processes = 0`` (auto): the number of cores, at most this many.
AUTO_MAX_PROCESSES = 4
#: How long the node waits for its receiver processes to start (imports, database).
START_TIMEOUT_S = 120.0
_MSG = 64 * 1024


def receiver_processes(config: Any) -> int:
    """``network.receiver_processes`` with 0 resolved to the core count (capped)."""
    n = int(getattr(config.network, "receiver_processes", 1) or 0)
    if n > 0:
        return n
    return max(1, min(os.cpu_count() or 1, AUTO_MAX_PROCESSES))


def lock_file(config: Any) -> Path:
    return Path(config.data_dir) / "receiver.locks"


# ---------------------------------------------------------------------------------------------
# cross-process UID locks
# ---------------------------------------------------------------------------------------------


class ProcessUIDLocks(UIDLocks):
    """:class:`node.receiver.UIDLocks` that also exclude other processes.

    Each key is one byte of a lock file (offset = 48-bit hash of the key), locked with POSIX
    ``fcntl`` locks. Such locks belong to the process, not the thread, so they are counted
    here: the first holder in this process locks the byte, the last one unlocks it; threads of
    this process still exclude each other through the parent class. A hash collision only
    makes two keys wait for each other. ``EDEADLK`` (the kernel sees two *processes* waiting on
    each other; every holder takes its keys in the same order and does not wait while holding,
    so it resolves as soon as the other holder's decision is done) is retried."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._cond = threading.Condition()
        self._held: dict[int, list] = {}  # offset -> [holders, being acquired]

    @staticmethod
    def offset(key: str) -> int:
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=6).digest(), "big")

    def _take(self, off: int) -> None:
        with self._cond:
            while True:
                entry = self._held.get(off)
                if entry is None:
                    self._held[off] = [0, True]
                    break
                if not entry[1]:
                    entry[0] += 1
                    return
                self._cond.wait()
        try:
            while True:
                try:
                    fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, off)
                    break
                except OSError as exc:
                    if exc.errno != errno.EDEADLK:
                        raise
                    time.sleep(0.002)
        except BaseException:
            with self._cond:
                del self._held[off]
                self._cond.notify_all()
            raise
        with self._cond:
            self._held[off] = [1, False]
            self._cond.notify_all()

    def _drop(self, off: int) -> None:
        with self._cond:
            entry = self._held[off]
            entry[0] -= 1
            if entry[0] == 0:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, off)
                del self._held[off]
                self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, *keys: str):
        with super().hold(*keys):
            taken: list[int] = []
            try:
                for key in dict.fromkeys(k for k in keys if k):
                    off = self.offset(key)
                    self._take(off)
                    taken.append(off)
                yield
            finally:
                for off in reversed(taken):
                    self._drop(off)

    def pin(self, *keys: str) -> None:
        """Count one more holder of each key's byte (the caller holds them now), so that the
        byte stays locked after :meth:`hold` ends, until :meth:`unpin`: the row decided under
        these keys is still in this process's write-behind, and another process decides from
        the database."""
        with self._cond:
            for key in dict.fromkeys(k for k in keys if k):
                self._held[self.offset(key)][0] += 1

    def unpin(self, *keys: str) -> None:
        for key in reversed(list(dict.fromkeys(k for k in keys if k))):
            self._drop(self.offset(key))

    def pinned(self) -> int:
        """Bytes this process holds locked (held or pinned)."""
        with self._cond:
            return len(self._held)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


# ---------------------------------------------------------------------------------------------
# a receiver process
# ---------------------------------------------------------------------------------------------


class _Count:
    def __init__(self, sink: "RemoteMetrics", name: str, label: str | None = None) -> None:
        self.sink, self.name, self.label = sink, name, label

    def labels(self, outcome: str) -> "_Count":
        return _Count(self.sink, self.name, outcome)

    def inc(self, n: float = 1) -> None:
        self.sink.add(self.name, self.label, n)

    def observe(self, value: float) -> None:
        self.sink.add(self.name, None, value, observe=True)


class RemoteMetrics:
    """What :class:`node.receiver.Receiver` touches of :class:`node.metrics.Metrics`, sent to
    the node process in batches (at most every ``interval`` seconds, and at the end)."""

    def __init__(self, send: Any, interval: float = 0.5) -> None:
        self._send = send
        self.interval = interval
        self._lock = threading.Lock()
        self._counts: dict[str, float] = {}
        self._obs: list[float] = []
        self._last = time.monotonic()
        for name in ("instances", "associations", "associations_rejected", "disk_full"):
            setattr(self, name, _Count(self, name))
        self.store_seconds = _Count(self, "store_seconds")
        # counts of a quiet moment (the last instance of a burst) are sent on a timer too
        threading.Thread(target=self._tick, name="metrics-flush", daemon=True).start()

    def _tick(self) -> None:
        while True:
            time.sleep(self.interval)
            self.flush()

    def add(self, name: str, label: str | None, value: float, observe: bool = False) -> None:
        with self._lock:
            if observe:
                self._obs.append(round(value, 6))
            else:
                key = f"{name}:{label or ''}"
                self._counts[key] = self._counts.get(key, 0) + value
            due = time.monotonic() - self._last >= self.interval
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            counts, obs = dict(self._counts), self._obs
            self._counts, self._obs = {}, []
            self._last = time.monotonic()
        if counts or obs:
            self._send({"op": "metrics", "counts": counts, "obs": obs})


def apply_metrics(metrics: Any, msg: dict) -> None:
    """Add a :class:`RemoteMetrics` batch to the node's registry."""
    if metrics is None:
        return
    for key, n in msg.get("counts", {}).items():
        name, _, label = key.partition(":")
        metric = getattr(metrics, name, None)
        if metric is None:
            continue
        (metric.labels(outcome=label) if label else metric).inc(n)
    for value in msg.get("obs", []):
        metrics.store_seconds.observe(value)


class ForwardedRefusals:
    """A receiver process's :class:`node.listener.RefusalAudit`: refusals are recorded by the
    node process's one audit, so ``network.refusal_audit_per_minute`` stays one budget for the
    node. ``sync=True`` waits (up to 5 s) until the node process has written the row."""

    def __init__(self, send: Any) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._seq = 0
        self._waiting: dict[int, threading.Event] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

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
    ) -> None:
        done = threading.Event()
        with self._lock:
            self._seq += 1
            seq = self._seq
            if sync:
                self._waiting[seq] = done
        self._send(
            {
                "op": "refusal",
                "seq": seq,
                "sync": sync,
                "args": [host, port, reason],
                "kw": {"calling_ae": calling_ae, "called_ae": called_ae, "kind": kind},
            }
        )
        if sync:
            done.wait(5.0)
            with self._lock:
                self._waiting.pop(seq, None)

    def acked(self, seq: int) -> None:
        with self._lock:
            done = self._waiting.get(seq)
        if done is not None:
            done.set()


def _answer_flush(receiver: Any, send: Any, seq: int, timeout: float) -> None:
    """The node process's completion barrier, in a receiver process: commit what is queued."""
    try:
        ok = bool(receiver.flush(timeout))
    except Exception:  # noqa: BLE001 - answer anyway: the node must not wait forever
        log.exception("write-behind flush failed")
        ok = False
    send({"op": "flushed", "seq": seq, "ok": ok})


def _child_main(config: Any, ctrl: socket.socket, index: int, address: tuple[str, int]) -> None:
    """Entry point of a receiver process (spawned): serve what the acceptor hands over until
    told to stop (or the node process is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node process decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from common.log import configure_logging

    configure_logging(json_output=config.logging.json, level=config.logging.level)
    from node.receiver import Receiver
    from storage import Database, Spool, Store

    send_lock = threading.Lock()

    def send(msg: dict) -> None:
        data = json.dumps(msg).encode()
        with send_lock:
            try:
                ctrl.send(data)
            except OSError:
                pass  # the node process is gone; the reader below ends this process

    db = Database(config.database_url, synchronous="NORMAL")
    store = Store(db, store_phi=config.audit.store_phi, node=config.node_name)
    spool = Spool(config.spool_dir)
    metrics = RemoteMetrics(send)

    def released(aid: Any) -> None:
        metrics.flush()  # the association's counts reach the node before its release does
        send({"op": "released", "aid": aid})

    receiver = Receiver(config, store, spool, metrics=metrics, on_release=released)
    receiver.uid_locks = ProcessUIDLocks(lock_file(config))
    refusals = receiver.refusals = ForwardedRefusals(send)
    server = receiver.start_fed(
        address, lambda cid: send({"op": "end", "id": cid}), write_behind=True
    )
    send({"op": "ready", "pid": os.getpid()})
    log.info("receiver process ready", index=index, pid=os.getpid())
    stop_timeout = float(config.network.dimse_timeout_s)
    served = 0
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(ctrl, _MSG, 4)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            break  # the node process is gone
        msg = json.loads(data)
        if msg.get("op") == "conn" and fds:
            sock = socket.socket(fileno=fds[0])
            served += 1
            for fd in fds[1:]:
                os.close(fd)
            try:
                server.serve_connection(sock, tuple(msg["addr"]), int(msg["id"]), msg.get("over"))
            except Exception:  # noqa: BLE001 - one connection must not end the process
                log.exception("could not serve a handed-over connection")
                sock.close()
                send({"op": "end", "id": msg["id"]})
        elif msg.get("op") == "ack":
            refusals.acked(int(msg["seq"]))
        elif msg.get("op") == "flush":
            threading.Thread(
                target=_answer_flush,
                args=(receiver, send, int(msg["seq"]), float(msg["timeout"])),
                name="flush",
                daemon=True,
            ).start()
        elif msg.get("op") == "stop":
            stop_timeout = float(msg.get("timeout", stop_timeout))
            break
    receiver.stop(timeout=stop_timeout)
    metrics.flush()
    send({"op": "stopped"})
    log.info("receiver process stopped", index=index, pid=os.getpid(), connections=served)


# ---------------------------------------------------------------------------------------------
# the acceptor (node process)
# ---------------------------------------------------------------------------------------------


class _Child:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Any = None
        self.ctrl: socket.socket | None = None
        self.ready = threading.Event()
        self.alive = False
        self.active = 0
        self.send_lock = threading.Lock()


class ReceiverPool:
    """The node's receiver when ``network.receiver_processes`` > 1 (see the module docstring);
    the same lifecycle as :class:`node.receiver.Receiver` (``start()`` -> port, ``stop()``)."""

    def __init__(
        self,
        config: Any,
        store: Any,
        spool: Any,
        *,
        metrics: Any = None,
        on_release: Any = None,
        processes: int | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.metrics = metrics
        self.on_release = on_release
        self.processes = processes or receiver_processes(config)
        n = config.network
        self.max_associations = int(n.max_associations)
        self.max_per_host = int(n.per_host_limit())
        self.refusals = RefusalAudit(store, n.refusal_audit_per_minute, metrics=metrics)
        self.port: int | None = None
        self._sock: socket.socket | None = None
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._hosts: dict[str, int] = {}
        self._conns: dict[int, tuple[str, _Child]] = {}
        self._next_id = 0
        self._stopping = False
        self._address: tuple[str, int] = ("", 0)
        self._flush_seq = 0
        self._flushes: dict[int, threading.Event] = {}
        self._flush_ok: dict[int, bool] = {}

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> int:
        n = self.config.network
        family = socket.AF_INET6 if ":" in n.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((n.host, n.port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            why = exc.strerror or str(exc)
            raise MolreError(
                f"network.port: cannot listen on {n.host}:{n.port} ({why}); is "
                f"another service using it? Choose another network.port or "
                f"network.host"
            ) from None
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        self._address = (n.host, self.port)
        lock_file(self.config).touch(mode=0o600, exist_ok=True)
        self.refusals.start()
        self._children = [_Child(i) for i in range(self.processes)]
        for child in self._children:
            self._spawn(child)
        deadline = time.monotonic() + START_TIMEOUT_S
        for child in self._children:
            if not child.ready.wait(max(0.0, deadline - time.monotonic())):
                self.stop(timeout=1.0)
                raise MolreError(
                    f"receiver process {child.index} did not start within "
                    f"{START_TIMEOUT_S:g} s (see the log)"
                )
        # the receiver processes' write-behinds: committed before series complete
        self.store.set_completion_barrier(self.flush)
        threading.Thread(target=self._accept_loop, name="receiver-acceptor", daemon=True).start()
        log.info(
            "receiver listening",
            ae_title=n.ae_title,
            host=n.host,
            port=self.port,
            tls=self.config.tls.enabled,
            allowed_callers=len(n.allowed_callers),
            max_per_host=self.max_per_host,
            receiver_processes=self.processes,
        )
        return self.port

    def _spawn(self, child: _Child) -> None:
        ctx = mp.get_context("spawn")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        child.ready.clear()
        child.ctrl = ours
        child.active = 0
        child.proc = ctx.Process(
            target=_child_main,
            name=f"molre-receiver-{child.index}",
            args=(self.config, theirs, child.index, self._address),
            daemon=True,
        )
        child.proc.start()
        theirs.close()
        child.alive = True
        threading.Thread(
            target=self._read_loop,
            args=(child, ours),
            name=f"receiver-ctrl-{child.index}",
            daemon=True,
        ).start()

    def stop_accepting(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting; each receiver process lets its associations finish (up to
        ``timeout``), aborts the rest, commits and exits."""
        self._stopping = True
        self.stop_accepting()
        self.store.set_completion_barrier(None)
        for child in self._children:
            self._send(child, {"op": "stop", "timeout": timeout})
        deadline = time.monotonic() + timeout + 10.0
        for child in self._children:
            if child.proc is None:
                continue
            child.proc.join(max(0.1, deadline - time.monotonic()))
            if child.proc.is_alive():
                log.error(
                    "receiver process did not stop in time; terminated",
                    index=child.index,
                    pid=child.proc.pid,
                )
                child.proc.terminate()
                child.proc.join(5.0)
            if child.ctrl is not None:
                child.ctrl.close()
        self.refusals.stop()

    def active_associations(self) -> int:
        with self._lock:
            return len(self._conns)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every receiver process has committed the rows it had queued when asked
        (their write-behinds); False when one did not answer in ``timeout``. Registered as the
        store's completion barrier: no series completes by quiet time while rows of instances
        already acknowledged by a receiver process are still queued there."""
        limit = 30.0 if timeout is None else float(timeout)
        waits: list[tuple[int, threading.Event]] = []
        for child in self._children:
            if not (child.alive and child.ready.is_set()):
                continue
            with self._lock:
                self._flush_seq += 1
                seq = self._flush_seq
                done = self._flushes[seq] = threading.Event()
            if self._send(child, {"op": "flush", "seq": seq, "timeout": limit}):
                waits.append((seq, done))
            else:
                with self._lock:
                    self._flushes.pop(seq, None)
        deadline = time.monotonic() + limit
        ok = True
        for seq, done in waits:
            ok = done.wait(max(0.0, deadline - time.monotonic())) and ok
            with self._lock:
                self._flushes.pop(seq, None)
                ok = self._flush_ok.pop(seq, False) and ok
        return ok

    # -- the acceptor --------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stopping:
            sock = self._sock
            if sock is None:
                return
            try:
                conn, addr = sock.accept()
            except OSError:
                if self._stopping or self._sock is None:
                    return
                time.sleep(0.01)
                continue
            try:
                self._hand_over(conn, addr)
            except Exception:  # noqa: BLE001 - the acceptor must keep accepting
                log.exception("could not hand a connection to a receiver process")
            finally:
                conn.close()  # the receiver process has its own copy

    def _hand_over(self, conn: socket.socket, addr: Any) -> None:
        host = peer_host(str(addr[0]))
        with self._lock:
            n = self._hosts.get(host, 0)
            refused = n >= self.max_per_host
            child = None
            if not refused:
                live = [c for c in self._children if c.alive and c.ready.is_set()]
                if live:
                    child = min(live, key=lambda c: c.active)
                    self._next_id += 1
                    cid = self._next_id
                    self._hosts[host] = n + 1
                    self._conns[cid] = (host, child)
                    child.active += 1
                    over = (
                        self.max_associations if len(self._conns) > self.max_associations else None
                    )
        if refused:
            self.refusals.record(
                host,
                int(addr[1]),
                f"before acceptance: {n} connections from {host} already "
                f"open (network.max_associations_per_host = "
                f"{self.max_per_host})",
                kind="per-host limit",
                sync=False,
            )
            return
        if child is None:
            self.refusals.record(
                host,
                int(addr[1]),
                "before acceptance: no receiver process is running",
                kind="no receiver",
                sync=False,
            )
            return
        msg = {"op": "conn", "id": cid, "addr": [str(addr[0]), int(addr[1])], "over": over}
        if not self._send(child, msg, conn.fileno()):
            self._ended(cid)

    def _send(self, child: _Child, msg: dict, fd: int | None = None) -> bool:
        if child.ctrl is None:
            return False
        data = json.dumps(msg).encode()
        try:
            with child.send_lock:
                if fd is None:
                    child.ctrl.send(data)
                else:
                    socket.send_fds(child.ctrl, [data], [fd])
            return True
        except OSError:
            return False

    def _ended(self, cid: int) -> None:
        with self._lock:
            entry = self._conns.pop(cid, None)
            if entry is None:
                return
            host, child = entry
            child.active -= 1
            n = self._hosts.get(host, 0) - 1
            if n > 0:
                self._hosts[host] = n
            else:
                self._hosts.pop(host, None)

    # -- messages from a receiver process -------------------------------------------------------
    def _read_loop(self, child: _Child, ctrl: socket.socket) -> None:
        while True:
            try:
                data = ctrl.recv(_MSG)
            except OSError:
                data = b""
            if not data:
                break
            try:
                msg = json.loads(data)
                op = msg.get("op")
                if op == "ready":
                    child.ready.set()
                elif op == "end":
                    self._ended(int(msg["id"]))
                elif op == "released" and self.on_release is not None:
                    self.on_release(int(msg["aid"]))
                elif op == "metrics":
                    apply_metrics(self.metrics, msg)
                elif op == "flushed":
                    with self._lock:
                        done = self._flushes.get(int(msg["seq"]))
                        if done is not None:
                            self._flush_ok[int(msg["seq"])] = bool(msg["ok"])
                    if done is not None:
                        done.set()
                elif op == "refusal":
                    self.refusals.record(*msg["args"], **msg["kw"], sync=bool(msg["sync"]))
                    if msg["sync"]:
                        self._send(child, {"op": "ack", "seq": msg["seq"]})
            except Exception:  # noqa: BLE001
                log.exception("bad message from a receiver process", index=child.index)
        child.alive = False
        with self._lock:
            lost = [cid for cid, (_h, c) in self._conns.items() if c is child]
        for cid in lost:
            self._ended(cid)
        if self._stopping or child.ctrl is not ctrl:
            return
        code = child.proc.exitcode if child.proc is not None else None
        log.error(
            "receiver process ended unexpectedly; starting a new one",
            index=child.index,
            exitcode=code,
            connections_lost=len(lost),
        )
        with contextlib.suppress(Exception):
            self.store.log_event(
                "node",
                "receiver",
                "process_died",
                details={"index": child.index, "exitcode": code, "connections_lost": len(lost)},
            )
        if child.proc is not None:
            child.proc.join(5.0)
        ctrl.close()
        self._spawn(child)
        threading.Thread(
            target=self._reindex_after_death,
            args=(time.time(),),
            name="receiver-reindex",
            daemon=True,
        ).start()

    #: how long after a receiver process died its files are looked at (a live process submits a
    #: file's row milliseconds after writing it; this leaves far more than that)
    REINDEX_SETTLE_S = 5.0

    def _reindex_after_death(self, died_at: float) -> None:
        """Rows the dead process had queued (instances it answered Success for) are lost with
        it; their files are in the spool. Once the live processes have committed what they
        queued, files written before the death that still have no row are indexed, as at
        start-up (``spool reindexed`` event)."""
        from node.receiver import reconcile_spool
        from storage.identity import load_patient_keyer

        time.sleep(self.REINDEX_SETTLE_S)
        if self._stopping:
            return
        try:
            if not self.flush(timeout=30.0):
                log.warning("receiver processes did not commit in time; re-indexing anyway")
            counts = reconcile_spool(
                self.store,
                self.spool,
                load_patient_keyer(self.config.data_dir),
                written_before=died_at,
            )
            log.info("spool checked after a receiver process died", **counts)
        except Exception:  # noqa: BLE001 - the next start re-indexes them in any case
            log.exception("could not re-index the spool after a receiver process died")


__all__ = ["AUTO_MAX_PROCESSES", "ProcessUIDLocks", "ReceiverPool", "receiver_processes"]
