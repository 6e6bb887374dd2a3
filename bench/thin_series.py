"""Thin-slice series: last instance -> SR and peak memory as the slice count grows.

Why: a modern head CT is often read from a thin reconstruction (480 x 512 x 512 at 0.625 mm,
240 MB). What the radiologist waits for after the last instance is reading + decoding the files,
resampling to the model grid, the model, the SR; what the site's machine must hold is the node
plus its inference process. This benchmark measures both for series of 32, 120 and 480 slices
that cover the same anatomy (slice thickness = 300 mm / slices), so only the slice count grows.

Setup as in bench/e2e.py (its `run_series` does the sending and the timing): `molre-node serve`
(tests.nodeproc.NodeProcess) with the packaged demo checkpoint (what `serve` uses without
`model.checkpoint`), a collecting storage SCP as destination, dcmtk `storescu` over one
association; the series is complete `release_grace_s` after the release (reported and
subtracted as `net_s`). One small warm-up series first (the inference process is ready before
it, see `start_to_inference_ready_s`). Peak RSS: the node process and all its children (the
inference process), sampled every 10 ms from the first instance sent to the SR's arrival, the
sum at each instant (and each process's own peak).

Phantoms are written with the project's synth code (tests.nodeproc.make_ct_series ->
molre.data.synth) once into --cache (a 480-slice 512^2 phantom takes ~30 s and ~10 GB while it
is rendered) and reused.

    python bench/thin_series.py                         # 32, 120, 480 slices -> bench/results/thin_series.json
    python bench/thin_series.py --slices 16,32 --size 64 --out /tmp/t.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from bench.e2e import run_series  # noqa: E402
from bench.ingest import machine_info  # noqa: E402
from tests.nodeproc import NodeProcess, StorageSCP, make_ct_series, wait_until  # noqa: E402

COVERAGE_MM = 300.0  # 480 x 0.625 mm


class RssSampler:
    """Peak resident memory of a process tree: the sum over all its processes at each sample,
    the sum of the node and its inference process (`inference_pids`), each role's own peak."""

    def __init__(self, pid: int, inference_pids: set[int], interval: float = 0.01) -> None:
        self.pid = pid
        self.inference_pids = inference_pids
        self.interval = interval
        self.peak_sum = 0
        self.peak_node_inference = 0
        self.peak_each: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = psutil.Process(self.pid)
        while not self._stop.is_set():
            total = core = 0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            others: dict[str, int] = {}
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
                if p.pid == self.pid or p.pid in self.inference_pids:
                    core += rss
                name = (
                    "node"
                    if p.pid == self.pid
                    else "inference"
                    if p.pid in self.inference_pids
                    else _role(p)
                )
                others[name] = others.get(name, 0) + rss
            for name, rss in others.items():
                self.peak_each[name] = max(self.peak_each.get(name, 0), rss)
            self.peak_sum = max(self.peak_sum, total)
            self.peak_node_inference = max(self.peak_node_inference, core)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(2)


def _role(p: psutil.Process) -> str:
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return f"pid{p.pid}"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    if "multiprocessing" in cmd or "spawn_main" in cmd:
        return "other children (receiver processes)"
    return p.name()


def _series(cache: Path, n: int, size: int, seed: int) -> Any:
    """A cached phantom series: (n slices, size^2, thickness COVERAGE_MM / n)."""
    thickness = round(COVERAGE_MM / n, 4)
    d = cache / f"n{n}-s{size}-t{thickness}-seed{seed}"
    info_path = d / "info.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        return argparse.Namespace(
            paths=[Path(p) for p in info["paths"]],
            series_uid=info["series_uid"],
            thickness=thickness,
        )
    if d.exists():
        shutil.rmtree(d)
    t0 = time.monotonic()
    info = make_ct_series(
        d / "dcm",
        ["subdural_hemorrhage"] if seed % 2 else [],
        n_slices=n,
        size=size,
        seed=seed,
        slice_thickness=thickness,
    )
    info_path.write_text(
        json.dumps({"paths": [str(p) for p in info.paths], "series_uid": info.series_uid})
    )
    print(
        f"  wrote {n} x {size}^2 phantom ({thickness} mm) in {time.monotonic() - t0:.0f} s",
        flush=True,
    )
    return argparse.Namespace(
        paths=list(info.paths), series_uid=info.series_uid, thickness=thickness
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", default="32,120,480", help="comma-separated slice counts")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="timed series per slice count")
    ap.add_argument("--release-grace", type=float, default=0.5)
    ap.add_argument(
        "--quiet-time",
        type=float,
        default=60.0,
        help="long, so completion comes from the association release",
    )
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "molre-thin-cache")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "thin_series.json")
    args = ap.parse_args(argv)
    counts = [int(v) for v in args.slices.split(",") if v.strip()]
    args.cache.mkdir(parents=True, exist_ok=True)

    warm = _series(args.cache, 32, args.size, 999)
    series = {
        n: [_series(args.cache, n, args.size, 100 * n + r) for r in range(args.repeats)]
        for n in counts
    }
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="molre-thin-") as tmp_s:
        tmp = Path(tmp_s)
        with StorageSCP("THINPACS") as scp:
            node = NodeProcess.create(
                tmp / "node",
                destinations=[scp.destination()],
                quiet_time_s=args.quiet_time,
                release_grace_s=args.release_grace,
                logging={"json": True, "level": "INFO"},
            )
            t_start = time.monotonic()
            with node:
                wait_until(
                    lambda: any(
                        r.get("event") == "inference process ready" for r in node.log_records()
                    ),
                    timeout=args.timeout,
                    what="inference process ready",
                )
                ready_s = time.monotonic() - t_start
                assert node.proc is not None
                print(f"  warm-up: {run_series(node, scp, warm, args.timeout)}", flush=True)
                inference = {
                    int(r["pid"])
                    for r in node.log_records()
                    if r.get("event") == "inference process ready" and r.get("pid")
                }
                for n in counts:
                    for info in series[n]:
                        with RssSampler(node.proc.pid, inference) as rss:
                            r = run_series(node, scp, info, args.timeout)
                        r["net_s"] = round(r["last_instance_to_sr_s"] - args.release_grace, 3)
                        r["peak_rss_mb"] = round(rss.peak_sum / 2**20)
                        r["peak_rss_node_inference_mb"] = round(rss.peak_node_inference / 2**20)
                        r["peak_rss_each_mb"] = {
                            k: round(v / 2**20) for k, v in sorted(rss.peak_each.items())
                        }
                        r["loadavg_1m"] = round(os.getloadavg()[0], 2)
                        results[n].append(r)
                        print(f"  {n} slices: {r}", flush=True)
                stages = [
                    rec for rec in node.log_records() if rec.get("event") == "series reported"
                ]
    rows = []
    base = None
    for n in counts:
        runs = results[n]
        med = statistics.median(r["last_instance_to_sr_s"] for r in runs)
        row = {
            "slices": n,
            "thickness_mm": round(COVERAGE_MM / n, 4),
            "median_last_instance_to_sr_s": round(med, 3),
            "median_net_s": round(statistics.median(r["net_s"] for r in runs), 3),
            "median_inference_s": None,
            "median_worker_total_s": None,
            "max_peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "max_peak_rss_node_inference_mb": max(r["peak_rss_node_inference_mb"] for r in runs),
            "median_cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 2),
            "runs": runs,
        }
        base = base or row["median_net_s"]
        row["net_vs_first"] = round(row["median_net_s"] / base, 2) if base else None
        rows.append(row)
    # the reported events come in the order the series were sent: warm-up first
    done = [rec for rec in stages if rec.get("inference_s") is not None][1:]
    k = 0
    for row in rows:
        mine = done[k : k + len(row["runs"])]
        k += len(row["runs"])
        if mine:  # worker: inference (read + preprocess + model, in the inference process)
            # and total (+ claim, SR evidence, SR building and writing, outbox)
            row["median_inference_s"] = round(statistics.median(r["inference_s"] for r in mine), 3)
            row["median_worker_total_s"] = round(statistics.median(r["total_s"] for r in mine), 3)
    result = {
        "benchmark": "thin_series",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "loadavg_at_start": [round(v, 2) for v in load_start],
        "loadavg_at_end": [round(v, 2) for v in os.getloadavg()],
        "node": {
            "checkpoint": "packaged demo (serve's default)",
            "isolation": "process",
            "release_grace_s": args.release_grace,
            "quiet_time_s": args.quiet_time,
            "start_to_inference_ready_s": round(ready_s, 2),
        },
        "series": {
            "size": args.size,
            "coverage_mm": COVERAGE_MM,
            "repeats": args.repeats,
            "sender": "dcmtk storescu (one association)",
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        "\n| slices | mm | last instance -> SR s | net of grace s | inference s | worker s | "
        "x first | peak RSS MB node + inference | all processes | CPU s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['slices']} | {row['thickness_mm']} | {row['median_last_instance_to_sr_s']}"
            f" | {row['median_net_s']} | {row['median_inference_s']} | "
            f"{row['median_worker_total_s']} | {row['net_vs_first']} | "
            f"{row['max_peak_rss_node_inference_mb']} | {row['max_peak_rss_mb']} | "
            f"{row['median_cpu_s']} |"
        )
    print(
        f"load average at start {result['loadavg_at_start']}, at end "
        f"{result['loadavg_at_end']}; inference ready {ready_s:.1f} s after start"
    )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
