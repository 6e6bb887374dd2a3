"""The DICOM receiver: C-ECHO and C-STORE SCP with access control and a durable spool.

Why it answers the way it does: a PACS deletes or stops retrying once it got Success, so Success
is sent only after the instance is in the spool (fsynced, with the default
``storage.durability = "fsync"``). The spool file is the durable record: the database runs
``synchronous=NORMAL`` and :func:`reconcile_spool` re-indexes, at start-up, files whose row a
crash or power cut took. So the 'stored' row is not on the critical path: it is queued to the
write-behind (:class:`storage.InstanceRecorder`, one thread, group commits; it also takes the
sha256 of the data set) and committed a few milliseconds after Success; duplicate checks see
queued rows, and an association's rows are committed before its release is answered and before
any series can complete. Per instance the hot path is: the file written and fsynced by a spool
I/O thread *while* the header is read (:meth:`storage.Spool.stage`;
:func:`node.header.scan_header` reads the ~30 elements the node needs from the bytes, pydicom
parses whatever it declines), one prepared lookup (duplicate check), a rename + directory
fsync. The other outcomes (rare) are recorded synchronously before the answer. Everything gets a
status the sender can act on, and every outcome is in the audit database:

| situation                                   | status                    | instance status |
|---------------------------------------------|---------------------------|-----------------|
| stored                                      | 0x0000 Success            | stored          |
| byte-identical resend of a known instance   | 0x0000 Success            | duplicate (no second file) |
| *different* object with a known SOP UID     | 0xB000 Warning            | conflict (kept under spool/conflicts/, never used for a report) |
| series known under another StudyInstanceUID | 0xC010 (identity conflict) | rejected, event `identity_conflict` |
| PatientID differs from the series'/study's  | 0xC011 (identity conflict) | rejected, event `identity_conflict` |
| SOP Instance UID already stored in another study | 0xC012 (identity conflict) | rejected, event `identity_conflict` |
| not a CT storage class (MR, SC, SR, ...)    | 0x0000 Success            | ignored (not kept) |
| free disk below `storage.min_free_disk`     | 0xA700 Out of Resources   | rejected        |
| SOP class/instance in dataset != request, missing/invalid UIDs | 0xA900 | rejected   |
| undecodable header                          | 0xC000 Cannot Understand  | rejected        |
| unexpected error in the node                | 0xC001 (processing failure) | rejected (if the DB is reachable) |

A conflict answers Warning rather than Failure so a sender does not retry the same object
forever; the original stays the one that is read (see docs/configuration.md).

Identity checks: UIDs collide in the wild (buggy modalities, anonymisers, re-imports), and a
series is keyed by its SeriesInstanceUID. An instance whose StudyInstanceUID differs from its
series' record, whose PatientID differs from its series' or study's (compared as keyed hashes,
:mod:`storage.identity`: no PHI is stored), or whose SOP Instance UID is stored in another study
is refused with a failure (0xC010-0xC012, ErrorComment saying why) and not merged: two patients
never end up in one series, one report. The check, the file's rename and the queued row happen
under per-UID locks (study, series, SOP Instance UID, always taken in that order), so two
associations sending the same UIDs at once are decided one after the other: the second sees the
first as a duplicate, a conflict or an identity conflict, never as nothing.

Access control happens when the association is requested (A-ASSOCIATE-RJ, rejected-permanent,
source = service user): calling AE title or host not on the allow-list -> reason 0x03 "calling
AE title not recognised" (DICOM has no "host not allowed" reason; 0x03 is what the caller's
operator needs to look at); called AE title != ours (with `network.require_called_ae`) -> 0x07
"called AE title not recognised". Each rejection is recorded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.pdu_primitives import A_RELEASE

from common.errors import MolreError
from common.log import get_logger, redact
from node.config import AllowedCaller, NodeConfig
from node.dicomnet import (
    CT_STORAGE_CLASSES,
    file_header,
    make_ae,
    scp_contexts,
    server_ssl_context,
)
from node.header import read_header, scan_header
from node.interfaces import RefusalLog
from node.listener import (
    GuardedServer,
    ListenerLimits,
    RefusalAudit,
    mark_audited,
    mark_established,
    over_limit_of,
    oversize_of,
    peer_host,
    start_server,
)
from storage import InstanceRecorder, StoredInstance
from storage.identity import load_patient_keyer

log = get_logger("node.receiver")

STATUS_SUCCESS = 0x0000
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
STATUS_CONFLICT_WARNING = 0xB000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0xC001
# identity conflicts (Cxxx: "cannot understand", the range DICOM leaves to the implementation)
STATUS_STUDY_CONFLICT = 0xC010
STATUS_PATIENT_CONFLICT = 0xC011
STATUS_SOP_ELSEWHERE = 0xC012

REJECT_CALLING_AE = 0x03
REJECT_CALLED_AE = 0x07

# ---------------------------------------------------------------------------------------------
# access control
# ---------------------------------------------------------------------------------------------


@dataclass
class AccessDecision:
    allowed: bool
    diagnostic: int = 0
    reason: str = ""


def check_access(
    calling_ae: str,
    called_ae: str,
    peer_host: str,
    *,
    own_ae: str,
    require_called_ae: bool,
    allowed: list[AllowedCaller],
) -> AccessDecision:
    """Allow-list check for an association request (pure; unit-testable).

    An empty allow-list allows every caller. An entry matches when its `ae_title` equals the
    calling AE (or is "*") and its `host` (IP or CIDR) contains the peer address (or is empty).
    """
    calling = (calling_ae or "").strip()
    called = (called_ae or "").strip()
    if require_called_ae and called != own_ae.strip():
        return AccessDecision(
            False, REJECT_CALLED_AE, f"called AE title {called!r} is not {own_ae!r}"
        )
    if not allowed:
        return AccessDecision(True)
    try:
        addr = ipaddress.ip_address(_peer_host(peer_host))
    except ValueError:
        addr = None
    ae_known = False
    for entry in allowed:
        if entry.ae_title not in ("*", calling):
            continue
        ae_known = True
        if not entry.host:
            return AccessDecision(True)
        if addr is not None and addr in ipaddress.ip_network(entry.host, strict=False):
            return AccessDecision(True)
    if ae_known:
        return AccessDecision(
            False,
            REJECT_CALLING_AE,
            f"calling AE title {calling!r} not allowed from host {peer_host}",
        )
    return AccessDecision(
        False, REJECT_CALLING_AE, f"calling AE title {calling!r} is not on the allow-list"
    )


_peer_host = peer_host  # check_access's parameter shadows the helper's name


def inflated_size_over(data: bytes, limit: int) -> int | None:
    """Inflate a Deflated Explicit VR Little Endian data set in 1 MiB steps without keeping
    the output; returns the size reached once it passes ``limit`` (None = within it, or not
    deflate data -- the parser reports that). Why: pydicom inflates the whole data set into
    memory to read its header; 1 MB on the wire can inflate to gigabytes."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    buf: bytes = data
    try:
        while True:
            out = d.decompress(buf, 1 << 20)
            total += len(out)
            if total > limit:
                return total
            buf = d.unconsumed_tail
            if d.eof or (not buf and len(out) < (1 << 20)):
                break
        total += len(d.flush())
    except zlib.error:
        return None
    return total if total > limit else None


#: Low-disk refusals of one episode that still get their own audit row; the rest are counted
#: and written as one event when space returns (a full disk must not fill up with rows).
LOW_DISK_ROWS = 10


class UIDLocks:
    """One lock per UID in use (created on demand, dropped when nobody holds or waits).

    Why: the receiver decides "new, duplicate, conflict or identity conflict?" from what is
    stored or queued, then renames the file and queues its row. Two associations doing that for
    the same UIDs at once would both see "new" (and the second file would replace the first).
    Keys are always taken in the order given (study, series, SOP), so no two holders wait on
    each other in a circle."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}  # key -> [lock, users]

    def _acquire(self, key: str) -> None:
        with self._guard:
            entry = self._locks.get(key)
            if entry is None:
                entry = self._locks[key] = [threading.Lock(), 0]
            entry[1] += 1
        entry[0].acquire()

    def _release(self, key: str) -> None:
        with self._guard:
            entry = self._locks[key]
            entry[0].release()
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]

    @contextlib.contextmanager
    def hold(self, *keys: str):
        taken: list[str] = []
        try:
            for key in dict.fromkeys(k for k in keys if k):
                self._acquire(key)
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                self._release(key)

    def pin(self, *keys: str) -> None:
        """Keep ``keys`` excluded from *other processes* past :meth:`hold` until :meth:`unpin`
        (called by a holder whose row is still in the write-behind). Threads of this process
        see queued rows (:class:`storage.recorder.InstanceRecorder`), so within one process
        there is nothing to keep: a no-op here, see :class:`node.receiver_pool.ProcessUIDLocks`."""

    def unpin(self, *keys: str) -> None:
        """End a :meth:`pin` (the row is committed)."""

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)


def uid_keys(header: Any) -> tuple[str, str, str]:
    """The UID lock keys of an instance, in the order they are always taken."""
    return (
        "study:" + header.study_uid,
        "series:" + header.series_uid,
        "sop:" + header.sop_instance_uid,
    )


def _failure(status: int, comment: str) -> Dataset:
    """A C-STORE failure status with an Error Comment (0000,0902; LO, 64 characters)."""
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]
    return rsp


def _uid_ok(value: Any) -> bool:
    return bool(value) and UID(str(value)).is_valid


def instance_relpath(header: Any) -> str:
    """Where a stored instance lives in the spool (reconciliation relies on this layout)."""
    return f"instances/{header.study_uid}/{header.series_uid}/{header.sop_instance_uid}.dcm"


def conflict_relpath(header: Any, digest: str) -> str:
    """Where a conflicting object (known SOP UID, other bytes) is kept."""
    return f"conflicts/{header.series_uid}/{header.sop_instance_uid}.{digest[:16]}.dcm"


# ---------------------------------------------------------------------------------------------
# the receiver
# ---------------------------------------------------------------------------------------------


class Receiver:
    """C-ECHO / C-STORE SCP writing into `storage` (spool + audit DB).

    `on_release(assoc_id)` (optional) is called when a release is requested (before it is
    answered, after the association row is closed) so the assembler can look at its series
    without waiting for the next poll. ``recorder`` commits the 'stored' rows (started and
    drained with the receiver; :meth:`flush` waits for it).
    """

    def __init__(
        self,
        config: NodeConfig,
        store: Any,
        spool: Any,
        *,
        metrics: Any = None,
        on_release: Callable[[int], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.spool = spool
        self.metrics = metrics
        self.on_release = on_release
        # storage.durability: "fsync" (default) makes every received file durable before
        # Success; "os" leaves it to the page cache (survives kill -9, not a power cut)
        self.durable = getattr(config.storage, "durability", "fsync") != "os"
        self.with_phi = bool(getattr(store, "store_phi", True))
        self.recorder = InstanceRecorder(store)
        # PatientIDs are compared as keyed hashes; the secret lives in the data dir
        self.keyer = load_patient_keyer(config.data_dir)
        self.uid_locks = UIDLocks()
        self.recorder.on_done = self._row_done
        # how long the end of an association waits for its rows to be committed
        self.flush_timeout_s = 30.0
        self._assoc_ids: dict[int, int] = {}
        self._lock = threading.Lock()
        self._server: GuardedServer | None = None
        self.ae = None
        self.port: int | None = None
        total = shutil.disk_usage(self.spool.root).total
        self.min_free_bytes = config.free_disk_threshold(total)
        n = config.network
        self.max_instance_bytes = config.size_limit("storage.max_instance_size")
        self.max_inflated_bytes = config.size_limit("storage.max_inflated_size")
        self.limits = ListenerLimits(
            acse_timeout_s=n.acse_timeout_s,
            network_timeout_s=n.network_timeout_s,
            max_associate_rq_bytes=config.size_limit("network.max_associate_rq_size"),
            max_instance_bytes=self.max_instance_bytes,
            max_per_host=n.per_host_limit(),
        )
        self.refusals: RefusalLog = RefusalAudit(store, n.refusal_audit_per_minute, metrics=metrics)
        # low disk: refusals counted per episode (see _disk_refusal)
        self._disk_lock = threading.Lock()
        self.disk_low_since: float | None = None
        self.disk_refusals = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def _make_ae(self) -> tuple[Any, Any, list]:
        """The AE, TLS context and event handlers of this receiver (listening or fed)."""
        n = self.config.network
        ae = make_ae(
            n.ae_title,
            acse_timeout=n.acse_timeout_s,
            dimse_timeout=n.dimse_timeout_s,
            network_timeout=n.network_timeout_s,
            max_associations=n.max_associations,
        )
        ae.supported_contexts = scp_contexts()
        ssl_ctx = None
        t = self.config.tls
        if t.enabled:
            ssl_ctx = server_ssl_context(
                t.certificate, t.key, t.ca or None, t.require_client_certificate
            )
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        return ae, ssl_ctx, handlers

    def start_fed(
        self,
        address: tuple[str, int],
        on_connection_end: Callable[[str], None],
        *,
        write_behind: bool = False,
    ) -> Any:
        """Serve connections accepted by another process (:mod:`node.receiver_pool`): no
        listening socket; the returned server's ``serve_connection(sock, addr, over_limit)``
        starts one. ``address`` is the pool's listening address (what pynetdicom reports as the
        local end). With ``write_behind`` (what the pool uses) 'stored' rows are committed by
        the write-behind and ``uid_locks`` must be cross-process locks that support ``pin``
        (:class:`node.receiver_pool.ProcessUIDLocks`): other receiver processes decide
        duplicates and identity conflicts from the database. Without it every 'stored' row is
        committed before Success."""
        from node.listener import FedServer

        ae, ssl_ctx, handlers = self._make_ae()
        # the pool counts connections across its processes and marks the one over
        # network.max_associations (rejected in _on_requested); this process's own count is
        # never the limit (a finished association's thread may linger a moment)
        ae.maximum_associations = self.config.network.max_associations + 64
        self.ae = ae
        if write_behind:
            self.recorder.start()
        self.refusals.start()
        server = ae.make_server(
            address,
            ssl_context=ssl_ctx,
            evt_handlers=handlers,
            server_class=FedServer,
            limits=self.limits,
            audit=self.refusals,
            on_connection_end=on_connection_end,
        )
        ae._servers.append(server)
        self._server = server
        self.port = int(address[1])
        return server

    def start(self) -> int:
        """Start listening (non-blocking); returns the bound port."""
        n = self.config.network
        ae, ssl_ctx, handlers = self._make_ae()
        t = self.config.tls
        self.ae = ae
        self.recorder.start()
        self.refusals.start()
        try:
            # node.listener: deadlines on every read, size caps, TLS handshake off the accept
            # thread, per-host connection limit, audited refusals
            server = start_server(
                ae,
                (n.host, n.port),
                evt_handlers=handlers,
                ssl_context=ssl_ctx,
                limits=self.limits,
                audit=self.refusals,
            )
        except OSError as exc:
            self.recorder.stop()
            self.refusals.stop()
            why = exc.strerror or str(exc)
            raise MolreError(
                f"network.port: cannot listen on {n.host}:{n.port} ({why}); is "
                f"another service using it? Choose another network.port or "
                f"network.host"
            ) from None
        self._server = server
        self.port = int(server.server_address[1])
        log.info(
            "receiver listening",
            ae_title=n.ae_title,
            host=n.host,
            port=self.port,
            tls=t.enabled,
            allowed_callers=len(n.allowed_callers),
            max_per_host=self.limits.max_per_host,
        )
        return self.port

    def stop_accepting(self) -> None:
        """Close the listening socket; running associations continue."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def active_associations(self) -> int:
        return len(self.ae.active_associations) if self.ae is not None else 0

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let running associations finish (up to `timeout`), then abort them;
        then commit the rows still queued and wait for staged writes.

        Bounded: a connection stuck in a read is shut down at the socket (which ends the read
        at once), and the aborts run in a helper thread given at most 5 s."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.ae is not None:
            ae = self.ae
            for assoc in list(ae.active_associations):
                sock = getattr(assoc.dul, "socket", None)
                try:
                    if sock is not None and sock.socket is not None:
                        sock.socket.shutdown(2)  # socket.SHUT_RDWR: ends a blocked recv
                except OSError:
                    pass

            def abort_all() -> None:
                for assoc in list(ae.active_associations):
                    try:
                        assoc.abort()
                    except Exception:  # noqa: BLE001
                        pass
                ae.shutdown()

            aborter = threading.Thread(target=abort_all, name="receiver-abort", daemon=True)
            aborter.start()
            aborter.join(5.0)
        self.recorder.stop()
        self.refusals.stop()
        self.spool.close()

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until the rows of every instance answered so far are committed."""
        return self.recorder.flush(timeout)

    # -- association events -----------------------------------------------------------------------
    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title or "").strip()
        called = str(rq.called_ae_title or "").strip()
        host, port = peer_host(assoc.requestor.address), assoc.requestor.port
        n = self.config.network
        decision = check_access(
            calling,
            called,
            host,
            own_ae=n.ae_title,
            require_called_ae=n.require_called_ae,
            allowed=n.allowed_callers,
        )
        if decision.allowed:
            limit = over_limit_of(assoc)
            if limit is not None:
                # several receiver processes: the pool counted this connection past
                # network.max_associations -- the rejection pynetdicom gives in one process
                # (rejected-transient, service provider (presentation), local limit exceeded)
                log.warning(
                    "association rejected: network.max_associations reached",
                    calling_ae=calling,
                    peer=host,
                    max_associations=limit,
                )
                assoc.guard.fail(f"network.max_associations ({limit}) reached")
                assoc.acse.send_reject(0x02, 0x03, 0x02)
                assoc.kill()
            return
        log.warning(
            "association rejected",
            calling_ae=calling,
            called_ae=called,
            peer=host,
            reason=decision.reason,
        )
        # rate-limited like every refusal before acceptance (a flood must not fill the disk)
        mark_audited(assoc)
        self.refusals.record(
            host, port, decision.reason, calling_ae=calling, called_ae=called, kind="not allowed"
        )
        assoc.acse.send_reject(0x01, 0x01, decision.diagnostic)
        assoc.kill()

    def _on_established(self, event: Any) -> None:
        assoc = event.assoc
        mark_established(assoc)
        try:
            aid = self.store.begin_association(
                assoc.requestor.ae_title.strip(),
                assoc.acceptor.ae_title.strip(),
                assoc.requestor.address,
                assoc.requestor.port,
            )
        except Exception:  # noqa: BLE001
            log.exception("could not record association")
            return
        with self._lock:
            self._assoc_ids[id(assoc)] = aid
        if self.metrics:
            self.metrics.associations.inc()
        log.info(
            "association established",
            association_id=aid,
            calling_ae=assoc.requestor.ae_title.strip(),
            peer=assoc.requestor.address,
        )

    def _on_acse_recv(self, event: Any) -> None:
        # an A-RELEASE request: commit this sender's rows and close its association row before
        # pynetdicom answers it, so a sender that saw its release completed finds every instance
        # stored and the association released in the database
        prim = event.primitive
        if isinstance(prim, A_RELEASE) and prim.result is None:
            self._released(event.assoc)

    def _end(self, assoc: Any, outcome: str) -> int | None:
        with self._lock:
            aid = self._assoc_ids.pop(id(assoc), None)
        if aid is None:
            return None
        # the association's counters and its series see all its rows -- or the sender is told
        if not self.recorder.flush(self.flush_timeout_s):
            outcome = self._flush_failed(assoc, aid, outcome)
        try:
            self.store.end_association(aid, outcome)
        except Exception:  # noqa: BLE001
            log.exception("could not record association end", association_id=aid)
        log.info(f"association {outcome}", association_id=aid)
        return aid

    def _flush_failed(self, assoc: Any, aid: int, outcome: str) -> str:
        """The write-behind did not commit this association's rows in time (database locked
        or failing): the release must not be answered as if they were. The files are in the
        spool (durable, re-indexed at the next start if their rows never come), but the sender
        is told something went wrong -- A-ABORT instead of the A-RELEASE response -- and the
        audit trail says so."""
        queued = self.recorder.queued()
        reason = (
            f"instance rows not committed within {self.flush_timeout_s:g} s "
            f"({queued} queued); the association is aborted instead of released"
        )
        log.error(
            "instance rows not committed before the association ended",
            association_id=aid,
            queued=queued,
            outcome=outcome,
        )
        try:
            self.store.log_event(
                "association",
                aid,
                "flush_failed",
                details={"queued": queued, "reason": reason, "requested": outcome},
            )
        except Exception:  # noqa: BLE001
            log.exception("could not record the failed flush", association_id=aid)
        if outcome == "released":
            try:
                assoc.abort()
            except Exception:  # noqa: BLE001
                log.exception("could not abort the association", association_id=aid)
        return "aborted"

    def _released(self, assoc: Any) -> None:
        aid = self._end(assoc, "released")
        if aid is not None and self.on_release is not None:
            try:
                self.on_release(aid)
            except Exception:  # noqa: BLE001
                log.exception("on_release callback failed")

    def _on_released(self, event: Any) -> None:
        self._released(event.assoc)  # already done when the request arrived; kept as a backstop

    def _on_aborted(self, event: Any) -> None:
        self._end(event.assoc, "aborted")

    def _on_conn_close(self, event: Any) -> None:
        # a peer that drops TCP without A-RELEASE/A-ABORT: count as aborted
        self._end(event.assoc, "aborted")

    def _on_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    # -- C-STORE ----------------------------------------------------------------------------------
    def _assoc_id(self, assoc: Any) -> int | None:
        with self._lock:
            return self._assoc_ids.get(id(assoc))

    def _on_store(self, event: Any) -> int:
        t0 = time.perf_counter()
        aid = self._assoc_id(event.assoc)
        try:
            try:
                status, outcome = self._store(event, aid)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # the disk filled up during the write (the staged temp file is already
                # removed): transient, the sender must retry -- not a permanent 0xC001
                status, outcome = self._disk_refusal(
                    aid, event, f"no space left on the spool's disk while writing ({exc.strerror})"
                )
        except Exception as exc:  # noqa: BLE001 - the service never crashes on input
            log.exception("C-STORE handling failed", association_id=aid)
            status, outcome = STATUS_PROCESSING_FAILURE, "error"
            try:
                from storage import InstanceHeader

                req = event.request
                hdr = InstanceHeader(
                    sop_class_uid=str(req.AffectedSOPClassUID or "") or None,
                    sop_instance_uid=str(req.AffectedSOPInstanceUID or "") or None,
                )
                self._record_now(
                    aid,
                    hdr,
                    spool_path=None,
                    size=None,
                    sha256=None,
                    status="rejected",
                    reason=f"internal error: {type(exc).__name__}: {redact(str(exc))}",
                )
            except Exception:  # noqa: BLE001
                log.exception("could not record failed instance")
        if self.metrics:
            self.metrics.instances.labels(outcome=outcome).inc()
            self.metrics.store_seconds.observe(time.perf_counter() - t0)
        return status

    def _record_now(self, aid: int | None, header: Any, **row: Any) -> Any:
        """Record a non-'stored' outcome before answering. Rows of instances answered earlier
        may still be queued in the write-behind: they are committed first, so the audit rows
        of an association keep the order in which its instances arrived (a resend's
        'duplicate' row comes after the 'stored' row it repeats)."""
        if not self.recorder.flush(self.flush_timeout_s):
            log.warning(
                "earlier rows still queued; this row may come before them",
                association_id=aid,
                queued=self.recorder.queued(),
            )
        return self.store.record_instance(aid, header, **row)

    def _disk_refusal(self, aid: int | None, event_or_header: Any, reason: str) -> tuple[int, str]:
        """0xA700 for a full (or nearly full) disk. The first :data:`LOW_DISK_ROWS` refusals of
        an episode get an audit row; the rest are only counted (every row is a write to the
        disk that is full), and :meth:`_disk_recovered` writes the count when space is back."""
        with self._disk_lock:
            if self.disk_low_since is None:
                self.disk_low_since = time.time()
                self.disk_refusals = 0
            self.disk_refusals += 1
            write_row = self.disk_refusals <= LOW_DISK_ROWS
        if self.metrics:
            self.metrics.disk_full.inc()
        header = event_or_header
        if hasattr(event_or_header, "request"):
            from storage import InstanceHeader

            req = event_or_header.request
            header = InstanceHeader(
                sop_class_uid=str(req.AffectedSOPClassUID or "") or None,
                sop_instance_uid=str(req.AffectedSOPInstanceUID or "") or None,
            )
        if write_row:
            try:
                return self._reject(
                    aid, header, STATUS_OUT_OF_RESOURCES, reason, "out_of_resources"
                )
            except Exception:  # noqa: BLE001 - the database shares the full disk
                log.exception("could not record a low-disk refusal")
        log.warning(
            "instance refused: low disk",
            association_id=aid,
            reason=reason,
            refusals=self.disk_refusals,
            sop_instance_uid=header.sop_instance_uid,
        )
        return STATUS_OUT_OF_RESOURCES, "out_of_resources"

    def _disk_recovered(self) -> None:
        with self._disk_lock:
            since, count = self.disk_low_since, self.disk_refusals
            self.disk_low_since = None
            self.disk_refusals = 0
        if since is None:
            return
        details = {
            "refused": count,
            "rows_written": min(count, LOW_DISK_ROWS),
            "seconds": round(time.time() - since, 1),
        }
        log.info("disk space recovered", **details)
        try:
            self.store.log_event("node", "disk", "space-recovered", details=details)
        except Exception:  # noqa: BLE001
            log.exception("could not record the disk recovery")

    def _reject(
        self, aid: int | None, header: Any, status: int, reason: str, outcome: str = "rejected"
    ) -> tuple[int, str]:
        self._record_now(
            aid, header, spool_path=None, size=None, sha256=None, status="rejected", reason=reason
        )
        log.warning(
            "instance rejected",
            association_id=aid,
            status=f"0x{status:04X}",
            reason=reason,
            sop_instance_uid=header.sop_instance_uid,
        )
        return status, outcome

    def _store(self, event: Any, aid: int | None) -> tuple[int, str]:
        from storage import InstanceHeader

        req = event.request
        rq_class = str(req.AffectedSOPClassUID or "")
        rq_instance = str(req.AffectedSOPInstanceUID or "")
        ts = str(event.context.transfer_syntax)
        base = InstanceHeader(
            sop_class_uid=rq_class or None, sop_instance_uid=rq_instance or None, transfer_syntax=ts
        )
        cut = oversize_of(event)  # node.listener stopped buffering it at the cap
        if cut is not None:
            return self._reject(
                aid,
                base,
                STATUS_OUT_OF_RESOURCES,
                f"data set larger than storage.max_instance_size "
                f"({self.max_instance_bytes} bytes; more than {cut} received)",
            )
        context_class = str(event.context.abstract_syntax)
        if rq_class != context_class:
            # e.g. a CT object sent on an MR or Verification context (pynetdicom passes it on):
            # the negotiated SOP class is what the node accepted, CT only on CT contexts
            return self._reject(
                aid,
                base,
                STATUS_SOP_CLASS_NOT_SUPPORTED,
                f"C-STORE of {UID(rq_class).name} on a presentation context "
                f"negotiated for {UID(context_class).name}",
            )
        if self.min_free_bytes and self.spool.free_bytes() < self.min_free_bytes:
            return self._disk_refusal(
                aid, base, f"free disk below storage.min_free_disk ({self.min_free_bytes} bytes)"
            )
        if self.disk_low_since is not None:
            self._disk_recovered()
        stream = event.encoded_dataset(include_meta=False)
        if UID(ts).is_deflated:
            inflated = inflated_size_over(stream, self.max_inflated_bytes)
            if inflated is not None:
                return self._reject(
                    aid,
                    base,
                    STATUS_OUT_OF_RESOURCES,
                    f"deflated data set inflates past "
                    f"storage.max_inflated_size ({self.max_inflated_bytes} "
                    f"bytes; {len(stream)} bytes on the wire)",
                )
        head = file_header(rq_class, rq_instance, ts)
        size = len(head) + len(stream)
        # the write (and fsync) runs in a spool I/O thread while this one reads the header;
        # leaving the block without commit() removes the file (rejected, duplicate, error)
        with self.spool.stage((head, stream), durable=self.durable) as staged:
            # PatientID is read whatever audit.store_phi says: the identity check compares its
            # keyed hash (the value itself is dropped below unless the store keeps PHI)
            with_phi = True
            # the scan reads the ~30 elements the node needs straight from the bytes; when it
            # is not sure of something (see node.header) pydicom parses the header
            header = scan_header(stream, ts, with_phi=with_phi)
            if header is None:
                try:
                    ds = pydicom.dcmread(BytesIO(head + stream), stop_before_pixels=True)
                except Exception as exc:  # noqa: BLE001 - any parse failure: "cannot understand"
                    return self._reject(
                        aid,
                        base,
                        STATUS_CANNOT_UNDERSTAND,
                        f"cannot decode header: {type(exc).__name__}: {redact(str(exc))}",
                    )
                try:
                    header = read_header(ds, ts, with_phi=with_phi)
                except Exception as exc:  # noqa: BLE001 - malformed values in a readable header
                    return self._reject(
                        aid,
                        base,
                        STATUS_CANNOT_UNDERSTAND,
                        f"cannot read header values: {type(exc).__name__}: {redact(str(exc))}",
                    )
            header.patient_key = self.keyer.key(header.phi.get("PatientID"))
            if not self.with_phi:
                header.phi = {}
            refusal = _refusal(header, rq_class, rq_instance)
            if refusal is not None:
                return self._reject(aid, header, STATUS_DATASET_MISMATCH, refusal)
            if header.sop_class_uid not in CT_STORAGE_CLASSES:
                name = UID(header.sop_class_uid).name
                self._record_now(
                    aid,
                    header,
                    spool_path=None,
                    size=size,
                    sha256=None,
                    status="ignored",
                    reason=f"sop_class: {name} is not CT",
                )
                log.info(
                    "instance ignored",
                    association_id=aid,
                    sop_class=name,
                    series_uid=header.series_uid,
                )
                return STATUS_SUCCESS, "ignored"
            with self.uid_locks.hold(*uid_keys(header)):
                return self._keep(aid, header, staged, stream, size)

    def _row_done(self, row: StoredInstance) -> None:
        """The write-behind is done with a 'stored' row (committed, or given up on): other
        processes may decide about its UIDs again."""
        self.uid_locks.unpin(*uid_keys(row.header))

    def _identity_conflict(
        self, header: Any, known: Any = None
    ) -> tuple[int, str, str, dict] | None:
        """(status, what, reason, details) when the instance's study or patient disagrees with
        what is recorded for its series, its study or its SOP Instance UID; else None.
        ``known``: the stored instance with this SOP UID (``recorder.known_instance``)."""
        if known is not None and known.study_uid and known.study_uid != header.study_uid:
            return (
                STATUS_SOP_ELSEWHERE,
                "sop_instance_uid",
                f"identity conflict: SOP Instance UID {header.sop_instance_uid} is already "
                f"stored in study {known.study_uid}, not {header.study_uid}",
                {"known_study_uid": known.study_uid},
            )
        ident = self.recorder.series_identity(header.series_uid, header.study_uid)
        if ident.series_study_uid and ident.series_study_uid != header.study_uid:
            return (
                STATUS_STUDY_CONFLICT,
                "study_instance_uid",
                f"identity conflict: StudyInstanceUID {header.study_uid} differs from "
                f"study {ident.series_study_uid} of series {header.series_uid}",
                {"known_study_uid": ident.series_study_uid},
            )
        key = header.patient_key
        if ident.series_patient_key and key and ident.series_patient_key != key:
            return (
                STATUS_PATIENT_CONFLICT,
                "patient_id",
                f"identity conflict: PatientID differs from that of series "
                f"{header.series_uid} (compared as keyed hashes)",
                {"scope": "series"},
            )
        if ident.study_patient_key and key and ident.study_patient_key != key:
            return (
                STATUS_PATIENT_CONFLICT,
                "patient_id",
                f"identity conflict: PatientID differs from that of study "
                f"{header.study_uid} (compared as keyed hashes)",
                {"scope": "study"},
            )
        return None

    def _keep(
        self, aid: int | None, header: Any, staged: Any, stream: bytes, size: int
    ) -> tuple[Any, str]:
        """The decision for a parsed CT instance, under its UID locks: identity conflict,
        duplicate, conflict or stored."""
        # one lookup of the SOP UID serves the identity check and the duplicate check
        known_row = self.recorder.known_instance(header.sop_instance_uid)
        conflict = self._identity_conflict(header, known_row)
        if conflict is not None:
            status, what, reason, details = conflict
            self._record_now(
                aid,
                header,
                spool_path=None,
                size=size,
                sha256=None,
                status="rejected",
                reason=reason,
                event_kind="identity_conflict",
                details={"conflict": what, **details},
            )
            log.warning(
                "instance refused: identity conflict",
                association_id=aid,
                conflict=what,
                status=f"0x{status:04X}",
                sop_instance_uid=header.sop_instance_uid,
                series_uid=header.series_uid,
                study_uid=header.study_uid,
            )
            comment = {
                "sop_instance_uid": "SOP Instance UID stored in another study",
                "study_instance_uid": "series UID known in another study",
                "patient_id": "PatientID differs from the series/study",
            }[what]
            return _failure(status, "identity conflict: " + comment), "identity_conflict"
        # a new SOP UID (the common case) needs no second lookup; a known one is looked up
        # again as (sha256, path) -- the seam tests use to race prune against a resend
        known = (
            self.recorder.stored_digest(header.sop_instance_uid) if known_row is not None else None
        )
        if known is not None:
            digest = hashlib.sha256(stream).hexdigest()
            known_sha256 = known[0]
            if known_sha256 == digest:
                if not self.recorder.flush(self.flush_timeout_s):
                    log.warning(
                        "earlier rows still queued; this row may come before them",
                        association_id=aid,
                        queued=self.recorder.queued(),
                    )
                # recorded only while the stored row is still there (prune may be removing
                # it this very moment); otherwise the resend is stored as new, below
                if (
                    self.store.record_duplicate(
                        aid, header, sha256=digest, size=size, reason="byte-identical resend"
                    )
                    is not None
                ):
                    return STATUS_SUCCESS, "duplicate"
                log.info(
                    "resend of a pruned instance stored again",
                    association_id=aid,
                    sop_instance_uid=header.sop_instance_uid,
                )
            else:
                path = staged.commit(conflict_relpath(header, digest))
                self._record_now(
                    aid,
                    header,
                    spool_path=str(path),
                    size=size,
                    sha256=digest,
                    status="conflict",
                    reason="different object with a known SOP Instance UID "
                    f"(first stored as sha256 {str(known_sha256)[:16]})",
                )
                log.warning(
                    "instance conflict",
                    association_id=aid,
                    sop_instance_uid=header.sop_instance_uid,
                    series_uid=header.series_uid,
                )
                return STATUS_CONFLICT_WARNING, "conflict"
        path = staged.commit(instance_relpath(header))
        # durable now: the row (and its sha256: the bytes go along) follows through the
        # write-behind, off the sender's path; reconcile_spool re-indexes it after a crash.
        # Queued before the UID locks are released, so the next holder in this process sees
        # it; other receiver processes decide from the database, so for them the keys stay
        # locked until the row is committed (pinned here, unpinned by _row_done).
        self.uid_locks.pin(*uid_keys(header))
        self.recorder.submit(
            StoredInstance(aid, header, str(path), size, None, self.store.now(), data=stream)
        )
        return STATUS_SUCCESS, "stored"


def _refusal(header: Any, rq_class: str, rq_instance: str) -> str | None:
    """Why a parsed instance is refused with 0xA900 (missing/invalid UIDs, or UIDs that do not
    match the C-STORE request), or None."""
    for kw, value in (
        ("SOPInstanceUID", header.sop_instance_uid),
        ("SeriesInstanceUID", header.series_uid),
        ("StudyInstanceUID", header.study_uid),
        ("SOPClassUID", header.sop_class_uid),
    ):
        if not _uid_ok(value):
            return f"{kw} missing or not a valid UID: {value!r}"
    if header.sop_class_uid != rq_class:
        return f"SOPClassUID {header.sop_class_uid} does not match the C-STORE request ({rq_class})"
    if header.sop_instance_uid != rq_instance:
        return (
            f"SOPInstanceUID {header.sop_instance_uid} does not match the C-STORE request "
            f"({rq_instance})"
        )
    return None


# ---------------------------------------------------------------------------------------------
# start-up reconciliation: spool files without a row
# ---------------------------------------------------------------------------------------------

RECONCILE_REASON = "re-indexed from the spool at start-up (its row was missing)"


def _dataset_digest(data: bytes) -> str:
    """sha256 of the data set part of a spool file -- what the receiver hashes (the C-STORE
    stream, without preamble and file meta), so a later resend is still a duplicate."""
    start = 0
    if data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00":
        start = 144 + int.from_bytes(data[140:144], "little")  # (0002,0000) group length
    return hashlib.sha256(memoryview(data)[start:]).hexdigest()


def reconcile_spool(
    store: Any, spool: Any, keyer: Any = None, *, written_before: float | None = None
) -> dict[str, int]:
    """Give every spool file an instance row again; call at start-up before the listener opens
    (or, with ``written_before``, while receivers run: only files last written before that
    time -- ``time.time()`` -- are looked at, whose rows a live receiver has already committed;
    :mod:`node.receiver_pool` does this after a receiver process died).

    Why: the spool file is the durable record of a received instance (fsynced before C-STORE
    Success), while the audit database runs with ``synchronous=NORMAL``, so a power cut can lose
    the last committed rows. Such a file was acknowledged to the sender, so it must be read:
    files under ``instances/`` with no row pointing at them are recorded as ``stored`` (which
    creates/reopens their series as a live receive would), files under ``conflicts/`` as
    ``conflict``; both with reason :data:`RECONCILE_REASON` and one ``node/spool reindexed``
    event. Skipped: files older than the last prune's cutoff (prune deleted their rows, then
    the node stopped before the files were removed -- reviving them would re-read pruned
    data), unreadable files, and files whose content is already indexed under another path.
    Returns the counts.
    """
    counts = {
        "files": 0,
        "reindexed": 0,
        "conflicts": 0,
        "prune_leftovers": 0,
        "unreadable": 0,
        "indexed_elsewhere": 0,
    }
    files = [
        f
        for sub in ("instances", "conflicts")
        if (spool.root / sub).is_dir()
        for f in (spool.root / sub).rglob("*.dcm")
        if f.is_file()
    ]
    counts["files"] = len(files)
    if not files:
        return counts
    if written_before is not None:
        files = [f for f in files if f.stat().st_mtime < written_before]
    indexed = store.indexed_spool_paths(str(f) for f in files)
    orphans = [f for f in files if str(f) not in indexed]
    if not orphans:
        return counts
    cutoff = store.last_prune_cutoff()
    orphans.sort(key=lambda f: f.stat().st_mtime)
    for f in orphans:
        rel = f.relative_to(spool.root).as_posix()
        if cutoff is not None and f.stat().st_mtime < cutoff.timestamp():
            counts["prune_leftovers"] += 1
            log.warning("spool file older than the last prune has no row; not re-indexed", path=rel)
            continue
        try:
            data = f.read_bytes()
            ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
            header = read_header(ds, str(ds.file_meta.TransferSyntaxUID), with_phi=True)
            if keyer is not None:  # the series row gets its patient key, as on receipt
                header.patient_key = keyer.key(header.phi.get("PatientID"))
            if not getattr(store, "store_phi", True):
                header.phi = {}
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the node
            counts["unreadable"] += 1
            log.warning(
                "spool file without a row cannot be read; not re-indexed",
                path=rel,
                error=f"{type(exc).__name__}: {redact(str(exc))}",
            )
            continue
        digest = _dataset_digest(data)
        conflict = rel.startswith("conflicts/")
        expected = conflict_relpath(header, digest) if conflict else instance_relpath(header)
        if expected != rel:
            counts["unreadable"] += 1
            log.warning("spool file's UIDs do not match its path; not re-indexed", path=rel)
            continue
        known = store.find_instance(header.sop_instance_uid)
        if not conflict and known is not None:
            # the same SOP UID is stored elsewhere (data dir moved?) -- same bytes: nothing to do
            if known.sha256 != digest:
                log.warning(
                    "spool file differs from the stored instance with its SOP UID; not re-indexed",
                    path=rel,
                    sop_instance_uid=header.sop_instance_uid,
                )
            counts["indexed_elsewhere"] += 1
            continue
        store.record_instance(
            None,
            header,
            spool_path=str(f),
            size=len(data),
            sha256=digest,
            status="conflict" if conflict else "stored",
            reason=RECONCILE_REASON,
        )
        counts["conflicts" if conflict else "reindexed"] += 1
    if any(counts[k] for k in counts if k != "files"):
        store.log_event("node", "spool", "reindexed", details=counts)
        log.info("spool reconciled with the audit database", **counts)
    return counts


__all__ = [
    "AccessDecision",
    "Receiver",
    "UIDLocks",
    "check_access",
    "conflict_relpath",
    "instance_relpath",
    "reconcile_spool",
]
