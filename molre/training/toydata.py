"""Fast, strong-signal toy head CTs for smoke tests of the training pipeline.

Why not `molre.data.synth` here: its phantoms are realistic — findings are small and often nearly
isodense — which is right for demos and benchmarks but means a random-init backbone needs many
epochs before its validation AUC leaves chance level. A test that must show "two short epochs
learn something" needs findings whose strength *we* pick. These heads are analytic ellipsoids
(scalp, skull, brain with noise, ventricles) written as real CT DICOM through the project's
writer (`molre.data.dicomio.write_ct_series`), plus a manifest (`molre.data.manifest`), so the
whole reading / preprocessing / caching path is exercised. Rendering one 64×64×24 series costs
a few milliseconds.

Planted findings (keys of the default catalog):
- ``intraparenchymal_hemorrhage``: a large hyperdense (≈ 80 HU) sphere in the brain;
- ``hydrocephalus``: ventricles enlarged 2–3× (CSF ≈ 5 HU);
- ``intracranial_calcification``: one large, very dense (300–400 HU) calcified lesion.
Nuisance variation (head size, brain density, position) is kept small on purpose.
Not for anything but tests and debugging.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["TOY_FINDINGS", "make_toy_dataset", "render_toy_head"]

TOY_FINDINGS: tuple[str, ...] = (
    "intraparenchymal_hemorrhage",
    "hydrocephalus",
    "intracranial_calcification",
)


def render_toy_head(
    rng: np.random.Generator,
    findings: Sequence[str],
    size: int = 64,
    n_slices: int = 24,
    fov_mm: float = 230.0,
    thickness: float = 5.0,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(HU volume (z, y, x) int16-ranged float32, spacing (z, y, x) mm)."""
    px = fov_mm / size
    z = (np.arange(n_slices) - (n_slices - 1) / 2) * thickness
    y = (np.arange(size) - (size - 1) / 2) * px
    x = (np.arange(size) - (size - 1) / 2) * px
    Z, Y, X = np.meshgrid(z, y, x, indexing="ij")
    ang = rng.uniform(-0.2, 0.2)
    c, s = np.cos(ang), np.sin(ang)
    cx, cy, cz = rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-2, 2)
    U = c * (X - cx) - s * (Y - cy)
    V = s * (X - cx) + c * (Y - cy)
    W = Z - cz
    ax = np.array([72.0, 90.0, 62.0]) * rng.uniform(0.99, 1.01)
    r_outer = np.sqrt((U / ax[0]) ** 2 + (V / ax[1]) ** 2 + (W / ax[2]) ** 2)
    vol = np.full(Z.shape, -1000.0, np.float32)
    head = r_outer < 1.0
    vol[head] = 40.0  # scalp
    skull = r_outer < 1.0 - 4.0 / ax.mean()
    vol[skull] = 1300.0
    brain = r_outer < 1.0 - 11.0 / ax.mean()
    vol[brain] = rng.uniform(34.5, 35.5) + rng.normal(0, 6, size=int(brain.sum()))
    vent_scale = rng.uniform(2.6, 3.0) if "hydrocephalus" in findings else rng.uniform(0.9, 1.15)
    va = np.array([9.0, 22.0, 12.0]) * vent_scale
    vent = ((np.abs(U) - 6 * vent_scale) / va[0]) ** 2 + (V / va[1]) ** 2 + (W / va[2]) ** 2 < 1.0
    vol[vent & brain] = rng.uniform(2, 8)
    if "intraparenchymal_hemorrhage" in findings:
        rad = rng.uniform(30, 36)
        side = rng.choice([-1.0, 1.0])
        ctr = np.array([side * rng.uniform(22, 28), rng.uniform(-20, 20), rng.uniform(-8, 10)])
        blob = ((U - ctr[0]) ** 2 + (V - ctr[1]) ** 2 + (W - ctr[2]) ** 2) < rad**2
        vol[blob & brain] = rng.uniform(85, 95) + rng.normal(0, 4, size=int((blob & brain).sum()))
    if "intracranial_calcification" in findings:
        # one large calcified lesion: dense enough to survive any soft-tissue window
        ctr = np.array([rng.uniform(-20, 20), rng.uniform(-30, 30), rng.uniform(-8, 8)])
        rad = rng.uniform(18, 22)
        spot = ((U - ctr[0]) ** 2 + (V - ctr[1]) ** 2 + (W - ctr[2]) ** 2) < rad**2
        vol[spot & brain] = rng.uniform(300, 400)
    return vol.astype(np.float32), (thickness, px, px)


def make_toy_dataset(
    out: Path | str,
    count: int = 36,
    seed: int = 0,
    size: int = 64,
    n_slices: int = 24,
    prevalence: float = 0.5,
    splits: tuple[float, float, float] = (0.56, 0.33, 0.11),
    unlabelled_fraction: float = 0.0,
) -> Path:
    """Write `count` toy series (one patient each) and `out/manifest.csv`; returns its path.

    Findings are drawn independently with `prevalence`, but each split gets a balanced
    rotation of patterns so that small validation sets still contain positives and negatives.
    `unlabelled_fraction` blanks one finding's label on that share of rows (exercises NaN masks).
    """
    from molre.catalog import load_catalog
    from molre.data.dicomio import write_ct_series
    from molre.data.manifest import write_manifest

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cat = load_catalog()
    rng = np.random.default_rng(seed)
    fr = np.asarray(splits, float) / float(np.sum(splits))
    n_train = int(round(fr[0] * count))
    n_val = int(round(fr[1] * count))
    rows = []
    for i in range(count):
        split = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
        j = i if split == "train" else (i - n_train if split == "val" else i - n_train - n_val)
        # alternate positives/negatives per finding with a random phase: balanced in each split
        found = [
            k
            for f, k in enumerate(TOY_FINDINGS)
            if ((j >> f) & 1) ^ (rng.uniform() < (1 - prevalence) * 0.2)
        ]
        vol, spacing = render_toy_head(rng, found, size=size, n_slices=n_slices)
        name = f"toy_{i + 1:04d}"
        write_ct_series(
            out / name,
            vol,
            spacing=spacing,
            PatientID=f"TOY-{i + 1:04d}",
            PatientName=f"TOY^{i + 1:04d}",
            SeriesDescription="toy head",
            StudyDescription="CT HEAD WO CONTRAST",
            BodyPartExamined="HEAD",
        )
        labels: dict[str, float | None] = {k: None for k in cat.keys}
        for k in TOY_FINDINGS:
            labels[k] = 1.0 if k in found else 0.0
        if unlabelled_fraction and rng.uniform() < unlabelled_fraction:
            labels[TOY_FINDINGS[-1]] = None
        rows.append(
            {"path": out / name, "patient_id": f"TOY-{i + 1:04d}", "split": split, "labels": labels}
        )
    return write_manifest(out / "manifest.csv", rows, cat)


def toy_train_config(manifest: Path, out: Path, cache_dir: Path, **kw) -> "TrainConfig":  # noqa: F821
    """The TrainConfig the smoke tests use on a toy data set (tiny-3d, MoLRE(6, 8), 2 epochs)."""
    from molre.training.loop import TrainConfig

    base = dict(
        backbone="tiny-3d",
        data=manifest,
        out=out,
        adapter="molre",
        experts=6,
        rank=8,
        epochs=2,
        batch_size=4,
        lr=1e-3,
        seed=0,
        device="cpu",
        progress=False,
        catalog_keys=list(TOY_FINDINGS),
        recipe={"hu_range": [0.0, 100.0]},
        cache_dir=cache_dir,
    )
    base.update(kw)
    return TrainConfig(**base)


def ensure_toy_run(base: Path, count: int = 60) -> tuple[Path, Path]:
    """Toy data + one trained run under `base`, built once (marker files make it idempotent,
    so several test modules of one pytest session share them). Returns (manifest, run dir)."""
    from molre.training.loop import train

    base = Path(base)
    manifest = base / "data" / "manifest.csv"
    if not (base / "data.done").exists():
        make_toy_dataset(
            base / "data", count=count, seed=0, splits=(0.55, 0.35, 0.10), unlabelled_fraction=0.15
        )
        (base / "data.done").write_text("ok")
    run = base / "run"
    if not (base / "run.done").exists():
        train(toy_train_config(manifest, run, base / "cache"))
        (base / "run.done").write_text("ok")
    return manifest, run
