"""Rendering one phantom (head + findings + scanner) and writing it as a CT DICOM series.

The generator is split into fixed sub-streams (anatomy, pose, each finding kind, noise, scanner),
so the same generator state with and without a finding gives the same head, pose and noise: the
difference is the finding alone (what the tests use to check each finding, and why the recorded
masks are exact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import MolreError
from common.jsonsafe import jsonable

from .anatomy import Anatomy, RenderContext, render_anatomy, sample_anatomy
from .findings import PHANTOM_FINDINGS, RENDER_ORDER, check_findings, finding_rngs, plan_findings
from .geometry import PhantomGeometry, PlacementError
from .sites import (
    MAX_SIZE,
    MIN_SIZE,
    Site,
    acquire,
    draw_scanner,
    get_site,
    make_geometry,
    site_tags,
)

_UID_PREFIX_ENTROPY = "molre-synth-v1"
_PLACEMENT_TRIES = 5


@dataclass
class PhantomInfo:
    """What `write_phantom_series` wrote and what it planted (the ground truth of one series)."""

    paths: list[Path]
    study_uid: str
    series_uid: str
    patient_id: str
    findings: tuple[str, ...]  # planted catalog keys, in PHANTOM_FINDINGS order
    details: dict[str, dict[str, Any]]  # per planted key: where / how big / how dense
    geometry: PhantomGeometry
    anatomy: Anatomy
    tags: dict[str, Any] = field(default_factory=dict)
    site: str = "generic"
    scanner: dict[str, float] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def labels(self) -> dict[str, int]:
        """1/0 for every key the phantom can plant (keys it cannot plant are unknown)."""
        return {k: int(k in self.findings) for k in PHANTOM_FINDINGS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "findings": list(self.findings),
            "details": _jsonable(self.details),
            "geometry": _jsonable(self.geometry.to_dict()),
            "anatomy": _jsonable(self.anatomy.to_dict()),
            "site": self.site,
            "scanner": _jsonable(self.scanner),
            "n_files": len(self.paths),
        }


def _jsonable(obj: Any) -> Any:
    """Manifest values: plain JSON, floats to 4 decimals."""
    return jsonable(obj, float_digits=4)


def check_shape_args(size: int | None, n_slices: int | None, slice_thickness: float | None) -> None:
    if size is not None and not (MIN_SIZE <= int(size) <= MAX_SIZE):
        raise MolreError(
            f"synthetic phantom: size={size} is outside {MIN_SIZE}..{MAX_SIZE} "
            f"pixels; use e.g. 128 or 512"
        )
    if n_slices is not None and not (1 <= int(n_slices) <= 1000):
        raise MolreError(f"synthetic phantom: slices={n_slices} must be 1..1000")
    if slice_thickness is not None and not (0.5 <= float(slice_thickness) <= 10.0):
        raise MolreError(
            f"synthetic phantom: slice_thickness={slice_thickness} mm must be 0.5..10 mm"
        )


def _plan_and_render(
    rngs: dict[str, np.random.Generator], keys: Sequence[str], geom: PhantomGeometry, anat: Anatomy
) -> tuple[dict[str, dict], RenderContext]:
    plan, mods = plan_findings(rngs, keys, geom, anat)
    ctx = render_anatomy(geom, anat, mods)
    _anatomy_vol = ctx.vol.copy()
    # Order: parenchymal changes first, then lesions on top, then extra-axial and bone.
    for key, paint in RENDER_ORDER:
        if key in plan:
            paint(ctx, plan[key])
    for k, keys_of in _ANATOMY_MODIFIERS.items():
        if k in plan:  # what the modifier changed: the head rendered without it, compared
            without = {m: v for m, v in mods.items() if m not in keys_of}
            ref = render_anatomy(geom, anat, without).vol
            ctx.masks[k] = ref != _anatomy_vol
            plan[k]["voxels"] = int(ctx.masks[k].sum())
    for k, p in plan.items():
        if p.get("voxels", 1) == 0:  # planted but invisible would be a wrong label
            raise PlacementError(
                f"synthetic phantom: {k} fell outside the scanned volume "
                f"({geom.shape[0]} slices of {geom.spacing[0]:g} mm); use more "
                f"slices (--slices)"
            )
    return plan, ctx


#: Findings that change the anatomy itself -> the anatomy modifiers (`plan_findings`) they set.
_ANATOMY_MODIFIERS = {
    "hydrocephalus": ("hydro_factor", "sulcal_mult"),
    "midline_shift": ("shift_mm", "ventricle_side_scale"),
}


@dataclass
class Rendered:
    """One rendered phantom: the scanner image in HU and its ground truth."""

    hu: np.ndarray  # (z, y, x) float32, the acquired image
    geometry: PhantomGeometry
    anatomy: Anatomy
    details: dict[str, dict[str, Any]]  # per planted key: where / how big / how dense
    masks: dict[str, np.ndarray]  # per planted key: bool (z, y, x), the voxels it changed
    site: Site
    scanner: dict[str, float]

    @property
    def findings(self) -> tuple[str, ...]:
        return check_findings(list(self.details))

    def volume(self) -> Any:
        """The `SeriesVolume` the node's reader would assemble from this series written as DICOM
        (a tilted acquisition deskewed onto an orthogonal grid the same way), without writing
        any file: what on-the-fly pretraining feeds to the preprocessing recipe."""
        import math

        from molre.data.volume import SeriesVolume

        g = self.geometry
        dz, dy, dx = g.spacing
        t = math.radians(g.tilt_deg)
        hu = self.hu
        if abs(t) > 1e-9:
            from scipy import ndimage

            fill = float(hu.min())
            hu = np.stack(
                [
                    ndimage.shift(
                        sl, (k * dz * math.sin(t) / dy, 0.0), order=1, mode="constant", cval=fill
                    )
                    for k, sl in enumerate(hu)
                ]
            ).astype(np.float32)
        direction = np.array(
            [[1.0, 0.0, 0.0], [0.0, math.cos(t), math.sin(t)], [0.0, -math.sin(t), math.cos(t)]]
        )
        return SeriesVolume(
            hu=hu,
            spacing=(dz * math.cos(t), dy, dx),
            origin=np.asarray(g.origin, dtype=np.float64),
            direction=direction,
            sop_instance_uids=[],
            series_uid="",
            study_uid="",
        )


def render(
    rng: np.random.Generator,
    findings: Sequence[str] = (),
    *,
    size: int | None = 128,
    n_slices: int | None = None,
    slice_thickness: float | None = None,
    anatomy: Anatomy | None = None,
    noise: bool = True,
    site: str | Site | None = None,
) -> Rendered:
    """Render one phantom with `findings` planted, acquired by `site` (None = neutral scanner).

    `size` None takes the site's matrix; `n_slices` / `slice_thickness` None draw a coverage
    from skull base to vertex and one of the site's slice thicknesses.
    """
    keys = check_findings(findings)
    check_shape_args(size, n_slices, slice_thickness)
    st = site if isinstance(site, Site) else get_site(site)
    seeds = rng.integers(0, 2**63 - 1, size=4)
    anat = anatomy if anatomy is not None else sample_anatomy(np.random.default_rng(seeds[0]))
    for attempt in range(_PLACEMENT_TRIES):
        # A finding that does not fit a short slab gets a new (deterministic) pose.
        pose_rng = np.random.default_rng(seeds[1] if attempt == 0 else [int(seeds[1]), attempt])
        geom = make_geometry(pose_rng, anat, st, size, n_slices, slice_thickness)
        try:
            plan, ctx = _plan_and_render(finding_rngs(int(seeds[2])), keys, geom, anat)
            break
        except PlacementError:
            if attempt == _PLACEMENT_TRIES - 1:
                raise
    scanner = draw_scanner(np.random.default_rng([int(seeds[3]), 1]), st)
    vol = acquire(ctx, st, scanner, np.random.default_rng(seeds[3]) if noise else None)
    details = {
        k: {kk: vv for kk, vv in plan[k].items() if kk not in ("axes_rot", "wobble_dirs", "seed")}
        for k in keys
    }
    masks = {k: ctx.masks[k] for k in keys if k in ctx.masks}
    return Rendered(
        hu=vol, geometry=geom, anatomy=anat, details=details, masks=masks, site=st, scanner=scanner
    )


def render_phantom(
    rng: np.random.Generator,
    findings: Sequence[str] = (),
    *,
    size: int = 128,
    n_slices: int | None = None,
    slice_thickness: float | None = None,
    anatomy: Anatomy | None = None,
    noise: bool = True,
    site: str | None = None,
) -> tuple[np.ndarray, PhantomGeometry, Anatomy, dict[str, dict[str, Any]]]:
    """`render` without the masks: (volume (z, y, x) float32, geometry, anatomy, details)."""
    r = render(
        rng,
        findings,
        size=size,
        n_slices=n_slices,
        slice_thickness=slice_thickness,
        anatomy=anatomy,
        noise=noise,
        site=site,
    )
    return r.hu, r.geometry, r.anatomy, r.details


def _uid(*parts: Any) -> str:
    """Deterministic UID from the generator's draws, so a seed reproduces the same study/series."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[_UID_PREFIX_ENTROPY, *map(str, parts)]))


def _patient_tags(rng: np.random.Generator, number: int) -> dict[str, Any]:
    """Synthetic demographics for one patient (name/ID are obviously synthetic)."""
    age = int(rng.integers(18, 91))
    return {
        "PatientName": f"SYNTH^{number:04d}",
        "PatientID": f"SYNTH-{number:04d}",
        "PatientSex": str(rng.choice(["F", "M"])),
        "_age": age,
    }


def _series_tags(
    rng: np.random.Generator, geom: PhantomGeometry, patient: Mapping[str, Any]
) -> dict[str, Any]:
    """A realistic tag set for one head-CT series; every value is drawn from `rng`."""
    import datetime as dt

    day = dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(0, 6 * 365)))
    hh, mm, ss = int(rng.integers(0, 24)), int(rng.integers(0, 60)), int(rng.integers(0, 60))
    t = f"{hh:02d}{mm:02d}{ss:02d}"
    age = int(patient.get("_age", rng.integers(18, 91)))
    birth = day.replace(year=day.year - age, day=min(day.day, 28))
    date = day.strftime("%Y%m%d")
    thick = geom.slice_thickness
    tags = {k: v for k, v in patient.items() if not k.startswith("_")}
    tags.update(
        {
            "PatientBirthDate": birth.strftime("%Y%m%d"),
            "PatientAge": f"{age:03d}Y",
            "AccessionNumber": f"SY{int(rng.integers(0, 10**10)):010d}",
            "StudyID": str(int(rng.integers(1, 100000))),
            "StudyDescription": "CT HEAD WO CONTRAST",
            "SeriesDescription": f"Axial {thick:g}mm Brain",
            "ProtocolName": "ROUTINE HEAD",
            "BodyPartExamined": "HEAD",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "XRayTubeCurrent": int(rng.integers(180, 360)),
            "ExposureTime": 1000,
            "SeriesNumber": int(rng.integers(2, 6)),
            "InstitutionName": "molre synthetic",
            "PatientPosition": "HFS",
            "WindowCenter": "40",
            "WindowWidth": "80",
            "StudyDate": date,
            "SeriesDate": date,
            "AcquisitionDate": date,
            "ContentDate": date,
            "InstanceCreationDate": date,
            "StudyTime": t,
            "SeriesTime": t,
            "AcquisitionTime": t,
            "ContentTime": t,
            "InstanceCreationTime": t,
        }
    )
    return tags


def write_phantom_series(
    out_dir: Path | str,
    rng: np.random.Generator,
    findings: Sequence[str] = (),
    size: int | None = 128,
    n_slices: int | None = None,
    slice_thickness: float | None = None,
    *,
    anatomy: Anatomy | None = None,
    site: str | Site | None = None,
    patient: Mapping[str, Any] | None = None,
    **tags: Any,
) -> PhantomInfo:
    """Render a phantom with `findings` planted and write it as one CT Image Storage file per slice.

    `site` names the scanner (`molre.data.synth.SITES`; None = the neutral scanner); `size` None
    takes the site's matrix. `n_slices` / `slice_thickness` None draw a realistic coverage (skull
    base to vertex) and one of the site's thicknesses. `**tags` override any DICOM attribute by
    keyword (e.g. PatientID, SeriesDescription). The same generator state reproduces the same
    pixels and UIDs (SOP Instance UIDs are fresh for every write). `anatomy` / `patient` (name,
    ID, sex, age as made by `generate_dataset`) let several series share one synthetic patient.
    The returned info carries the findings' voxel masks (`PhantomInfo.masks`).
    """
    from molre.data.dicomio import write_ct_series

    r = render(
        rng,
        findings,
        size=size,
        n_slices=n_slices,
        slice_thickness=slice_thickness,
        anatomy=anatomy,
        site=site,
    )
    geom = r.geometry
    ids = rng.integers(0, 2**63 - 1, size=2)
    own = _patient_tags(rng, int(rng.integers(1, 10000)))
    all_tags = _series_tags(rng, geom, patient if patient is not None else own)
    all_tags.update(site_tags(r.site, geom))
    all_tags.update(tags)
    # The seed alone fixes anatomy and scanner draws, whatever is planted or which site acquires
    # it: `synth --seed 2 --findings X` and `synth --seed 2 --normal` are the same head, with and
    # without X. Their UIDs must still differ (different pixels under one Series Instance UID
    # would be merged into one series by any PACS or by the node), so what changes the pixels --
    # the site and the planted findings -- goes into the UIDs with the seed's draws.
    what = (r.site.name, *r.findings)
    study_uid = str(all_tags.pop("StudyInstanceUID", None) or _uid("study", ids[0], *what))
    series_uid = str(all_tags.pop("SeriesInstanceUID", None) or _uid("series", ids[1], *what))
    paths = write_ct_series(
        Path(out_dir),
        r.hu,
        spacing=geom.spacing,
        origin=geom.origin,
        direction=geom.direction,
        study_uid=study_uid,
        series_uid=series_uid,
        rescale=(1.0, -1024.0),
        **all_tags,
    )
    return PhantomInfo(
        paths=list(paths),
        study_uid=study_uid,
        series_uid=series_uid,
        patient_id=str(all_tags.get("PatientID", "")),
        findings=r.findings,
        details=r.details,
        geometry=geom,
        anatomy=r.anatomy,
        tags=all_tags,
        site=r.site.name,
        scanner=r.scanner,
        masks=r.masks,
    )
