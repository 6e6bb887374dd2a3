"""Adapters compared on the same synthetic phantoms: none / LoRA r=8 / LoRA r=48 / MoLRE(6, 8).

Backbone `tiny-3d` (random init, BatchNorm calibrated on the training phantoms, soft-tissue
window — the demo's recipe), three seeds per adapter. Reported per adapter: macro AUC on the
validation split (best epoch) and on the test split, mean ± sd over seeds; trainable parameters;
seconds per epoch. Also the input pipeline: volumes/s reading + preprocessing DICOM vs reading the
tensor cache (`molre.cache`).

Backbone (`--weights`): `demo` (default) = the packaged demo's backbone when its card says it
was pretrained (`molre.training.pretrain`; then the table also reports test macro AUC on the
held-out findings, those the backbone was not pretrained on), else random init; `random`; or a
.safetensors path. The packaged demo is currently not pretrained (docs/training.md, "Pretraining
tiny-3d"), so the default is random init and the numbers measure the pipeline and the relative
cost of the adapters, not an adapter ranking.

    python bench/train_synth.py                 # default size (~5-10 min on 2 shared cores)
    python bench/train_synth.py --count 40 --epochs 1 --seeds 0   # smoke run
Writes bench/results/train_synth.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADAPTERS = {
    "none": dict(adapter="none"),
    "lora-r8": dict(adapter="lora", rank=8, alpha=16.0),
    "lora-r48": dict(adapter="lora", rank=48, alpha=96.0),
    "molre-6x8": dict(adapter="molre", experts=6, rank=8, alpha=16.0),
}


def _msd(v: list[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in v if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def pipeline_throughput(manifest: Path, cache_dir: Path, n: int) -> dict:
    """Volumes/s: DICOM → SeriesVolume → recipe tensor, vs torch.load from the cache."""
    import torch

    from molre.backbones import create_backbone
    from molre.cache import VolumeCache
    from molre.catalog import load_catalog
    from molre.data.manifest import read_manifest
    from molre.data.volume import read_volume
    from molre.demo_checkpoint import DEMO_RECIPE
    from molre.training.loop import _build_recipe

    torch.manual_seed(0)
    recipe = _build_recipe(create_backbone("tiny-3d"), DEMO_RECIPE)
    rows = read_manifest(manifest, load_catalog())[:n]
    t0 = time.perf_counter()
    for r in rows:
        recipe(read_volume(r.path))
    dicom_s = time.perf_counter() - t0
    cache = VolumeCache(cache_dir, recipe)
    rep = cache.build([str(r.path) for r in rows], progress=False)
    t0 = time.perf_counter()
    for r in rows:
        cache.load(rep.paths[str(r.path)])
    cache_s = time.perf_counter() - t0
    return {"volumes": len(rows), "dicom_volumes_per_s": len(rows) / dicom_s,
            "cache_volumes_per_s": len(rows) / cache_s,
            "speedup": dicom_s / cache_s if cache_s > 0 else None}


def _resolve_weights(spec: str) -> tuple[str | None, str, tuple[str, ...]]:
    """(weights path or None, description, findings the backbone was pretrained on)."""
    if spec == "random":
        return None, "tiny-3d (random init seed = run seed, BatchNorm calibrated)", ()
    if spec == "demo":
        demo = ROOT / "molre" / "resources" / "demo"
        card = json.loads((demo / "model.json").read_text(encoding="utf-8"))
        pre = card.get("backbone", {}).get("pretraining")
        if not pre:
            print("packaged demo backbone is not pretrained; using random init", file=sys.stderr)
            return _resolve_weights("random")
        return (str(demo / "backbone.safetensors"),
                "tiny-3d pretrained on synthetic phantoms (packaged demo backbone, frozen)",
                tuple(pre["findings"]))
    from molre.training.pretrain import PRETRAIN_FINDINGS

    return spec, f"tiny-3d weights {spec} (frozen)", PRETRAIN_FINDINGS


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=64, help="synthetic series")
    ap.add_argument("--size", type=int, default=64, help="phantom matrix (px)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_synth.json")
    ap.add_argument("--weights", default="demo",
                    help="frozen backbone weights: 'demo' = the packaged demo's backbone when it "
                         "was pretrained (molre.training.pretrain), 'random' = random init + "
                         "BatchNorm calibration, or a .safetensors path")
    a = ap.parse_args(argv)
    weights, bb_desc, pre_findings = _resolve_weights(a.weights)

    import numpy as np
    import torch

    from molre.data.synth import PHANTOM_FINDINGS, generate_dataset
    from molre.demo_checkpoint import DEMO_RECIPE
    from molre.evaluate import evaluate_arrays, predict_rows, read_rows
    from molre.checkpoint import Predictor
    from molre.training import TrainConfig, train

    tmp = None
    work = a.work
    if work is None:
        tmp = tempfile.mkdtemp(prefix="molre-bench-")
        work = Path(tmp)
    t_all = time.perf_counter()
    try:
        data = work / "synth"
        t0 = time.perf_counter()
        if not (data / "manifest.csv").is_file():
            generate_dataset(data, count=a.count, seed=1234, size=a.size, prevalence=0.3,
                             normal_fraction=0.2, workers=2, overwrite=True, progress=False)
        gen_s = time.perf_counter() - t0
        manifest = data / "manifest.csv"
        cache = work / "cache"
        pipe = pipeline_throughput(manifest, work / "cache_pipe", n=min(12, a.count))
        results = {}
        for name, kw in ADAPTERS.items():
            runs = []
            for seed in a.seeds:
                out = work / "runs" / f"{name}-s{seed}"
                cfg = TrainConfig(backbone="tiny-3d", data=manifest, out=out, epochs=a.epochs,
                                  batch_size=4, lr=a.lr, seed=seed, device="cpu", progress=False,
                                  catalog_keys=list(PHANTOM_FINDINGS), recipe=dict(DEMO_RECIPE),
                                  cache_dir=cache, weights=weights, **kw)
                t0 = time.perf_counter()
                res = train(cfg)
                wall = time.perf_counter() - t0
                hist = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
                card = json.loads((res.best_dir / "model.json").read_text())
                pred = Predictor.from_checkpoint(res.best_dir)
                rows = [r for r in read_rows(manifest, pred.catalog) if r.split == "test"]
                probs, ok, _ = predict_rows(pred, rows, cache_dir=cache, progress=False)
                labels = np.stack([rows[i].labels for i in ok]).astype(np.float64)
                test = evaluate_arrays(labels, probs, pred.catalog, pred.thresholds, n_boot=0)
                held = [k for k in PHANTOM_FINDINGS if k not in pre_findings]
                held_auc = [test["per_finding"][k]["auc"] for k in held
                            if k in test["per_finding"]]
                runs.append({"seed": seed, "val_macro_auc": res.best_val_macro_auc,
                             "test_macro_auc": test["macro_auc"],
                             "test_macro_auc_held_out": _msd(held_auc)[0],
                             "test_auc": {k: v["auc"] for k, v in test["per_finding"].items()},
                             "best_epoch": res.best_epoch,
                             "epoch_seconds": statistics.fmean(h["epoch_seconds"] for h in hist),
                             "train_seconds": wall,
                             "trainable_params": card["adapter"]["trainable_params"]})
                print(f"{name} seed {seed}: val {res.best_val_macro_auc} test {test['macro_auc']}",
                      file=sys.stderr)
            vm, vs = _msd([r["val_macro_auc"] for r in runs])
            tm, ts = _msd([r["test_macro_auc"] for r in runs])
            em, _ = _msd([r["epoch_seconds"] for r in runs])
            hm, hs = _msd([r["test_macro_auc_held_out"] for r in runs])
            results[name] = {"runs": runs, "val_macro_auc_mean": vm, "val_macro_auc_sd": vs,
                             "test_macro_auc_mean": tm, "test_macro_auc_sd": ts,
                             "test_macro_auc_held_out_mean": hm, "test_macro_auc_held_out_sd": hs,
                             "epoch_seconds_mean": em,
                             "trainable_params": runs[0]["trainable_params"]}
        rows_ = read_rows(manifest, __import__("molre.catalog", fromlist=["x"]).load_catalog())
        counts = {s: sum(1 for r in rows_ if r.split == s) for s in ("train", "val", "test")}
        out = {
            "benchmark": "train_synth",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "device": "cpu"},
            "data": {"generator": "molre.data.synth.generate_dataset", "count": a.count,
                     "size": a.size, "seed": 1234, "split_counts": counts,
                     "generate_seconds": round(gen_s, 1), "findings": list(PHANTOM_FINDINGS)},
            "backbone": bb_desc, "pretrain_findings": list(pre_findings),
            "held_out_findings": [k for k in PHANTOM_FINDINGS if k not in pre_findings],
            "recipe": DEMO_RECIPE, "epochs": a.epochs, "seeds": a.seeds, "lr": a.lr,
            "pipeline": pipe, "adapters": results,
            "total_seconds": round(time.perf_counter() - t_all, 1),
        }
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(table(out))
        return out
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def table(res: dict) -> str:
    def f(m, s):
        return "n/a" if m is None else f"{m:.3f} ± {s:.3f}"

    lines = ["| adapter | trainable params | val macro AUC | test macro AUC (all) | "
             "test macro AUC (held-out findings) | s / epoch |",
             "|---|---|---|---|---|---|"]
    for name, r in res["adapters"].items():
        lines.append(f"| {name} | {r['trainable_params']:,} | {f(r['val_macro_auc_mean'], r['val_macro_auc_sd'])} | "
                     f"{f(r['test_macro_auc_mean'], r['test_macro_auc_sd'])} | "
                     f"{f(r.get('test_macro_auc_held_out_mean'), r.get('test_macro_auc_held_out_sd'))} | "
                     f"{r['epoch_seconds_mean']:.1f} |")
    p = res["pipeline"]
    lines.append("")
    lines.append(f"Input pipeline ({p['volumes']} volumes): DICOM+preprocess "
                 f"{p['dicom_volumes_per_s']:.1f} vol/s, cache {p['cache_volumes_per_s']:.1f} vol/s "
                 f"({p['speedup']:.0f}x)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
