"""`molre-node evaluate` and `molre-node compare`: AUCs with bootstrap CIs, ROC plots, reports.

evaluate: one checkpoint on the rows of a manifest split → ``metrics.json`` (per-finding AUC with
bootstrap 95 % CI by case, macro AUC, AUC per category, sensitivity / specificity at the card's
thresholds), ``report.md`` (Markdown tables), ``predictions.csv`` (one row per case: probability
and label per finding — what `compare` pairs on) and ``roc/roc_<category>.png``.

compare: several runs on the *same cases* → the paper-style table (adapter type, trainable
parameters, macro AUC with CI, per-category AUC) and a paired bootstrap of Δ macro AUC against
the first run (CI and two-sided p-value); ``compare.md`` + ``compare.json``.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common.errors import MolreError
from common.log import get_logger
from molre.training import metrics as M

__all__ = [
    "evaluate_checkpoint",
    "compare_runs",
    "read_predictions",
    "write_predictions",
    "evaluate_arrays",
    "Predictions",
]

log = get_logger("molre.evaluate")

PRED_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"


def _fmt(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _fmt_ci(v: float | None, lo: float | None, hi: float | None) -> str:
    if v is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


@dataclass
class Predictions:
    """Per-case probabilities and labels (NaN = unlabelled) for the findings `keys`."""

    case_ids: list[str]
    patient_ids: list[str]
    splits: list[str]
    keys: list[str]
    probs: np.ndarray
    labels: np.ndarray


def write_predictions(path: Path, p: Predictions) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["case_id", "patient_id", "split"]
            + [f"prob:{k}" for k in p.keys]
            + [f"label:{k}" for k in p.keys]
        )
        for i, cid in enumerate(p.case_ids):
            probs = [f"{v:.6f}" for v in p.probs[i]]
            labels = ["" if np.isnan(v) else f"{int(v)}" for v in p.labels[i]]
            w.writerow([cid, p.patient_ids[i], p.splits[i]] + probs + labels)


def read_predictions(path: Path) -> Predictions:
    """Read a `predictions.csv` written by evaluate (MolreError naming the file if malformed)."""
    path = Path(path)
    if path.is_dir():
        path = path / PRED_FILE
    if not path.is_file():
        raise MolreError(f"{path} not found; run `molre-node evaluate` first or pass a checkpoint")
    with open(path, newline="", encoding="utf-8") as fh:
        r = csv.reader(fh)
        header = next(r, None)
        if not header or header[:3] != ["case_id", "patient_id", "split"]:
            raise MolreError(f"{path}: line 1 must start with case_id,patient_id,split")
        keys = [h[5:] for h in header if h.startswith("prob:")]
        lkeys = [h[6:] for h in header if h.startswith("label:")]
        if keys != lkeys:
            raise MolreError(f"{path}: prob:/label: columns do not name the same findings")
        ids, pids, splits, probs, labels = [], [], [], [], []
        for n, row in enumerate(r, start=2):
            if len(row) != len(header):
                raise MolreError(f"{path}: line {n}: {len(row)} columns, header has {len(header)}")
            ids.append(row[0])
            pids.append(row[1])
            splits.append(row[2])
            F = len(keys)
            probs.append([float(v) for v in row[3 : 3 + F]])
            labels.append([float(v) if v != "" else np.nan for v in row[3 + F :]])
    return Predictions(
        ids,
        pids,
        splits,
        keys,
        np.asarray(probs, np.float64).reshape(-1, len(keys)),
        np.asarray(labels, np.float64).reshape(-1, len(keys)),
    )


# ----------------------------------------------------------------------------------------------
# metrics from arrays
# ----------------------------------------------------------------------------------------------


def evaluate_arrays(
    labels: np.ndarray,
    probs: np.ndarray,
    catalog: Any,
    thresholds: dict[str, float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """All evaluate metrics from (n, F) labels/probabilities; pure numpy, JSON-ready."""
    keys = list(catalog.keys)
    thresholds = thresholds or {}
    n = labels.shape[0]
    w = M.bootstrap_weights(n, n_boot, seed) if n_boot > 0 and n > 0 else None
    boot = M.bootstrap_aucs(labels, probs, w) if w is not None else None
    per: dict[str, dict] = {}
    aucs: list[float | None] = []
    for f, k in enumerate(keys):
        y = labels[:, f]
        m = ~np.isnan(y)
        npos, nneg = int((y[m] == 1).sum()), int((y[m] == 0).sum())
        a = M.auc(y, probs[:, f])
        lo, hi = (
            M.percentile_ci(boot[:, f], level)
            if (boot is not None and a is not None)
            else (None, None)
        )
        thr = float(thresholds.get(k, 0.5))
        sens, spec = M.sens_spec(y, probs[:, f], thr)
        per[k] = {
            "auc": a,
            "ci_low": lo,
            "ci_high": hi,
            "positives": npos,
            "negatives": nneg,
            "labelled": int(m.sum()),
            "threshold": thr,
            "sensitivity": sens,
            "specificity": spec,
            "category": catalog.get(k).category,
            "note": None if a is not None else "n/a: needs positives and negatives",
        }
        aucs.append(a)
    defined = np.array([i for i, a in enumerate(aucs) if a is not None], dtype=int)
    macro = M.macro(aucs)
    mlo = mhi = None
    if boot is not None and defined.size:
        mlo, mhi = M.percentile_ci(M._nanmean_rows(boot, defined), level)
    cats: dict[str, dict] = {}
    for cat in catalog.categories:
        idx = np.array(
            [
                i
                for i, k in enumerate(keys)
                if catalog.get(k).category == cat and aucs[i] is not None
            ],
            dtype=int,
        )
        v = M.macro([aucs[i] for i in idx]) if idx.size else None
        clo = chi = None
        if boot is not None and idx.size:
            clo, chi = M.percentile_ci(M._nanmean_rows(boot, idx), level)
        cats[cat] = {"auc": v, "ci_low": clo, "ci_high": chi, "n_findings": int(idx.size)}
    return {
        "n_cases": int(n),
        "bootstrap": {"resamples": int(n_boot), "seed": int(seed), "level": level, "unit": "case"},
        "macro_auc": macro,
        "macro_ci_low": mlo,
        "macro_ci_high": mhi,
        "n_findings_with_auc": int(defined.size),
        "per_category": cats,
        "per_finding": per,
    }


# ----------------------------------------------------------------------------------------------
# running a checkpoint over a manifest
# ----------------------------------------------------------------------------------------------


def read_rows(data: str | Path, catalog: Any, manifest_catalog: str | Path | None = None) -> list:
    """Manifest rows with labels in `catalog` order.

    A checkpoint's catalog may be a subset of the catalog the manifest was written for (the demo
    predicts 12 findings; manifests carry all 75 columns): then the manifest is read with the
    site / packaged catalog and the checkpoint's columns are picked out.
    """
    import dataclasses

    from molre.catalog import load_catalog
    from molre.data.manifest import read_manifest

    try:
        return read_manifest(Path(data), catalog)
    except MolreError as exc:
        if "are not findings of catalog" not in str(exc):
            raise
    full = load_catalog(manifest_catalog)
    missing = [k for k in catalog.keys if k not in full]
    if missing:
        raise MolreError(
            f"{data}: the checkpoint predicts findings {missing[:5]} that the "
            f"catalog {full.name!r} used to read the manifest does not know"
        )
    cols = [full.index(k) for k in catalog.keys]
    return [
        dataclasses.replace(r, labels=np.asarray(r.labels)[cols])
        for r in read_manifest(Path(data), full)
    ]


def _select_rows(rows: list, split: str | None) -> list:
    from molre.training.loop import _norm_split

    if split in (None, "", "all"):
        return list(rows)
    want = _norm_split(split)
    return [r for r in rows if _norm_split(getattr(r, "split", None)) == want]


def predict_rows(
    predictor: Any,
    rows: Sequence[Any],
    cache_dir: Path | None = None,
    batch_size: int = 4,
    progress: bool = True,
    workers: int = 0,
) -> tuple[np.ndarray, list[int], dict[str, str]]:
    """Probabilities for manifest rows; returns (probs of the usable rows, their indices, failures)."""
    from tqdm.auto import tqdm

    failures: dict[str, str] = {}
    ok: list[int] = []
    out: list[np.ndarray] = []
    if cache_dir is not None:
        from molre.cache import VolumeCache

        cache = VolumeCache(cache_dir, predictor.recipe)
        rep = cache.build([str(r.path) for r in rows], workers=workers, progress=progress)
        failures.update(rep.failures)
        batch: list[torch.Tensor] = []
        bidx: list[int] = []
        for i, r in enumerate(rows):
            p = rep.paths.get(str(r.path))
            if p is None:
                continue
            x = cache.load(p).float()
            if batch and x.shape != batch[0].shape:  # 2D series differ in slice count
                out.append(predictor.predict_tensor(torch.stack(batch)))
                ok += bidx
                batch, bidx = [], []
            batch.append(x)
            bidx.append(i)
            if len(batch) == batch_size:
                out.append(predictor.predict_tensor(torch.stack(batch)))
                ok += bidx
                batch, bidx = [], []
        if batch:
            out.append(predictor.predict_tensor(torch.stack(batch)))
            ok += bidx
    else:
        from molre.data.volume import read_volume

        for i, r in enumerate(
            tqdm(rows, desc="predict", unit="series", disable=not progress, leave=False)
        ):
            try:
                vol = read_volume(Path(r.path))
                x = predictor.recipe(vol)
            except MolreError as exc:
                failures[str(r.path)] = str(exc)
                log.warning("evaluate.series_skipped", source=str(r.path), reason=str(exc))
                continue
            out.append(predictor.predict_tensor(x))
            ok.append(i)
    probs = np.concatenate(out, 0) if out else np.zeros((0, len(predictor.catalog.keys)))
    return probs, ok, failures


def _roc_plots(
    out: Path, labels: np.ndarray, probs: np.ndarray, catalog: Any, per: dict[str, dict]
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from molre.catalog import CATEGORIES

    files: list[str] = []
    rd = out / "roc"
    rd.mkdir(parents=True, exist_ok=True)
    keys = list(catalog.keys)
    for cat in catalog.categories:
        idx = [
            i
            for i, k in enumerate(keys)
            if catalog.get(k).category == cat and per[k]["auc"] is not None
        ]
        if not idx:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=100)
        for i in idx:
            fpr, tpr, _ = M.roc_curve(labels[:, i], probs[:, i])
            ax.plot(fpr, tpr, lw=1.4, label=f"{keys[i]} ({per[keys[i]]['auc']:.3f})")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"ROC - {CATEGORIES.get(cat, cat)}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        name = f"roc_{cat}.png"
        fig.savefig(rd / name)
        plt.close(fig)
        files.append(f"roc/{name}")
    return files


def _report_md(metrics: dict, card: dict, catalog: Any) -> str:
    from molre.catalog import CATEGORIES

    lines = [
        f"# Evaluation of {card.get('model_name', '?')} ({card.get('model_version', '?')})",
        "",
    ]
    if card.get("is_demo"):
        lines += [f"> {card.get('disclaimer', 'DEMO MODEL - not for clinical use')}", ""]
    lines += [
        f"- checkpoint: `{metrics['checkpoint']}` (hash `{metrics['checkpoint_hash'][:16]}`)",
        f"- data: `{metrics['data']}` split `{metrics['split']}`: {metrics['n_cases']} cases"
        f" ({metrics['n_failed']} could not be read)",
        f"- macro AUC: **{_fmt_ci(metrics['macro_auc'], metrics['macro_ci_low'], metrics['macro_ci_high'])}**"
        f" over {metrics['n_findings_with_auc']} findings with positives and negatives"
        f" (95 % CI: bootstrap by case, {metrics['bootstrap']['resamples']} resamples)",
        "",
        "## AUC per category",
        "",
        "| category | AUC [95 % CI] | findings |",
        "|---|---|---|",
    ]
    for cat, v in metrics["per_category"].items():
        lines.append(
            f"| {CATEGORIES.get(cat, cat)} | {_fmt_ci(v['auc'], v['ci_low'], v['ci_high'])} | {v['n_findings']} |"
        )
    lines += [
        "",
        "## Per finding",
        "",
        "| finding | AUC [95 % CI] | pos | neg | threshold | sensitivity | specificity |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, v in metrics["per_finding"].items():
        if v["labelled"] == 0:
            continue
        lines.append(
            f"| {k} | {_fmt_ci(v['auc'], v['ci_low'], v['ci_high'])} | {v['positives']} | "
            f"{v['negatives']} | {v['threshold']:.3f} | {_fmt(v['sensitivity'])} | {_fmt(v['specificity'])} |"
        )
    unl = [k for k, v in metrics["per_finding"].items() if v["labelled"] == 0]
    if unl:
        lines += ["", f"{len(unl)} findings have no labels in this split and are not listed."]
    return "\n".join(lines) + "\n"


def evaluate_checkpoint(
    checkpoint: str | Path | None,
    data: str | Path,
    out: str | Path,
    split: str | None = "test",
    n_boot: int = 1000,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    weights: str | Path | None = None,
    batch_size: int = 4,
    progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Evaluate a checkpoint on a manifest split and write metrics.json, report.md,
    predictions.csv and ROC plots into `out`. Returns the metrics dict."""
    from molre.checkpoint import Predictor

    out = Path(out)
    t0 = time.perf_counter()
    pred = Predictor.from_checkpoint(checkpoint, device=device, weights=weights)
    catalog = pred.catalog
    rows_all = read_rows(data, catalog)
    rows = _select_rows(rows_all, split)
    if not rows:
        have = sorted({str(getattr(r, "split", "")) for r in rows_all})
        raise MolreError(
            f"{data}: no rows with split={split!r} (splits present: {', '.join(have) or 'none'});"
            " choose one with --split, or --split all"
        )
    probs, ok, failures = predict_rows(
        pred, rows, Path(cache_dir) if cache_dir else None, batch_size=batch_size, progress=progress
    )
    if not ok:
        raise MolreError(
            f"{data}: none of the {len(rows)} series could be read; first reasons: "
            + "; ".join(list(failures.values())[:3])
        )
    used = [rows[i] for i in ok]
    labels = np.stack([np.asarray(r.labels, np.float64) for r in used])
    metrics = evaluate_arrays(labels, probs, catalog, pred.thresholds, n_boot=n_boot, seed=seed)
    card = pred.card
    metrics.update(
        {
            "checkpoint": str(pred.path),
            "checkpoint_hash": pred.checkpoint_hash,
            "model_name": pred.model_name,
            "model_version": pred.model_version,
            "is_demo": pred.is_demo,
            "adapter": card.get("adapter", {}).get("type"),
            "trainable_params": card.get("adapter", {}).get("trainable_params"),
            "backbone": card.get("backbone", {}).get("name"),
            "data": str(data),
            "split": split or "all",
            "n_failed": len(failures),
            "failures": failures,
            "seconds": round(time.perf_counter() - t0, 3),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(
        out / PRED_FILE,
        Predictions(
            [str(r.path) for r in used],
            [str(getattr(r, "patient_id", "")) for r in used],
            [str(getattr(r, "split", "")) for r in used],
            list(catalog.keys),
            probs,
            labels,
        ),
    )
    if plots:
        metrics["roc_plots"] = _roc_plots(out, labels, probs, catalog, metrics["per_finding"])
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / REPORT_FILE).write_text(_report_md(metrics, card, catalog), encoding="utf-8")
    log.info(
        "evaluate.done",
        out=str(out),
        cases=len(used),
        failed=len(failures),
        macro_auc=metrics["macro_auc"],
    )
    return metrics


# ----------------------------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------------------------


def _run_predictions(
    run: Path,
    data: Path | None,
    split: str | None,
    work: Path,
    i: int,
    cache_dir: Path | None,
    device: str,
    n_boot: int,
    seed: int,
    progress: bool,
) -> tuple[Predictions, dict]:
    """(predictions, metrics.json) of a run: an evaluate output dir, or a checkpoint/run dir."""
    if (run / PRED_FILE).is_file() and (run / METRICS_FILE).is_file():
        return read_predictions(run / PRED_FILE), json.loads((run / METRICS_FILE).read_text())
    if data is None:
        raise MolreError(
            f"{run}: has no {PRED_FILE}; pass --data MANIFEST so compare can evaluate "
            "this checkpoint, or give the output directory of `molre-node evaluate`"
        )
    sub = work / f"run{i}"
    evaluate_checkpoint(
        run,
        data,
        sub,
        split=split,
        n_boot=n_boot,
        seed=seed,
        cache_dir=cache_dir,
        device=device,
        progress=progress,
        plots=False,
    )
    return read_predictions(sub / PRED_FILE), json.loads((sub / METRICS_FILE).read_text())


def compare_runs(
    runs: Sequence[str | Path],
    out: str | Path,
    data: str | Path | None = None,
    split: str | None = "test",
    n_boot: int = 1000,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    names: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Paper-style comparison of runs on the same cases (see module docstring)."""
    from molre.catalog import CATEGORIES

    if len(runs) < 1:
        raise MolreError("compare needs at least one run")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preds, mets = [], []
    for i, r in enumerate(runs):
        p, m = _run_predictions(
            Path(r),
            Path(data) if data else None,
            split,
            out,
            i,
            Path(cache_dir) if cache_dir else None,
            device,
            n_boot,
            seed,
            progress,
        )
        preds.append(p)
        mets.append(m)
    # common cases and findings, in the first run's order
    common_ids = set(preds[0].case_ids)
    for p in preds[1:]:
        common_ids &= set(p.case_ids)
    ids = [c for c in preds[0].case_ids if c in common_ids]
    if not ids:
        raise MolreError(
            "the runs share no cases (case_id = series path); evaluate them on the same manifest"
        )
    keys = [k for k in preds[0].keys if all(k in p.keys for p in preds[1:])]
    if not keys:
        raise MolreError("the runs share no findings; they were trained for different catalogs")

    def sub(p: Predictions) -> tuple[np.ndarray, np.ndarray]:
        ri = {c: j for j, c in enumerate(p.case_ids)}
        rows = [ri[c] for c in ids]
        cols = [p.keys.index(k) for k in keys]
        return p.labels[np.ix_(rows, cols)], p.probs[np.ix_(rows, cols)]

    labels, ref = sub(preds[0])
    # categories from the first run's card catalog (through its metrics.json)
    cat_of = {k: mets[0]["per_finding"].get(k, {}).get("category", "other") for k in keys}
    cats = []
    for k in keys:
        if cat_of[k] not in cats:
            cats.append(cat_of[k])
    table = []
    w = M.bootstrap_weights(len(ids), n_boot, seed) if n_boot > 0 else None
    for i, (p, m) in enumerate(zip(preds, mets)):
        lab_i, pr = sub(p)
        per = M.auc_matrix(labels, pr)
        defined = np.array(
            [j for j, a in enumerate(M.auc_matrix(labels, ref)) if a is not None], dtype=int
        )
        macro = M.macro([per[j] for j in defined]) if defined.size else None
        lo = hi = None
        if w is not None and defined.size:
            lo, hi = M.percentile_ci(M._nanmean_rows(M.bootstrap_aucs(labels, pr, w), defined))
        by_cat = {c: M.macro([per[j] for j in defined if cat_of[keys[j]] == c]) for c in cats}
        row = {
            "run": names[i] if names and i < len(names) else str(runs[i]),
            "checkpoint_hash": m.get("checkpoint_hash"),
            "adapter": m.get("adapter"),
            "backbone": m.get("backbone"),
            "trainable_params": m.get("trainable_params"),
            "macro_auc": macro,
            "macro_ci_low": lo,
            "macro_ci_high": hi,
            "auc_by_category": by_cat,
            "n_cases": len(ids),
        }
        if i > 0:
            row["vs_first"] = M.paired_bootstrap(
                labels, ref, pr, n_boot=max(n_boot, 1), seed=seed
            ).to_dict()
        table.append(row)
    result = {
        "cases": len(ids),
        "findings": len(keys),
        "split": split,
        "bootstrap": {"resamples": n_boot, "seed": seed, "unit": "case", "paired": True},
        "categories": cats,
        "runs": table,
    }
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    head = [
        "run",
        "adapter",
        "trainable params",
        "macro AUC [95 % CI]",
        "Δ vs first [95 % CI]",
        "p",
    ] + [CATEGORIES.get(c, c) for c in cats]
    lines = [
        f"# Comparison on {len(ids)} cases, {len(keys)} findings",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in table:
        vs = row.get("vs_first")
        d = "—" if vs is None else _fmt_ci(vs["delta"], vs["ci_low"], vs["ci_high"])
        pv = "—" if vs is None or vs["p_value"] is None else f"{vs['p_value']:.3f}"
        tp = row["trainable_params"]
        lines.append(
            "| "
            + " | ".join(
                [
                    Path(row["run"]).name or row["run"],
                    str(row["adapter"]),
                    f"{tp:,}" if isinstance(tp, int) else "?",
                    _fmt_ci(row["macro_auc"], row["macro_ci_low"], row["macro_ci_high"]),
                    d,
                    pv,
                ]
                + [_fmt(row["auc_by_category"][c]) for c in cats]
            )
            + " |"
        )
    lines += ["", "Δ and p: paired bootstrap over the same resampled cases (two-sided)."]
    (out / "compare.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return result
