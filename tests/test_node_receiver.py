"""The receiver in-process (no model): statuses and audit rows for each kind of input."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import pytest

from node.config import config_from_dict
from node.receiver import Receiver
from storage import Database, Spool, Store
from tests.nodeproc import make_ct_series, send_folder, wait_until
from tests.nodeproc import sql_rows as rows


def test_store_duplicate_conflict(rx, tmp_path: Path) -> None:
    receiver, store, cfg = rx
    info = make_ct_series(tmp_path / "ct", [], n_slices=3, seed=11)
    res = send_folder(info.paths, receiver.port)
    assert res.statuses == [0, 0, 0]
    files = sorted((cfg.spool_dir / "instances").rglob("*.dcm"))
    assert len(files) == 3
    # the spooled file is the received object, byte for byte after the file meta
    sent = pydicom.dcmread(info.paths[0])
    kept = pydicom.dcmread(store.find_instance(sent.SOPInstanceUID).spool_path)
    assert kept.PixelData == sent.PixelData and kept.SOPInstanceUID == sent.SOPInstanceUID

    assert send_folder(info.paths[:1], receiver.port).statuses == [0]  # identical resend
    changed = tmp_path / "changed.dcm"
    sent.SeriesDescription = "edited"
    sent.save_as(changed, enforce_file_format=True)
    assert send_folder([changed], receiver.port).statuses == [0xB000]  # conflict: warning
    status = dict(rows(cfg, "SELECT status, COUNT(*) FROM instances GROUP BY status"))
    assert status == {"stored": 3, "duplicate": 1, "conflict": 1}
    assert len(sorted((cfg.spool_dir / "instances").rglob("*.dcm"))) == 3  # no second file
    assert len(list((cfg.spool_dir / "conflicts").rglob("*.dcm"))) == 1
    assert store.get_series(info.series_uid).instance_count == 3


def test_refusals_have_statuses_and_audit_rows(rx, tmp_path: Path) -> None:
    receiver, store, cfg = rx
    info = make_ct_series(tmp_path / "ct", [], n_slices=2, seed=12)
    # dataset SOP Class differs from the one negotiated (file meta) -> 0xA900
    bad = tmp_path / "mismatch.dcm"
    ds = pydicom.dcmread(info.paths[0])
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.save_as(bad)  # file meta keeps CT Image Storage
    assert pydicom.dcmread(bad).file_meta.MediaStorageSOPClassUID == info_class(info)
    assert send_folder([bad], receiver.port).statuses == [0xA900]
    # no SeriesInstanceUID -> 0xA900
    nouid = tmp_path / "nouid.dcm"
    ds = pydicom.dcmread(info.paths[1])
    del ds.SeriesInstanceUID
    ds.save_as(nouid, enforce_file_format=True)
    assert send_folder([nouid], receiver.port).statuses == [0xA900]
    # disk below the watermark -> 0xA700 Out of Resources
    receiver.min_free_bytes = 1 << 62
    assert send_folder(info.paths[1:], receiver.port).statuses == [0xA700]
    receiver.min_free_bytes = 0
    reasons = [
        r
        for (r,) in rows(cfg, "SELECT reason FROM instances WHERE status = 'rejected' ORDER BY id")
    ]
    assert "does not match the C-STORE request" in reasons[0]
    assert reasons[1].startswith("SeriesInstanceUID missing")
    assert "min_free_disk" in reasons[2]
    assert (
        rows(cfg, "SELECT COUNT(*) FROM events WHERE entity = 'instance' AND kind = 'rejected'")[0][
            0
        ]
        == 3
    )
    assert not list((cfg.spool_dir).rglob("*.dcm"))
    # the receiver still works afterwards
    assert send_folder(info.paths[1:], receiver.port).statuses == [0]


def info_class(info) -> str:
    return pydicom.dcmread(info.paths[0]).SOPClassUID


def test_association_rows(rx, tmp_path: Path) -> None:
    receiver, store, cfg = rx
    info = make_ct_series(tmp_path / "ct", [], n_slices=2, seed=13)
    send_folder(info.paths, receiver.port, calling_ae="SENDER")
    # the release is recorded by the SCP's handler just after the SCU returns
    wait_until(
        lambda: (
            ("SENDER", "MOLRE", "released", 2)
            in rows(cfg, "SELECT calling_ae, called_ae, outcome, n_stored FROM associations")
        ),
        10,
        what="association recorded as released",
    )


def test_reactor_wakes_on_input_not_on_its_poll(rx, tmp_path: Path, monkeypatch) -> None:
    """The association's two reactor threads wait for input instead of polling every 1 ms
    (node.listener.GuardedDUL / GuardedDIMSE). With their longest wait set to 30 s, every step
    must still be woken by what it waits for: instances, responses, the release, an abort; a
    lost wake-up would cost 30 s per step."""
    import time

    from pynetdicom import AE

    import node.listener as listener

    monkeypatch.setattr(listener, "REACTOR_POLL_S", 30.0)
    receiver, store, cfg = rx
    info = make_ct_series(tmp_path / "ct", [], n_slices=6, seed=14)
    t0 = time.monotonic()
    res = send_folder(info.paths, receiver.port, calling_ae="WAKER")
    assert res.statuses == [0] * 6
    wait_until(
        lambda: (
            receiver.active_associations() == 0
            and ("WAKER", "released", 6)
            in rows(cfg, "SELECT calling_ae, outcome, n_stored FROM associations")
        ),
        10,
        what="association released and recorded",
    )
    # an abort from the sender frees the slot at once too
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="MOLRE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.abort()
    wait_until(lambda: receiver.active_associations() == 0, 10, what="aborted slot freed")
    assert time.monotonic() - t0 < 25.0


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("openssl command not available to make a test certificate")
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            f"/CN={name}",
            "-days",
            "2",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_tls_listener_requires_client_certificate(tmp_path: Path) -> None:
    from node.dicomnet import client_ssl_context, echo

    cert, key = _self_signed(tmp_path, "node")
    ccert, ckey = _self_signed(tmp_path, "client")
    ca = tmp_path / "ca.pem"
    ca.write_text(cert.read_text() + ccert.read_text())
    cfg = config_from_dict(
        {
            "network": {"port": 0},
            "tls": {
                "enabled": True,
                "certificate": str(cert),
                "key": str(key),
                "ca": str(ca),
                "require_client_certificate": True,
            },
            "storage": {"data_dir": str(tmp_path / "data"), "min_free_disk": "0"},
        }
    )
    db = Database(cfg.database_url)
    db.upgrade()
    receiver = Receiver(cfg, Store(db), Spool(cfg.spool_dir))
    receiver.start()
    try:
        good = client_ssl_context(ca, ccert, ckey)
        assert echo("127.0.0.1", receiver.port, "MOLRE", ssl_context=good) == 0
        # no client certificate -> handshake refused; plain TCP -> no association
        assert (
            echo("127.0.0.1", receiver.port, "MOLRE", ssl_context=client_ssl_context(ca), timeout=5)
            is None
        )
        assert echo("127.0.0.1", receiver.port, "MOLRE", timeout=5) is None
        # a client that does not trust the node's certificate refuses it
        assert (
            echo(
                "127.0.0.1",
                receiver.port,
                "MOLRE",
                ssl_context=client_ssl_context(ccert, ccert, ckey),
                timeout=5,
            )
            is None
        )
    finally:
        receiver.stop(timeout=5)


# -- durability modes and start-up reconciliation --------------------------------------------------
def test_durability_config_and_os_mode_needs_no_fsync(tmp_path: Path, monkeypatch) -> None:
    import os

    from common.errors import ConfigError
    from node.service import open_storage

    with pytest.raises(ConfigError, match="storage.durability"):
        config_from_dict({"storage": {"data_dir": str(tmp_path), "durability": "sometimes"}})
    made = {}
    for mode in ("fsync", "os"):
        cfg = config_from_dict(
            {
                "network": {"port": 0},
                "storage": {
                    "data_dir": str(tmp_path / mode),
                    "min_free_disk": "0",
                    "durability": mode,
                },
            }
        )
        spool, db, store = open_storage(cfg)
        assert spool.durable  # reports etc. are always fsynced; durability is the receiver's
        with db.engine.connect() as c:  # the node's WAL runs NORMAL: the spool is the record
            assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 1
        made[mode] = (cfg, spool, store)
    info = make_ct_series(tmp_path / "ct", [], n_slices=2, seed=14)

    def no_fsync(fd):
        raise OSError(5, "fsync refused by the test")

    monkeypatch.setattr(os, "fsync", no_fsync)  # the spool's fsyncs; SQLite's are in C
    for mode, expected in (("os", [0, 0]), ("fsync", [0xC001, 0xC001])):
        cfg, spool, store = made[mode]
        receiver = Receiver(cfg, store, spool)
        assert receiver.durable is (mode == "fsync")
        receiver.start()
        try:
            assert send_folder(info.paths, receiver.port).statuses == expected
        finally:
            receiver.stop(timeout=5)
    # "fsync" never answers Success without the fsync; "os" stored both, complete
    assert len(list((made["fsync"][0].spool_dir).rglob("*.dcm"))) == 0
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in info.paths}
    kept = {
        pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData
        for p in (made["os"][0].spool_dir / "instances").rglob("*.dcm")
    }
    assert kept == sent
    assert made["os"][2].get_series(info.series_uid).instance_count == 2


def test_reconcile_reindexes_spool_files_whose_rows_were_lost(rx, tmp_path: Path) -> None:
    """What a power cut does with synchronous=NORMAL: the last commits are gone, the fsynced
    spool files are not. Start-up reconciliation must bring every such file back."""
    from node.receiver import RECONCILE_REASON, reconcile_spool

    receiver, store, cfg = rx
    info = make_ct_series(tmp_path / "ct", [], n_slices=3, seed=15)
    assert send_folder(info.paths, receiver.port).statuses == [0, 0, 0]
    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(info.paths[0])
    ds.SeriesDescription = "edited"
    ds.save_as(changed, enforce_file_format=True)
    assert send_folder([changed], receiver.port).statuses == [0xB000]
    digests = dict(rows(cfg, "SELECT spool_path, sha256 FROM instances WHERE status = 'stored'"))
    spool = receiver.spool
    assert reconcile_spool(store, spool)["reindexed"] == 0  # nothing lost: nothing to do
    # lose everything but the first stored row (series row and conflict row included)
    con = sqlite3.connect(cfg.database_url.removeprefix("sqlite:///"))
    with con:
        keep = con.execute("SELECT MIN(id) FROM instances").fetchone()[0]
        con.execute("DELETE FROM instances WHERE id != ?", (keep,))
        con.execute("DELETE FROM series")
    con.close()
    junk = spool.root / "instances" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not dicom")
    counts = reconcile_spool(store, spool)
    assert (counts["reindexed"], counts["conflicts"], counts["unreadable"]) == (2, 1, 1)
    got = rows(
        cfg,
        "SELECT spool_path, sha256, reason FROM instances WHERE status = 'stored' "
        "AND reason IS NOT NULL",
    )
    assert len(got) == 2 and all(r == RECONCILE_REASON for _, _, r in got)
    assert all(digests[path] == digest for path, digest, _ in got)  # same hash as on receipt
    assert rows(cfg, "SELECT COUNT(*) FROM instances WHERE status = 'conflict'")[0][0] == 1
    # the series is back with every instance, and a resend is still a byte-identical duplicate
    assert store.get_series(info.series_uid).instance_count == 2  # the kept row's count was lost
    assert send_folder(info.paths, receiver.port).statuses == [0, 0, 0]
    assert rows(cfg, "SELECT COUNT(*) FROM instances WHERE status = 'duplicate'")[0][0] == 3
    assert (
        rows(cfg, "SELECT COUNT(*) FROM events WHERE entity = 'node' AND kind = 'reindexed'")[0][0]
        == 1
    )
    assert reconcile_spool(store, spool)["reindexed"] == 0  # idempotent


def test_reconcile_leaves_prune_leftovers_alone(rx, tmp_path: Path) -> None:
    import datetime as dt

    from node.receiver import reconcile_spool

    receiver, store, cfg = rx
    info = make_ct_series(tmp_path / "ct", [], n_slices=2, seed=16)
    assert send_folder(info.paths, receiver.port).statuses == [0, 0]
    con = sqlite3.connect(cfg.database_url.removeprefix("sqlite:///"))
    with con:
        con.execute("DELETE FROM instances")
    con.close()
    # a prune whose cutoff is after these files were written deleted their rows
    store.log_event(
        "node",
        "prune",
        "pruned",
        details={"cutoff": dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)},
    )
    counts = reconcile_spool(store, receiver.spool)
    assert (counts["prune_leftovers"], counts["reindexed"]) == (2, 0)
    assert rows(cfg, "SELECT COUNT(*) FROM instances")[0][0] == 0
