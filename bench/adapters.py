"""Cost of MoLRE adapters on CPU: base vs LoRA(r) vs LoRA(K·r) vs MoLRE(K, r).

Why this benchmark: MoLRE computes its K experts as one stacked rank-K·r path plus a per-sample
gate multiply, so it should cost about the same as a single LoRA of rank K·r (goal: within
1.15×). Two workloads:
  (a) ViT-B-sized transformer blocks (timm `Block`, dim 768, 12 heads; adapters on attn.qkv and
      attn.proj), batch 8 × 197 tokens;
  (b) a CT-FM-sized Conv3d stage (256→256 3×3×3 conv + instance norm + ReLU, `--conv-blocks`
      of them, default 1; adapters on every conv), a 24×32×32 map, batch 1.
Forward is timed under `torch.inference_mode` (serving); forward+backward in train mode with the
input requiring grad in every variant, so the base does the same data-gradient work and adapters
add only their own weight gradients. Warm-up runs, then the median of several repeats.

    python bench/adapters.py            # full run, writes bench/results/adapters.json
    python bench/adapters.py --quick    # small shapes, few repeats (smoke test)
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from molre.adapters import MoLREConfig, adapter_report, inject_adapters  # noqa: E402


class ConvStage(nn.Module):
    """Two residual-free 3×3×3 conv blocks, like one CT-FM (SegResNet-style) encoder stage."""

    def __init__(self, ch: int = 256, n: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(ch, ch, 3, padding=1, bias=False), nn.InstanceNorm3d(ch), nn.ReLU()
            )
            for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def vit_blocks(depth: int, dim: int = 768) -> nn.Module:
    from timm.models.vision_transformer import Block

    return nn.Sequential(
        *[Block(dim=dim, num_heads=12, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)]
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bench_workload(
    name: str, make_model, make_input, targets: list[str], K: int, r: int, warmup: int, repeats: int
) -> dict:
    torch.manual_seed(0)
    base = make_model()
    for p in base.parameters():
        p.requires_grad_(False)
    variants: dict[str, nn.Module] = {"base": base}
    configs = {
        f"lora_r{r}": MoLREConfig(experts=1, rank=r, alpha=2 * r, targets=targets),
        f"lora_r{K * r}": MoLREConfig(experts=1, rank=K * r, alpha=2 * K * r, targets=targets),
        f"molre_k{K}_r{r}": MoLREConfig(experts=K, rank=r, alpha=2 * r, targets=targets),
    }
    params: dict[str, dict] = {}
    for vname, cfg in configs.items():
        m = copy.deepcopy(base)
        inject_adapters(m, cfg)
        # non-zero up-projections so the adapter path is numerically live (zeros could be skipped)
        with torch.no_grad():
            for mod_name, p in m.named_parameters():
                if ".lora_B." in mod_name:
                    p.normal_(0, 1e-3)
        variants[vname] = m
        rep = adapter_report(m)
        params[vname] = {
            "adapter_params": rep["adapter_params"],
            "overhead_percent": rep["overhead_percent"],
        }
    x = make_input()
    out: dict = {
        "workload": name,
        "input_shape": list(x.shape),
        "params": params,
        "forward_s": {},
        "forward_backward_s": {},
        "forward_min_s": {},
        "forward_backward_min_s": {},
    }
    xg = x.clone().requires_grad_(True)

    def fwd(m: nn.Module) -> None:
        with torch.inference_mode():
            m(x)

    def fwd_bwd(m: nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        xg.grad = None
        m(xg).float().sum().backward()

    # Noise-free companion to the timings: matmul/conv FLOPs counted by torch's FlopCounterMode
    # (elementwise ops such as the gate multiply and pooling are not counted).
    from torch.utils.flop_counter import FlopCounterMode

    # Counted on meta-device copies: shapes only, nothing is computed, so it costs no time.
    out["gflops"] = {"forward": {}, "forward_backward": {}}
    xm = x.to("meta")
    for v, m in variants.items():
        mm = copy.deepcopy(m).to("meta")
        for phase, mode in (("forward", False), ("forward_backward", True)):
            mm.train(mode)
            counter = FlopCounterMode(display=False)
            with counter:
                if mode:
                    mm(xm.clone().requires_grad_(True)).float().sum().backward()
                else:
                    with torch.inference_mode():
                        mm(xm)
            out["gflops"][phase][v] = counter.get_total_flops() / 1e9

    # Interleave the variants (round robin, rotating start) so that load from other processes
    # on a shared machine hits every variant alike instead of biasing whichever ran during a spike.
    names = list(variants)
    for phase, fn, mode in (("forward", fwd, False), ("forward_backward", fwd_bwd, True)):
        times: dict[str, list[float]] = {v: [] for v in names}
        cpu: dict[str, list[float]] = {v: [] for v in names}
        for v in names:
            variants[v].train(mode)
            for _ in range(warmup):
                fn(variants[v])
        for i in range(repeats):
            for v in names[i % len(names) :] + names[: i % len(names)]:
                c0, t0 = time.process_time(), time.perf_counter()
                fn(variants[v])
                times[v].append(time.perf_counter() - t0)
                cpu[v].append(time.process_time() - c0)
        key = "forward_s" if phase == "forward" else "forward_backward_s"
        for v in names:
            out[key][v] = statistics.median(times[v])
            out[key.replace("_s", "_min_s")][v] = min(times[v])
            # process CPU time: less sensitive than wall time to other processes taking the cores
            out.setdefault(key.replace("_s", "_cpu_s"), {})[v] = statistics.median(cpu[v])
            print(
                f"  {name:11s} {phase:16s} {v:14s} median {out[key][v] * 1e3:9.1f} ms  "
                f"min {min(times[v]) * 1e3:9.1f} ms  cpu {statistics.median(cpu[v]) * 1e3:9.1f} ms",
                file=sys.stderr,
                flush=True,
            )
    molre, lora_kr = f"molre_k{K}_r{r}", f"lora_r{K * r}"
    out["ratios"] = {
        phase: {
            "molre_over_lora_kr": out[key][molre] / out[key][lora_kr],
            "molre_over_base": out[key][molre] / out[key]["base"],
            "lora_kr_over_base": out[key][lora_kr] / out[key]["base"],
            "lora_r_over_base": out[key][f"lora_r{r}"] / out[key]["base"],
            "gflops_molre_over_lora_kr": out["gflops"][phase][molre]
            / out["gflops"][phase][lora_kr],
            "cpu_time_molre_over_lora_kr": out[key.replace("_s", "_cpu_s")][molre]
            / out[key.replace("_s", "_cpu_s")][lora_kr],
            "cpu_time_molre_over_base": out[key.replace("_s", "_cpu_s")][molre]
            / out[key.replace("_s", "_cpu_s")]["base"],
        }
        for phase, key in (("forward", "forward_s"), ("forward_backward", "forward_backward_s"))
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="small shapes and few repeats (smoke test)"
    )
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "adapters.json",
        help="where to write the JSON (full runs only unless --out is given)",
    )
    ap.add_argument("--only", choices=["vit", "conv3d"], default=None)
    ap.add_argument(
        "--conv-blocks", type=int, default=1, help="conv blocks in the Conv3d stage (full run)"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    K, r = args.experts, args.rank
    if args.quick:
        vit = dict(depth=1, batch=2, tokens=197, warmup=1, repeats=3)
        conv = dict(n=1, ch=256, shape=(12, 16, 16), warmup=1, repeats=3)
    else:
        vit = dict(depth=2, batch=8, tokens=197, warmup=1, repeats=5)
        # one conv block keeps the run within minutes on a shared 2-core box; every block of a
        # stage has the same adapter/base cost ratio, so more blocks would not change the ratios
        conv = dict(n=args.conv_blocks, ch=256, shape=(24, 32, 32), warmup=1, repeats=3)
    results = []
    if args.only in (None, "vit"):
        results.append(
            bench_workload(
                "vit_b",
                lambda: vit_blocks(vit["depth"]),
                lambda: torch.randn(vit["batch"], vit["tokens"], 768),
                [r".*attn\.qkv", r".*attn\.proj"],
                K,
                r,
                vit["warmup"],
                vit["repeats"],
            )
        )
        results[-1]["config"] = vit
    if args.only in (None, "conv3d"):
        results.append(
            bench_workload(
                "ctfm_conv3d",
                lambda: ConvStage(conv["ch"], conv["n"]),
                lambda: torch.randn(1, conv["ch"], *conv["shape"]),
                [r"blocks\.\d+\.0"],
                K,
                r,
                conv["warmup"],
                conv["repeats"],
            )
        )
        results[-1]["config"] = {**conv, "shape": list(conv["shape"])}
    report = {
        "benchmark": "molre.adapters",
        "when_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "experts": K,
        "rank": r,
        "machine": {
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "results": results,
    }
    print(json.dumps(report, indent=2))
    print(
        "\nwall = median wall time, cpu = median process CPU time, flops = counted matmul/conv FLOPs"
    )
    print(
        f"{'workload':12s} {'phase':17s} {'MoLRE/LoRA(K·r)':>16s} {'MoLRE/base':>11s} "
        f"{'LoRA(K·r)/base':>15s} {'LoRA(r)/base':>13s} {'cpu MoLRE/LoRA(K·r)':>20s} "
        f"{'flops MoLRE/LoRA(K·r)':>22s}"
    )
    for res in results:
        for phase, rat in res["ratios"].items():
            print(
                f"{res['workload']:12s} {phase:17s} {rat['molre_over_lora_kr']:16.3f} "
                f"{rat['molre_over_base']:11.3f} {rat['lora_kr_over_base']:15.3f} {rat['lora_r_over_base']:13.3f} "
                f"{rat['cpu_time_molre_over_lora_kr']:20.3f} {rat['gflops_molre_over_lora_kr']:22.4f}"
            )
    if not args.quick or "--out" in (argv if argv is not None else sys.argv[1:]):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
