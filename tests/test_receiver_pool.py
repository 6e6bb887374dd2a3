"""Several receiver processes (node/receiver_pool.py): the limits and locks that must hold
across processes. The 8-sender load with two receiver processes is in tests/test_load.py."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.receiver_pool import ProcessUIDLocks
from tests.nodeproc import NodeProcess, wait_until
from tests.orthanc import sql


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
