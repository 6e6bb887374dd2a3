"""Series shaped like what real scanners send, for the reader and the node (issue 12).

`write_ge_stepped_head` reproduces a GE two-part head protocol: 14 slices at 4 mm (posterior
fossa), then 14 at 7 mm, gantry tilt +18.5 degrees (the image plane is tilted, the table moves
along z, so slice positions are not along the slice normal), padding outside the reconstruction
circle stored as -1500 HU; the 7 mm block starts 4 mm after the last 4 mm slice (so 14 of the
27 steps are 4 mm: a reader taking the median step sees 13 "gaps"). Every file is a plain CT Image Storage object written by
`molre.data.dicomio.write_ct_series` (one call per acquisition block); SliceThickness is the
block's own (4 or 7 mm).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from molre.data import dicomio

TILT_DEG = 18.5
PADDING_HU = -1500.0


@dataclass
class SteppedSeries:
    paths: list[Path]
    study_uid: str
    series_uid: str
    blocks: list[tuple[int, float]] = field(default_factory=list)  # (slices, table step mm)
    tilt_deg: float = TILT_DEG


def _head(
    points: np.ndarray, centre: np.ndarray, fov_mask: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """HU of a crude head (air, bone shell, brain, a dense 'bleed') at LPS points (..., 3)."""
    rel = (points - centre) / np.array([75.0, 95.0, 80.0])
    r = np.sqrt((rel**2).sum(axis=-1))
    hu = np.full(r.shape, -1000.0, np.float32)
    hu[r < 1.0] = 1100.0
    hu[r < 0.9] = 32.0
    bleed = np.sqrt((((points - centre - np.array([30.0, -10.0, 20.0])) / 12.0) ** 2).sum(axis=-1))
    hu[bleed < 1.0] = 70.0
    hu += rng.normal(0, 3, hu.shape).astype(np.float32)
    hu[~fov_mask] = PADDING_HU
    return hu


def write_ge_stepped_head(
    out: Path,
    *,
    size: int = 64,
    pixel_mm: float = 3.6,
    blocks: tuple[tuple[int, float], ...] = ((14, 4.0), (14, 7.0)),
    tilt_deg: float = TILT_DEG,
    seed: int = 0,
    **tags: object,
) -> SteppedSeries:
    """Write the stepped, tilted series into `out` (flat folder, IM00001.dcm ...)."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = np.radians(tilt_deg)
    # rows along x; columns tilted in the y-z plane; the table (slice positions) moves along z
    direction = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)], [0.0, 0.0, 1.0]])
    half = size * pixel_mm / 2
    jj, ii = np.mgrid[0:size, 0:size].astype(np.float64)
    fov_mask = (ii - (size - 1) / 2) ** 2 + (jj - (size - 1) / 2) ** 2 <= ((size - 1) / 2) ** 2
    extent = sum((n - 1) * step for n, step in blocks) + sum(step for _, step in blocks[:-1])
    centre = np.array([0.0, 0.0, extent * 0.55])
    study_uid, series_uid = str(dicomio.new_uid()), str(dicomio.new_uid())
    all_tags: dict[str, object] = {
        "Manufacturer": "GE MEDICAL SYSTEMS",
        "ManufacturerModelName": "Revolution",
        "GantryDetectorTilt": f"{tilt_deg:g}",
        "ConvolutionKernel": "STANDARD",
        "SeriesDescription": "HEAD 4/7mm",
        "ProtocolName": "ROUTINE HEAD",
        "ScanOptions": "AXIAL MODE",
    }
    all_tags.update(tags)
    paths: list[Path] = []
    z0, number = 0.0, 1
    for b, (n, step) in enumerate(blocks):
        if b:
            z0 += blocks[b - 1][1]  # the next block starts one step of the previous block on
        origin = np.array([-half, -half * np.cos(t), z0 + half * np.sin(t)])
        vol = np.empty((n, size, size), np.float32)
        for k in range(n):
            pos = origin + k * step * direction[2]
            pts = (
                pos
                + ii[..., None] * pixel_mm * direction[0]
                + jj[..., None] * pixel_mm * direction[1]
            )
            vol[k] = _head(pts, centre, fov_mask, rng)
        tmp = out / f".block{b}"
        written = dicomio.write_ct_series(
            tmp,
            vol,
            spacing=(step, pixel_mm, pixel_mm),
            origin=origin,
            direction=direction,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_numbers=list(range(number, number + n)),
            **all_tags,
        )
        for p in written:
            dest = out / f"IM{number:05d}.dcm"
            shutil.move(str(p), dest)
            paths.append(dest)
            number += 1
        shutil.rmtree(tmp)
        z0 += (n - 1) * step
    return SteppedSeries(paths, study_uid, series_uid, list(blocks), tilt_deg)


__all__ = ["PADDING_HU", "TILT_DEG", "SteppedSeries", "write_ge_stepped_head"]
