"""Does MoLRE beat LoRA? Paired comparison with confidence intervals on multi-site phantoms.

    python bench/molre_vs_lora.py                 # full run (writes bench/results/molre_vs_lora*)
    python bench/molre_vs_lora.py --quick         # CI-sized smoke run (same code path)

Setting "multi": the frozen phantom-3d backbone is pretrained on ONE site (`metro`) only; the
adapters are trained and tested on phantoms from every built-in site, so they must bridge the
shift (kernel, noise, calibration, beam hardening, tilt). Setting "single": everything on `metro`
(the control, where MoLRE should roughly equal LoRA).

Variants: linear probe; LoRA r=8; LoRA r=48 (MoLRE's total rank); MoLRE K=6 r=8; MoLRE with the
router frozen to uniform gates; MoLRE with an oracle router given the site (expert i = site i).
Every variant x seed is scored on the same held-out test set (per setting): per-finding and
macro AUC, the paired case-bootstrap 95 % CI of delta macro AUC vs LoRA r=48 per seed, and a
t-interval of the mean delta over seeds, by finding category too.

Cheap by construction: the frozen layers below the first adapter (stem..enc3, and the 1/4-res
skip) are run once per volume and cached; adapters sit on every conv of the bottleneck and the
1/4-resolution decoder block, and the bench reads the volume vector from those two levels
([avg, max] of each), so a training step never touches the 1/2-resolution layers. Each variant x
seed also writes an evaluate-style folder (predictions.csv + metrics.json), so
`molre-node compare DIR...` prints the paper-style table for any of them.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.procs import process_pool  # noqa: E402
from molre.adapters import MoLREConfig, adapted_layers, inject_adapters  # noqa: E402
from molre.backbones.phantom import PhantomUNet, phantom_sizes  # noqa: E402
from molre.data.synth import PHANTOM_FINDINGS, SITES  # noqa: E402
from molre.losses import focal_loss, prevalence_weights  # noqa: E402
from molre.training import pretrain as P  # noqa: E402
from molre.training.metrics import auc_matrix, bootstrap_weights  # noqa: E402

VARIANTS = ["linear_probe", "lora_r8", "lora_r48", "molre_k6_r8", "molre_uniform", "molre_oracle"]
#: ablations run on request (--variants) and summarised where every finished seed has them:
#: molre_meanstd = MoLRE 6 x 8 whose routers read [spatial mean, spatial std] of the layer input
#: instead of the mean only (the std carries noise level and kernel sharpness: the site shift)
EXTRA_VARIANTS = ["molre_meanstd"]
#: the learned-router variants whose gates per site are recorded (file name per seed folder)
USAGE_FILES = {"molre_k6_r8": "expert_usage.json", "molre_meanstd": "expert_usage_meanstd.json"}
REFERENCE = "lora_r48"
TARGETS = [r"^bottleneck\.conv\.unit[01]\.conv$", r"^dec2\.conv\.unit[01]\.conv$"]
SIZES = {
    "full": dict(
        pre_train=600, pre_val=120, pre_epochs=4, train=400, val=120, test=400, seeds=5, epochs=8
    ),
    "quick": dict(
        pre_train=12, pre_val=8, pre_epochs=1, train=24, val=12, test=24, seeds=1, epochs=2
    ),
}


def _catalog() -> Any:
    from molre.catalog import Catalog, load_catalog

    cat = load_catalog()
    return Catalog([cat.get(k) for k in PHANTOM_FINDINGS], name=cat.name, version=cat.version)


#: the phantom-3d architecture the benchmark's figures (BENCHMARKS.md) were measured on
BENCH_ARCH = "v1"


def pretrained_backbone(size: dict, cache: Path, seed: int) -> tuple[PhantomUNet, dict]:
    """phantom-3d pretrained on `metro` only (cached under `cache`, keyed by its config)."""
    from safetensors.torch import load_file

    cfg = P.PretrainConfig(
        seed=seed,
        train_phantoms=size["pre_train"],
        val_phantoms=size["pre_val"],
        epochs=size["pre_epochs"],
        sites=("metro",),
        workers=2,
        arch=BENCH_ARCH,
    )
    tag = f"phantom-3d-metro-{cfg.train_phantoms}x{cfg.epochs}-s{seed}"
    out = cache / tag
    if not (out / P.WEIGHTS_FILE).is_file():
        res = P.pretrain(cfg, progress=False)
        P.save(res, cfg, out, f"bench/molre_vs_lora.py (single-site pretraining, {tag})")
    card = json.loads((out / P.CARD_FILE).read_text())
    net = PhantomUNet(**phantom_sizes(BENCH_ARCH))
    net.load_state_dict(load_file(str(out / P.WEIGHTS_FILE)))
    return net.eval(), card


def samples(seed: int, split: int, n: int, sites: tuple[str, ...]) -> list[P.Sample]:
    """Phantoms through the node's recipe (no masks), each from its own seed."""
    jobs = [(seed, split, i, 0.3, 0.15, sites, False, BENCH_ARCH) for i in range(n)]
    with process_pool(2) as ex:
        return list(ex.map(P._sample_job, jobs, chunksize=8))


@torch.no_grad()
def encode(net: PhantomUNet, data: list[P.Sample]) -> dict[str, torch.Tensor]:
    """Frozen activations below the first adapter: enc3 output (1/8) and enc2 output (1/4)."""
    e3, s2 = [], []
    for i in range(0, len(data), 8):
        x = torch.from_numpy(np.stack([s.x for s in data[i : i + 8]])).float()
        a2 = net.enc2(net.enc1(net.stem(x)))
        e3.append(net.enc3(a2).half())
        s2.append(a2.half())
    y = torch.from_numpy(np.stack([s.presence for s in data]))
    site = torch.tensor([list(SITES).index(s.site) for s in data])
    return {"e3": torch.cat(e3), "s2": torch.cat(s2), "y": y, "site": site}


class Upper(nn.Module):
    """The adapted part (bottleneck + 1/4 decoder), the bench's readout and the head."""

    def __init__(self, net: PhantomUNet, classes: int) -> None:
        super().__init__()
        self.bottleneck = copy.deepcopy(net.bottleneck)
        self.dec2 = copy.deepcopy(net.dec2)
        c = net.bottleneck.conv.unit1.conv.out_channels + net.dec2.conv.unit1.conv.out_channels
        self.head = nn.Linear(2 * c, classes)

    def forward(self, e3: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        b = self.bottleneck(e3)
        u2 = self.dec2(
            torch.cat(
                [F.interpolate(b, size=s2.shape[2:], mode="trilinear", align_corners=False), s2],
                dim=1,
            )
        )
        return self.head(
            torch.cat(
                [b.mean((2, 3, 4)), b.amax((2, 3, 4)), u2.mean((2, 3, 4)), u2.amax((2, 3, 4))],
                dim=1,
            )
        )


class Gates:
    """MoLRE routing of the controls (uniform gates, one-hot by site) and a gate log."""

    def __init__(self, model: nn.Module, mode: str, experts: int) -> None:
        self.site: torch.Tensor | None = None
        self.log: list[torch.Tensor] = []
        self.record = False
        for layer in adapted_layers(model).values():

            def fn(x, _orig=layer._probs_and_gates):
                if mode == "uniform":
                    g = torch.full((x.shape[0], experts), 1.0 / experts)
                elif mode == "oracle":
                    g = F.one_hot(self.site, experts).float()
                else:
                    g = _orig(x)[1]
                if self.record:
                    self.log.append(g.detach())
                return g, g

            layer._probs_and_gates = fn
            if mode != "learned" and layer.router is not None:
                for p in layer.router.parameters():
                    p.requires_grad_(False)


def mean_std_routers(m: nn.Module) -> None:
    """Every adapted layer's router reads [mean, std] over space of its input (a new router
    with twice the inputs, same hidden width, same init as the library's)."""
    from molre.adapters.layers import Router

    for layer in adapted_layers(m).values():
        old = layer.router
        assert old is not None
        layer.router = Router(2 * old.fc1.in_features, old.fc1.out_features, layer.experts)

        def pool(x: torch.Tensor) -> torch.Tensor:
            dims = tuple(range(2, x.dim()))
            return torch.cat([x.mean(dim=dims), x.std(dim=dims)], dim=1)

        layer.pool = pool


def build(variant: str, net: PhantomUNet, seed: int) -> tuple[Upper, Gates | None]:
    torch.manual_seed(seed)
    m = Upper(net, len(PHANTOM_FINDINGS))
    for p in m.parameters():
        p.requires_grad_(False)
    gates = None
    if variant != "linear_probe":
        k, r = {"lora_r8": (1, 8), "lora_r48": (1, 48)}.get(variant, (6, 8))
        inject_adapters(m, MoLREConfig(experts=k, rank=r, alpha=2.0 * r, targets=TARGETS))
        if variant == "molre_meanstd":
            mean_std_routers(m)
        if k > 1:
            mode = {"molre_uniform": "uniform", "molre_oracle": "oracle"}.get(variant, "learned")
            gates = Gates(m, mode, k)
    for p in m.head.parameters():
        p.requires_grad_(True)
    return m, gates


def predict(m: Upper, gates: Gates | None, d: dict, record: bool = False) -> np.ndarray:
    m.eval()
    out = []
    if gates is not None:
        gates.record, gates.log = record, []
    with torch.no_grad():
        for i in range(0, len(d["y"]), 32):
            if gates is not None:
                gates.site = d["site"][i : i + 32]
            out.append(torch.sigmoid(m(d["e3"][i : i + 32].float(), d["s2"][i : i + 32].float())))
    if gates is not None:
        gates.record = False
    return torch.cat(out).numpy()


def macro(y: np.ndarray, p: np.ndarray) -> float:
    a = [v for v in auc_matrix(y, p) if v is not None]
    return float(np.mean(a)) if a else float("nan")


def train_one(
    variant: str,
    net: PhantomUNet,
    tr: dict,
    va: dict,
    seed: int,
    epochs: int,
    lr: float = 2e-3,
    batch: int = 16,
) -> tuple[Upper, Gates | None, int]:
    """Train one variant; keep the epoch with the best validation macro AUC."""
    m, gates = build(variant, net, seed)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    pw = prevalence_weights(tr["y"].numpy(), 20.0)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_ep = -1.0, None, 0
    n = len(tr["y"])
    for ep in range(epochs):
        m.train()
        for idx in torch.randperm(n, generator=gen).split(batch):
            if gates is not None:
                gates.site = tr["site"][idx]
            loss = focal_loss(
                m(tr["e3"][idx].float(), tr["s2"][idx].float()),
                tr["y"][idx],
                gamma=2.0,
                pos_weight=pw,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        score = macro(va["y"].numpy(), predict(m, gates, va))
        if score > best:
            best, best_ep = score, ep + 1
            best_state = {k: v.clone() for k, v in m.state_dict().items()}
    m.load_state_dict(best_state)
    return m, gates, best_ep


def paired_ci(
    y: np.ndarray,
    pa: np.ndarray,
    pb: np.ndarray,
    n_boot: int,
    seed: int,
    cols: list[int] | None = None,
) -> dict[str, float]:
    """Delta macro AUC (a - b) on the same cases, with a case-bootstrap 95 % interval."""
    cols = cols if cols is not None else list(range(y.shape[1]))
    d0 = macro(y[:, cols], pa[:, cols]) - macro(y[:, cols], pb[:, cols])
    if n_boot <= 0:
        return {"delta": round(d0, 4), "lo": float("nan"), "hi": float("nan")}
    w = bootstrap_weights(len(y), n_boot, seed)
    deltas = []
    for b in range(n_boot):
        idx = np.repeat(np.arange(len(y)), w[b].astype(int))
        yy = y[np.ix_(idx, cols)]
        deltas.append(macro(yy, pa[np.ix_(idx, cols)]) - macro(yy, pb[np.ix_(idx, cols)]))
    lo, hi = np.nanpercentile(deltas, [2.5, 97.5])
    return {"delta": round(d0, 4), "lo": round(float(lo), 4), "hi": round(float(hi), 4)}


def t_interval(values: list[float]) -> dict[str, float]:
    """Mean and 95 % t-interval over seeds."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return {"mean": round(float(v.mean()), 4), "lo": float("nan"), "hi": float("nan")}
    from scipy import stats

    h = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return {
        "mean": round(float(v.mean()), 4),
        "lo": round(float(v.mean() - h), 4),
        "hi": round(float(v.mean() + h), 4),
    }


def write_eval_dir(out: Path, y: np.ndarray, p: np.ndarray, cat: Any) -> None:
    """predictions.csv + metrics.json as `molre-node evaluate` writes them (for `compare`)."""
    from molre.evaluate import METRICS_FILE, Predictions, evaluate_arrays, write_predictions

    ids = [f"test_{i:04d}" for i in range(len(y))]
    write_predictions(
        out / "predictions.csv", Predictions(ids, ids, ["test"] * len(ids), list(cat.keys), p, y)
    )
    (out / METRICS_FILE).write_text(json.dumps(evaluate_arrays(y, p, cat, n_boot=0), indent=1))


def usage_png(path: Path, usage: dict[str, list[list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = list(usage)
    mat = np.array([np.mean(usage[s], axis=0) for s in sites])
    fig, ax = plt.subplots(figsize=(6, 2.5))
    im = ax.imshow(mat, vmin=0, vmax=max(0.5, float(mat.max())), cmap="viridis")
    ax.set_yticks(range(len(sites)), sites)
    ax.set_xticks(range(mat.shape[1]), [f"E{i + 1}" for i in range(mat.shape[1])])
    ax.set_title("MoLRE mean gate per site (test set, all adapted layers)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def site_usage(m: Upper, gates: Gates, site: torch.Tensor) -> dict[str, list[float]]:
    """Mean gate per expert for each site (gates are logged batch by batch, layer by layer)."""
    n_layers = len(adapted_layers(m))
    nb = len(gates.log) // n_layers
    g = torch.cat(
        [torch.stack(gates.log[b * n_layers : (b + 1) * n_layers]).mean(0) for b in range(nb)]
    ).numpy()
    out = {}
    for si, name in enumerate(SITES):
        sel = site.numpy() == si
        if sel.any():
            out[name] = g[sel].mean(0).tolist()
    return out


def run_setting(
    setting: str,
    net: PhantomUNet,
    size: dict,
    seed0: int,
    boot: int,
    out: Path,
    cat: Any,
    cats: dict[str, list[int]],
    seeds: list[int] | None = None,
    variants: list[str] | None = None,
) -> dict[str, Any]:
    variants = variants or VARIANTS
    sites = tuple(SITES) if setting == "multi" else ("metro",)
    t1 = time.perf_counter()
    base = seed0 + 100 + 10 * (setting == "single")
    data = {
        s: encode(net, samples(base, i, size[s], sites))
        for i, s in enumerate(("train", "val", "test"))
    }
    t_data = time.perf_counter() - t1
    y = data["test"]["y"].numpy()
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    probs: dict[str, list[np.ndarray]] = {v: [] for v in variants}
    usage: dict[str, list[list[float]]] = {}
    for seed in seeds if seeds is not None else range(size["seeds"]):
        for v in variants:
            t2 = time.perf_counter()
            m, gates, ep = train_one(v, net, data["train"], data["val"], seed, size["epochs"])
            p = predict(m, gates, data["test"], record=(v in USAGE_FILES))
            if v in USAGE_FILES and gates is not None and gates.log:
                per_site = site_usage(m, gates, data["test"]["site"])
                if v == "molre_k6_r8":
                    for name, g in per_site.items():
                        usage.setdefault(name, []).append(g)
                (out / setting / f"seed{seed}").mkdir(parents=True, exist_ok=True)
                (out / setting / f"seed{seed}" / USAGE_FILES[v]).write_text(
                    json.dumps(per_site) + "\n"
                )
            probs[v].append(p)
            per = dict(zip(PHANTOM_FINDINGS, auc_matrix(y, p)))
            runs[v].append(
                {
                    "seed": seed,
                    "macro_auc": round(macro(y, p), 4),
                    "epoch": ep,
                    "per_finding": {
                        k: (round(x, 4) if x is not None else None) for k, x in per.items()
                    },
                    "seconds": round(time.perf_counter() - t2, 1),
                }
            )
            write_eval_dir(out / setting / f"seed{seed}" / v, y, p, cat)
            print(
                f"[{setting}] seed {seed} {v:<14} macro AUC {runs[v][-1]['macro_auc']:.3f} "
                f"({runs[v][-1]['seconds']} s)",
                flush=True,
            )
    if usage:
        usage_png(out / f"expert_usage_{setting}.png", usage)
    return {
        "sites": list(sites),
        "n": {k: int(len(d["y"])) for k, d in data.items()},
        "data_seconds": round(t_data, 1),
        "runs": runs,
        "summary": summarize(y, probs, runs, boot, cats) if REFERENCE in probs else {},
        "expert_usage": {s: np.mean(u, axis=0).round(3).tolist() for s, u in usage.items()},
    }


def summarize(
    y: np.ndarray,
    probs: dict[str, list[np.ndarray]],
    runs: dict[str, list[dict]],
    boot: int,
    cats: dict[str, list[int]],
) -> dict[str, Any]:
    """Per variant: macro AUC over seeds, paired bootstrap delta vs the reference per seed, the
    t-interval of those deltas over seeds, and the same by finding category."""
    summary: dict[str, Any] = {}
    seeds = range(len(probs[REFERENCE]))
    for v in probs:
        deltas = [paired_ci(y, probs[v][s], probs[REFERENCE][s], boot, s) for s in seeds]
        by_cat = {
            c: t_interval(
                [paired_ci(y, probs[v][s], probs[REFERENCE][s], 0, s, cols)["delta"] for s in seeds]
            )
            for c, cols in cats.items()
        }
        summary[v] = {
            "macro_auc": t_interval([r["macro_auc"] for r in runs[v]]),
            "delta_vs_lora_r48_per_seed": deltas,
            "delta_vs_lora_r48_over_seeds": t_interval([d["delta"] for d in deltas]),
            "delta_by_category": by_cat,
        }
    return summary


def from_runs(
    out: Path, setting: str, boot: int, cats: dict[str, list[int]], planned: int
) -> dict[str, Any]:
    """The summary of an interrupted run, from the evaluate-style folders of the seeds whose
    every variant finished (seeds may have run in separate processes: --only-seeds)."""
    from molre.evaluate import read_predictions

    y = None
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    probs: dict[str, list[np.ndarray]] = {v: [] for v in VARIANTS}
    usage: dict[str, list[list[float]]] = {}
    done = [
        seed
        for seed in range(planned)
        if all((out / setting / f"seed{seed}" / v / "metrics.json").is_file() for v in VARIANTS)
    ]
    extras = [
        v
        for v in EXTRA_VARIANTS
        if done
        and all((out / setting / f"seed{seed}" / v / "metrics.json").is_file() for seed in done)
    ]
    for v in extras:
        runs[v], probs[v] = [], []
    extra_usage: dict[str, list[list[float]]] = {}
    for seed in done:
        for v in VARIANTS + extras:
            pr = read_predictions(out / setting / f"seed{seed}" / v)
            y = pr.labels if y is None else y
            if not np.array_equal(y, pr.labels, equal_nan=True):
                raise SystemExit(f"{setting} seed {seed} {v}: not the same test set")
            probs[v].append(pr.probs)
            per = dict(zip(PHANTOM_FINDINGS, auc_matrix(y, pr.probs)))
            runs[v].append(
                {
                    "seed": seed,
                    "macro_auc": round(macro(y, pr.probs), 4),
                    "per_finding": {
                        k: (round(x, 4) if x is not None else None) for k, x in per.items()
                    },
                }
            )
        u = out / setting / f"seed{seed}" / "expert_usage.json"
        if u.is_file():
            for name, g in json.loads(u.read_text()).items():
                usage.setdefault(name, []).append(g)
        u = out / setting / f"seed{seed}" / USAGE_FILES["molre_meanstd"]
        if "molre_meanstd" in extras and u.is_file():
            for name, g in json.loads(u.read_text()).items():
                extra_usage.setdefault(name, []).append(g)
    if y is None:
        raise SystemExit(f"{out / setting}: no seed with every variant finished")
    if usage:
        usage_png(out / f"expert_usage_{setting}.png", usage)
    return {
        "partial": len(done) < planned,
        "seeds_completed": done,
        "n": {"test": int(len(y))},
        "runs": runs,
        "summary": summarize(y, probs, runs, boot, cats),
        "expert_usage": {s: np.mean(u, axis=0).round(3).tolist() for s, u in usage.items()},
        "expert_usage_seeds": [
            s for s in done if (out / setting / f"seed{s}" / "expert_usage.json").is_file()
        ],
        "expert_usage_meanstd": {
            s: np.mean(u, axis=0).round(3).tolist() for s, u in extra_usage.items()
        },
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| setting | variant | macro AUC, mean [95% t-CI] over seeds | Δ vs LoRA r=48, mean "
        "[95% t-CI] over seeds | seed 0: paired bootstrap Δ [95% CI] |",
        "|---|---|---|---|---|",
    ]
    for setting, r in result["settings"].items():
        for v, s in r["summary"].items():
            m, d = s["macro_auc"], s["delta_vs_lora_r48_over_seeds"]
            d0 = s["delta_vs_lora_r48_per_seed"][0]
            lines.append(
                f"| {setting} | {v} | {m['mean']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] | "
                f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] | "
                f"{d0['delta']:+.3f} [{d0['lo']:+.3f}, {d0['hi']:+.3f}] |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--settings", default="multi,single")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--from-runs",
        action="store_true",
        help="summarise the finished seeds of an interrupted run from its folders (no training)",
    )
    ap.add_argument(
        "--variants",
        default="",
        help=f"run only these variants (default: {','.join(VARIANTS)}; "
        f"ablations: {','.join(EXTRA_VARIANTS)})",
    )
    ap.add_argument(
        "--only-seeds",
        default="",
        help="run only these seeds (e.g. 4) into the run folders; then --from-runs summarises",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (1 when the settings run as two processes)",
    )
    a = ap.parse_args()
    size = SIZES["quick" if a.quick else "full"]
    torch.set_num_threads(a.threads)
    name = "molre_vs_lora_quick" if a.quick else "molre_vs_lora"
    out = a.out / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cat = _catalog()
    cats: dict[str, list[int]] = {}
    for i, k in enumerate(PHANTOM_FINDINGS):
        cats.setdefault(cat.get(k).category, []).append(i)
    path = a.out / f"{name}.json"
    if a.from_runs:
        result = json.loads(path.read_text()) if path.is_file() else {"settings": {}}
        result.update(
            {
                "command": "python bench/molre_vs_lora.py" + (" --quick" if a.quick else ""),
                "sizes": size,
                "targets": TARGETS,
                "reference": REFERENCE,
            }
        )
        for setting in a.settings.split(","):  # the folders are the record: always re-read
            result["settings"][setting] = from_runs(out, setting, a.boot, cats, size["seeds"])
        path.write_text(json.dumps(result, indent=1) + "\n")
        md = table(result)
        (a.out / f"{name}.md").write_text(md + "\n")
        print(md)
        return
    net, pcard = pretrained_backbone(size, a.out / "cache", a.seed)
    result: dict[str, Any] = {
        "command": "python bench/molre_vs_lora.py" + (" --quick" if a.quick else ""),
        "sizes": size,
        "targets": TARGETS,
        "reference": REFERENCE,
        "settings": {},
        "backbone": {
            "pretrained_on": "metro",
            "pretrain_minutes": pcard.get("minutes"),
            "presence_auc_val": pcard["validation_presence_auc"]["macro_auc"],
        },
    }
    for setting in a.settings.split(","):
        t_s = time.perf_counter()
        only = [int(x) for x in a.only_seeds.split(",")] if a.only_seeds else None
        chosen = [v for v in a.variants.split(",") if v] or None
        unknown = set(chosen or []) - set(VARIANTS + EXTRA_VARIANTS)
        if unknown:
            raise SystemExit(f"--variants: unknown {sorted(unknown)}")
        r = run_setting(setting, net, size, a.seed, a.boot, out, cat, cats, only, chosen)
        if only is not None:
            print(f"seeds {only} written under {out / setting}; summarise with --from-runs")
            continue
        r["minutes"] = round((time.perf_counter() - t_s) / 60, 1)
        # Settings may run as separate processes (--settings multi / --settings single): merge
        # into the JSON the other one wrote, when it describes the same design.
        if path.is_file():
            prev = json.loads(path.read_text())
            if prev.get("sizes") == size and prev.get("targets") == TARGETS:
                result["settings"] = {**prev["settings"], **result["settings"]}
        result["settings"][setting] = r
        path.write_text(json.dumps(result, indent=1) + "\n")
    md = table(result)
    (a.out / f"{name}.md").write_text(md + "\n")
    print(md)
    print(f"total {(time.perf_counter() - t0) / 60:.1f} min; JSON: {path}")


if __name__ == "__main__":
    main()
