"""GPU benchmark: CT-FM throughput with no adapter / LoRA / MoLRE, and per-series inference time.

Why: MoLRE claims < 0.5 % extra parameters and near-LoRA cost (the K experts are computed as one
rank-K*r LoRA). This measures it on the real CT-FM architecture (random init; weights do not
change the cost) at the recipe's input size (1 x 48 x 128 x 128), in bf16 autocast:

- forward volumes/s (inference) and forward+backward volumes/s (training step without the
  optimizer) for: `none` (frozen backbone, trainable linear head), `lora` (experts = 1),
  `molre` (experts = 6, rank 8), and `full` (every backbone parameter trainable, the cost that
  adapters avoid);
- per-series inference time through `molre.checkpoint.Predictor` (read DICOM -> preprocess ->
  model -> probabilities) on a synthetic phantom series, when pydicom & co. are importable.

Run through `bench/gpu.sh` (one script, < 8 minutes on one H100). `--dry-run` shrinks everything
(tiny-3d backbone, 2 iterations) so the script can be checked on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

N_FINDINGS = 75


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(variant: str, backbone: str, device: torch.device) -> tuple[nn.Module, nn.Module, dict]:
    """Backbone (+ adapters) and a linear head; returns (backbone, head, info)."""
    from molre.adapters import MoLREConfig, adapter_report, inject_adapters
    from molre.backbones import create_backbone

    model = create_backbone(backbone)
    base_params = sum(p.numel() for p in model.parameters())
    info: dict[str, Any] = {"base_params": base_params}
    if variant in ("lora", "molre"):
        cfg = MoLREConfig(
            experts=1 if variant == "lora" else 6,
            rank=8,
            alpha=16.0,
            targets=list(model.spec.default_targets),
        )
        adapted = inject_adapters(model, cfg)
        info["adapted_layers"] = len(adapted)
        rep = adapter_report(model)
        info["adapter_report"] = {k: v for k, v in rep.items() if isinstance(v, (int, float, str))}
    elif variant == "none":
        for p in model.parameters():
            p.requires_grad_(False)
    elif variant == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        raise ValueError(variant)
    head = nn.Linear(model.spec.feature_dim, N_FINDINGS)
    model.to(device)
    head.to(device)
    info["trainable_params"] = sum(
        p.numel() for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad
    )
    info["extra_params_pct"] = round(
        100.0 * (sum(p.numel() for p in model.parameters()) - base_params) / base_params, 4
    )
    return model, head, info


def time_loop(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per iteration (after warm-up)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def bench_variant(variant: str, args: argparse.Namespace, device: torch.device) -> dict:
    model, head, info = build(variant, args.backbone, device)
    roi = tuple(args.roi) if args.roi else tuple(model.spec.recipe["roi"])
    x = torch.randn(args.batch, 1, *roi, device=device)
    y = (torch.rand(args.batch, N_FINDINGS, device=device) > 0.9).float()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=args.dtype == "bf16")
    loss_fn = nn.BCEWithLogitsLoss()

    model.eval()

    def fwd() -> None:
        with torch.inference_mode(), autocast:
            head(model(x))

    model.train()  # MoLRE routers / dropout in training mode for the backward pass
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]

    def fwd_bwd() -> None:
        for p in params:
            p.grad = None
        with autocast:
            loss = loss_fn(head(model(x)).float(), y)
        loss.backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.eval()
    t_fwd = time_loop(fwd, device, args.warmup, args.iters)
    mem_fwd = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_bwd = time_loop(fwd_bwd, device, args.warmup, args.iters)
    mem_bwd = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    res = {
        "variant": variant,
        "roi": list(roi),
        "batch": args.batch,
        "dtype": args.dtype,
        "forward_volumes_per_s": round(args.batch / t_fwd, 2),
        "forward_backward_volumes_per_s": round(args.batch / t_bwd, 2),
        "forward_ms_per_batch": round(1000 * t_fwd, 2),
        "forward_backward_ms_per_batch": round(1000 * t_bwd, 2),
        "peak_mem_forward_mib": round(mem_fwd / 2**20, 1) if mem_fwd else None,
        "peak_mem_forward_backward_mib": round(mem_bwd / 2**20, 1) if mem_bwd else None,
        **info,
    }
    del model, head, x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def bench_series(args: argparse.Namespace, device: torch.device) -> dict:
    """Predictor on a synthetic series: read + preprocess + forward, median of N runs."""
    try:
        import numpy as np

        from molre.checkpoint import Predictor
        from molre.data.synth import write_phantom_series
    except Exception as exc:  # noqa: BLE001 - missing optional packages on the GPU image
        return {"skipped": f"import failed: {type(exc).__name__}: {exc}"}
    try:
        with tempfile.TemporaryDirectory(prefix="molre-gpu-series-") as tmp:
            info = write_phantom_series(
                Path(tmp),
                np.random.default_rng(0),
                ["subdural_hemorrhage"],
                size=args.series_size,
                n_slices=args.series_slices,
                slice_thickness=5.0,
            )
            t0 = time.perf_counter()
            pred = Predictor.from_checkpoint(args.checkpoint, device=str(device))
            load_s = time.perf_counter() - t0
            times = []
            for _ in range(args.series_runs + 1):
                _sync(device)
                t0 = time.perf_counter()
                pred.predict_series(info.paths)
                _sync(device)
                times.append(time.perf_counter() - t0)
            return {
                "checkpoint": args.checkpoint or "packaged demo",
                "model_name": pred.model_name,
                "slices": args.series_slices,
                "matrix": args.series_size,
                "checkpoint_load_s": round(load_s, 3),
                "first_series_s": round(times[0], 3),
                "series_s_median": round(statistics.median(times[1:]), 4),
                "runs": len(times) - 1,
            }
    except Exception as exc:  # noqa: BLE001 - report, do not lose the throughput numbers
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", default="ct-fm")
    ap.add_argument("--variants", default="none,lora,molre,full")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--roi", type=int, nargs=3, default=None, help="D H W (default: recipe)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--checkpoint", default=None, help="for per-series timing (None = demo)")
    ap.add_argument("--series-slices", type=int, default=40)
    ap.add_argument("--series-size", type=int, default=512)
    ap.add_argument("--series-runs", type=int, default=5)
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny sizes (tiny-3d, batch 1, 16x32x32, 1 iteration): checks the script",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.backbone, args.batch, args.roi = "tiny-3d", 1, [16, 32, 32]
        args.warmup, args.iters = 1, 1
        args.series_slices, args.series_size, args.series_runs = 8, 64, 1
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.time()
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "dry_run": args.dry_run,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
    }
    print(json.dumps(env), flush=True)
    results = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        try:
            r = bench_variant(variant, args, device)
        except Exception as exc:  # noqa: BLE001 - one variant failing keeps the others
            r = {
                "variant": variant,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=4),
            }
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "traceback"}), flush=True)
    series = bench_series(args, device)
    print(json.dumps({"series": series}), flush=True)
    ok = [r for r in results if "error" not in r]
    by = {r["variant"]: r for r in ok}
    ratios = {}
    for v in ("lora", "molre", "full"):
        if v in by and "none" in by:
            ratios[f"{v}_vs_none_forward"] = round(
                by[v]["forward_volumes_per_s"] / by["none"]["forward_volumes_per_s"], 3
            )
            ratios[f"{v}_vs_none_train"] = round(
                by[v]["forward_backward_volumes_per_s"]
                / by["none"]["forward_backward_volumes_per_s"],
                3,
            )
    if "molre" in by and "lora" in by:
        ratios["molre_vs_lora_train"] = round(
            by["molre"]["forward_backward_volumes_per_s"]
            / by["lora"]["forward_backward_volumes_per_s"],
            3,
        )
    out = {
        "benchmark": "gpu",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": env,
        "backbone": args.backbone,
        "results": results,
        "ratios": ratios,
        "series": series,
        "wall_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"\n{'variant':8s} {'fwd vol/s':>10s} {'fwd+bwd vol/s':>14s} {'trainable':>11s} "
        f"{'extra %':>8s}"
    )
    for r in ok:
        print(
            f"{r['variant']:8s} {r['forward_volumes_per_s']:10.1f} "
            f"{r['forward_backward_volumes_per_s']:14.1f} {r['trainable_params']:11d} "
            f"{r['extra_params_pct']:8.3f}"
        )
    for k, v in ratios.items():
        print(f"{k}: {v}")
    print(f"series: {series}")
    print(f"-> {args.out}")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
