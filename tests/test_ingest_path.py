"""The receiver's fast ingest path (issue 7): staged spool writes, the hand-built file meta, the
group-commit write-behind for 'stored' rows, and what keeps them honest -- duplicates seen while
a row is queued, rows committed before a release is answered and before a series can complete,
a drained queue on stop, and a crash before the commit healed by start-up reconciliation."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from node.dicomnet import file_header
from node.receiver import reconcile_spool
from storage import (
    Database,
    InstanceHeader,
    InstanceRecorder,
    Spool,
    Store,
    StoredInstance,
)
from storage.models import Association, Instance
from tests.nodeproc import make_ct_series, receiver_parts, send_folder

T0 = dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "audit.db"
    database = Database(f"sqlite:///{path}")
    database.upgrade()
    database.dispose()
    return path


@pytest.fixture()
def store(tmp_path: Path, template_db: Path) -> Store:
    shutil.copyfile(template_db, tmp_path / "audit.db")
    database = Database(f"sqlite:///{tmp_path / 'audit.db'}")
    yield Store(database)
    database.dispose()


def row(
    sop: str, series: str = "1.2.3.1", assoc: int | None = None, n: int = 1, digest: str = "a" * 64
) -> StoredInstance:
    h = InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop,
        study_uid="1.2.3",
        series_uid=series,
        modality="CT",
        transfer_syntax="1.2.840.10008.1.2.1",
        instance_number=n,
        meta={"SeriesDescription": "HEAD"},
    )
    return StoredInstance(assoc, h, f"/spool/{sop}.dcm", 10, digest, T0)


class Gate:
    """Makes ``store.record_stored_batch`` wait until opened (rows stay queued meanwhile)."""

    def __init__(self, store: Store) -> None:
        self.open = threading.Event()
        self.fail = False  # once opened: refuse every batch (the rows are lost)
        self.batches: list[int] = []
        real = store.record_stored_batch

        def gated(rows):
            self.open.wait(30)
            if self.fail:
                raise RuntimeError("the process died before this commit")
            self.batches.append(len(rows))
            return real(rows)

        store.record_stored_batch = gated  # type: ignore[method-assign]


# -- file meta ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sop_class, sop, ts",
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1"),  # odd lengths
        ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.3.45", "1.2.840.10008.1.2"),  # even lengths
        ("1.2.840.10008.5.1.4.1.1.4", "2.25.1234567890", "1.2.840.10008.1.2.4.50"),
    ],
)
def test_file_header_is_byte_identical_to_pynetdicoms(sop_class: str, sop: str, ts: str) -> None:
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    expected = (
        b"\x00" * 128
        + b"DICM"
        + encode_file_meta(
            create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop, transfer_syntax=ts)
        )
    )
    assert file_header(sop_class, sop, ts) == expected


# -- staged spool writes ---------------------------------------------------------------------------
def test_stage_commit_discard_and_failure(tmp_path: Path, monkeypatch) -> None:
    import storage.spool as spool_mod

    synced: list[Path] = []
    monkeypatch.setattr(spool_mod, "_fsync_dir", lambda p: synced.append(Path(p)))
    spool = Spool(tmp_path / "spool")
    payload = bytearray(os.urandom(300_000))
    with spool.stage((b"head", memoryview(payload))) as staged:
        final = staged.commit("instances/st/se/1.dcm")
    assert final.read_bytes() == b"head" + bytes(payload)
    assert synced[0] == final.parent  # the rename is made durable
    # not committed: the temp file goes away once written; nothing under a final name
    with spool.stage(b"unwanted"):
        pass
    spool.close()  # waits for in-flight writes (and their clean-up)
    assert not list((spool.root / "incoming").iterdir())
    # the write fails (fsync refused): commit raises, nothing is left behind
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError):
        with spool.stage(b"x") as staged:
            staged.commit("instances/st/se/2.dcm")
    spool.close()
    assert not (spool.root / "instances/st/se/2.dcm").exists()
    assert not list((spool.root / "incoming").iterdir())
    # os mode: no fsync at all
    monkeypatch.undo()
    calls: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    with spool.stage(b"fast", durable=False) as staged:
        assert staged.commit("instances/st/se/3.dcm").read_bytes() == b"fast"
    assert calls == []
    spool.close()


def test_stage_recreates_a_pruned_target_directory(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", durable=False)
    spool.write_atomic("instances/a/b/1.dcm", b"1")
    shutil.rmtree(spool.root / "instances" / "a")  # pruned behind the spool's back
    with spool.stage(b"2") as staged:
        assert staged.commit("instances/a/b/2.dcm").read_bytes() == b"2"
    spool.close()


# -- group commit -------------------------------------------------------------------------------------
def test_record_stored_batch_matches_record_instance(store: Store) -> None:
    a = store.begin_association("SCU", "MOLRE", "127.0.0.1", 1)
    b = store.begin_association("SCU2", "MOLRE", "127.0.0.1", 2)
    # first row creates the series (ORM path) inside the same transaction as the fast rows;
    # a repeated SOP UID counts once; two associations get their own counters
    store.record_stored_batch(
        [
            row("1.2.3.1.1", assoc=a),
            row("1.2.3.1.2", assoc=a, n=2),
            row("1.2.3.1.2", assoc=a, n=2),
            row("1.2.3.1.3", assoc=b, n=3),
            row("1.2.3.9.1", series="1.2.3.9", assoc=b),
        ]
    )
    rec = store.get_series("1.2.3.1")
    assert (rec.instance_count, rec.version, rec.state.value) == (3, 1, "receiving")
    assert rec.last_instance_at == T0  # the time of receipt, not of the commit
    assert store.get_series("1.2.3.9").instance_count == 1
    with store.db.session(write=False) as s:
        assert (s.get(Association, a).n_stored, s.get(Association, b).n_stored) == (3, 2)
        rows = s.execute(select(Instance).order_by(Instance.id)).scalars().all()
    assert [r.sop_instance_uid for r in rows] == [
        "1.2.3.1.1",
        "1.2.3.1.2",
        "1.2.3.1.2",
        "1.2.3.1.3",
        "1.2.3.9.1",
    ]
    assert {r.series_version for r in rows} == {1}
    assert rows[1].meta == {"SeriesDescription": "HEAD"} and rows[1].received_at == T0
    # a completed series is reopened by a batch row, later rows land in the new version
    store.transition("1.2.3.1", "complete")
    store.record_stored_batch([row("1.2.3.1.4", n=4), row("1.2.3.1.5", n=5)])
    rec = store.get_series("1.2.3.1")
    assert (rec.state.value, rec.version, rec.instance_count) == ("receiving", 2, 5)
    assert store.find_instance("1.2.3.1.5").series_version == 2


def test_series_bump_looks_the_instance_up_by_its_sop_uid(store: Store) -> None:
    """The per-instance "already stored in this series?" check is an index lookup on the SOP
    UID, not a walk through every stored instance of the series (quadratic per series)."""
    bump = store._hot()["bump"]
    con = store.db.engine.raw_connection()
    try:
        plan = [
            r[3]
            for r in con.execute(
                "EXPLAIN QUERY PLAN " + bump.sql, ["x"] * bump.sql.count("?")
            ).fetchall()
        ]
    finally:
        con.close()
    lookups = [p for p in plan if "instances" in p]
    assert lookups and all("ix_instances_sop_series_status" in p for p in lookups), plan


def test_record_stored_batch_is_one_transaction(store: Store) -> None:
    bad = row("1.2.3.1.2", assoc=987654)  # no such association: foreign key violation
    with pytest.raises(Exception):
        store.record_stored_batch([row("1.2.3.1.1"), bad])
    assert store.find_instance("1.2.3.1.1") is None  # the good row was rolled back with it


# -- the write-behind ----------------------------------------------------------------------------------
def test_recorder_flush_pending_digest_and_drain(store: Store) -> None:
    gate = Gate(store)
    rec = InstanceRecorder(store)
    rec.start()
    try:
        rec.submit(row("1.2.3.1.1", digest="1" * 64))
        assert rec.stored_digest("1.2.3.1.1") == ("1" * 64, "/spool/1.2.3.1.1.dcm")  # queued
        assert store.find_instance("1.2.3.1.1") is None  # ...and not committed yet
        assert rec.flush(timeout=0.2) is False
        for i in range(2, 6):
            rec.submit(row(f"1.2.3.1.{i}", n=i))
        assert rec.queued() == 5
        gate.open.set()
        assert rec.flush(timeout=10)
        assert rec.queued() == 0 and store.get_series("1.2.3.1").instance_count == 5
        assert gate.batches[0] == 1 and sum(gate.batches) == 5  # later rows grouped
        assert rec.stored_digest("1.2.3.1.1") == ("1" * 64, "/spool/1.2.3.1.1.dcm")  # from the DB
        # stop drains whatever is still queued
        gate.open.clear()
        rec.submit(row("1.2.3.1.6", n=6))
        threading.Timer(0.2, gate.open.set).start()
    finally:
        rec.stop()
    assert store.find_instance("1.2.3.1.6") is not None
    rec.submit(row("1.2.3.1.7", n=7))  # stopped: written synchronously
    assert store.find_instance("1.2.3.1.7") is not None


def test_recorder_lingers_to_batch_rows_and_a_flush_ends_the_wait(
    store: Store, monkeypatch
) -> None:
    """A sequential sender's rows are committed several at a time (fewer commits, less CPU);
    a flush (release, completion check) does not wait for the linger to run out."""
    batches: list[int] = []
    real = store.record_stored_batch

    def counting(rows):
        batches.append(len(rows))
        return real(rows)

    monkeypatch.setattr(store, "record_stored_batch", counting)
    rec = InstanceRecorder(store, linger_s=60.0)  # would hold rows for a minute without flush
    rec.start()
    try:
        for i in range(5):
            rec.submit(row(f"1.2.3.1.{i}", n=i))
        assert rec.queued() == 5 and batches == []  # lingering: nothing committed yet
        assert rec.flush(timeout=10.0)  # ends the linger at once
        assert batches == [5] and rec.queued() == 0
    finally:
        rec.stop()


def test_recorder_retries_then_drops_only_the_bad_row(store: Store) -> None:
    rec = InstanceRecorder(store, retry_delays_s=(0.01,))
    calls = {"n": 0}
    real = store.record_stored_batch

    def flaky(rows):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("database is locked")
        return real(rows)

    store.record_stored_batch = flaky  # type: ignore[method-assign]
    rec.start()
    try:
        rec.submit(row("1.2.3.1.1"))
        assert rec.flush(10)
        assert store.find_instance("1.2.3.1.1") is not None and calls["n"] == 2
        store.record_stored_batch = real  # type: ignore[method-assign]
        gate = Gate(store)
        rec.submit(row("1.2.3.1.2", n=2))
        rec.submit(row("1.2.3.1.3", assoc=987654, n=3))  # unknown association: always refused
        rec.submit(row("1.2.3.1.4", n=4))
        gate.open.set()
        assert rec.flush(10)
    finally:
        rec.stop()
    assert rec.dropped == 1
    assert [store.find_instance(f"1.2.3.1.{i}") is not None for i in (2, 3, 4)] == [
        True,
        False,
        True,
    ]


def test_completion_waits_for_queued_rows(store: Store) -> None:
    store.record_stored_batch([row("1.2.3.1.1")])  # the series exists, received at T0
    gate = Gate(store)
    rec = InstanceRecorder(store)
    rec.start()
    try:
        rec.submit(
            StoredInstance(None, row("1.2.3.1.2", n=2).header, "/s/2", 1, "b" * 64, store.now())
        )
        later = store.now() + dt.timedelta(seconds=2)
        threading.Timer(0.3, gate.open.set).start()
        t0 = time.monotonic()
        # without the barrier the series would look quiet for 5 s (its only committed row is
        # from T0); the queued row, received just now, keeps it receiving
        assert store.series_due_for_completion(5.0, 2.0, now=later) == []
        assert time.monotonic() - t0 >= 0.25  # it waited for the commit
        gate.open.clear()
        rec.submit(row("1.2.3.1.3", n=3))
        store.set_completion_barrier(lambda: rec.flush(timeout=0.05))
        assert store.series_due_for_completion(0.0, 0.0) == []  # not flushed: deferred
        gate.open.set()
    finally:
        rec.stop()
    assert store.series_due_for_completion(0.0, 0.0) == ["1.2.3.1"]


# -- through the receiver --------------------------------------------------------------------------------
@pytest.fixture()
def rx(tmp_path: Path):
    with receiver_parts(tmp_path, start=False) as parts:
        yield parts


def _count(cfg, query: str) -> list:
    con = sqlite3.connect(cfg.database_url.removeprefix("sqlite:///"))
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def test_receiver_detects_duplicates_while_rows_are_queued(rx, tmp_path: Path) -> None:
    receiver, store, cfg = rx
    gate = Gate(store)
    receiver.start()
    info = make_ct_series(tmp_path / "ct", [], n_slices=2, seed=31)
    # the rows stay queued; the release waits for them, so send from a thread
    done: dict = {}
    t = threading.Thread(target=lambda: done.update(first=send_folder(info.paths, receiver.port)))
    t.start()
    deadline = time.monotonic() + 20
    while receiver.recorder.queued() < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert receiver.recorder.queued() == 2 and _count(cfg, "SELECT * FROM instances") == []
    assert t.is_alive()  # A-RELEASE not answered while its rows are queued
    # a second sender resends one identical and one edited object meanwhile
    changed = tmp_path / "changed.dcm"
    ds = pydicom.dcmread(info.paths[1])
    ds.SeriesDescription = "edited"
    ds.save_as(changed, enforce_file_format=True)
    resend: dict = {}
    t2 = threading.Thread(
        target=lambda: resend.update(res=send_folder([info.paths[0], changed], receiver.port))
    )
    t2.start()
    time.sleep(1.0)
    gate.open.set()
    t.join(20)
    t2.join(20)
    assert done["first"].statuses == [0, 0]
    assert resend["res"].statuses == [0, 0xB000]  # duplicate, conflict: seen while queued
    status = dict(_count(cfg, "SELECT status, COUNT(*) FROM instances GROUP BY status"))
    assert status == {"stored": 2, "duplicate": 1, "conflict": 1}
    # the audit keeps arrival order: the stored rows (queued when the resend came) were
    # committed before the duplicate / conflict rows were written
    order = [r[0] for r in _count(cfg, "SELECT status FROM instances ORDER BY id")]
    assert order == ["stored", "stored", "duplicate", "conflict"], order
    assert len(list((cfg.spool_dir / "instances").rglob("*.dcm"))) == 2
    # the write-behind hashed the queued rows' bytes: each row's sha256 is its file's data set's
    from node.receiver import _dataset_digest

    for path, sha in _count(
        cfg, "SELECT spool_path, sha256 FROM instances WHERE status = 'stored'"
    ):
        assert sha == _dataset_digest(Path(path).read_bytes())


def test_release_answers_only_after_rows_are_committed(rx, tmp_path: Path) -> None:
    receiver, store, cfg = rx
    real = store.record_stored_batch

    def slow(rows):
        time.sleep(0.3)
        return real(rows)

    real_end = store.end_association

    def slow_end(aid, outcome):
        time.sleep(0.3)
        return real_end(aid, outcome)

    store.record_stored_batch = slow  # type: ignore[method-assign]
    store.end_association = slow_end  # type: ignore[method-assign]
    receiver.start()
    info = make_ct_series(tmp_path / "ct", [], n_slices=3, seed=32)
    assert send_folder(info.paths, receiver.port, calling_ae="SLOWDB").statuses == [0, 0, 0]
    # the sender's release returned: every row is there, counted on its association, and the
    # association is already closed as released (not still 'open')
    assert _count(cfg, "SELECT COUNT(*) FROM instances WHERE status = 'stored'") == [(3,)]
    assert _count(
        cfg, "SELECT n_stored, outcome FROM associations WHERE calling_ae = 'SLOWDB'"
    ) == [(3, "released")]


def test_rows_lost_before_their_commit_come_back_from_the_spool(rx, tmp_path: Path) -> None:
    """kill -9 between Success and the group commit, in-process: the rows never reach the
    database (the writer is stuck), the process 'dies'; a new start re-indexes every file."""
    receiver, store, cfg = rx
    gate = Gate(store)  # not opened until the "restart" is done: nothing is committed
    receiver.recorder.retry_delays_s = ()
    receiver.start()
    info = make_ct_series(tmp_path / "ct", [], n_slices=4, seed=33)
    result: dict = {}
    t = threading.Thread(
        target=lambda: result.update(res=send_folder(info.paths, receiver.port, timeout=10)),
        daemon=True,
    )
    t.start()
    deadline = time.monotonic() + 20
    while receiver.recorder.queued() < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert receiver.recorder.queued() == 4  # all four answered Success, no row committed
    assert _count(cfg, "SELECT COUNT(*) FROM instances") == [(0,)]
    # "restart": a fresh store on the same files; start-up reconciliation
    db2 = Database(cfg.database_url)
    store2 = Store(db2)
    counts = reconcile_spool(store2, Spool(cfg.spool_dir))
    assert counts["reindexed"] == 4
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in info.paths}
    got = {
        r[0] for r in _count(cfg, "SELECT sop_instance_uid FROM instances WHERE status = 'stored'")
    }
    assert got == uids and store2.get_series(info.series_uid).instance_count == 4
    db2.dispose()
    gate.fail = True  # the old process never commits them
    gate.open.set()
    t.join(20)
    assert result["res"].statuses == [0, 0, 0, 0]
    assert receiver.recorder.dropped == 4
    assert _count(cfg, "SELECT COUNT(*) FROM instances") == [(4,)]  # once each
