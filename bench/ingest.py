"""Ingest benchmark: the node's durable receiver vs a bare pynetdicom handler vs dcmtk storescp.

Why: the node only answers Success after the instance is fsynced into the spool (its audit row
follows through a group-commit writer thread). That costs something; this benchmark measures how
much, against baselines run in the same invocation on the same machine:

- `bare`: a pynetdicom SCP with the node's own AE settings and presentation contexts
  (`node.dicomnet.make_ae` / `scp_contexts`) whose handler writes the received bytes to a file
  and does nothing else (no fsync, no database); the file meta is built with
  `node.dicomnet.file_header` as in the node (pynetdicom's `event.encoded_dataset()` would cost
  the bare handler ~0.5 ms more per instance and flatter the node);
- `storescp`: dcmtk's storescp in bit-preserving mode (`+B`), one file per instance;
- `bare_fsync`: the bare handler writing through `storage.Spool.write_atomic` (fsync, rename,
  directory fsync): the cost of file durability alone;
- `node`: `molre-node serve` (via `tests.nodeproc.NodeProcess`), configured so that no series
  completes during the measurement (long quiet time), i.e. pure ingest, with the default
  `storage.durability = "fsync"`; `node_os`: the same with `storage.durability = "os"`.

Every receiver gets the same series (default 200 slices of 512x512, 16-bit) sent by dcmtk
`storescu` over one association; each receiver is run `--repeats` times, interleaved, and the
median wall time of the storescu run counts. Reported: instances/s, MB/s, CPU seconds used by the
receiver process (and its children), peak RSS of the receiver's process tree, and ratios
(issue 16 goals: the default node, `node_1p`, >= 0.85 x bare_fsync for one association; with
`--concurrent 8`, node (several receiver processes) >= 1.6 x node_1p and >= 1.0 x bare).
With `--concurrent`, each run also records when the first sender finished
(`first_sender_done_s`): the span from there to the end is the tail in which fewer associations
than at the start share the receiver (a receiver process whose connections have all finished
idles meanwhile).

    python bench/ingest.py                       # full run -> bench/results/ingest.json
    python bench/ingest.py --slices 20 --size 64 --repeats 1 --out /tmp/ingest.json  # smoke
    # before/after a change, in one run: the node of another checkout as receiver node_base
    git archive HEAD~1 | (mkdir -p /tmp/base && tar -x -C /tmp/base)
    python bench/ingest.py --receivers bare,node_base,node --node-base /tmp/base

Not part of the CI test run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from tests.nodeproc import NodeProcess, free_port, wait_until  # noqa: E402
from tests.orthanc import dcmtk_tool  # noqa: E402

#: issue 16, one association: the default node (fsync; ``network.receiver_processes = 1``, the
#: receiver ``node_1p``) >= 0.85 x the bare handler with fsync. ``node_vs_bare_fsync`` (the
#: opt-in pool of receiver processes on one association) is reported beside it.
SINGLE_GOALS = {"node_1p_vs_bare_fsync": 0.85}
#: issue 16, 8 associations at once: several receiver processes >= 1.6 x the node in one
#: process and >= 1.0 x one bare pynetdicom process
CONCURRENT_GOALS = {"node_vs_node_1p": 1.6, "node_vs_bare": 1.0}
LOAD_AT_START = list(os.getloadavg())

#: dcmtk as packaged by Debian leaves Nagle's algorithm on unless TCP_NODELAY=1 is set in the
#: environment; with it off every small PDU waits for a delayed ACK (~40 ms per instance on
#: loopback), which would measure the kernel's timers instead of the receivers.
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def make_series(out: Path, slices: int, size: int, seed: int = 0) -> list[Path]:
    """The benchmark series (written once, reused): a crude head, `slices` x `size`^2, 16-bit."""
    from molre.data import dicomio

    done = out / ".complete"
    if done.exists():
        return sorted(out.glob("*.dcm"))
    if out.exists():
        shutil.rmtree(out)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    r2d = np.sqrt(((xx - c) / (0.42 * size)) ** 2 + ((yy - c) / (0.48 * size)) ** 2)
    vol = np.empty((slices, size, size), np.float32)
    for k in range(slices):
        zf = abs((k - (slices - 1) / 2) / (0.55 * slices + 1))
        r = np.sqrt(r2d**2 + zf**2)
        sl = np.full((size, size), -1000.0, np.float32)
        sl[r < 1.0] = 1200.0
        sl[r < 0.9] = 35.0
        vol[k] = sl + rng.normal(0, 6, (size, size)).astype(np.float32)
    px = 220.0 / size
    paths = dicomio.write_ct_series(out, vol, spacing=(1.0, px, px), origin=(-110.0, -110.0, 0.0))
    done.write_text("ok")
    return paths


# --------------------------------------------------------------------------------------------
# receivers
# --------------------------------------------------------------------------------------------

#: (receiver, baseline) pairs reported as instances/s ratios ("node_vs_bare" is the goal's).
RATIOS = (
    ("node", "bare"),
    ("node", "storescp"),
    ("node_os", "bare"),
    ("node", "bare_fsync"),
    ("node_1p", "bare_fsync"),
    ("node", "node_1p"),
    ("node_1p", "bare"),
    ("bare_fsync", "bare"),
    ("storescp", "bare"),
    ("node", "node_base"),
    ("node_base", "bare"),
)


def serve_bare(port: int, out_dir: Path, durable: bool = False) -> None:
    """Run the bare pynetdicom receiver in this process until SIGTERM (used as a subprocess).

    `durable`: write through `storage.Spool.write_atomic` (temp file, fsync, rename, fsync of
    the directory) — exactly the node's file durability, without parsing or database.
    """
    from pynetdicom import evt

    from node.dicomnet import file_header, make_ae, scp_contexts

    out_dir.mkdir(parents=True, exist_ok=True)
    spool = None
    if durable:
        from storage import Spool

        spool = Spool(out_dir)

    def on_store(event: Any) -> int:
        req = event.request
        uid = str(req.AffectedSOPInstanceUID)
        # preamble + file meta + dataset as received; the meta is built the node's (cheaper)
        # way so the node gets no edge from it: `event.encoded_dataset()` costs ~0.5 ms more
        data = (
            file_header(str(req.AffectedSOPClassUID), uid, str(event.context.transfer_syntax)),
            event.encoded_dataset(include_meta=False),
        )
        if spool is not None:
            spool.write_atomic(f"{uid}.dcm", data)
        else:
            with open(out_dir / f"{uid}.dcm", "wb") as fh:
                for chunk in data:
                    fh.write(chunk)
        return 0x0000

    ae = make_ae("BARE")
    ae.supported_contexts = scp_contexts()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_C_ECHO, lambda e: 0x0000)],
    )
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *a: stop.update(flag=True))
    while not stop["flag"]:
        time.sleep(0.1)
    server.shutdown()


def _echo_ok(port: int, aet: str) -> bool:
    res = subprocess.run(
        [dcmtk_tool("echoscu"), "-aec", aet, "127.0.0.1", str(port)],
        capture_output=True,
        env=DCMTK_ENV,
    )
    return res.returncode == 0


class Receiver:
    """Start / stop one receiver; `count()` = instances it holds."""

    name = ""
    aet = ""

    def start(self, work: Path) -> None: ...
    def stop(self) -> None: ...
    def count(self) -> int: ...
    def pid(self) -> int: ...


class BareReceiver(Receiver):
    name, aet = "bare", "BARE"
    durable = False

    def start(self, work: Path) -> None:
        self.dir = work / self.name
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve-bare",
                str(self.port),
                str(self.dir),
                *(["--durable"] if self.durable else []),
            ],
            env=env,
        )
        wait_until(lambda: _echo_ok(self.port, self.aet), 30, what="bare receiver")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)

    def count(self) -> int:
        return len(list(self.dir.glob("*.dcm")))

    def pid(self) -> int:
        return self.proc.pid


class BareFsyncReceiver(BareReceiver):
    name = "bare_fsync"
    durable = True


class StorescpReceiver(Receiver):
    name, aet = "storescp", "STORESCP"

    def start(self, work: Path) -> None:
        self.dir = work / "storescp"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                dcmtk_tool("storescp"),
                "-aet",
                self.aet,
                "+xa",
                "+B",
                "-od",
                str(self.dir),
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=DCMTK_ENV,
        )
        wait_until(lambda: _echo_ok(self.port, self.aet), 30, what="storescp")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def count(self) -> int:
        return sum(1 for p in self.dir.iterdir() if p.is_file())

    def pid(self) -> int:
        return self.proc.pid


class NodeReceiver(Receiver):
    name, aet = "node", "MOLRE"
    checkpoint = ""  # set from --node-checkpoint; empty = packaged demo
    durability = "fsync"  # storage.durability
    processes = 0  # network.receiver_processes = 0: one per core, at most 4 (the pool)

    node_process = NodeProcess

    def start(self, work: Path) -> None:
        # Long quiet time + grace: nothing completes, no inference competes with the receiver.
        model = {"checkpoint": self.checkpoint} if self.checkpoint else {}
        self.node = self.node_process.create(
            work / self.name,
            ae_title=self.aet,
            quiet_time_s=3600.0,
            release_grace_s=3600.0,
            model=model,
            storage={"durability": self.durability},
            network={
                "receiver_processes": self.processes,
                "max_associations": 32,
                "max_associations_per_host": 32,
            },
            logging={"json": True, "level": "INFO"},
        )
        self.node.start(timeout=120)
        self.port = self.node.port
        # Steady state: the inference process (torch import, checkpoint load) must be up before
        # the clock starts, or its start-up CPU would be billed to the receiver.
        wait_until(
            lambda: any(
                r.get("event") in ("inference process ready", "inference engine not available")
                for r in self.node.log_records()
            ),
            300,
            what="inference process start",
        )
        if any(r.get("event") == "inference engine not available" for r in self.node.log_records()):
            raise RuntimeError(
                "node: inference engine not available (checkpoint?); pass --node-checkpoint DIR"
            )

    def stop(self) -> None:
        self.node.stop(timeout=60)

    def count(self) -> int:
        import sqlite3

        db = self.node.data_dir / "molre.db"
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return int(
                con.execute("select count(*) from instances where status='stored'").fetchone()[0]
            )
        finally:
            con.close()

    def pid(self) -> int:
        assert self.node.proc is not None
        return self.node.proc.pid


class NodeOsReceiver(NodeReceiver):
    """The node with `storage.durability = "os"`: no fsync before Success (kill -9 safe only)."""

    name = "node_os"
    durability = "os"


class NodeOneProcessReceiver(NodeReceiver):
    """The node with `network.receiver_processes = 1`: every association in the node process
    (the behaviour before receiver processes existed)."""

    name = "node_1p"
    processes = 1


class NodeBaseReceiver(NodeReceiver):
    """The node of another checkout (``--node-base DIR``, e.g. ``git archive`` of the commit
    before a change), run by that checkout's own tests/nodeproc.py: a before/after comparison
    inside one run, where the machine's noise hits both alike."""

    name = "node_base"
    base: Path | None = None

    def start(self, work: Path) -> None:
        import importlib.util

        if self.base is None:
            raise RuntimeError("node_base needs --node-base DIR (a checkout to compare with)")
        spec = importlib.util.spec_from_file_location(
            "_base_nodeproc", self.base / "tests" / "nodeproc.py"
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        self.node_process = mod.NodeProcess
        super().start(work)


RECEIVERS = {
    "bare": BareReceiver,
    "bare_fsync": BareFsyncReceiver,
    "storescp": StorescpReceiver,
    "node": NodeReceiver,
    "node_os": NodeOsReceiver,
    "node_1p": NodeOneProcessReceiver,
    "node_base": NodeBaseReceiver,
}


def _cpu_seconds(pid: int, children: bool = True) -> float:
    try:
        p = psutil.Process(pid)
        t = p.cpu_times()
        total = t.user + t.system
        for ch in p.children(recursive=True) if children else []:
            try:
                ct = ch.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return float("nan")


class PeakRSS:
    """Peak resident memory of a process and its children (sampled every 50 ms)."""

    def __init__(self, pid: int) -> None:
        import threading

        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                p = psutil.Process(self.pid)
                total = p.memory_info().rss
                for ch in p.children(recursive=True):
                    try:
                        total += ch.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def run_once(kind: str, batches: list[list[Path]], work: Path) -> dict[str, Any]:
    """One receiver, ``len(batches)`` storescu processes at once (one association each)."""
    rec = RECEIVERS[kind]()
    rec.start(work)
    n_files = sum(len(b) for b in batches)
    try:
        cpu0 = _cpu_seconds(rec.pid())
        main0 = _cpu_seconds(rec.pid(), children=False)
        work.mkdir(parents=True, exist_ok=True)
        logs = [open(work / f"storescu-{i}.log", "w+") for i in range(len(batches))]
        with PeakRSS(rec.pid()) as mem:
            t0 = time.perf_counter()
            procs = [
                subprocess.Popen(
                    [
                        dcmtk_tool("storescu"),
                        "-aec",
                        rec.aet,
                        "-aet",
                        f"BENCH{i}",
                        "127.0.0.1",
                        str(rec.port),
                        *map(str, files),
                    ],
                    stdout=logs[i],
                    stderr=subprocess.STDOUT,
                    env=DCMTK_ENV,
                )
                for i, files in enumerate(batches)
            ]
            # When each sender finished: with several associations, the span between the first
            # and the last is the tail in which fewer associations than at the start share the
            # receiver (a receiver process whose connections finish early idles meanwhile).
            done: dict[int, float] = {}
            while len(done) < len(procs):
                for i, p in enumerate(procs):
                    if i not in done and p.poll() is not None:
                        done[i] = time.perf_counter() - t0
                time.sleep(0.002)
            seconds = time.perf_counter() - t0
            outs = []
            for f in logs:
                f.seek(0)
                outs.append(f.read())
                f.close()
        cpu = _cpu_seconds(rec.pid()) - cpu0
        cpu_main = _cpu_seconds(rec.pid(), children=False) - main0
        received = rec.count()
    finally:
        rec.stop()
    bad = [i for i, p in enumerate(procs) if p.returncode != 0]
    if bad or received != n_files:
        raise RuntimeError(
            f"{kind}: storescu rc={[procs[i].returncode for i in bad]}, "
            f"{received}/{n_files} received; output: "
            f"{(outs[bad[0]] if bad else '')[-800:]}"
        )
    return {
        "seconds": seconds,
        "first_sender_done_s": min(done.values()),
        "cpu_s": cpu,
        "cpu_main_s": cpu_main,
        "received": received,
        "peak_rss_mb": round(mem.peak / 2**20, 1),
    }


def disk_flush_ms(directory: Path, size: int, n: int = 60) -> dict[str, float]:
    """Median latency of the two flushes behind "fsync" durability on this disk, for a file of
    `size` bytes: the file's fsync and, after the rename, the directory's fsync (what bounds the
    node's default mode: neither can overlap the next instance, which the sender sends only
    after Success)."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(size)
    file_ms: list[float] = []
    dir_ms: list[float] = []
    for i in range(n):
        tmp, final = directory / f".t{i}", directory / f"f{i}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
            t0 = time.perf_counter()
            os.fsync(fd)
            file_ms.append((time.perf_counter() - t0) * 1e3)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            os.fsync(dfd)
            dir_ms.append((time.perf_counter() - t0) * 1e3)
        finally:
            os.close(dfd)
    shutil.rmtree(directory, ignore_errors=True)
    return {
        "file_fsync_ms": round(statistics.median(file_ms), 3),
        "dir_fsync_ms": round(statistics.median(dir_ms), 3),
        "samples": n,
    }


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import pydicom
    import pynetdicom

    dcmtk = subprocess.run(
        [dcmtk_tool("storescu"), "--version"], capture_output=True, text=True
    ).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "dcmtk": (dcmtk.splitlines() or [""])[0].strip(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--receivers",
        default=None,
        help="comma-separated (default: bare,bare_fsync,storescp,node,node_1p,"
        "node_os; with --concurrent: bare,node_1p,node)",
    )
    ap.add_argument(
        "--concurrent",
        type=int,
        default=1,
        metavar="N",
        help="N storescu processes at once, each sending its own series over its "
        "own association (issue 16: 8)",
    )
    ap.add_argument(
        "--data",
        type=Path,
        default=None,
        help="where the series is generated/cached (default: system temp dir)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    ap.add_argument(
        "--node-checkpoint",
        default="",
        help="checkpoint directory for the node (default: packaged demo)",
    )
    ap.add_argument(
        "--node-base",
        type=Path,
        default=None,
        help="another checkout whose node runs as receiver 'node_base' "
        "(before/after comparison in one run)",
    )
    ap.add_argument("--serve-bare", nargs=2, metavar=("PORT", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--durable", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_bare:
        serve_bare(int(args.serve_bare[0]), Path(args.serve_bare[1]), durable=args.durable)
        return 0
    for tool in ("storescu", "storescp", "echoscu"):
        try:
            dcmtk_tool(tool)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    NodeReceiver.checkpoint = (
        str(Path(args.node_checkpoint).resolve()) if args.node_checkpoint else ""
    )
    NodeBaseReceiver.base = args.node_base.resolve() if args.node_base else None
    data = args.data or Path(tempfile.gettempdir()) / f"molre-bench-{args.slices}x{args.size}"
    conc = max(1, args.concurrent)
    # one series per association (own Study/Series UIDs): 8 senders = 8 studies at once
    batches = [
        make_series(
            data if i == 0 else data.with_name(f"{data.name}-{i}"), args.slices, args.size, seed=i
        )
        for i in range(conc)
    ]
    files = [f for b in batches for f in b]
    total_bytes = sum(p.stat().st_size for p in files)
    default_kinds = (
        "bare,node_1p,node" if conc > 1 else "bare,bare_fsync,storescp,node,node_1p,node_os"
    )
    kinds = [k.strip() for k in (args.receivers or default_kinds).split(",") if k.strip()]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="molre-ingest-") as tmp:
        flush = disk_flush_ms(Path(tmp) / "flush", total_bytes // max(1, len(files)))
        print(
            f"  disk: file fsync {flush['file_fsync_ms']} ms, directory fsync "
            f"{flush['dir_fsync_ms']} ms (median)",
            flush=True,
        )
        for rep in range(args.repeats):
            for kind in kinds:  # interleaved so drift hits every receiver alike
                work = Path(tmp) / f"{kind}-{rep}"
                r = run_once(kind, batches, work)
                runs[kind].append(r)
                print(
                    f"  rep {rep + 1}/{args.repeats} {kind:9s} {r['seconds']:7.2f} s "
                    f"{len(files) / r['seconds']:7.1f} inst/s"
                    + (
                        f" (first sender done {r['first_sender_done_s']:.2f} s)" if conc > 1 else ""
                    ),
                    flush=True,
                )
                shutil.rmtree(work, ignore_errors=True)
    summary: dict[str, Any] = {}
    for kind, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        summary[kind] = {
            "runs_s": [round(r["seconds"], 4) for r in rs],
            "median_s": round(secs, 4),
            "first_sender_done_s_median": round(
                statistics.median(r["first_sender_done_s"] for r in rs), 4
            ),
            "instances_per_s": round(len(files) / secs, 2),
            "mb_per_s": round(total_bytes / secs / 1e6, 2),
            "cpu_s_median": round(statistics.median(r["cpu_s"] for r in rs), 3),
            "cpu_main_process_s_median": round(statistics.median(r["cpu_main_s"] for r in rs), 3),
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in rs),
        }
    ratios = {
        f"{a}_vs_{b}": round(summary[a]["instances_per_s"] / summary[b]["instances_per_s"], 3)
        for a, b in RATIOS
        if a in summary and b in summary
    }
    goals = CONCURRENT_GOALS if conc > 1 else SINGLE_GOALS
    verdict = {k: (ratios[k] >= v) if k in ratios else None for k, v in goals.items()}
    result = {
        "benchmark": "ingest",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "series": {
            "slices": args.slices,
            "size": args.size,
            "bytes": total_bytes,
            "associations": conc,
            "sender": f"dcmtk storescu x{conc} at once, one association and one "
            f"series each, TCP_NODELAY=1",
        },
        "load_average_at_start": LOAD_AT_START,
        "load_average_at_end": list(os.getloadavg()),
        "repeats": args.repeats,
        "disk_flush": flush,
        "receivers": summary,
        "ratios": ratios,
        "goals": goals,
        "meets_goals": verdict,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(
        f"{'receiver':10s} {'median s':>9s} {'inst/s':>8s} {'MB/s':>8s} {'CPU s':>7s} "
        f"{'peak RSS MB':>11s}"
    )
    for kind, s in summary.items():
        print(
            f"{kind:10s} {s['median_s']:9.2f} {s['instances_per_s']:8.1f} "
            f"{s['mb_per_s']:8.1f} {s['cpu_s_median']:7.2f} {s['peak_rss_mb_max']:11.0f}"
        )
    for k, v in ratios.items():
        print(
            f"{k}: {v}"
            + (
                f"  (goal >= {goals[k]}: {'met' if verdict[k] else 'NOT met'})"
                if k in goals
                else ""
            )
        )
    print(f"load average: start {LOAD_AT_START}, end {result['load_average_at_end']}")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
