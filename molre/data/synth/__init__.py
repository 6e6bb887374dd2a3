"""Synthetic head-CT phantoms from several simulated sites, written as real CT DICOM series.

Why: the node, the trainer and the tests need head CTs with *known* findings, and no clinical
data can be shipped or downloaded here. The package is split by concept:

- `anatomy`  — the synthetic patient (head shape, tissues) rendered in HU;
- `findings` — the 12 plantable findings: placement, painting, and their voxel masks;
- `sites`    — scanners and protocols that differ in the pixels (kernel, thickness, noise,
               calibration, beam hardening, field of view, gantry tilt) and in their tags;
- `geometry` — the scanner grid (sheared when the gantry is tilted) and the head pose;
- `render`   — one phantom: render, acquire, write as DICOM;
- `dataset`  — data sets with labels, splits, manifest, ground truth and masks.

Everything is driven by `numpy.random.Generator` streams, so a seed reproduces the same labels
and pixels. This is a test and development instrument, not a substitute for clinical
validation: see docs/synthetic-data.md.
"""

from .anatomy import Anatomy, sample_anatomy
from .dataset import (
    EDEMA_WITH_MASS,
    MASKS_DIR,
    _prevalences,
    dataset_summary,
    generate_dataset,
    load_masks,
    sample_findings,
    save_masks,
)
from .findings import PHANTOM_FINDINGS, check_findings
from .geometry import PhantomGeometry, PlacementError
from .render import PhantomInfo, Rendered, render, render_phantom, write_phantom_series
from .sites import (
    GENERIC,
    MAX_SIZE,
    MIN_SIZE,
    SITES,
    SLICE_THICKNESSES,
    Site,
    check_sites,
    get_site,
)

__all__ = [
    "Anatomy",
    "EDEMA_WITH_MASS",
    "GENERIC",
    "MASKS_DIR",
    "MAX_SIZE",
    "MIN_SIZE",
    "PHANTOM_FINDINGS",
    "PhantomGeometry",
    "PhantomInfo",
    "PlacementError",
    "Rendered",
    "SITES",
    "SLICE_THICKNESSES",
    "Site",
    "check_findings",
    "check_sites",
    "dataset_summary",
    "generate_dataset",
    "get_site",
    "load_masks",
    "render",
    "render_phantom",
    "sample_anatomy",
    "sample_findings",
    "save_masks",
    "write_phantom_series",
    "_prevalences",
]
