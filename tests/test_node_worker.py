"""Worker: supervised inference process, bounded retries, one bad series never blocks the queue."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from molre.catalog import load_catalog
from node.config import config_from_dict
from node.worker import InferenceCrash, ProcessEngine, UserSeriesError, Worker
from storage import Database, InstanceHeader, Spool, Store
from tests.nodeproc import make_ct_series


def fake_child(conn: Any, checkpoint: Any, device: str, log_json: bool, threads: int) -> None:
    """Stands in for the inference process (no torch): 'crash' dies, 'hang' never answers."""
    conn.send(
        (
            "ready",
            {
                "catalog": {},
                "model_name": "fake",
                "checkpoint_hash": "0" * 64,
                "is_demo": True,
                "pid": os.getpid(),
            },
        )
    )
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        paths = msg[1]
        if paths[0] == "crash":
            os._exit(139)
        if paths[0] == "hang":
            time.sleep(3600)
        if paths[0] == "bad":
            conn.send(("user_error", "SeriesError: slices have different orientations"))
            continue
        conn.send(("ok", {"pid": os.getpid(), "n": len(paths)}))


def test_process_engine_survives_crash_and_timeout() -> None:
    engine = ProcessEngine(None, "cpu", target=fake_child, load_timeout=60)
    try:
        assert engine.predict(["a", "b"], timeout=30)["n"] == 2
        pid1 = engine.pid
        with pytest.raises(InferenceCrash, match="died"):
            engine.predict(["crash"], timeout=30)
        assert engine.predict(["a"], timeout=30)["pid"] != pid1  # restarted
        with pytest.raises(UserSeriesError, match="orientations"):
            engine.predict(["bad"], timeout=30)
        pid2 = engine.pid
        with pytest.raises(InferenceCrash, match="job_timeout_s"):
            engine.predict(["hang"], timeout=1)
        assert engine.predict(["a"], timeout=30)["pid"] not in (pid1, pid2)
    finally:
        engine.close()
    assert engine.pid is None


class FakeEngine:
    """In-process engine returning fixed probabilities; fails for series listed in `bad`."""

    def __init__(self, bad_paths: set[str], crash_paths: set[str]) -> None:
        cat = load_catalog()
        self.catalog = cat
        self.bad, self.crash = bad_paths, crash_paths
        self.info = {
            "catalog": cat.to_dict(),
            "model_name": "fake",
            "checkpoint_hash": "a" * 64,
            "is_demo": True,
        }
        self.calls = 0

    def ensure_started(self) -> dict:
        return self.info

    def predict(self, paths: list[str], timeout: float) -> dict:
        self.calls += 1
        if set(paths) & self.bad:
            raise UserSeriesError("SeriesError: no usable slices")
        if set(paths) & self.crash:
            raise InferenceCrash("inference process died (exit code -9)")
        probs = {k: (0.9 if i == 0 else 0.1) for i, k in enumerate(self.catalog.keys)}
        return {
            "probabilities": probs,
            "decisions": {k: p > 0.5 for k, p in probs.items()},
            "checkpoint_hash": "a" * 64,
            "model_name": "fake",
            "model_version": "1",
            "is_demo": True,
            "used_sop_instance_uids": [],
        }

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        pass


def _ingest(store: Store, spool: Spool, paths: list[Path]) -> str:
    series_uid = ""
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        data = p.read_bytes()
        rel = f"instances/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        path = spool.write_atomic(rel, data)
        h = InstanceHeader(
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            study_uid=ds.StudyInstanceUID,
            series_uid=ds.SeriesInstanceUID,
            modality="CT",
            meta={"Modality": "CT"},
        )
        store.record_instance(
            None, h, spool_path=str(path), size=len(data), sha256="x", status="stored"
        )
        series_uid = ds.SeriesInstanceUID
    store.transition(series_uid, "complete")
    store.transition(series_uid, "selected")
    store.enqueue_job(series_uid)
    return series_uid


def test_bad_series_is_recorded_and_does_not_block_the_queue(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {
            "storage": {"data_dir": str(tmp_path / "data")},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "port": 104}],
            "retry": {"max_attempts": 2, "job_retry_delay_s": 0},
            "model": {"isolation": "thread"},
        }
    )
    db = Database(cfg.database_url)
    db.upgrade()
    store, spool = Store(db), Spool(cfg.spool_dir)
    bad = _ingest(store, spool, make_ct_series(tmp_path / "bad", [], n_slices=2, seed=21).paths)
    crashy = _ingest(store, spool, make_ct_series(tmp_path / "c", [], n_slices=2, seed=22).paths)
    good = _ingest(store, spool, make_ct_series(tmp_path / "ok", [], n_slices=2, seed=23).paths)
    spooled = {s: {i.spool_path for i in store.series_instances(s)} for s in (bad, crashy)}
    worker = Worker(cfg, store, spool)
    worker.engine = FakeEngine(spooled[bad], spooled[crashy])
    for _ in range(6):
        if not worker.run_once():
            break
    b, c, g = (store.get_series(u) for u in (bad, crashy, good))
    assert str(b.state) == "failed" and "no usable slices" in b.reason  # final at once
    assert str(c.state) == "failed" and "died" in c.reason  # after max_attempts retries
    assert str(g.state) == "reported"
    assert worker.engine.calls == 1 + 2 + 1
    exports = store.due_exports()
    assert [e.series_uid for e in exports] == [good]
    sr = pydicom.dcmread(exports[0].report_path)
    assert sr.Modality == "SR" and sr.StudyInstanceUID == g.study_uid
    rows = store.findings()
    assert {r["series_uid"] for r in rows} <= {good}
