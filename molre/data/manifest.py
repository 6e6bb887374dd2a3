"""Training manifests: which scans, which patient, which split, which labels.

A manifest is a CSV file with the columns ``path``, ``patient_id``, ``split`` (train / val /
test) and then one column per catalog finding key holding ``1`` (present), ``0`` (absent) or
blank (not labelled -> NaN, excluded from that finding's loss and AUC). ``path`` is a DICOM
series folder (or single file) or a NIfTI volume (.nii / .nii.gz), relative to the manifest's
folder or absolute.

Why so strict: labels usually come from report extraction scripts, and a typo in a column name
or a stray "yes" would otherwise silently become a missing label. Every problem raises
`MolreError` naming the line and column. Patients appearing in more than one split leak
information between train and test and are refused unless explicitly allowed. Catalog findings
without a column are allowed (all NaN) so partially labelled data sets can be used.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import MolreError
from molre.catalog import Catalog
from molre.data.volume import SeriesVolume, read_volume

SPLITS = ("train", "val", "test")
BASE_COLUMNS = ("path", "patient_id", "split")
#: Optional descriptive columns (not findings): ``site`` names the scanner / centre of a scan
#: (what `molre-node synth` writes; used to report results and expert usage per site).
META_COLUMNS = ("site",)
_TRUE = {"1", "1.0"}
_FALSE = {"0", "0.0"}


@dataclass
class ManifestRow:
    """One scan: absolute path, patient, split and labels (F,) float32 with NaN = not labelled."""

    path: Path
    patient_id: str
    split: str
    labels: np.ndarray
    site: str = ""

    def volume(self, **kwargs: Any) -> SeriesVolume:
        return read_volume(self.path, **kwargs)

    def label_dict(self, catalog: Catalog) -> dict[str, float]:
        return {k: float(v) for k, v in zip(catalog.keys, self.labels, strict=True)}


def _parse_label(value: str, where: str) -> float:
    v = value.strip()
    if v == "":
        return math.nan
    if v in _TRUE:
        return 1.0
    if v in _FALSE:
        return 0.0
    raise MolreError(f"{where}: label {value!r} is not 1, 0 or blank (blank = not labelled)")


def read_manifest(
    path: Path | str,
    catalog: Catalog,
    *,
    check_paths: bool = True,
    allow_patient_overlap: bool = False,
) -> list[ManifestRow]:
    """Parse and validate a manifest CSV against ``catalog`` (see the module docstring)."""
    mpath = Path(path)
    try:
        text = mpath.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise MolreError(f"cannot read manifest {mpath}: {exc}") from exc
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise MolreError(
            f"{mpath}: empty manifest; the first line must be the header "
            f"{','.join(BASE_COLUMNS)},<finding keys...>"
        ) from None
    missing = [c for c in BASE_COLUMNS if c not in header]
    if missing:
        raise MolreError(
            f"{mpath}: line 1: missing column(s) {', '.join(missing)}; the header "
            f"must contain {', '.join(BASE_COLUMNS)} and finding keys"
        )
    dups = sorted({h for h in header if header.count(h) > 1})
    if dups:
        raise MolreError(f"{mpath}: line 1: duplicate column(s) {', '.join(dups)}")
    findings = [h for h in header if h not in BASE_COLUMNS and h not in META_COLUMNS]
    unknown = [h for h in findings if h not in catalog]
    if unknown:
        shown = ", ".join(repr(u) for u in unknown)
        raise MolreError(
            f"{mpath}: line 1: column(s) {shown} are not "
            f"findings of catalog {catalog.name!r}; rename them to catalog keys "
            "(see docs/catalog.md) or remove them"
        )
    col_index = {h: i for i, h in enumerate(header)}
    finding_pos = [(catalog.index(h), col_index[h]) for h in findings]
    base = mpath.parent
    rows: list[ManifestRow] = []
    first_line: dict[str, tuple[int, str]] = {}
    for values in reader:
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise MolreError(
                f"{mpath}: line {line}: {len(values)} values for {len(header)} columns"
            )
        raw_path = values[col_index["path"]].strip()
        patient = values[col_index["patient_id"]].strip()
        split = values[col_index["split"]].strip().lower()
        if not raw_path:
            raise MolreError(f"{mpath}: line {line}, column path: empty")
        if not patient:
            raise MolreError(
                f"{mpath}: line {line}, column patient_id: empty (needed to keep a "
                "patient's scans in one split)"
            )
        if split not in SPLITS:
            raise MolreError(
                f"{mpath}: line {line}, column split: {split!r} is not one of {', '.join(SPLITS)}"
            )
        p = Path(raw_path)
        p = p if p.is_absolute() else base / p
        if check_paths and not p.exists():
            raise MolreError(
                f"{mpath}: line {line}, column path: {raw_path} does not exist "
                f"(relative paths are resolved against {base})"
            )
        labels = np.full(len(catalog), np.nan, np.float32)
        for out_i, col_i in finding_pos:
            labels[out_i] = _parse_label(
                values[col_i], f"{mpath}: line {line}, column {header[col_i]}"
            )
        if patient in first_line and first_line[patient][1] != split and not allow_patient_overlap:
            other_line, other_split = first_line[patient]
            raise MolreError(
                f"{mpath}: line {line}: the patient of line {other_line} "
                f"({other_split}) appears again in {split}; keep each patient in "
                "one split to avoid leakage"
            )
        first_line.setdefault(patient, (line, split))
        site = values[col_index["site"]].strip() if "site" in col_index else ""
        rows.append(ManifestRow(path=p, patient_id=patient, split=split, labels=labels, site=site))
    if not rows:
        raise MolreError(f"{mpath}: no rows after the header")
    return rows


def _labels_of(row: Any, catalog: Catalog, where: str) -> np.ndarray:
    labels = row["labels"] if isinstance(row, Mapping) else row.labels
    if isinstance(labels, Mapping):
        unknown = [k for k in labels if k not in catalog]
        if unknown:
            raise MolreError(f"{where}: unknown finding key(s) {', '.join(unknown)}")
        arr = np.full(len(catalog), np.nan, np.float32)
        for k, v in labels.items():
            arr[catalog.index(k)] = np.nan if v is None else float(v)
        return arr
    arr = np.asarray(labels, dtype=np.float32)
    if arr.shape != (len(catalog),):
        raise MolreError(
            f"{where}: labels have shape {arr.shape}, catalog has {len(catalog)} findings"
        )
    return arr


def _fmt(v: float, where: str) -> str:
    if math.isnan(v):
        return ""
    if v in (0.0, 1.0):
        return str(int(v))
    raise MolreError(f"{where}: label {v!r} is not 0, 1 or NaN")


def write_manifest(
    path: Path | str,
    rows: Iterable[ManifestRow | Mapping[str, Any]],
    catalog: Catalog,
) -> Path:
    """Write rows (ManifestRow or dicts with path/patient_id/split/labels) as a manifest CSV.

    ``labels`` may be an array in catalog order or a ``{key: 1/0/None}`` dict. Paths inside the
    manifest's folder are written relative to it, so a data set folder can be moved as a whole.
    """
    mpath = Path(path)
    mpath.parent.mkdir(parents=True, exist_ok=True)
    base = mpath.parent.resolve()
    out_rows: list[list[str]] = []
    rows = list(rows)
    sites = [
        str((r.get("site") if isinstance(r, Mapping) else getattr(r, "site", "")) or "")
        for r in rows
    ]
    with_site = any(sites)
    for i, row in enumerate(rows):
        where = f"manifest row {i + 1}"
        get = row.get if isinstance(row, Mapping) else lambda k, r=row: getattr(r, k)
        p = Path(get("path"))
        split = str(get("split")).lower()
        if split not in SPLITS:
            raise MolreError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        patient = str(get("patient_id"))
        if not patient:
            raise MolreError(f"{where}: empty patient_id")
        if p.is_absolute():
            try:
                rel = p.resolve().relative_to(base)
                p_text = rel.as_posix()
            except ValueError:
                p_text = str(p)
        else:
            p_text = p.as_posix()
        labels = _labels_of(row, catalog, where)
        out_rows.append(
            [
                p_text,
                patient,
                split,
                *([sites[i]] if with_site else []),
                *(
                    _fmt(float(v), f"{where}, column {k}")
                    for k, v in zip(catalog.keys, labels, strict=True)
                ),
            ]
        )
    tmp = mpath.with_name(mpath.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow([*BASE_COLUMNS, *(["site"] if with_site else []), *catalog.keys])
        writer.writerows(out_rows)
    os.replace(tmp, mpath)
    return mpath


def split_rows(rows: Sequence[ManifestRow], split: str) -> list[ManifestRow]:
    return [r for r in rows if r.split == split]


__all__ = [
    "BASE_COLUMNS",
    "SPLITS",
    "ManifestRow",
    "read_manifest",
    "read_volume",
    "split_rows",
    "write_manifest",
]
