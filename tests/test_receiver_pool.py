"""Several receiver processes (node/receiver_pool.py): the limits and locks that must hold
across processes. The 8-sender load with two receiver processes is in tests/test_load.py."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.receiver_pool import ProcessUIDLocks
from tests.nodeproc import NodeProcess, make_ct_series, receiver_parts, send_folder, wait_until
from tests.orthanc import sql
from tests.test_ingest_path import Gate


def _try_lock(path: str, offset: int, out: "mp.Queue") -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        out.put("locked")
    except OSError:
        out.put("busy")
    finally:
        os.close(fd)


def _other_process_sees(path: Path, key: str) -> str:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_try_lock, args=(str(path), ProcessUIDLocks.offset(key), out))
    p.start()
    p.join(10)
    return out.get(timeout=5)


def test_uid_locks_exclude_other_processes_while_held(tmp_path: Path) -> None:
    locks = ProcessUIDLocks(tmp_path / "receiver.locks")
    with locks.hold("study:1", "series:2", "sop:3"):
        assert _other_process_sees(locks.path, "series:2") == "busy"
        assert _other_process_sees(locks.path, "sop:3") == "busy"
        with locks.hold("sop:4"):  # another thread's key in the same process: no wait
            assert _other_process_sees(locks.path, "sop:4") == "busy"
        assert _other_process_sees(locks.path, "sop:4") == "locked"
        assert _other_process_sees(locks.path, "sop:3") == "busy"
    assert _other_process_sees(locks.path, "sop:3") == "locked"
    assert len(locks) == 0
    locks.close()


def test_pinned_keys_stay_locked_for_other_processes_until_unpinned(tmp_path: Path) -> None:
    locks = ProcessUIDLocks(tmp_path / "receiver.locks")
    keys = ("study:1", "series:2", "sop:3")
    with locks.hold(*keys):
        locks.pin(*keys)
    assert len(locks) == 0  # threads of this process no longer wait
    assert _other_process_sees(locks.path, "series:2") == "busy"
    with locks.hold(*keys):  # this process takes them again without waiting
        pass
    assert _other_process_sees(locks.path, "sop:3") == "busy"
    locks.unpin(*keys)
    assert _other_process_sees(locks.path, "series:2") == "locked"
    assert locks.pinned() == 0
    locks.close()


def test_receiver_process_write_behind_keeps_uids_locked_until_the_commit(tmp_path: Path) -> None:
    """A receiver process answers Success before its 'stored' rows are committed (the
    write-behind); another process, which decides duplicates and identity conflicts from the
    database, must wait for those UIDs until the rows are there."""
    with receiver_parts(tmp_path, start=False) as (receiver, store, _cfg):
        receiver.uid_locks = locks = ProcessUIDLocks(tmp_path / "receiver.locks")
        gate = Gate(store)
        receiver.start()
        info = make_ct_series(tmp_path / "ct", [], n_slices=2, seed=41)
        done: dict = {}
        t = threading.Thread(target=lambda: done.update(r=send_folder(info.paths, receiver.port)))
        t.start()
        deadline = time.monotonic() + 20
        while receiver.recorder.queued() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert receiver.recorder.queued() == 2  # both answered, neither committed
        assert _other_process_sees(locks.path, "series:" + info.series_uid) == "busy"
        assert _other_process_sees(locks.path, "study:" + info.study_uid) == "busy"
        gate.open.set()
        t.join(20)
        assert done["r"].statuses == [0, 0]
        assert receiver.recorder.queued() == 0
        assert _other_process_sees(locks.path, "series:" + info.series_uid) == "locked"
        assert locks.pinned() == 0


def test_pool_completion_barrier_waits_for_every_receiver_process(tmp_path: Path) -> None:
    """The node process's store asks every receiver process to commit its queued rows before
    it decides which series are complete; a process that cannot answer (stopped here with
    SIGSTOP) defers completion instead of letting a series complete without its rows."""
    import signal

    pool, store, db = _pool(tmp_path)
    pool.start()
    try:
        assert pool.flush(timeout=10) is True
        assert store.series_due_for_completion(0.0, 0.0) == []  # nothing there, but no wait
        stopped = pool._children[0].proc
        assert stopped is not None and stopped.pid is not None
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert pool.flush(timeout=0.5) is False
            assert time.monotonic() - t0 >= 0.45
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        assert pool.flush(timeout=10) is True
    finally:
        pool.stop(timeout=5)
        db.dispose()
    assert store._completion_barrier is None


def _pool(tmp_path: Path):
    from node.config import config_from_dict
    from node.receiver_pool import ReceiverPool
    from storage import Database, Spool, Store

    cfg = config_from_dict(
        {
            "network": {"port": 0, "receiver_processes": 2},
            "storage": {"data_dir": str(tmp_path / "data"), "min_free_disk": "0"},
        }
    )
    db = Database(cfg.database_url)
    db.upgrade()
    store = Store(db)
    return ReceiverPool(cfg, store, Spool(cfg.spool_dir)), store, db


def test_rows_a_dead_receiver_process_had_queued_are_reindexed(tmp_path: Path) -> None:
    """A receiver process answers Success once the file is durable; its row may still be in
    the write-behind when the process is killed. The node replaces the process and, once the
    live ones have committed, indexes the spool files written before the death that have no
    row -- without waiting for the next start. Files written after the death are left to the
    live processes."""
    import pydicom

    from node.header import read_header
    from node.receiver import RECONCILE_REASON, instance_relpath

    pool, store, db = _pool(tmp_path)
    pool.REINDEX_SETTLE_S = 0.2
    info = make_ct_series(tmp_path / "ct", [], n_slices=3, seed=43)
    pool.start()
    try:
        # what the dying process had acknowledged: two files, their rows never committed
        for src in info.paths[:2]:
            ds = pydicom.dcmread(src, stop_before_pixels=True)
            header = read_header(ds, str(ds.file_meta.TransferSyntaxUID), with_phi=True)
            dest = pool.spool.root / instance_relpath(header)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(Path(src).read_bytes())
        victim = pool._children[0].proc
        assert victim is not None and victim.pid is not None
        time.sleep(0.05)
        os.kill(victim.pid, 9)
        wait_until(
            lambda: len(store.events(entity="node", kind="reindexed")) == 1,
            30,
            what="the spool re-indexed after the death",
        )
        rows = store.series(limit=None)
        assert [r["series_uid"] for r in rows] == [info.series_uid]
        got = store.events(entity="node", kind="reindexed")[0]["details"]
        assert got["reindexed"] == 2
        assert len(store.events(entity="node", kind="process_died")) == 1
        wait_until(
            lambda: pool._children[0].alive and pool._children[0].ready.is_set(),
            60,
            what="the replacement process",
        )
        assert pool.flush(timeout=10) is True
    finally:
        pool.stop(timeout=5)
        db.dispose()
    import sqlite3

    con = sqlite3.connect(str(tmp_path / "data" / "molre.db"))
    try:
        reasons = [r[0] for r in con.execute("SELECT reason FROM instances")]
    finally:
        con.close()
    assert reasons == [RECONCILE_REASON, RECONCILE_REASON]


def test_max_associations_counts_across_receiver_processes(tmp_path: Path) -> None:
    """max_associations = 2 with two receiver processes: two associations are held open
    (one per process), a third (from another address) is rejected as one process would (rejected-transient,
    local limit exceeded) and audited; after a release a new one is accepted again."""
    node = NodeProcess.create(
        tmp_path,
        network={"receiver_processes": 2, "max_associations": 2, "max_associations_per_host": 2},
    )
    with node:
        ae = AE(ae_title="POOLSCU")
        ae.add_requested_context(Verification)
        held: list = []

        def one_more(address: str) -> bool:
            # the readiness probe's connection may still be counted for a moment: retry
            a = ae.associate(
                "127.0.0.1", node.port, ae_title=node.ae_title, bind_address=(address, 0)
            )
            if a.is_established:
                held.append(a)
            return a.is_established

        for address in ("127.0.0.3", "127.0.0.4"):
            wait_until(lambda: one_more(address), 15, what="an association")
        # from another address: within its per-host limit, past max_associations
        extra = ae.associate(
            "127.0.0.1", node.port, ae_title=node.ae_title, bind_address=("127.0.0.5", 0)
        )
        assert extra.is_rejected
        prim = extra.acceptor.primitive
        assert (prim.result, prim.result_source, prim.diagnostic) == (0x02, 0x03, 0x02)
        held[0].release()
        db = node.data_dir / "molre.db"

        def audited() -> bool:
            return bool(
                sql(
                    db,
                    "select reject_reason from associations where outcome = "
                    "'rejected' and reject_reason like "
                    "'%max_associations (2) reached%'",
                )
            )

        wait_until(audited, 10, what="audit row of the rejected association")

        def accepted_again() -> bool:
            a = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
            ok = a.is_established
            if ok:
                a.release()
            return ok

        wait_until(accepted_again, 10, what="a slot after the release")
        held[1].release()
        ae.shutdown()
    served = [r for r in node.log_records() if r.get("event") == "receiver process stopped"]
    assert len({r["pid"] for r in served}) == 2, served
    assert all(r["connections"] >= 1 for r in served), served
