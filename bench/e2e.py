"""End-to-end latency: last instance sent -> SR received by a test SCP.

Why: what a radiologist waits for is the time from the scanner's (or PACS's) last instance to the
AI result in the PACS. The node adds a deliberate wait (the series is complete only
`assembler.release_grace_s` after the sender released the association, or after
`assembler.quiet_time_s` of silence); that wait is configuration, not cost, so it is reported and
subtracted. The rest is: completion + selection + queue + reading the series + preprocessing +
model + SR building + C-STORE of the SR.

Setup: `molre-node serve` (tests.nodeproc.NodeProcess) with a collecting storage SCP
(tests.nodeproc.StorageSCP) as destination; each series is a synthetic head CT written by
`molre.data.synth`, sent by dcmtk `storescu` over one association (released at the end). One
warm-up series first (the inference process loads the checkpoint), then `--series` timed ones;
the median counts. CPU seconds of the node process tree per series are reported too.

    python bench/e2e.py                      # demo checkpoint -> bench/results/e2e.json
    python bench/e2e.py --series 2 --size 64 --slices 16 --out /tmp/e2e.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402

from bench.ingest import machine_info  # noqa: E402
from tests.nodeproc import NodeProcess, StorageSCP, make_ct_series, wait_until  # noqa: E402
from tests.orthanc import dcmtk_tool, sr_source_series  # noqa: E402

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def _cpu(pid: int) -> float:
    try:
        p = psutil.Process(pid)
        total = sum(p.cpu_times()[:2])
        for ch in p.children(recursive=True):
            try:
                total += sum(ch.cpu_times()[:2])
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return float("nan")


def _sr_arrival(scp: StorageSCP, series_uid: str, timeout: float) -> float:
    """Block until an SR naming `series_uid` is at the SCP; returns time.monotonic() then."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        items = scp.received
        for ds in items[seen:]:
            if ds.Modality == "SR" and series_uid in sr_source_series(ds):
                return time.monotonic()
        seen = len(items)
        time.sleep(0.005)
    raise TimeoutError(f"no SR for {series_uid} within {timeout:.0f} s")


def run_series(node: NodeProcess, scp: StorageSCP, info: Any, timeout: float) -> dict:
    assert node.proc is not None
    cpu0 = _cpu(node.proc.pid)
    t0 = time.monotonic()
    res = subprocess.run(
        [
            dcmtk_tool("storescu"),
            "-aet",
            "E2ESCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            *map(str, info.paths),
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )
    t_last = time.monotonic()  # storescu returns after the last response and A-RELEASE
    if res.returncode != 0:
        raise RuntimeError(f"storescu failed: {res.stderr[-500:]}")
    t_sr = _sr_arrival(scp, info.series_uid, timeout)
    cpu = _cpu(node.proc.pid) - cpu0
    return {
        "send_s": round(t_last - t0, 3),
        "last_instance_to_sr_s": round(t_sr - t_last, 3),
        "cpu_s": round(cpu, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, default=5, help="timed series (after one warm-up)")
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--thickness", type=float, default=5.0)
    ap.add_argument("--checkpoint", default="", help="empty = packaged demo checkpoint")
    ap.add_argument("--release-grace", type=float, default=0.5)
    ap.add_argument(
        "--quiet-time",
        type=float,
        default=30.0,
        help="long, so completion comes from the association release",
    )
    ap.add_argument("--isolation", default="process", choices=["process", "thread"])
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "e2e.json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="molre-e2e-") as tmp_s:
        tmp = Path(tmp_s)
        series = [
            make_ct_series(
                tmp / f"ct{i}",
                ["subdural_hemorrhage"] if i % 2 else [],
                n_slices=args.slices,
                size=args.size,
                seed=500 + i,
                slice_thickness=args.thickness,
            )
            for i in range(args.series + 1)
        ]
        model: dict[str, Any] = {"isolation": args.isolation}
        if args.checkpoint:
            model["checkpoint"] = str(Path(args.checkpoint).resolve())
        with StorageSCP("E2EPACS") as scp:
            node = NodeProcess.create(
                tmp / "node",
                destinations=[scp.destination()],
                quiet_time_s=args.quiet_time,
                release_grace_s=args.release_grace,
                model=model,
                logging={"json": True, "level": "INFO"},
            )
            t_start = time.monotonic()
            with node:
                started_s = time.monotonic() - t_start
                if args.isolation == "process":
                    wait_until(
                        lambda: any(
                            r.get("event") == "inference process ready" for r in node.log_records()
                        ),
                        timeout=args.timeout,
                        what="inference process ready",
                    )
                ready_s = time.monotonic() - t_start
                warm = run_series(node, scp, series[0], args.timeout)
                print(f"  warm-up: {warm}", flush=True)
                runs = []
                for i, info in enumerate(series[1:]):
                    r = run_series(node, scp, info, args.timeout)
                    r["net_s"] = round(r["last_instance_to_sr_s"] - args.release_grace, 3)
                    runs.append(r)
                    print(f"  series {i + 1}/{args.series}: {r}", flush=True)
                card = next(
                    (
                        rec
                        for rec in node.log_records()
                        if rec.get("event") == "inference process ready"
                    ),
                    {},
                )
    lat = [r["last_instance_to_sr_s"] for r in runs]
    net = [r["net_s"] for r in runs]
    result = {
        "benchmark": "e2e",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "series": {
            "count": args.series,
            "slices": args.slices,
            "size": args.size,
            "thickness_mm": args.thickness,
            "sender": "dcmtk storescu",
        },
        "node": {
            "checkpoint": args.checkpoint or "packaged demo",
            "model": card.get("model"),
            "checkpoint_hash": card.get("checkpoint_hash"),
            "isolation": args.isolation,
            "device": "cpu",
            "release_grace_s": args.release_grace,
            "quiet_time_s": args.quiet_time,
            "start_to_echo_s": round(started_s, 2),
            "start_to_inference_ready_s": round(ready_s, 2),
        },
        "warm_up": warm,
        "runs": runs,
        "median_last_instance_to_sr_s": round(statistics.median(lat), 3),
        "median_net_s": round(statistics.median(net), 3),
        "min_net_s": round(min(net), 3),
        "max_net_s": round(max(net), 3),
        "median_cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nlast instance -> SR: median {result['median_last_instance_to_sr_s']:.2f} s "
        f"(minus {args.release_grace} s release grace: {result['median_net_s']:.2f} s; "
        f"range {result['min_net_s']:.2f}-{result['max_net_s']:.2f}); "
        f"CPU {result['median_cpu_s']:.1f} s/series; node ready for inference after "
        f"{ready_s:.1f} s"
    )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
