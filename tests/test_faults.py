"""Fault injection against the real node: kill -9, destination down, inference crash, full disk.

The node's promises are only worth something if they hold when things break:
- Success means durable: after `kill -9` at a random point of a transfer, every instance the
  sender got Success for is in the spool and the database; after the sender resends the rest,
  the series is reported exactly once.
- A result is never lost: a destination that is down gets the report when it comes back, and
  every failed attempt is in the audit trail.
- An inference process that dies mid-job does not take the service down; the job is retried.
- A full disk answers Out of Resources (0xA7xx) instead of crashing or lying, and the node
  resumes by itself when space returns.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pydicom
import pytest

from tests.nodeproc import (
    NodeProcess,
    StorageSCP,
    echo,
    make_ct_series,
    node_config,
    send_folder,
    wait_until,
    write_config,
)
from tests.orthanc import model_section, sql, sr_source_series

SUCCESS = 0x0000


def _srs_for(scp: StorageSCP, series_uid: str) -> list[pydicom.Dataset]:
    return [
        ds
        for ds in list(scp.received)
        if ds.Modality == "SR" and series_uid in sr_source_series(ds)
    ]


def _wait_sr(
    node: NodeProcess, scp: StorageSCP, series_uid: str, timeout: float = 240
) -> pydicom.Dataset:
    try:
        return wait_until(
            lambda: (_srs_for(scp, series_uid) or [None])[0],
            timeout=timeout,
            interval=0.5,
            what=f"SR for series {series_uid}",
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{node.log_tail(40)}") from None


def _stored(db: Path, series_uid: str) -> dict[str, str]:
    """SOP Instance UID -> spool path of the series' stored instances."""
    return dict(
        sql(
            db,
            "select sop_instance_uid, spool_path from instances "
            "where series_uid = ? and status = 'stored'",
            series_uid,
        )
    )


# ---------------------------------------------------------------------------------------------
# kill -9 while a 200-slice series streams in
# ---------------------------------------------------------------------------------------------


def test_kill9_during_transfer_loses_nothing_and_reports_once(tmp_path: Path) -> None:
    rng = random.Random(20261128)
    info = make_ct_series(tmp_path / "ct", n_slices=200, size=32, seed=5, slice_thickness=1.0)
    originals = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in info.paths}
    with StorageSCP("KILLPACS") as scp:
        # long quiet time: the series may only complete when the final resend is released
        node = NodeProcess.create(
            tmp_path, destinations=[scp.destination()], quiet_time_s=600.0, model=model_section()
        )
        db = node.data_dir / "molre.db"
        acked: set[str] = set()
        node.start()
        try:
            for round_no in range(3):
                pending = [p for uid, p in originals.items() if uid not in acked]
                already = len(_stored(db, info.series_uid))
                kill_at = min(already + rng.randint(10, 45), len(originals) - 5)
                result: dict = {}

                def sender(paths=pending, out=result) -> None:
                    try:
                        out["res"] = send_folder(
                            paths,
                            node.port,
                            called_ae=node.ae_title,
                            calling_ae="KILLSCU",
                            timeout=30,
                        )
                    except Exception as exc:  # noqa: BLE001 - association cut by the kill
                        out["error"] = exc

                t = threading.Thread(target=sender, daemon=True)
                t.start()
                wait_until(
                    lambda k=kill_at: len(_stored(db, info.series_uid)) >= k or not t.is_alive(),
                    timeout=120,
                    interval=0.02,
                    what=f"{kill_at} instances stored",
                )
                node.kill()  # SIGKILL to the node's process group
                t.join(90)
                assert not t.is_alive(), "sender hung after the node was killed"
                res = result.get("res")
                if res is not None:
                    for path, status in zip(pending, res.statuses):
                        if status == SUCCESS:
                            acked.add(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                node.start()
                stored = _stored(db, info.series_uid)
                missing = sorted(acked - set(stored))
                assert not missing, (
                    f"round {round_no}: {len(missing)} instances were "
                    f"acknowledged with Success but are not in the database"
                )
                for uid in acked:  # durable means readable and identical, not just a row
                    spooled = pydicom.dcmread(stored[uid])
                    orig = pydicom.dcmread(originals[uid])
                    assert spooled.SOPInstanceUID == uid
                    assert spooled.PixelData == orig.PixelData
                print(
                    f"round {round_no}: killed at >= {kill_at} stored; acked {len(acked)}, "
                    f"stored {len(stored)}"
                )
                assert len(acked) < len(originals), "the kill came too late to test anything"

            # the sender resends what it never got Success for; now nothing is killed
            rest = [p for uid, p in originals.items() if uid not in acked]
            res = send_folder(
                rest, node.port, called_ae=node.ae_title, calling_ae="KILLSCU", timeout=60
            )
            assert all(s == SUCCESS for s in res.statuses), res.statuses
            assert set(_stored(db, info.series_uid)) == set(originals)
            rows = sql(db, "select state from series where series_uid = ?", info.series_uid)
            assert rows == [("receiving",)], rows

            # The killed associations never said "done" (no A-RELEASE), so only the quiet time
            # completes this series: restart with a short one (an operator's config change).
            node.stop()
            write_config(
                node.config_path,
                node_config(
                    node.data_dir,
                    node.port,
                    destinations=[scp.destination()],
                    quiet_time_s=2.0,
                    model=model_section(),
                ),
            )
            node.start()
            _wait_sr(node, scp, info.series_uid)
            node.wait_series_state(info.series_uid, ["delivered"], timeout=60)
            time.sleep(2.0)  # a second (duplicate) report would arrive in this window
            srs = _srs_for(scp, info.series_uid)
            assert len(srs) == 1, f"{len(srs)} SRs for one series version"
            rows = sql(
                db, "select version, state from series where series_uid = ?", info.series_uid
            )
            assert rows == [(1, "delivered")]
            exports = sql(db, "select state from exports where series_uid = ?", info.series_uid)
            assert exports == [("delivered",)]
        finally:
            node.stop()


# ---------------------------------------------------------------------------------------------
# one node for the faults that need no restart
# ---------------------------------------------------------------------------------------------

FILL_MARGIN = 1 << 30  # the watermark sits 1 GiB below the free space at start


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("faults")
    scp = StorageSCP("FAULTPACS").start()
    st = os.statvfs(tmp)
    watermark = max(0, st.f_bavail * st.f_frsize - FILL_MARGIN)
    node = NodeProcess.create(
        tmp,
        destinations=[scp.destination()],
        model=model_section(),
        storage={"min_free_disk": str(watermark)},
    )
    node.start()
    try:
        yield node, scp, tmp, watermark
    finally:
        node.stop()
        scp.stop()


def test_destination_down_then_back(shared, tmp_path: Path) -> None:
    node, scp, _, _ = shared
    scp.stop()  # the PACS is down
    try:
        info = make_ct_series(tmp_path / "ct", ["acute_infarct"], n_slices=16, size=48, seed=21)
        assert node.send(info.paths).ok
        db = node.data_dir / "molre.db"
        wait_until(
            lambda: sql(
                db,
                "select attempts from exports where series_uid = ? and attempts >= 2",
                info.series_uid,
            ),
            timeout=240,
            interval=0.5,
            what="two failed export attempts",
        )
        rows = sql(
            db, "select state, last_error from exports where series_uid = ?", info.series_uid
        )
        assert rows[0][0] == "pending" and rows[0][1], rows
        assert not _srs_for(scp, info.series_uid)
    finally:
        scp.start()  # the PACS is back
    _wait_sr(node, scp, info.series_uid, timeout=60)
    node.wait_series_state(info.series_uid, ["delivered"], timeout=30)
    ((state, attempts),) = sql(
        db, "select state, attempts from exports where series_uid = ?", info.series_uid
    )
    assert state == "delivered" and attempts >= 3  # >= 2 failures + the delivery
    assert len(_srs_for(scp, info.series_uid)) == 1


def _inference_pid(node: NodeProcess) -> int | None:
    pids = [r.get("pid") for r in node.log_records() if r.get("event") == "inference process ready"]
    return pids[-1] if pids else None


def _inference_started(node: NodeProcess, series_uid: str) -> bool:
    return any(
        r.get("event") == "inference started" and r.get("series_uid", series_uid) == series_uid
        for r in node.log_records()
    )


def test_inference_process_crash_is_retried(shared, tmp_path: Path) -> None:
    node, scp, _, _ = shared
    info = make_ct_series(tmp_path / "ct", ["hydrocephalus"], n_slices=24, size=64, seed=22)
    db = node.data_dir / "molre.db"
    assert node.send(info.paths).ok

    def running() -> bool:
        return bool(
            sql(
                db, "select 1 from jobs where series_uid = ? and state = 'running'", info.series_uid
            )
        )

    wait_until(running, timeout=180, interval=0.05, what="inference job running")
    pid = wait_until(lambda: _inference_pid(node), timeout=30, what="inference process pid")
    wait_until(
        lambda: _inference_started(node, info.series_uid),
        timeout=60,
        interval=0.05,
        what="inference started",
    )
    os.kill(pid, 9)  # the inference child dies in the middle of the job
    # the service itself keeps answering
    assert echo(node.port, node.ae_title, timeout=10) == 0
    _wait_sr(node, scp, info.series_uid)
    assert node.alive
    jobs = sql(db, "select attempts, state from jobs where series_uid = ?", info.series_uid)
    assert max(a for a, _ in jobs) >= 2, jobs  # retried after the crash
    assert _inference_pid(node) != pid, "a new inference process took over"
    assert len(_srs_for(scp, info.series_uid)) == 1


def test_disk_below_watermark_is_out_of_resources(shared, tmp_path: Path) -> None:
    node, _scp, tmp, watermark = shared
    info = make_ct_series(tmp_path / "ct", n_slices=4, size=32, seed=23)
    filler = tmp / "filler.bin"
    st = os.statvfs(tmp)
    free = st.f_bavail * st.f_frsize
    try:
        with open(filler, "wb") as fh:
            try:  # push free space 1 GiB below the watermark, without writing the bytes
                os.posix_fallocate(fh.fileno(), 0, max(1, free - watermark) + FILL_MARGIN)
            except OSError as exc:
                pytest.skip(f"cannot preallocate on this file system: {exc}")
        res = node.send(info.paths[:2], calling_ae="DISKFULL")
        assert all(s is not None and 0xA700 <= s <= 0xA7FF for s in res.statuses), [
            hex(s) if s is not None else None for s in res.statuses
        ]
        rows = sql(
            node.data_dir / "molre.db",
            "select i.status, i.reason from instances i join associations a on "
            "a.id = i.association_id where a.calling_ae = 'DISKFULL'",
        )
        assert len(rows) == 2 and all(s == "rejected" and "min_free_disk" in r for s, r in rows), (
            rows
        )
        assert node.alive and echo(node.port, node.ae_title, timeout=10) == 0
    finally:
        filler.unlink(missing_ok=True)
    # space is back: the same node accepts again, no restart
    res = node.send(info.paths, calling_ae="DISKBACK")
    assert res.ok, [hex(s) if s is not None else None for s in res.statuses]
