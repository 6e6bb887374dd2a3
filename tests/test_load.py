"""Bounded load: 8 concurrent associations x 200 slices; everything arrives, 8 reports go out.

Eight dcmtk `storescu` processes (a real multi-sender situation: a PACS forwarding several
studies at once) each send one 200-slice series on its own association. Small matrices keep it
fast; the point is concurrency in the receiver, the SQLite writers and the queue, not bytes.
The node's peak memory (its process plus its inference child, sampled with psutil) is printed and
kept under a generous bound, so a leak or an unbounded buffer shows up here.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.nodeproc import NodeProcess, StorageSCP, make_ct_series, wait_until
from tests.orthanc import dcmtk_tool, have_dcmtk, model_section, sql, sr_source_series

SENDERS = 8
SLICES = 200
MEMORY_BOUND = 3 * 1024**3  # node + inference child, resident

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed (storescu)")


class PeakRSS:
    """Samples the resident memory of a process tree in a background thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.peak_main = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                proc = psutil.Process(self.pid)
                main = proc.memory_info().rss
                total = main
                for child in proc.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak_main = max(self.peak_main, main)
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.parametrize("processes", [1, 2])
def test_eight_concurrent_senders(tmp_path: Path, processes: int) -> None:
    """``processes``: ``network.receiver_processes`` (1 = every association in the node
    process; 2 = an acceptor handing connections to two receiver processes)."""
    series = [
        make_ct_series(
            tmp_path / f"ct{i}", n_slices=SLICES, size=32, seed=100 + i, slice_thickness=1.0
        )
        for i in range(SENDERS)
    ]
    with StorageSCP("LOADPACS") as scp:
        node = NodeProcess.create(
            tmp_path,
            destinations=[scp.destination()],
            network={
                "max_associations": SENDERS + 2,
                "max_associations_per_host": SENDERS + 2,
                "receiver_processes": processes,
            },
            model=model_section(),
        )
        with node:
            assert node.proc is not None
            with PeakRSS(node.proc.pid) as mem:
                env = dict(os.environ, TCP_NODELAY="1")
                t0 = time.monotonic()
                procs = [
                    subprocess.Popen(
                        [
                            dcmtk_tool("storescu"),
                            "-aet",
                            f"LOAD{i}",
                            "-aec",
                            node.ae_title,
                            "127.0.0.1",
                            str(node.port),
                            *map(str, s.paths),
                        ],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        text=True,
                        env=env,
                    )
                    for i, s in enumerate(series)
                ]
                outs = [p.communicate(timeout=300)[0] for p in procs]
                send_s = time.monotonic() - t0
                for i, p in enumerate(procs):
                    assert p.returncode == 0, f"sender {i}: {outs[i][-500:]}"

                db = node.data_dir / "molre.db"
                for s in series:
                    n = sql(
                        db,
                        "select count(distinct sop_instance_uid) from instances "
                        "where series_uid = ? and status = 'stored'",
                        s.series_uid,
                    )
                    assert n == [(SLICES,)], f"series {s.series_uid}: {n} stored"
                # every association ran concurrently and was recorded with its counts
                assocs = sql(
                    db,
                    "select calling_ae, outcome, n_stored from associations "
                    "where calling_ae like 'LOAD%'",
                )
                assert sorted(a for a, _, _ in assocs) == [f"LOAD{i}" for i in range(SENDERS)]
                assert all(o == "released" and n == SLICES for _, o, n in assocs), assocs

                def all_reported() -> bool:
                    got = set()
                    for ds in list(scp.received):
                        if ds.Modality == "SR":
                            got |= sr_source_series(ds)
                    return all(s.series_uid in got for s in series)

                try:
                    wait_until(all_reported, timeout=420, interval=1.0, what=f"{SENDERS} reports")
                except TimeoutError as exc:
                    raise AssertionError(f"{exc}\n{node.log_tail(30)}") from None
            srs = [ds for ds in scp.received if ds.Modality == "SR"]
            assert len(srs) == SENDERS, f"{len(srs)} SRs for {SENDERS} series"
        # after the stop: with several receiver processes, each one served connections
        served = [r for r in node.log_records() if r.get("event") == "receiver process stopped"]
        if processes == 1:
            assert served == []
        else:
            assert len({r["pid"] for r in served}) == processes, served
            assert all(r["connections"] >= 1 for r in served), served
            assert sum(r["connections"] for r in served) >= SENDERS, served
            print(
                f"\nload: {SENDERS}x{SLICES} instances sent in {send_s:.1f} s "
                f"({SENDERS * SLICES / send_s:.0f} inst/s); peak RSS node "
                f"{mem.peak_main / 2**20:.0f} MiB, node + inference "
                f"{mem.peak / 2**20:.0f} MiB"
            )
            assert mem.peak > 0
            assert mem.peak < MEMORY_BOUND, f"peak RSS {mem.peak / 2**20:.0f} MiB"
