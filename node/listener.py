"""The hardened DICOM listener: every socket read has a deadline, every size a cap.

Why this module exists: pynetdicom (3.0.x) reads a PDU in two blocking ``recv`` calls -- the
6-byte header, then *the whole declared length* -- on an accepted socket that has no timeout.
``acse_timeout`` / ``network_timeout`` are only checked *between* PDUs, by timers the reading
thread never gets back to while it is stuck inside one. So a peer that sends 20 bytes of an
A-ASSOCIATE-RQ, or one byte per second, held a thread and an association slot forever; a
declared length of 511 MB was buffered before any access check; and the TLS handshake ran in the
accept thread without a timeout, so one idle TCP connection stalled the TLS listener for
everyone. The API offers no hook for any of this, so the fix is one level down, in subclasses of
pynetdicom's own classes (pinned to the 3.0 series in pyproject; :func:`check_pynetdicom`
fails loudly at start if the methods overridden here changed):

- :class:`GuardedSocket` (``transport.AssociationSocket``): ``recv`` with a per-read timeout
  (``network_timeout_s``) and an absolute deadline; reads large chunks into one buffer.
- :class:`GuardedDUL` (``dul.DULServiceProvider``): ``_read_pdu_data`` is pynetdicom's, plus
  the deadline before acceptance (TLS handshake + A-ASSOCIATE-RQ within ``acse_timeout_s`` of
  the TCP accept, however slowly the bytes drip), PDU-length caps checked on the 6-byte header
  *before* anything is buffered, and a reason for every failure; ``receive_pdu`` returns at once
  when the connection is gone, so a slot is released right after an abort instead of after
  ``acse_timeout_s``. Its loop, and the association's (:meth:`GuardedDIMSE.get_msg`), wait for
  input instead of polling every 1 ms (issue 16: faster ingest, idle associations cost ~nothing).
- :class:`GuardedDIMSE` (``dimse.DIMSEServiceProvider``): stops buffering a data set past
  ``storage.max_instance_size``; the C-STORE handler then answers 0xA700 (see
  :func:`oversize_of`).
- :class:`GuardedServer` / :class:`GuardedRequestHandler`: TLS handshake in the connection's own
  thread with the pre-acceptance deadline; a per-peer-address limit on concurrent connections
  checked at accept (refused connections are closed before a thread exists); IPv4-mapped IPv6
  peers are treated as their IPv4 address.
- :class:`RefusalAudit`: every attempt that fails before acceptance gets an ``associations``
  row (``outcome = rejected``, reason) -- written by a background thread and rate-limited
  (``network.refusal_audit_per_minute``), with one summary event counting what was not
  written, so a flood can neither stall the accept loop nor fill the disk.
"""

from __future__ import annotations

import ipaddress
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from common.log import get_logger
from node.interfaces import ListenerMetrics, ListenerStore, RefusalLog

log = get_logger("node.listener")

_PDU_NAMES = {
    1: "A-ASSOCIATE-RQ",
    2: "A-ASSOCIATE-AC",
    3: "A-ASSOCIATE-RJ",
    4: "P-DATA-TF",
    5: "A-RELEASE-RQ",
    6: "A-RELEASE-RP",
    7: "A-ABORT",
}
#: A command set is a few hundred bytes; more than this is not a DIMSE command.
MAX_COMMAND_BYTES = 64 * 1024
#: Maximum PDU length the listener announces (A-ASSOCIATE-AC). pynetdicom's 0 ("unlimited")
#: would oblige the node to buffer a PDU of any declared length; 4 MiB keeps whole CT slices in
#: one PDU (the speed of "unlimited") while a larger P-DATA is a protocol violation (aborted).
RECEIVE_PDU_BYTES = 4 * 1024 * 1024
#: Longest wait of an association's two reactor threads when nothing arrives (they wake at once
#: on input); bounds how late the ARTIM and network timers are checked.
REACTOR_POLL_S = 0.02
#: Tolerance for peers that count the PDV item headers differently.
PDU_SLACK_BYTES = 1024
#: Largest single recv (bytes): one read per megabyte instead of pynetdicom's 4 KiB.
RECV_CHUNK = 1024 * 1024


def peer_host(address: str) -> str:
    """The address rules and limits see: IPv4-mapped IPv6 (``::ffff:10.0.0.5``) -> IPv4."""
    try:
        addr = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@dataclass(frozen=True)
class ListenerLimits:
    """Deadlines and caps of the listener (all from ``network.*`` / ``storage.*``)."""

    acse_timeout_s: float
    network_timeout_s: float
    max_associate_rq_bytes: int
    max_instance_bytes: int
    max_per_host: int

    @property
    def max_pdata_bytes(self) -> int:
        return RECEIVE_PDU_BYTES + PDU_SLACK_BYTES


# ---------------------------------------------------------------------------------------------
# audit of refusals before acceptance (rate-limited, written off the network threads)
# ---------------------------------------------------------------------------------------------


class RefusalAudit:
    """Writes ``associations`` rows for attempts refused before/at acceptance.

    ``record(..., sync=False)`` never blocks (the accept thread): rows go through a bounded
    queue to one writer thread; connection threads write synchronously (``sync=True``, so the
    row exists before the peer sees the refusal). At most
    ``per_minute`` rows are written per minute; the rest are counted and written as one
    ``node/listener refusals-not-recorded`` event (counts by reason) when the minute is over.
    """

    def __init__(
        self, store: ListenerStore, per_minute: int, *, metrics: ListenerMetrics | None = None
    ) -> None:
        self.store = store
        self.per_minute = max(0, int(per_minute))
        self.metrics = metrics
        self._q: queue.Queue = queue.Queue(maxsize=1000)
        self._lock = threading.Lock()
        self._window_start = time.monotonic()
        self._written = 0
        self._suppressed: Counter[str] = Counter()
        self.total = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="refusal-audit", daemon=True)
        self._thread.start()

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
        with self._lock:
            self.total += 1
            self._roll_window()
            allowed = self._written < self.per_minute
            if allowed:
                self._written += 1
            else:
                self._suppressed[kind] += 1
        if self.metrics is not None:
            self.metrics.associations_rejected.inc()
        log.warning(
            "connection refused",
            peer=host,
            port=port,
            reason=reason,
            kind=kind,
            calling_ae=calling_ae,
        )
        if not allowed:
            return
        row = (calling_ae, called_ae, host, port, reason[:500])
        if sync:
            self._write("row", row)
            return
        try:
            self._q.put_nowait(("row", row))
        except queue.Full:
            with self._lock:
                self._suppressed[kind] += 1

    def _roll_window(self) -> None:
        now = time.monotonic()
        if now - self._window_start < 60.0:
            return
        if self._suppressed:
            counts = dict(self._suppressed)
            try:
                self._q.put_nowait(("summary", counts))
            except queue.Full:
                pass
        self._suppressed = Counter()
        self._written = 0
        self._window_start = now

    def flush_summary(self) -> None:
        """Queue the summary of the current window now (tests; stop)."""
        with self._lock:
            self._window_start = -1e9
            self._roll_window()

    def _run(self) -> None:
        while not self._stop.is_set() or not self._q.empty():
            try:
                kind, item = self._q.get(timeout=0.2)
            except queue.Empty:
                with self._lock:
                    self._roll_window()
                continue
            try:
                self._write(kind, item)
            finally:
                self._q.task_done()

    def _write(self, kind: str, item: Any) -> None:
        try:
            if kind == "row":
                self.store.record_rejected_association(*item)
            else:
                self.store.log_event(
                    "node",
                    "listener",
                    "refusals-not-recorded",
                    details={"counts": item, "per_minute": self.per_minute},
                )
        except Exception:  # noqa: BLE001 - never let bookkeeping break the listener
            log.exception("could not record a refused connection")

    def join(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far is written (tests)."""
        deadline = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self.flush_summary()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)


# ---------------------------------------------------------------------------------------------
# one connection
# ---------------------------------------------------------------------------------------------


class ConnectionGuard:
    """Per-connection state: when it was accepted, why it failed, whether it was audited."""

    def __init__(self, server: "GuardedServer", host: str, port: int | None) -> None:
        self.server = server
        self.host = host
        self.port = port
        self.accepted_at = time.monotonic()
        self.reason: str | None = None
        self.audited = False
        self.established = False
        self.bytes_received = 0
        #: DIMSE Message ID -> data set bytes seen, for C-STOREs cut at max_instance_size
        self.oversize: dict[int, int] = {}
        #: several receiver processes: the pool's id of this connection, and the
        #: network.max_associations it was counted past (None = within the limit)
        self.conn_id: int | None = None
        self.over_limit: int | None = None
        self._released = False

    @property
    def limits(self) -> ListenerLimits:
        return self.server.limits

    @property
    def preaccept_deadline(self) -> float:
        return self.accepted_at + self.limits.acse_timeout_s

    def fail(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def audit(self, reason: str, **kw: Any) -> None:
        if self.audited:
            return
        self.audited = True
        self.server.audit.record(self.host, self.port, reason, **kw)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.server.release_host(self.host)
            if self.conn_id is not None:
                self.server.connection_ended(self.conn_id)

    def finished(self, assoc: "GuardedAssociation | None") -> None:
        """The connection is over: free its per-host slot; audit it if nothing else did."""
        try:
            if assoc is None or self.audited:
                return
            rq = assoc.requestor.primitive
            if rq is None:
                why = self.reason or (
                    "connection closed before an A-ASSOCIATE-RQ"
                    if self.bytes_received
                    else "connection closed without sending anything"
                )
                self.audit(f"before acceptance: {why}")
            elif assoc.is_rejected and not self.established:
                prim = assoc.acceptor.primitive
                detail = ""
                if prim is not None and prim.result is not None:
                    detail = (
                        f" (result {prim.result}, source {prim.result_source}, "
                        f"reason {prim.diagnostic})"
                    )
                self.audit(
                    f"rejected by the DICOM layer{detail}: "
                    f"{self.reason or 'see pynetdicom reason'}",
                    calling_ae=str(rq.calling_ae_title or "").strip() or None,
                    called_ae=str(rq.called_ae_title or "").strip() or None,
                )
            elif not self.established:
                self.audit(
                    f"during negotiation: {self.reason or 'aborted'}",
                    calling_ae=str(rq.calling_ae_title or "").strip() or None,
                )
        except Exception:  # noqa: BLE001
            log.exception("could not audit a finished connection")
        finally:
            self.release()


class GuardedSocket(AssociationSocket):
    """``AssociationSocket`` whose reads cannot block forever.

    ``idle`` bounds each ``recv`` (``network_timeout_s``); ``deadline`` (monotonic seconds, or
    None) bounds the whole read -- set before acceptance. A timeout raises ``TimeoutError``,
    which pynetdicom's DUL treats as a closed transport (Evt17): the association is aborted
    (established) or dropped (not yet), and its thread ends.
    """

    def __init__(
        self, assoc: "GuardedAssociation", client_socket: socket.socket, idle: float | None
    ) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self.idle = idle
        self.deadline: float | None = None

    def _timeout(self) -> float | None:
        timeout = self.idle
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("deadline passed")
            timeout = remaining if timeout is None else min(timeout, remaining)
        return timeout

    def recv_exact(self, view: memoryview) -> int:
        """Fill ``view`` from the socket; returns the bytes read (fewer = the peer closed)."""
        sock = self.socket
        if sock is None:
            return 0
        want = len(view)
        got = 0
        while got < want:
            sock.settimeout(self._timeout())
            n = sock.recv_into(view[got:], min(want - got, RECV_CHUNK))
            if not n:
                break
            got += n
        guard = getattr(self.assoc, "guard", None)
        if guard is not None:
            guard.bytes_received += got
        return got

    def recv(self, nr_bytes: int) -> bytearray:  # noqa: D102 - see the class docstring
        buf = bytearray(nr_bytes)
        with memoryview(buf) as view:
            got = self.recv_exact(view)
        if got < nr_bytes:
            del buf[got:]
        return buf

    def send(self, bytestream: bytes) -> None:  # noqa: D102 - a peer that never reads
        if self.socket is not None:
            try:
                self.socket.settimeout(self.idle)
            except OSError:
                pass
        super().send(bytestream)


class _WakingQueue(queue.Queue):
    """A queue that sets ``wake`` on every put: the association's reactor waits on it."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self.wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake.set()


class GuardedDUL(DULServiceProvider):
    """pynetdicom's DUL with deadlines and PDU-length caps (see the module docstring), and a
    reactor that waits for input instead of polling.

    pynetdicom's DUL loop checks the socket with a zero-timeout ``select`` and sleeps 1 ms
    whenever a pass found nothing (``_run_loop_delay``): every time the receiver catches up with
    the sender inside a data set, and before every C-STORE response it sends, up to 1 ms is
    lost, and each idle association wakes its thread 1,000 times a second, competing for the
    interpreter lock with the associations that work. Here the loop blocks in ``select`` on the
    socket *and* a wake-up socket that :meth:`send_pdu` (a primitive to send) and the kill flag
    write to, at most :data:`REACTOR_POLL_S` (timers: ARTIM, network timeout)."""

    def __init__(self, assoc: "GuardedAssociation") -> None:
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._killed = False
        super().__init__(assoc)
        self._rq_seen = False
        self.to_user_queue = _WakingQueue(assoc.wake)
        self._run_loop_delay = 0.0  # the wait is in _is_transport_event

    # pynetdicom sets the flag from other threads (kill_dul, stop_dul): wake the reactor
    @property
    def _kill_thread(self) -> bool:
        return self._killed

    @_kill_thread.setter
    def _kill_thread(self, value: bool) -> None:
        self._killed = value
        if value:
            self._wake_reactor()

    def _wake_reactor(self) -> None:
        w = self._wake_w
        if w is not None:
            try:
                w.send(b"\0")
            except OSError:  # closed (the reactor ended) or full (a wake-up is pending anyway)
                pass

    def send_pdu(self, primitive: Any) -> None:  # noqa: D102 - pynetdicom's, then wake up
        super().send_pdu(primitive)
        self._wake_reactor()

    def run_reactor(self) -> None:  # noqa: D102 - pynetdicom's, with the wake-up socket
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        try:
            super().run_reactor()
        finally:
            r, w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = None
            for s in (r, w):
                s.close()
            # the association sees it ended
            self.assoc.wake.set()  # type: ignore[attr-defined]

    def _is_transport_event(self) -> bool:  # noqa: D102 - pynetdicom's; if idle, wait for input
        if super()._is_transport_event():
            return True
        wake = self._wake_r
        busy = not (self.event_queue.empty() and self.to_provider_queue.empty())
        if wake is None or self._killed or busy:  # nothing to wait for, or work already queued
            return False
        sock = self.socket
        raw = sock.socket if sock is not None and sock._is_connected else None
        if (
            raw is not None
            and self.state_machine.current_state != "Sta13"
            and not (isinstance(raw, ssl.SSLSocket) and raw.pending())
        ):
            rlist, timeout = [raw, wake], REACTOR_POLL_S
        else:  # no socket to wait on: pynetdicom's own pace
            rlist, timeout = [wake], 0.001
        try:
            ready, _, _ = select.select(rlist, [], [], timeout)
        except (OSError, ValueError):
            return False  # a closed socket: pynetdicom's next check reports it
        if wake in ready:
            try:
                while wake.recv(4096):
                    pass
            except OSError:  # BlockingIOError: drained
                pass
        return bool(ready) and super()._is_transport_event()

    @property
    def guard(self) -> ConnectionGuard:
        return self.assoc.guard  # type: ignore[attr-defined]

    def _drop(self, reason: str, *, abort: bool) -> None:
        """Give up on this connection: note why, A-ABORT (service provider) if asked, close."""
        self.guard.fail(reason)
        log.warning("connection dropped", peer=self.guard.host, reason=reason)
        sock = self.socket
        if sock is not None and sock.socket is not None:
            if abort:
                pdu = A_ABORT_RQ()
                pdu.source = 0x02
                pdu.reason_diagnostic = 0x00
                sock.send(pdu.encode())
            sock._shutdown_socket()
        self.event_queue.put("Evt17")

    def _read_pdu_data(self) -> None:
        """pynetdicom 3.0's ``_read_pdu_data`` plus deadline, caps and failure reasons."""
        sock: GuardedSocket = self.socket  # type: ignore[assignment]
        guard = self.guard
        limits = guard.limits
        sock.deadline = None if self._rq_seen else guard.preaccept_deadline
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            self._drop(self._timeout_reason(exc, "a PDU header"), abort=False)
            return
        if len(header) < 6:
            if header:
                guard.fail(f"connection closed inside a PDU header ({len(header)} of 6 bytes)")
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        name = _PDU_NAMES.get(pdu_type)
        if name is None:
            guard.fail(f"unknown PDU type 0x{pdu_type:02X}")
            self.event_queue.put("Evt19")
            return
        if pdu_type == 4 and self._rq_seen:
            cap, key = limits.max_pdata_bytes, "the announced maximum PDU length"
        else:
            cap, key = limits.max_associate_rq_bytes, "network.max_associate_rq_size"
        if pdu_length > cap:
            self._drop(f"{name} PDU of {pdu_length} bytes exceeds {key} ({cap} bytes)", abort=True)
            return
        pdu_bytes = bytearray(6 + pdu_length)
        pdu_bytes[:6] = header
        try:
            with memoryview(pdu_bytes) as view:
                got = sock.recv_exact(view[6:])
        except (OSError, TimeoutError) as exc:
            self._drop(
                self._timeout_reason(exc, f"a {name} PDU of {pdu_length} bytes"), abort=False
            )
            return
        if got != pdu_length:
            guard.fail(f"connection closed inside a {name} PDU ({got} of {pdu_length} bytes)")
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(pdu_bytes)
        except Exception as exc:  # noqa: BLE001 - any decode failure: invalid PDU
            guard.fail(f"malformed {name} PDU: {type(exc).__name__}: {exc}"[:300])
            self.event_queue.put("Evt19")
            return
        if pdu_type == 1:
            self._rq_seen = True
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _timeout_reason(self, exc: BaseException, what: str) -> str:
        if isinstance(exc, (TimeoutError, socket.timeout)):
            if not self._rq_seen:
                return (
                    f"no complete A-ASSOCIATE-RQ within network.acse_timeout_s "
                    f"({self.guard.limits.acse_timeout_s:g} s) while reading {what}"
                )
            return (
                f"no data for network.network_timeout_s "
                f"({self.guard.limits.network_timeout_s:g} s) while reading {what}"
            )
        return f"connection error while reading {what}: {type(exc).__name__}"

    def _connection_gone(self) -> bool:
        sock = self.socket
        return (
            self._kill_thread or not self.is_alive() or (sock is not None and sock.socket is None)
        )

    def receive_pdu(self, wait: bool = False, timeout: float | None = None):  # noqa: D102
        # pynetdicom waits the full acse_timeout for an A-ASSOCIATE-RQ even when the connection
        # was already dropped (malformed request, abort): the slot stayed taken that long
        if not wait:
            return super().receive_pdu(wait=False)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic()))
            item = super().receive_pdu(wait=True, timeout=step)
            if item is not None:
                return item
            if deadline is not None and time.monotonic() >= deadline:
                return None
            if self._connection_gone() and self.to_user_queue.empty():
                return None


class GuardedDIMSE(DIMSEServiceProvider):
    """Stops buffering a data set at ``storage.max_instance_size``.

    The fragments past the cap are dropped (control byte kept, so the message still completes);
    the Message ID is noted in the connection guard and the C-STORE handler answers 0xA700
    without looking at the (truncated) data set. Memory per association is bounded by the cap.
    """

    def __init__(self, assoc: "GuardedAssociation") -> None:
        super().__init__(assoc)
        self._cmd_bytes = 0
        self._ds_bytes = 0
        self.msg_queue = _WakingQueue(assoc.wake)

    def get_msg(self, block: bool = False) -> Any:  # noqa: D102
        # pynetdicom's acceptor loop sleeps 1 ms, then asks without blocking: a complete
        # message waited up to 1 ms, and an idle association woke 1,000 times a second. Here
        # the ask waits until a message, a primitive from the peer (release, abort), the DUL's
        # end or a kill wakes it, or REACTOR_POLL_S passes (the loop's timers).
        if not block and self.msg_queue.empty():
            wake: threading.Event = self.assoc.wake  # type: ignore[attr-defined]
            wake.clear()
            if self.msg_queue.empty() and not self.assoc._kill:
                wake.wait(REACTOR_POLL_S)
        return super().get_msg(block)

    def receive_primitive(self, primitive: Any) -> None:  # noqa: D102 - see the class docstring
        guard: ConnectionGuard = self.assoc.guard  # type: ignore[attr-defined]
        cap = guard.limits.max_instance_bytes
        if self.message is None:
            self._cmd_bytes = self._ds_bytes = 0
        pdvs = primitive.presentation_data_value_list
        for i, (context_id, data) in enumerate(pdvs):
            if not data:
                continue
            if data[0] & 1:
                self._cmd_bytes += len(data) - 1
                if self._cmd_bytes > MAX_COMMAND_BYTES:
                    guard.fail(f"DIMSE command set larger than {MAX_COMMAND_BYTES} bytes")
                    self.dul.event_queue.put("Evt19")
                    return
            else:
                self._ds_bytes += len(data) - 1
                if self._ds_bytes > cap:
                    msg = self.message
                    msg_id = getattr(getattr(msg, "command_set", None), "MessageID", None)
                    if msg_id is not None:
                        guard.oversize[int(msg_id)] = self._ds_bytes
                    pdvs[i] = [context_id, data[:1]]  # keep the control byte only
        super().receive_primitive(primitive)


def oversize_of(event: Any) -> int | None:
    """Data set bytes of a C-STORE cut at ``storage.max_instance_size`` (None = complete)."""
    guard = getattr(event.assoc, "guard", None)
    if guard is None or not guard.oversize:
        return None
    msg_id = getattr(event.request, "MessageID", None)
    return guard.oversize.pop(int(msg_id), None) if msg_id is not None else None


def over_limit_of(assoc: Any) -> int | None:
    """The ``network.max_associations`` a pool connection was counted past, or None."""
    guard = getattr(assoc, "guard", None)
    return guard.over_limit if guard is not None else None


def mark_audited(assoc: Any) -> None:
    """The receiver recorded this association itself: the guard must not record it again."""
    guard = getattr(assoc, "guard", None)
    if guard is not None:
        guard.audited = True


def mark_established(assoc: Any) -> None:
    guard = getattr(assoc, "guard", None)
    if guard is not None:
        guard.established = True
        guard.audited = True  # the receiver's association row covers it from here on


class GuardedAssociation(Association):
    """An acceptor association with the guarded DUL/DIMSE and a :class:`ConnectionGuard`."""

    def __init__(self, ae: Any, guard: ConnectionGuard) -> None:
        super().__init__(ae, MODE_ACCEPTOR)
        self.guard = guard
        self.wake = threading.Event()  # see GuardedDIMSE.get_msg
        self.dul = GuardedDUL(self)
        self.dimse = GuardedDIMSE(self)
        # the timers live in the DUL: apply the timeouts to the new one
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout

    def run(self) -> None:  # noqa: D102 - Thread.run: free the slot whatever happens
        try:
            super().run()
        finally:
            self.guard.finished(self)

    def kill(self) -> None:  # noqa: D102 - pynetdicom's; the reactor may be waiting
        self._kill = True
        self.wake.set()
        super().kill()


class GuardedRequestHandler(RequestHandler):
    """Per connection (its own thread): TLS handshake with a deadline, then the association."""

    server: "GuardedServer"

    def handle(self) -> None:  # noqa: D102
        server = self.server
        guard = ConnectionGuard(
            server, peer_host(str(self.client_address[0])), int(self.client_address[1])
        )
        guard.conn_id, guard.over_limit = server.take_flags(self.request)
        assoc = None
        try:
            if server.ssl_context is not None:
                raw = self.request
                try:
                    tls = server.ssl_context.wrap_socket(
                        raw, server_side=True, do_handshake_on_connect=False
                    )
                    tls.settimeout(max(0.01, guard.preaccept_deadline - time.monotonic()))
                    tls.do_handshake()
                except (OSError, ssl.SSLError, ValueError) as exc:
                    why = (
                        "timed out"
                        if isinstance(exc, (TimeoutError, socket.timeout))
                        else f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}"
                    )
                    guard.audit(f"before acceptance: TLS handshake failed ({why})"[:300])
                    try:
                        raw.close()
                    except OSError:
                        pass
                    return
                self.request = tls
            assoc = self._create_association(guard)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
        except Exception:  # noqa: BLE001
            log.exception("could not start an association", peer=guard.host)
            assoc = None
        finally:
            if assoc is None:
                guard.release()

    def _create_association(self, guard: ConnectionGuard) -> GuardedAssociation:  # type: ignore[override]
        """pynetdicom 3.0's ``RequestHandler._create_association`` with the guarded classes."""
        server = self.server
        ae = self.ae
        assoc = GuardedAssociation(ae, guard)
        assoc._server = server
        timestamp = datetime.strftime(datetime.now(), "%Y%m%d%H%M%S")
        assoc.name = f"AcceptorThread@{timestamp}"
        sock = GuardedSocket(assoc, self.request, idle=server.limits.network_timeout_s)
        assoc.set_socket(sock)
        assoc.acceptor.maximum_length = RECEIVE_PDU_BYTES
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote
        for event in server._handlers:
            if event.is_intervention and server._handlers[event]:
                assoc.bind(event, *server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                handlers = server._handlers[event]
                if isinstance(handlers, list):  # always, for a notification event
                    for handler in handlers:
                        assoc.bind(event, handler[0], handler[1])
        return assoc


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server: no TLS in the accept thread, a per-host connection limit."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(
        self,
        ae: Any,
        address: Any,
        ae_title: str,
        contexts: Any,
        ssl_context: Any = None,
        evt_handlers: Any = None,
        *,
        limits: ListenerLimits,
        audit: RefusalLog,
    ) -> None:
        self.limits = limits
        self.audit = audit
        self._hosts: dict[str, int] = {}
        self._hosts_lock = threading.Lock()
        super().__init__(
            ae,
            address,
            ae_title,
            contexts,
            ssl_context,
            evt_handlers=evt_handlers,
            request_handler=GuardedRequestHandler,
        )

    def get_request(self) -> tuple[socket.socket, Any]:  # noqa: D102 - handshake moved out
        sock = self.socket
        if sock is None:  # closed: socketserver treats OSError as "no request"
            raise OSError("the server socket is closed")
        return sock.accept()

    def verify_request(self, request: Any, client_address: Any) -> bool:  # noqa: D102
        host = peer_host(str(client_address[0]))
        with self._hosts_lock:
            n = self._hosts.get(host, 0)
            if n >= self.limits.max_per_host:
                refused = True
            else:
                self._hosts[host] = n + 1
                refused = False
        if refused:
            self.audit.record(
                host,
                int(client_address[1]),
                f"before acceptance: {n} connections from {host} already open "
                f"(network.max_associations_per_host = "
                f"{self.limits.max_per_host})",
                kind="per-host limit",
                sync=False,
            )
            return False
        return True

    def release_host(self, host: str) -> None:
        with self._hosts_lock:
            n = self._hosts.get(host, 0) - 1
            if n > 0:
                self._hosts[host] = n
            else:
                self._hosts.pop(host, None)

    def connections(self) -> dict[str, int]:
        with self._hosts_lock:
            return dict(self._hosts)

    def take_flags(self, request: Any) -> tuple[int | None, int | None]:
        """(pool connection id, max_associations it is over) -- only a :class:`FedServer`'s
        connections have them."""
        return None, None

    def connection_ended(self, conn_id: int) -> None:
        """A pool connection is over (see :class:`FedServer`)."""


class FedServer(GuardedServer):
    """A :class:`GuardedServer` without a listening socket: the connections come from the
    acceptor of :class:`node.receiver_pool.ReceiverPool` (another process), which has already
    applied the per-host limit and counted the connection against ``network.max_associations``
    (``over_limit``: rejected by the receiver after the access check, as pynetdicom does in one
    process). Everything else -- deadlines, size caps, TLS handshake, audit -- is the same."""

    def __init__(self, *args: Any, on_connection_end: Any = None, **kw: Any) -> None:
        self._on_connection_end = on_connection_end
        self._flags: dict[int, tuple[int, int | None]] = {}
        self._flags_lock = threading.Lock()
        super().__init__(*args, **kw)

    def server_bind(self) -> None:  # noqa: D102 - no socket of its own
        pass

    def server_activate(self) -> None:  # noqa: D102
        pass

    def verify_request(self, request: Any, client_address: Any) -> bool:  # noqa: D102
        return True  # the acceptor applied the per-host limit

    def serve_connection(
        self, sock: socket.socket, client_address: Any, conn_id: int, over_limit: int | None
    ) -> None:
        """Handle an accepted connection in its own thread, like an accepted one."""
        with self._flags_lock:
            self._flags[sock.fileno()] = (conn_id, over_limit)
        self.process_request(sock, client_address)

    def take_flags(self, request: Any) -> tuple[int | None, int | None]:  # noqa: D102
        raw = getattr(request, "fileno", None)
        with self._flags_lock:
            return self._flags.pop(raw(), (None, None)) if raw is not None else (None, None)

    def connection_ended(self, conn_id: int) -> None:  # noqa: D102
        if self._on_connection_end is not None:
            self._on_connection_end(conn_id)

    def shutdown(self) -> None:  # noqa: D102 - no serve_forever loop to end
        self.server_close()


def start_server(
    ae: Any,
    address: tuple[str, int],
    *,
    evt_handlers: list,
    ssl_context: Any,
    limits: ListenerLimits,
    audit: RefusalLog,
) -> GuardedServer:
    """Start a :class:`GuardedServer` for ``ae`` in a background thread (like
    ``AE.start_server(block=False)``) and return it; ``server.shutdown()`` stops it."""
    check_pynetdicom()
    server = ae.make_server(
        address,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        server_class=GuardedServer,
        limits=limits,
        audit=audit,
    )
    thread = threading.Thread(
        target=server.serve_forever, name="AcceptorServer@guarded", daemon=True
    )
    thread.start()
    ae._servers.append(server)
    return server


def check_pynetdicom() -> None:
    """Fail at start (not under attack) if pynetdicom moved what this module overrides."""
    missing = [
        f"{cls.__name__}.{name}"
        for cls, name in (
            (DULServiceProvider, "_read_pdu_data"),
            (DULServiceProvider, "_decode_pdu"),
            (DULServiceProvider, "receive_pdu"),
            (DULServiceProvider, "_is_transport_event"),
            (DULServiceProvider, "run_reactor"),
            (DULServiceProvider, "send_pdu"),
            (DIMSEServiceProvider, "get_msg"),
            (Association, "_run_reactor"),
            (DIMSEServiceProvider, "receive_primitive"),
            (AssociationSocket, "recv"),
            (AssociationSocket, "_shutdown_socket"),
            (RequestHandler, "_create_association"),
            (ThreadedAssociationServer, "get_request"),
        )
        if not callable(getattr(cls, name, None))
    ]
    if missing:
        raise RuntimeError(
            f"pynetdicom changed: {', '.join(missing)} not found; node/listener.py "
            f"overrides them (written for pynetdicom 3.0)"
        )


__all__ = [
    "RECEIVE_PDU_BYTES",
    "FedServer",
    "GuardedServer",
    "ListenerLimits",
    "RefusalAudit",
    "check_pynetdicom",
    "mark_audited",
    "mark_established",
    "over_limit_of",
    "oversize_of",
    "peer_host",
    "start_server",
]
