"""Ingest safety in-process (issue 12): identity checks, races between senders, prune and the
write-behind, and the worker's view of missing files.

Each race test forces the interleaving it is about with a hook in the code under test (no
sleeps, no timing assertions): the hook runs the competing operation at the exact point where
the race window is.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from storage import Database, Store
from tests.nodeproc import make_ct_series, send_folder, wait_until
from tests.nodeproc import sql_rows as rows


def _variant(src: Path, dst: Path, **tags) -> Path:
    ds = pydicom.dcmread(src)
    for k, v in tags.items():
        setattr(ds, k, v)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


# ---------------------------------------------------------------------------------------------
# identity checks
# ---------------------------------------------------------------------------------------------


def test_series_uid_reused_by_another_study_or_patient_is_refused(rx, tmp_path: Path) -> None:
    receiver, store, cfg = rx
    a = make_ct_series(
        tmp_path / "a", [], n_slices=3, seed=31, PatientID="PAT-A", PatientName="ALPHA^ANN"
    )
    assert send_folder(a.paths, receiver.port).statuses == [0, 0, 0]
    # another study (and patient) reusing the SeriesInstanceUID, new SOP UIDs
    b = make_ct_series(
        tmp_path / "b",
        [],
        n_slices=2,
        seed=32,
        PatientID="PAT-B",
        PatientName="BETA^BOB",
        SeriesInstanceUID=a.series_uid,
    )
    res = send_folder(b.paths, receiver.port)
    assert all(s is not None and 0xC000 <= s <= 0xCFFF for s in res.statuses), res.statuses
    # same study and series UIDs, but another PatientID (an anonymiser's collision)
    c = make_ct_series(
        tmp_path / "c",
        [],
        n_slices=2,
        seed=33,
        PatientID="PAT-C",
        StudyInstanceUID=a.study_uid,
        SeriesInstanceUID=a.series_uid,
    )
    res = send_folder(c.paths, receiver.port)
    assert all(s is not None and 0xC000 <= s <= 0xCFFF for s in res.statuses), res.statuses
    # a new series of patient A's study, but with patient C's ID
    d = make_ct_series(
        tmp_path / "d", [], n_slices=1, seed=34, PatientID="PAT-C", StudyInstanceUID=a.study_uid
    )
    assert send_folder(d.paths, receiver.port).statuses[0] >= 0xC000
    # a SOP Instance UID of study A sent again inside another study
    sop = pydicom.dcmread(a.paths[0]).SOPInstanceUID
    e = _variant(
        a.paths[0],
        tmp_path / "e.dcm",
        StudyInstanceUID="1.2.826.0.1.3680043.99.1",
        SeriesInstanceUID="1.2.826.0.1.3680043.99.2",
    )
    assert send_folder([e], receiver.port).statuses[0] >= 0xC000

    rec = store.get_series(a.series_uid)
    assert rec.version == 1 and rec.instance_count == 3 and rec.study_uid == a.study_uid
    stored = rows(cfg, "SELECT DISTINCT study_uid FROM instances WHERE status = 'stored'")
    assert stored == [(a.study_uid,)]
    reasons = [
        r
        for (r,) in rows(cfg, "SELECT reason FROM instances WHERE status = 'rejected' ORDER BY id")
    ]
    assert len(reasons) == 2 + 2 + 1 + 1
    assert all("identity conflict" in r for r in reasons), reasons
    assert "StudyInstanceUID" in reasons[0] and "PatientID" in reasons[2]
    assert "PatientID" in reasons[4] and sop in reasons[5]
    kinds = rows(
        cfg, "SELECT details FROM events WHERE entity = 'instance' AND kind = 'identity_conflict'"
    )
    assert len(kinds) == 6
    # no PHI in the database: neither the IDs nor the names
    raw = Path(cfg.database_url.removeprefix("sqlite:///")).read_bytes()
    for phi in (b"PAT-A", b"PAT-B", b"PAT-C", b"ALPHA", b"BETA"):
        assert phi not in raw
    # nothing of B, C, D or E in the spool
    assert len(list((cfg.spool_dir / "instances").rglob("*.dcm"))) == 3


# ---------------------------------------------------------------------------------------------
# two associations, one SOP Instance UID
# ---------------------------------------------------------------------------------------------


def test_same_sop_uid_from_two_associations_never_overwrites(rx, tmp_path: Path) -> None:
    receiver, store, cfg = rx
    info = make_ct_series(tmp_path / "ct", [], n_slices=1, seed=41)
    one = info.paths[0]
    two = _variant(one, tmp_path / "two.dcm", SeriesDescription="another object, same SOP UID")
    barrier = threading.Barrier(2)
    real = receiver.recorder.stored_digest

    def both_look_first(uid: str):
        try:  # both associations ask "known?" before either has stored (at most 3 s)
            barrier.wait(timeout=3)
        except threading.BrokenBarrierError:
            pass
        return real(uid)

    receiver.recorder.stored_digest = both_look_first
    results: dict[str, list] = {}

    def send(name: str, path: Path) -> None:
        results[name] = send_folder([path], receiver.port, calling_ae=name).statuses

    threads = [threading.Thread(target=send, args=(n, p)) for n, p in (("A1", one), ("A2", two))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results["A1"] + results["A2"]) == [0x0000, 0xB000]
    receiver.flush()
    got = rows(cfg, "SELECT status, sha256, spool_path FROM instances ORDER BY id")
    assert sorted(s for s, _, _ in got) == ["conflict", "stored"]
    ((sha, path),) = [(h, p) for s, h, p in got if s == "stored"]
    import hashlib

    data = Path(path).read_bytes()
    start = 144 + int.from_bytes(data[140:144], "little")
    assert hashlib.sha256(data[start:]).hexdigest() == sha  # the file is the stored row's


# ---------------------------------------------------------------------------------------------
# prune against resends
# ---------------------------------------------------------------------------------------------


def _final_series(store: Store, receiver, paths) -> str:
    assert send_folder(paths, receiver.port).statuses == [0] * len(paths)
    receiver.flush()
    uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    store.transition(uid, "complete")
    store.transition(uid, "skipped", reason="test")
    return uid


def _every_stored_row_has_its_file(cfg) -> list[str]:
    got = rows(cfg, "SELECT spool_path FROM instances WHERE status IN ('stored', 'duplicate')")
    return [p for (p,) in got if not Path(p).exists()]


def test_prune_never_deletes_the_file_of_a_resend_stored_after_its_commit(
    rx, tmp_path: Path, monkeypatch
) -> None:
    receiver, store, cfg = rx
    info = make_ct_series(tmp_path / "ct", [], n_slices=2, seed=51)
    _final_series(store, receiver, info.paths)
    cutoff_now = store.now() + dt.timedelta(seconds=1)
    db, main = store.db, threading.get_ident()
    real_session = type(db).session
    fired = []

    from contextlib import contextmanager

    @contextmanager
    def session(self, *, write: bool = True):
        with real_session(self, write=write) as s:
            yield s
        # prune's rows are committed: the sender resends the study before the files go
        if write and threading.get_ident() == main and not fired:
            fired.append(1)
            assert send_folder(info.paths, receiver.port).statuses == [0, 0]
            receiver.flush()

    monkeypatch.setattr(type(db), "session", session)
    report = store.prune(dt.timedelta(0), spool=receiver.spool, now=cutoff_now)
    monkeypatch.undo()
    assert fired and report.instances >= 2
    assert rows(cfg, "SELECT COUNT(*) FROM instances WHERE status = 'stored'") == [(2,)]
    assert _every_stored_row_has_its_file(cfg) == []


def test_duplicate_of_a_row_being_pruned_keeps_its_file(rx, tmp_path: Path) -> None:
    receiver, store, cfg = rx
    info = make_ct_series(tmp_path / "ct", [], n_slices=1, seed=52)
    _final_series(store, receiver, info.paths)
    cutoff_now = store.now() + dt.timedelta(seconds=1)
    real = receiver.recorder.stored_digest
    fired = []

    def prune_in_between(uid: str):
        known = real(uid)  # the resend is found to be a duplicate of the old row ...
        if known is not None and not fired:  # ... which prune removes right then
            fired.append(store.prune(dt.timedelta(0), spool=receiver.spool, now=cutoff_now))
        return known

    receiver.recorder.stored_digest = prune_in_between
    assert send_folder(info.paths, receiver.port).statuses == [0]
    receiver.flush()
    assert fired and fired[0].instances == 1
    assert _every_stored_row_has_its_file(cfg) == []
    assert rows(cfg, "SELECT COUNT(*) FROM instances WHERE status = 'stored'") == [(1,)]


def test_prune_spares_series_with_recent_rows_and_does_not_block_writers(
    rx, tmp_path: Path, monkeypatch
) -> None:
    receiver, store, cfg = rx
    info = make_ct_series(tmp_path / "ct", [], n_slices=1, seed=53)
    uid = _final_series(store, receiver, info.paths)
    cutoff_now = store.now() + dt.timedelta(milliseconds=1)
    wait_until(lambda: store.now() > cutoff_now, 5, interval=0.01)
    # a byte-identical resend after the cutoff: acknowledged as a duplicate of the kept file
    assert send_folder(info.paths, receiver.port).statuses == [0]
    import storage.queries as queries

    other = Store(Database(cfg.database_url, busy_timeout_s=0.5))
    writes: list[str] = []
    real = queries._eligible_series

    def scan_then_write(s, cutoff):
        found = real(s, cutoff)
        try:  # another process writes while prune is scanning
            other.log_event("node", "node", "probe")
            writes.append("ok")
        except Exception as exc:  # noqa: BLE001
            writes.append(type(exc).__name__)
        return found

    monkeypatch.setattr(queries, "_eligible_series", scan_then_write)
    report = store.prune(dt.timedelta(0), spool=receiver.spool, now=cutoff_now)
    other.db.dispose()
    assert writes == ["ok"]
    assert uid not in report.series  # a resend newer than the cutoff keeps the series
    assert _every_stored_row_has_its_file(cfg) == []


# ---------------------------------------------------------------------------------------------
# the write-behind's flush
# ---------------------------------------------------------------------------------------------


def test_release_is_not_answered_as_committed_when_the_flush_fails(rx, tmp_path: Path) -> None:
    receiver, store, cfg = rx
    info = make_ct_series(tmp_path / "ct", [], n_slices=1, seed=61)
    gate = threading.Event()
    real_batch = store.record_stored_batch

    def stuck(batch):  # the database does not take the rows in time
        gate.wait(30)
        real_batch(batch)

    store.record_stored_batch = stuck
    receiver.flush_timeout_s = 0.5
    ae = AE(ae_title="FLUSHSCU")
    ae.add_requested_context(
        CTImageStorage, pydicom.dcmread(info.paths[0]).file_meta.TransferSyntaxUID
    )
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="MOLRE")
    try:
        assert assoc.is_established
        assert assoc.send_c_store(info.paths[0]).Status == 0  # the file is durable
        assoc.release()
        assert assoc.is_aborted and not assoc.is_released
    finally:
        gate.set()
        ae.shutdown()
    wait_until(lambda: rows(cfg, "SELECT outcome FROM associations")[0][0] == "aborted", 10)
    receiver.flush()
    ev = rows(
        cfg, "SELECT details FROM events WHERE entity = 'association' AND kind = 'flush_failed'"
    )
    assert len(ev) == 1 and "not committed" in ev[0][0]
    assert rows(cfg, "SELECT COUNT(*) FROM instances WHERE status = 'stored'") == [(1,)]


# ---------------------------------------------------------------------------------------------
# the worker and missing files
# ---------------------------------------------------------------------------------------------


def test_worker_fails_a_series_whose_files_are_missing(tmp_path: Path) -> None:
    from node.config import config_from_dict
    from node.worker import Worker
    from storage import Spool
    from tests.test_node_worker import FakeEngine, _ingest

    cfg = config_from_dict(
        {"storage": {"data_dir": str(tmp_path / "data")}, "model": {"isolation": "thread"}}
    )
    db = Database(cfg.database_url)
    db.upgrade()
    store, spool = Store(db), Spool(cfg.spool_dir)
    uid = _ingest(store, spool, make_ct_series(tmp_path / "s", [], n_slices=4, seed=71).paths)
    gone = store.series_instances(uid)[:2]
    for inst in gone:
        Path(inst.spool_path).unlink()
    worker = Worker(cfg, store, spool)
    worker.engine = FakeEngine(set(), set())
    assert worker.run_once()
    rec = store.get_series(uid)
    assert str(rec.state) == "failed", rec.state
    assert "2 of 4" in rec.reason and "missing" in rec.reason
    assert worker.engine.calls == 0  # the model never read a partial series
    db.dispose()
