"""Concurrent writers on one database: threads and processes, no lost row, no 'locked'.

The node's receiver, worker and dispatcher write the same database at the same time (threads in
one process, or separate processes; on PostgreSQL also separate nodes). These tests run them for
real and then count rows, on SQLite and on a real PostgreSQL server (``db_url`` in conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage import Database, FindingResult, InstanceHeader, SeriesState, Store
from storage.models import Event, Instance, Job, Series, Study

ROOT = Path(__file__).resolve().parents[1]


def _db(url: str) -> Database:
    db = Database(url)
    db.upgrade()
    return db


def _hdr(series: str, sop: str, n: int) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop,
        study_uid="1.9",
        series_uid=series,
        modality="CT",
        instance_number=n,
    )


def _queue(store: Store, uids: list[str]) -> None:
    """Queued series + jobs written in one transaction (the Store path is tested elsewhere)."""
    now = store.now()
    with store.db.session() as s:
        if s.get(Study, 1) is None:
            s.add(Study(study_uid="1.9", created_at=now))
            s.flush()
        for uid in uids:
            s.add(
                Series(
                    series_uid=uid,
                    study_uid="1.9",
                    state="queued",
                    version=1,
                    instance_count=1,
                    first_instance_at=now,
                    last_instance_at=now,
                    created_at=now,
                    updated_at=now,
                    priority=0,
                )
            )
        s.flush()  # no ORM relationships: make the parent rows exist before the jobs
        for uid in uids:
            s.add(Job(series_uid=uid, version=1, state="queued", attempts=0, enqueued_at=now))


def test_receiver_worker_dispatcher_threads(db_url: str) -> None:
    db = _db(db_url)
    store = Store(db)
    jobs = [f"2.{i}" for i in range(15)]
    _queue(store, jobs)
    errors: list[BaseException] = []
    worker_done = threading.Event()

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
                errors.append(exc)

        return run

    def receiver():
        a = store.begin_association("SCU", "MOLRE", "127.0.0.1", 1)
        for i in range(100):
            store.record_instance(
                a,
                _hdr("3.1", f"3.1.{i}", i),
                spool_path=f"/s/{i}",
                size=1,
                sha256=None,
                status="stored",
            )
        store.end_association(a, "released")

    def worker(name: str):
        while (claim := store.claim_job(name)) is not None:
            store.finish_job(
                claim.id,
                results=[FindingResult("k", 0.7, True)],
                checkpoint_hash="h",
                model_name="m",
                report_path=None,
                report_sop_uid=None,
                destinations=["PACS"],
            )

    def workers():
        ts = [threading.Thread(target=guard(lambda n=n: worker(n))) for n in ("w1", "w2")]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        worker_done.set()

    def dispatcher():
        while True:
            due = store.due_exports(limit=5)
            for e in due:
                store.record_export_attempt(e.id, ok=True, status=0)
            if not due and worker_done.is_set() and not store.due_exports():
                return

    threads = [threading.Thread(target=guard(f)) for f in (receiver, workers, dispatcher)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    assert store.get_series("3.1").instance_count == 100
    with db.session(write=False) as s:
        assert (
            s.execute(
                select(func.count()).select_from(Instance).where(Instance.series_uid == "3.1")
            ).scalar_one()
            == 100
        )
        assert s.execute(select(Job.state, func.count()).group_by(Job.state)).all() == [
            ("done", 15)
        ]
    assert all(store.get_series(u).state is SeriesState.DELIVERED for u in jobs)
    assert store.stats()["exports"] == {"delivered": 15}


WRITER = r"""
import sys
from storage import Database, InstanceHeader, Store
url, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
# NORMAL: no fsync per commit. Locking (what this test is about) is the same as with FULL.
store = Store(Database(url, synchronous="NORMAL"))
assoc = store.begin_association(tag, "MOLRE", "127.0.0.1", 1)
for i in range(n):
    # one series shared by every process (upsert race) and one of its own
    for series in ("7.shared", "7." + tag):
        store.record_instance(assoc, InstanceHeader(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=f"{series}.{tag}.{i}",
            study_uid="7", series_uid=series, modality="CT", instance_number=i),
            spool_path=None, size=1, sha256=None, status="stored")
    store.log_event("node", tag, "tick", {"i": i})
store.end_association(assoc, "released")
print("ok")
"""


def _spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_three_processes_write_without_loss(db_url: str) -> None:
    db = _db(db_url)
    n = 70  # 3 write transactions per iteration: 210 per process, 630 in all
    procs = [_spawn(WRITER, db.url, tag, str(n)) for tag in ("p1", "p2", "p3")]
    outs = [p.communicate(timeout=500) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "locked" not in err
        assert out.strip() == "ok"
    store = Store(db)
    assert store.get_series("7.shared").instance_count == 3 * n
    for tag in ("p1", "p2", "p3"):
        assert store.get_series("7." + tag).instance_count == n
    with db.session(write=False) as s:
        assert s.execute(select(func.count()).select_from(Instance)).scalar_one() == 6 * n
        assert (
            s.execute(
                select(func.count()).select_from(Event).where(Event.kind == "tick")
            ).scalar_one()
            == 3 * n
        )
    assert store.stats()["associations"] == {"released": 3}


CLAIMER = r"""
import json, sys
from storage import Database, Store
store = Store(Database(sys.argv[1]))
got = []
while (claim := store.claim_job(sys.argv[2], lease_s=600)) is not None:
    got.append(claim.id)
print(json.dumps(got))
"""


def test_concurrent_claimers_never_share_a_job(db_url: str) -> None:
    db = _db(db_url)
    store = Store(db)
    _queue(store, [f"5.{i}" for i in range(40)])
    procs = [_spawn(CLAIMER, db.url, f"w{i}") for i in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    # plus threads in this process racing on a second batch
    _queue(store, [f"6.{i}" for i in range(30)])
    thread_got: list[list[int]] = [[], [], []]

    def claim_all(k: int) -> None:
        while (c := store.claim_job(f"t{k}")) is not None:
            thread_got[k].append(c.id)

    ts = [threading.Thread(target=claim_all, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for batch, expected in ((results, 40), (thread_got, 30)):
        flat = [j for got in batch for j in got]
        assert len(flat) == len(set(flat)) == expected
    with db.session(write=False) as s:
        assert (
            s.execute(
                select(func.count())
                .select_from(Job)
                .where(Job.state == "running", Job.attempts == 1)
            ).scalar_one()
            == 70
        )


def test_reader_not_blocked_by_open_writer(tmp_path: Path) -> None:
    """Read sessions use a deferred BEGIN: the audit CLI never waits for the receiver (SQLite:
    PostgreSQL readers never wait for writers anyway)."""
    db = _db(f"sqlite:///{tmp_path / 'audit.db'}")
    store = Store(db)
    _queue(store, ["8.1"])
    other = Database(db.url, busy_timeout_s=0.2)
    with db.session() as s:  # holds the write lock (BEGIN IMMEDIATE)
        s.execute(select(Job)).all()
        assert Store(other).get_series("8.1").state is SeriesState.QUEUED
        import pytest
        from sqlalchemy.exc import OperationalError

        with pytest.raises(OperationalError, match="locked"):
            Store(other).log_event("node", "n", "x")  # a second writer waits, then gives up
    other.dispose()


def test_wal_switch_waits_for_a_lock_held_elsewhere(tmp_path: Path) -> None:
    """SQLite can refuse ``PRAGMA journal_mode = WAL`` with "database is locked" without running
    its busy handler; several processes opening a new database at once then failed at random
    (CI: one of three ``upgrade`` processes). The switch retries until the other holder is done,
    and still fails, clearly, once the busy timeout has passed."""
    import sqlite3
    import time

    from storage.db import _enable_wal

    path = tmp_path / "w.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    # timeout=0: no busy handler at all, the worst case the retry has to cover
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _enable_wal(other.cursor(), 0.05)

    releaser = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    releaser.start()
    t0 = time.monotonic()
    _enable_wal(other.cursor(), 10.0)
    waited = time.monotonic() - t0
    releaser.join()
    assert waited >= 0.2
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    holder.close()
    other.close()
