"""Attack corpus against the real node (loopback only, bounded): a hostile or broken peer must
not stall or exhaust the listener (issue 13, node/listener.py).

One node runs the whole corpus with small timeouts (acse/network 2 s, dimse 3 s, 4 associations,
2 per host, caps of 64 KiB per A-ASSOCIATE-RQ, 2 MiB per instance, 4 MiB inflated). Attackers
connect from other loopback addresses (127.0.0.2...; Linux routes all of 127/8 to lo), the
allowed caller TESTSCU from 127.0.0.1. For every attack the test asserts:

- the allowed caller can C-ECHO and C-STORE *during* the attack and right after it;
- the attacker's connections end (no slot is held past the deadline that applies);
- the attempt is in the audit database (an `associations` row with the reason);
and at the end: the node's peak memory (VmHWM) grew less than MEMORY_BOUND over its level
after start-up (the unfixed node grew by hundreds of MB on the same inputs), every instance
answered Success is stored in the database and the spool, and SIGTERM with stuck connections
ends cleanly (exit 0) within the documented grace (`node.service.stop_grace_s`).

Also here (in-process receiver, faults injected): ENOSPC during a write, the low-disk episode
counting, least-privilege file modes, the exposure check and IPv4-mapped peers.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import sqlite3
import stat
import struct
import threading
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from tests.nodeproc import NodeProcess, make_ct_series, receiver_parts, send_folder, wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
#: Allowed growth of the node's peak resident memory over the whole corpus.
MEMORY_BOUND = 150 * 1024 * 1024
LIMITS = {
    "acse_timeout_s": 2.0,
    "network_timeout_s": 2.0,
    "dimse_timeout_s": 3.0,
    "max_associations": 4,
    "max_associations_per_host": 2,
    "max_associate_rq_size": "64KiB",
    "refusal_audit_per_minute": 25,
}


# ---------------------------------------------------------------------------------------------
# raw protocol helpers (the attacker does not use a well-behaved library)
# ---------------------------------------------------------------------------------------------


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def associate_rq(
    calling: bytes | str = "ATTACKER", called: str = "MOLRE", abstract: str = VERIFICATION
) -> bytes:
    """An A-ASSOCIATE-RQ PDU (PS3.8 9.3.2), one presentation context, Implicit VR LE."""
    calling_b = calling if isinstance(calling, bytes) else calling.encode().ljust(16)
    ctx = (
        struct.pack(">BBBB", 1, 0, 0, 0)
        + _item(0x30, abstract.encode())
        + _item(0x40, b"1.2.840.10008.1.2")
    )
    body = (
        struct.pack(">HH", 1, 0)
        + called.encode().ljust(16)
        + calling_b.ljust(16)[:16]
        + b"\0" * 32
        + _item(0x10, b"1.2.840.10008.3.1.1.1")
        + _item(0x20, ctx)
        + _item(0x50, _item(0x51, struct.pack(">I", 16384)))
    )
    return struct.pack(">BBI", 1, 0, len(body)) + body


def connect(port: int, src: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((src, 0))
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


def closed_by_node(s: socket.socket, within: float) -> bool:
    """True when the node ends the connection (EOF or reset) within `within` seconds; any
    bytes it sends first (A-ABORT, A-ASSOCIATE-RJ) are read and skipped."""
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            s.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                if not s.recv(65536):
                    return True
            except socket.timeout:
                return False
        return False
    except OSError:
        return True
    finally:
        s.close()


def sql(node: NodeProcess, query: str, *args) -> list[tuple]:
    con = sqlite3.connect(node.data_dir / "molre.db", timeout=30)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


def refusals(node: NodeProcess, host: str) -> list[str]:
    return [
        r
        for (r,) in sql(
            node,
            "SELECT reject_reason FROM associations WHERE peer_host = ? "
            "AND outcome = 'rejected' ORDER BY id",
            host,
        )
    ]


def vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def raw_ct_file(path: Path, template: Path, *, pixel_bytes: int, deflate: bool) -> Path:
    """A CT file whose body is written by hand: the template's header with a PixelData of
    `pixel_bytes` zeros (Rows/Columns adjusted), Explicit VR LE or deflated."""
    ds = pydicom.dcmread(template)
    side = int((pixel_bytes // 2) ** 0.5)
    ds.Rows = ds.Columns = side
    del ds.PixelData
    body = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pydicom.dcmwrite(body, ds, write_like_original=False)  # header only (no pixels)
    raw = body.getvalue()
    meta_end = 132 + 12 + struct.unpack("<I", raw[140:144])[0]
    dataset = raw[meta_end:] + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, side * side * 2)
    if deflate:
        comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        chunk = b"\0" * (1 << 20)
        parts = [comp.compress(dataset)]
        left = side * side * 2
        while left:
            n = min(left, len(chunk))
            parts.append(comp.compress(chunk[:n]))
            left -= n
        parts.append(comp.flush())
        payload, ts = b"".join(parts), DeflatedExplicitVRLittleEndian
    else:
        payload, ts = dataset + b"\0" * (side * side * 2), ExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = ts
    meta = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + payload)
    return path


# ---------------------------------------------------------------------------------------------
# the node under attack
# ---------------------------------------------------------------------------------------------


class Caller:
    """The allowed caller: C-ECHO and a fresh CT instance per probe; remembers what was
    acknowledged."""

    def __init__(self, node: NodeProcess, files: list[Path]) -> None:
        self.node = node
        self.files = list(files)
        self.acked: list[str] = []

    def probe(self, what: str) -> None:
        status = None
        for _ in range(3):  # a refusal by the global limit is transient: no more than 3 tries
            from tests.nodeproc import echo

            status = echo(self.node.port, self.node.ae_title, calling_ae="TESTSCU", timeout=5)
            if status == 0:
                break
            time.sleep(0.3)
        assert status == 0, f"C-ECHO of the allowed caller failed {what}\n{self.node.log_tail()}"
        f = self.files.pop()
        res = send_folder(
            [f], self.node.port, called_ae=self.node.ae_title, calling_ae="TESTSCU", timeout=10
        )
        assert res.statuses == [0], f"C-STORE of the allowed caller failed {what}: {res}"
        self.acked.append(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID))


@pytest.fixture(scope="module")
def corpus_node(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("attacks")
    info = make_ct_series(tmp / "ct", [], n_slices=40, size=32, seed=131)
    network = dict(
        LIMITS,
        allowed_callers=[
            {"ae_title": "TESTSCU", "host": "127.0.0.1"},
            {"ae_title": "STALLER", "host": "127.0.0.4"},
            {"ae_title": "BIGSCU", "host": "127.0.0.5"},
        ],
    )
    node = NodeProcess.create(
        tmp,
        quiet_time_s=3600.0,
        release_grace_s=3600.0,
        network=network,
        storage={"max_instance_size": "2MiB", "max_inflated_size": "4MiB"},
        model={"job_timeout_s": 20.0, "job_lease_s": 30.0},
    )
    node.start()
    try:
        caller = Caller(node, info.paths)
        caller.probe("after start")
        baseline = vm_hwm(node.proc.pid)
        yield node, caller, baseline, tmp, info
    finally:
        if node.alive:
            node.kill()


def test_attack_corpus(corpus_node) -> None:
    node, caller, baseline, tmp, info = corpus_node
    port = node.port
    acse = LIMITS["acse_timeout_s"]

    # 1. partial A-ASSOCIATE-RQ (first 20 bytes), as many connections as one host may have,
    #    plus one more: the extra one is refused at accept, the others dropped at the deadline
    held = [connect(port, "127.0.0.2") for _ in range(2)]
    for s in held:
        s.sendall(associate_rq()[:20])
    extra = connect(port, "127.0.0.2")
    assert closed_by_node(extra, 3), "per-host limit: the third connection must be closed"
    caller.probe("during partial-PDU connections")
    assert all(closed_by_node(s, acse + 3) for s in held), "partial RQs must time out"
    caller.probe("after partial-PDU connections")
    wait_until(lambda: len(refusals(node, "127.0.0.2")) >= 3, 10, what="partial RQ audit rows")
    reasons = refusals(node, "127.0.0.2")
    assert any("max_associations_per_host" in r for r in reasons), reasons
    assert sum("acse_timeout_s" in r for r in reasons) >= 2, reasons

    # 2. one byte at a time (slowloris): the deadline covers the whole request
    drip = [connect(port, "127.0.0.3") for _ in range(2)]
    stop = threading.Event()

    def dribble(s: socket.socket) -> None:
        for b in associate_rq():
            if stop.wait(0.25):
                return
            try:
                s.send(bytes([b]))
            except OSError:
                return

    threads = [threading.Thread(target=dribble, args=(s,), daemon=True) for s in drip]
    for t in threads:
        t.start()
    caller.probe("during slow-drip connections")
    assert all(closed_by_node(s, acse + 3) for s in drip), "slow RQs must hit the deadline"
    stop.set()
    caller.probe("after slow-drip connections")
    wait_until(lambda: len(refusals(node, "127.0.0.3")) >= 2, 10, what="slow-drip audit rows")

    # 3. an A-ASSOCIATE-RQ declaring 511 MB: refused on its header, nothing buffered
    big = connect(port, "127.0.0.6")
    big.sendall(struct.pack(">BBI", 1, 0, 511 * 1024 * 1024))
    sent = 0
    try:
        big.settimeout(5)
        chunk = b"\0" * (1 << 20)
        while sent < 256 * (1 << 20):
            big.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    finally:
        big.close()
    assert sent < 256 * (1 << 20), "the node kept reading a 511 MB association request"
    caller.probe("after an oversized A-ASSOCIATE-RQ")
    wait_until(
        lambda: any("max_associate_rq_size" in r for r in refusals(node, "127.0.0.6")),
        10,
        what="oversized RQ audit row",
    )

    # 4. malformed requests (bad AE title characters) from four hosts at once: each aborted
    #    and its slot released at once (pynetdicom held it for acse_timeout_s)
    bad = [connect(port, f"127.0.0.{10 + i}") for i in range(4)]
    for s in bad:
        s.sendall(associate_rq(calling=b"BAD\\AE\x01\x02TITLE!!!"))
    for s in bad:
        s.settimeout(3)
        assert s.recv(10)[:1] in (b"\x07", b"\x03", b""), "expected an A-ABORT or a rejection"
        s.close()
    caller.probe("right after malformed requests")
    for i in range(4):
        wait_until(lambda: refusals(node, f"127.0.0.{10 + i}"), 10, what="malformed RQ row")

    # 5. an allowed caller that stops half-way through a P-DATA PDU
    st = connect(port, "127.0.0.4")
    st.sendall(associate_rq(calling="STALLER"))
    st.settimeout(5)
    assert st.recv(6)[:1] == b"\x02", "STALLER must be accepted"
    st.sendall(struct.pack(">BBI", 4, 0, 1000) + b"\0" * 10)
    caller.probe("during a stalled P-DATA")
    assert closed_by_node(st, LIMITS["network_timeout_s"] + 3), "stalled P-DATA must time out"
    caller.probe("after a stalled P-DATA")
    wait_until(
        lambda: (
            sql(node, "SELECT outcome FROM associations WHERE calling_ae = 'STALLER'")
            == [("aborted",)]
        ),
        10,
        what="STALLER association recorded as aborted",
    )

    # 6. deflate bomb: 256 MiB of zeros, ~250 KB on the wire; and 7. an instance over the cap
    bomb = raw_ct_file(tmp / "bomb.dcm", info.paths[0], pixel_bytes=256 << 20, deflate=True)
    assert bomb.stat().st_size < 2 << 20
    huge = raw_ct_file(tmp / "huge.dcm", info.paths[0], pixel_bytes=3 << 20, deflate=False)
    ok = caller.files.pop()
    res = _send_from("127.0.0.5", "BIGSCU", [bomb, huge, ok], port, node.ae_title)
    assert res == [0xA700, 0xA700, 0], [hex(s) if s is not None else s for s in res]
    caller.acked.append(str(pydicom.dcmread(ok, stop_before_pixels=True).SOPInstanceUID))
    caller.probe("after a deflate bomb and an oversized instance")
    rows = sql(
        node,
        "SELECT i.status, i.reason FROM instances i JOIN associations a ON "
        "a.id = i.association_id WHERE a.calling_ae = 'BIGSCU' ORDER BY i.id",
    )
    assert [s for s, _ in rows] == ["rejected", "rejected", "stored"], rows
    assert "max_inflated_size" in rows[0][1] and "max_instance_size" in rows[1][1], rows

    # 8. a CT object on an MR context and on the Verification context
    statuses = _store_on_wrong_context(port, node.ae_title, info.paths[-1])
    assert statuses == [0x0122, 0x0122], statuses
    wrong = sql(
        node,
        "SELECT status, reason FROM instances WHERE reason LIKE "
        "'%on a presentation context negotiated for%' ORDER BY id",
    )
    assert [s for s, _ in wrong] == ["rejected", "rejected"], wrong
    assert "MR Image" in wrong[0][1] and "Verification" in wrong[1][1], wrong
    caller.probe("after C-STOREs on wrong contexts")

    # 9. a flood from one host: at most max_associations_per_host connections at a time;
    #    audit rows limited to refusal_audit_per_minute, the rest counted (checked after stop)
    flood = []
    for _ in range(40):
        try:
            flood.append(connect(port, "127.0.0.7"))
        except OSError:
            pass
    caller.probe("during a connection flood")
    for s in flood:
        s.close()
    caller.probe("after a connection flood")

    # memory: nothing above was buffered whole
    grown = vm_hwm(node.proc.pid) - baseline
    print(
        f"node peak memory: {baseline >> 20} MiB after start, +{grown >> 20} MiB after the "
        f"attacks (bound {MEMORY_BOUND >> 20} MiB)"
    )
    assert grown < MEMORY_BOUND, f"node peak memory grew by {grown >> 20} MiB"

    # 10. SIGTERM while a pre-acceptance and an established connection are stuck
    from node.config import load_config
    from node.service import stop_grace_s

    stuck = connect(port, "127.0.0.8")
    stuck.sendall(associate_rq()[:7])
    st = connect(port, "127.0.0.4")
    st.sendall(associate_rq(calling="STALLER"))
    st.settimeout(5)
    assert st.recv(6)[:1] == b"\x02"
    st.sendall(struct.pack(">BBI", 4, 0, 5000) + b"\0" * 3)
    grace = stop_grace_s(load_config(node.config_path))
    node.proc.send_signal(15)
    try:
        rc = node.proc.wait(grace)
    except Exception:  # noqa: BLE001
        node.kill()
        raise AssertionError(f"SIGTERM did not end the node within {grace} s")
    finally:
        stuck.close()
        st.close()
    assert rc == 0, node.log_tail()

    # every attempt audited: flood rows + counted refusals cover the refused connections
    flood_rows = refusals(node, "127.0.0.7")
    assert 1 <= len(flood_rows) <= LIMITS["refusal_audit_per_minute"], len(flood_rows)
    counted = sql(node, "SELECT details FROM events WHERE kind = 'refusals-not-recorded'")
    assert counted, "refusals beyond the per-minute rows must be counted in an event"
    # nothing acknowledged is lost: every Success is a stored row and a spool file
    for uid in caller.acked:
        got = sql(
            node,
            "SELECT spool_path FROM instances WHERE sop_instance_uid = ? AND status = 'stored'",
            uid,
        )
        assert got and Path(got[0][0]).is_file(), uid
    assert not list((node.data_dir / "spool" / "incoming").glob("*")), "temp files left"


def _send_from(src: str, calling: str, paths: list[Path], port: int, called: str) -> list:
    """C-STORE files over one association from a given loopback source address."""
    from pynetdicom import _config

    from node.dicomnet import _file_contexts, make_ae

    contexts, _ = _file_contexts(paths)
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = make_ae(calling, acse_timeout=10, dimse_timeout=10, network_timeout=10)
    ae.requested_contexts = contexts
    assoc = ae.associate("127.0.0.1", port, ae_title=called, bind_address=(src, 0))
    assert assoc.is_established
    try:
        out = []
        for p in paths:
            rsp = assoc.send_c_store(p)
            out.append(int(rsp.Status) if rsp is not None and "Status" in rsp else None)
        return out
    finally:
        assoc.release()
        ae.shutdown()


def _store_on_wrong_context(port: int, called: str, path: Path) -> list:
    """Send a CT C-STORE on an MR context, then on the Verification context (PS3.7 9.3.1
    request built by hand: a well-behaved SCU library picks the matching context itself)."""
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.sop_class import Verification

    from node.dicomnet import make_ae

    ds = pydicom.dcmread(path)
    raw = io.BytesIO()
    pydicom.dcmwrite(raw, ds, write_like_original=False)
    stream = raw.getvalue()
    body = stream[132 + 12 + struct.unpack("<I", stream[140:144])[0] :]
    ae = make_ae("TESTSCU", acse_timeout=10, dimse_timeout=10, network_timeout=10)
    ae.add_requested_context(MR, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    out = []
    assoc._reactor_checkpoint.clear()  # as pynetdicom's send_c_*: keep its reactor off the queue
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        for cx in sorted(assoc.accepted_contexts, key=lambda c: c.abstract_syntax != MR):
            req = C_STORE()
            req.MessageID = len(out) + 1
            req.AffectedSOPClassUID = CT
            req.AffectedSOPInstanceUID = ds.SOPInstanceUID
            req.Priority = 2
            req.DataSet = io.BytesIO(body)
            assoc.dimse.send_msg(req, cx.context_id)
            _, rsp = assoc.dimse.get_msg(block=True)
            out.append(int(rsp.Status) if rsp is not None else None)
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()
        ae.shutdown()
    return out


# ---------------------------------------------------------------------------------------------
# in-process: disk full, low-disk episodes, modes, exposure, IPv4-mapped peers
# ---------------------------------------------------------------------------------------------


def _rows(cfg, query: str) -> list[tuple]:
    con = sqlite3.connect(cfg.database_url.removeprefix("sqlite:///"), timeout=30)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def test_enospc_during_write_is_out_of_resources_and_cleans_up(tmp_path: Path, monkeypatch) -> None:
    from storage import spool as spool_mod

    info = make_ct_series(tmp_path / "ct", [], n_slices=2, size=32, seed=132)
    real = spool_mod._write_all

    def full(fd, chunks):  # a few bytes land, then the file system is full
        os.write(fd, b"x" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with receiver_parts(tmp_path) as (receiver, store, cfg):
        monkeypatch.setattr(spool_mod, "_write_all", full)
        assert send_folder(info.paths[:1], receiver.port).statuses == [0xA700]
        monkeypatch.setattr(spool_mod, "_write_all", real)
        assert not [p for p in cfg.spool_dir.rglob("*") if p.is_file()], "temp file left"
        ((reason,),) = _rows(cfg, "SELECT reason FROM instances WHERE status = 'rejected'")
        assert "no space left" in reason.lower()
        # space is back: the same receiver stores again
        assert send_folder(info.paths[1:], receiver.port).statuses == [0]


def test_low_disk_refusals_are_counted_not_written_and_resume(tmp_path: Path) -> None:
    from node.receiver import LOW_DISK_ROWS

    info = make_ct_series(tmp_path / "ct", [], n_slices=LOW_DISK_ROWS + 5, size=32, seed=133)
    with receiver_parts(tmp_path) as (receiver, store, cfg):
        receiver.min_free_bytes = 1 << 62  # below the watermark
        res = send_folder(info.paths[:-1], receiver.port)
        assert res.statuses == [0xA700] * (LOW_DISK_ROWS + 4)
        ((count,),) = _rows(cfg, "SELECT COUNT(*) FROM instances")
        assert count == LOW_DISK_ROWS, "refusals past the first ones must not write rows"
        receiver.min_free_bytes = 0  # space is back
        assert send_folder(info.paths[-1:], receiver.port).statuses == [0]
        ((details,),) = _rows(cfg, "SELECT details FROM events WHERE kind = 'space-recovered'")
        assert details and f'"refused": {LOW_DISK_ROWS + 4}' in details, details


def test_data_dir_and_database_are_private_whatever_the_umask(tmp_path: Path) -> None:
    from node.config import config_from_dict
    from node.service import open_storage

    old = os.umask(0o022)
    try:
        cfg = config_from_dict({"storage": {"data_dir": str(tmp_path / "data")}})
        _spool, db, store = open_storage(cfg)
        store.log_event("node", "node", "test")  # creates the WAL
    finally:
        os.umask(old)
    assert stat.S_IMODE(cfg.data_dir.stat().st_mode) == 0o700
    files = [f for f in cfg.data_dir.iterdir() if f.name.startswith("molre.db")]
    assert any(f.name.endswith("-wal") for f in files), files
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    db.dispose()


def test_open_allow_list_needs_loopback_or_explicit_opt_in() -> None:
    from common.errors import ConfigError
    from node.config import check_exposure, config_from_dict

    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(config_from_dict({"network": {"host": host}}))
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(ConfigError, match="allow_any_caller"):
            check_exposure(config_from_dict({"network": {"host": host}}))
        check_exposure(config_from_dict({"network": {"host": host, "allow_any_caller": True}}))
        check_exposure(
            config_from_dict(
                {
                    "network": {
                        "host": host,
                        "allowed_callers": [{"ae_title": "PACS", "host": "10.0.0.0/8"}],
                    }
                }
            )
        )


def test_ipv4_mapped_peers_match_ipv4_rules() -> None:
    from node.config import AllowedCaller
    from node.listener import peer_host
    from node.receiver import check_access

    rules = [AllowedCaller("PACS", "10.1.0.0/16")]
    for peer, ok in (("::ffff:10.1.2.3", True), ("10.1.2.3", True), ("::ffff:10.2.0.1", False)):
        assert (
            check_access(
                "PACS", "MOLRE", peer, own_ae="MOLRE", require_called_ae=True, allowed=rules
            ).allowed
            is ok
        ), peer
    assert peer_host("::ffff:127.0.0.1") == "127.0.0.1" and peer_host("::1") == "::1"


def test_idle_connections_do_not_stall_the_tls_listener(tmp_path: Path) -> None:
    """The TLS handshake runs in the connection's thread with the pre-acceptance deadline:
    idle TCP connections to the TLS port neither block other TLS clients nor stay open."""
    from node.config import config_from_dict
    from node.dicomnet import client_ssl_context, echo
    from node.receiver import Receiver
    from storage import Database, Spool, Store
    from tests.test_node_receiver import _self_signed

    cert, key = _self_signed(tmp_path, "node")
    cfg = config_from_dict(
        {
            "network": {"port": 0, "acse_timeout_s": 1.5, "network_timeout_s": 1.5},
            "tls": {"enabled": True, "certificate": str(cert), "key": str(key)},
            "storage": {"data_dir": str(tmp_path / "data"), "min_free_disk": "0"},
        }
    )
    db = Database(cfg.database_url)
    db.upgrade()
    receiver = Receiver(cfg, Store(db), Spool(cfg.spool_dir))
    receiver.start()
    try:
        idle = [connect(receiver.port, "127.0.0.2") for _ in range(3)]
        assert (
            echo(
                "127.0.0.1", receiver.port, "MOLRE", ssl_context=client_ssl_context(cert), timeout=5
            )
            == 0
        ), "an idle TCP connection stalled the TLS listener"
        assert all(closed_by_node(s, 5) for s in idle), "idle TLS connections must time out"
        wait_until(
            lambda: (
                len(
                    _rows(
                        cfg,
                        "SELECT 1 FROM associations WHERE peer_host = "
                        "'127.0.0.2' AND reject_reason LIKE '%TLS handshake%'",
                    )
                )
                == 3
            ),
            10,
            what="TLS handshake failures audited",
        )
    finally:
        receiver.stop(timeout=5)
        db.dispose()
