"""Data sets of phantoms: findings drawn per series, patients split, a manifest written.

`generate_dataset` writes ``series_NNNN/`` DICOM folders, ``manifest.csv`` (path, patient,
split, site, one column per catalog finding), ``phantoms.jsonl`` (full ground truth: positions,
sizes, geometry, scanner; no names) and, outside the DICOM folders so that `storescu +sd +r` on a
series folder sends only DICOM, ``masks/series_NNNN.npz`` with one boolean voxel mask per planted
finding on the series' own grid.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import MolreError
from common.log import get_logger
from common.procs import process_pool

from .anatomy import sample_anatomy
from .findings import PHANTOM_FINDINGS, check_findings
from .render import _jsonable, _patient_tags, check_shape_args, write_phantom_series
from .sites import check_sites

log = get_logger("molre.data.synth")

MASKS_DIR = "masks"

EDEMA_WITH_MASS = 0.8  # P(vasogenic_edema | intracranial_mass)


def _prevalences(prevalence: float | Mapping[str, float], keys: Sequence[str]) -> dict[str, float]:
    if isinstance(prevalence, Mapping):
        unknown = [k for k in prevalence if k not in PHANTOM_FINDINGS]
        if unknown:
            raise MolreError(
                f"prevalence names unknown finding(s) {unknown}; plantable keys: "
                f"{', '.join(PHANTOM_FINDINGS)}"
            )
        out = {k: float(prevalence.get(k, 0.0)) for k in keys}
    else:
        out = {k: float(prevalence) for k in keys}
    for k, p in out.items():
        if not 0.0 <= p <= 1.0 or math.isnan(p):
            raise MolreError(f"prevalence of {k} is {p}; it must be between 0 and 1")
    return out


def sample_findings(
    rng: np.random.Generator, prevalence: Mapping[str, float], normal_fraction: float = 0.0
) -> tuple[str, ...]:
    """Independent Bernoulli draws per finding, with a share of scans forced normal.

    `prevalence` is the *marginal* rate wanted in the dataset; inside abnormal scans each finding
    is drawn with prevalence / (1 - normal_fraction). Vasogenic edema is tied to masses (most
    masses have it) but keeps its marginal rate by occurring alone sometimes (occult lesion).
    """
    if rng.uniform() < normal_fraction:
        return ()
    scale = 1.0 / max(1e-9, 1.0 - normal_fraction)
    planted = []
    p_cond = {k: min(1.0, p * scale) for k, p in prevalence.items()}
    for k in PHANTOM_FINDINGS:
        u = rng.uniform()  # always draw: keeps the streams aligned whatever the prevalences
        if k not in p_cond:
            continue
        if k == "vasogenic_edema" and "intracranial_mass" in p_cond:
            pm = p_cond["intracranial_mass"]
            pe = p_cond[k]
            if "intracranial_mass" in planted:
                ok = u < EDEMA_WITH_MASS
            else:
                ok = u < float(np.clip((pe - pm * EDEMA_WITH_MASS) / max(1e-9, 1 - pm), 0, 1))
        else:
            ok = u < p_cond[k]
        if ok:
            planted.append(k)
    return tuple(planted)


def _split_patients(
    rng: np.random.Generator, patients: Sequence[int], splits: Sequence[float]
) -> dict[int, str]:
    names = ("train", "val", "test")
    fr = np.asarray(splits, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise MolreError(
            f"splits={tuple(splits)} must be three non-negative fractions (train, val, test)"
        )
    fr = fr / fr.sum()
    order = list(patients)
    rng.shuffle(order)
    n = len(order)
    bounds = np.round(np.cumsum(fr) * n).astype(int)
    out = {}
    for i, p in enumerate(order):
        out[p] = names[min(int(np.searchsorted(bounds, i, side="right")), 2)]
    return out


def _series_job(job: dict[str, Any]) -> dict[str, Any]:
    """Write one series (runs in a worker process); returns a JSON-able summary."""
    anat = sample_anatomy(np.random.default_rng(job["anatomy_seed"]))
    info = write_phantom_series(
        Path(job["out"]) / job["name"],
        np.random.default_rng(job["seed"]),
        job["findings"],
        size=job["size"],
        n_slices=job["n_slices"],
        slice_thickness=job["slice_thickness"],
        anatomy=anat,
        patient=job["patient"],
        site=job["site"],
    )
    if job["masks"] and info.masks:
        save_masks(Path(job["out"]) / MASKS_DIR / f"{job['name']}.npz", info.masks)
    return {"name": job["name"], "patient_id": info.patient_id, **info.to_dict()}


def save_masks(path: Path, masks: Mapping[str, np.ndarray]) -> None:
    """One boolean (z, y, x) array per finding key, bit-packed and compressed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for k, m in masks.items():
        arrays[k] = np.packbits(np.asarray(m, dtype=bool).ravel())
        arrays[f"{k}.shape"] = np.asarray(m.shape, dtype=np.int64)
    np.savez_compressed(path, **arrays)


def load_masks(path: Path | str) -> dict[str, np.ndarray]:
    """Inverse of `save_masks`: finding key -> bool (z, y, x) on the series' own grid."""
    out: dict[str, np.ndarray] = {}
    with np.load(Path(path)) as z:
        for k in z.files:
            if k.endswith(".shape"):
                continue
            shape = tuple(int(n) for n in z[f"{k}.shape"])
            out[k] = np.unpackbits(z[k], count=int(np.prod(shape))).astype(bool).reshape(shape)
    return out


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MolreError(f"synth output {out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MolreError(
                f"synth output folder {out} is not empty; choose an empty folder "
                f"or pass --overwrite to replace the phantoms in it"
            )
        # Remove only what a previous synth run wrote there.
        for child in out.iterdir():
            if child.is_dir() and (child.name.startswith("series_") or child.name == MASKS_DIR):
                shutil.rmtree(child)
            elif child.name in ("manifest.csv", "phantoms.jsonl"):
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate_dataset(
    out: Path | str,
    count: int,
    seed: int,
    size: int | None = 128,
    *,
    prevalence: float | Mapping[str, float] = 0.3,
    normal_fraction: float = 0.25,
    splits: Sequence[float] = (0.6, 0.2, 0.2),
    unlabelled_fraction: float = 0.0,
    workers: int = 1,
    n_slices: int | None = None,
    slice_thickness: float | None = None,
    follow_up_fraction: float = 0.15,
    catalog: Any = None,
    overwrite: bool = False,
    progress: bool = True,
    sites: Sequence[str] | None = None,
    findings: Sequence[str] | None = None,
    masks: bool = True,
) -> Path:
    """Write `count` phantom series under `out` (series_0001/ ...) and `out/manifest.csv`.

    Labels: 1/0 for the findings the phantom can plant, blank (not labelled) for the rest of
    the catalog, and blank everywhere for an `unlabelled_fraction` of series (semi-supervised
    use). Some patients get a follow-up series (same head, new study) so that the split by
    patient matters. `out/phantoms.jsonl` keeps the full ground truth (positions, sizes,
    geometry; no names). The result depends only on the arguments: the same seed gives the same
    labels and pixels, whatever the number of workers.

    `sites` (default: every built-in site) are drawn per series, independently of the findings,
    so prevalence does not depend on the site; `size` None takes each site's matrix.
    `findings` plants exactly those keys in every series (an empty list: every series normal)
    instead of drawing them with `prevalence`. `masks` writes ``masks/series_NNNN.npz``.
    """
    from molre.catalog import load_catalog

    if count < 1:
        raise MolreError(f"synth --count must be at least 1 (got {count})")
    if not 0.0 <= unlabelled_fraction <= 1.0:
        raise MolreError(f"unlabelled_fraction={unlabelled_fraction} must be between 0 and 1")
    if not 0.0 <= normal_fraction < 1.0:
        raise MolreError(f"normal_fraction={normal_fraction} must be in [0, 1)")
    check_shape_args(size, n_slices, slice_thickness)
    site_names = check_sites(sites)
    fixed = None if findings is None else check_findings(list(findings))
    cat = catalog if catalog is not None else load_catalog()
    plantable = [k for k in PHANTOM_FINDINGS if k in cat.keys]
    missing = [k for k in PHANTOM_FINDINGS if k not in cat.keys]
    if missing:
        log.warning("synth.catalog_missing_keys", missing=missing)
    prev = _prevalences(prevalence, plantable)
    out = Path(out)
    _prepare_out(out, overwrite)

    root = np.random.SeedSequence(int(seed))
    plan_seq, *series_seqs = root.spawn(count + 1)
    plan = np.random.default_rng(plan_seq)
    patients: list[int] = []
    patient_of: list[int] = []
    anat_seed: dict[int, int] = {}
    ptags: dict[int, dict[str, Any]] = {}
    n_series: Counter = Counter()
    for i in range(count):
        follow = plan.uniform()
        if patients and follow < follow_up_fraction and n_series[patients[-1]] == 1:
            p = patients[-1]
        else:
            p = len(patients) + 1
            patients.append(p)
            anat_seed[p] = int(plan.integers(2**63 - 1))
            ptags[p] = _patient_tags(plan, p)
        patient_of.append(p)
        n_series[p] += 1
    split_of = _split_patients(plan, patients, splits)
    unlabelled = plan.uniform(size=count) < unlabelled_fraction
    site_of = [site_names[int(i)] for i in plan.integers(0, len(site_names), size=count)]

    jobs = []
    for i, seq in enumerate(series_seqs):
        srng = np.random.default_rng(seq)
        found = sample_findings(srng, prev, normal_fraction)
        if fixed is not None:
            found = fixed
        jobs.append(
            {
                "out": str(out),
                "name": f"series_{i + 1:04d}",
                "seed": int(srng.integers(2**63 - 1)),
                "anatomy_seed": anat_seed[patient_of[i]],
                "findings": found,
                "size": None if size is None else int(size),
                "n_slices": n_slices,
                "slice_thickness": slice_thickness,
                "patient": ptags[patient_of[i]],
                "site": site_of[i],
                "masks": bool(masks),
            }
        )

    results: list[dict[str, Any]] = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = (
        tqdm(total=count, desc="synth", unit="series", disable=None if progress else True)
        if tqdm
        else None
    )
    if workers > 1:
        with process_pool(workers) as ex:
            for r in ex.map(_series_job, jobs, chunksize=max(1, count // (8 * workers))):
                results.append(r)
                if bar:
                    bar.update(1)
    else:
        for job in jobs:
            results.append(_series_job(job))
            if bar:
                bar.update(1)
    if bar:
        bar.close()

    rows = []
    for i, r in enumerate(results):
        labels: dict[str, float | None] = {k: None for k in cat.keys}
        if not unlabelled[i]:
            for k in plantable:
                labels[k] = 1.0 if k in r["findings"] else 0.0
        rows.append(
            {
                "path": r["name"],
                "patient_id": r["patient_id"],
                "split": split_of[patient_of[i]],
                "site": r["site"],
                "labels": labels,
            }
        )
    from molre.data.manifest import write_manifest

    manifest = out / "manifest.csv"
    write_manifest(manifest, rows, cat)
    with open(out / "phantoms.jsonl", "w", encoding="utf-8") as fh:
        for i, r in enumerate(results):
            rec = {k: v for k, v in r.items() if k != "patient_id"}
            rec["split"] = split_of[patient_of[i]]
            rec["labelled"] = not bool(unlabelled[i])
            fh.write(json.dumps(_jsonable(rec)) + "\n")
    counts = Counter(k for r in results for k in r["findings"])
    log.info(
        "synth.done",
        out=str(out),
        series=count,
        patients=len(patients),
        sites=dict(Counter(site_of)),
        normal=sum(1 for r in results if not r["findings"]),
        **{k: counts[k] for k in plantable},
    )
    return manifest


def dataset_summary(out: Path | str) -> dict[str, Any]:
    """Counts per finding / split from a generated folder (reads phantoms.jsonl)."""
    path = Path(out) / "phantoms.jsonl"
    if not path.is_file():
        raise MolreError(f"{path} not found: not a folder written by `molre-node synth`")
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    counts = Counter(k for r in recs for k in r["findings"])
    return {
        "series": len(recs),
        "normal": sum(1 for r in recs if not r["findings"]),
        "files": sum(r["n_files"] for r in recs),
        "splits": dict(Counter(r["split"] for r in recs)),
        "unlabelled": sum(1 for r in recs if not r["labelled"]),
        "sites": dict(Counter(r.get("site", "generic") for r in recs)),
        "findings": {k: counts.get(k, 0) for k in PHANTOM_FINDINGS},
    }
