"""Synthetic head-CT phantoms written as real CT DICOM series.

Why: the node, the trainer and the tests need head CTs with *known* findings, and no clinical
data can be shipped or downloaded here. A phantom is an analytic head (scalp, skull with diploe,
CSF, grey/white matter with a folded cortex, deep grey nuclei, ventricles, cisterns) rendered in
Hounsfield units on a scanner grid, into which findings are planted with random size, contrast
and position. Everything is vectorised numpy so that a 128 x 128 x 32 series costs a fraction of
a second, and everything is driven by one `numpy.random.Generator`, so a seed reproduces the
same labels and the same pixels.

Coordinates: the scanner (patient LPS) frame is x = patient left, y = posterior, z = superior,
in mm. The anatomy lives in its own frame (u, v, w) = (left, posterior, superior) centred on the
head; a rotation (yaw in-plane, pitch = head flexion, small roll) and an offset place it in the
scanner. Volumes are indexed (z, y, x) with slice 0 the most inferior.

This is a test and development instrument, not a substitute for clinical validation: see
docs/synthetic-data.md.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from molre.errors import MolreError
from molre.log import get_logger

log = get_logger(__name__)

# Catalog keys the phantom can plant (docs/architecture.md, "molre.catalog").  Order matters:
# it fixes the per-finding random streams, so changing it changes every generated dataset.
PHANTOM_FINDINGS: tuple[str, ...] = (
    "intraparenchymal_hemorrhage",
    "subdural_hemorrhage",
    "epidural_hematoma",
    "intraventricular_hemorrhage",
    "subarachnoid_hemorrhage",
    "acute_infarct",
    "skull_fracture",
    "hydrocephalus",
    "midline_shift",
    "intracranial_calcification",
    "intracranial_mass",
    "vasogenic_edema",
)

SLICE_THICKNESSES: tuple[float, ...] = (2.5, 3.0, 4.0, 5.0)
MIN_SIZE, MAX_SIZE = 32, 512
MIN_PIXEL, MAX_PIXEL = 0.45, 1.8
_UID_PREFIX_ENTROPY = "molre-synth-v1"
_PLACEMENT_TRIES = 5


class _PlacementError(MolreError):
    """A drawn finding does not fit the scanned slab (raised after the last pose retry)."""


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anatomy:
    """Patient-specific shape and tissue values (shared by all series of one synthetic patient)."""

    head_axes: tuple[float, float, float]  # outer head ellipsoid semi-axes (u, v, w) mm
    scalp: float  # mm
    skull: float  # mm
    csf_rim: float  # mm of subarachnoid CSF over the convexity
    cortex: float  # grey ribbon thickness mm
    sulcal_half_width: float  # mm; larger = more atrophy
    sulcal_depth: float  # mm
    ventricle_scale: float  # 1 = average adult
    grey_hu: float
    white_hu: float
    deep_grey_hu: float
    csf_hu: float
    scalp_hu: float
    fat_hu: float
    cortical_bone_hu: float
    diploe_hu: float
    fold_k: tuple[tuple[float, float, float], ...]  # cortical folding wave vectors (rad/mm)
    fold_phase: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PhantomGeometry:
    """Where the voxels are and where the anatomy sits in them (all mm, LPS)."""

    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (z, y, x)
    origin: tuple[float, float, float]  # (x, y, z) of voxel (0, 0, 0)
    head_center: tuple[float, float, float]  # (x, y, z)
    rotation: tuple[tuple[float, float, float], ...]  # 3x3, anatomical -> scanner
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    slice_thickness: float
    noise_sigma: float

    @property
    def direction(self) -> np.ndarray:
        """Rows = unit vectors of the x / y / z voxel axes in LPS (axial, identity)."""
        return np.eye(3)

    def to_world(self, uvw: np.ndarray) -> np.ndarray:
        """Anatomical (u, v, w) mm -> scanner (x, y, z) mm; accepts (..., 3)."""
        r = np.asarray(self.rotation)
        return np.asarray(uvw, dtype=float) @ r.T + np.asarray(self.head_center)

    def to_anatomical(self, xyz: np.ndarray) -> np.ndarray:
        r = np.asarray(self.rotation)
        return (np.asarray(xyz, dtype=float) - np.asarray(self.head_center)) @ r

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Scanner (x, y, z) mm -> fractional voxel index (z, y, x)."""
        xyz = np.asarray(xyz, dtype=float)
        o = np.asarray(self.origin)
        dz, dy, dx = self.spacing
        rel = xyz - o
        return np.stack([rel[..., 2] / dz, rel[..., 1] / dy, rel[..., 0] / dx], axis=-1)

    def index_to_world(self, zyx: np.ndarray) -> np.ndarray:
        zyx = np.asarray(zyx, dtype=float)
        dz, dy, dx = self.spacing
        return np.stack([self.origin[0] + zyx[..., 2] * dx, self.origin[1] + zyx[..., 1] * dy,
                         self.origin[2] + zyx[..., 0] * dz], axis=-1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhantomGeometry:
        """Inverse of `to_dict` (e.g. from `phantoms.jsonl`), to locate findings in pixels."""
        tup = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        tup["rotation"] = tuple(tuple(r) for r in d["rotation"])
        tup["shape"] = tuple(int(n) for n in d["shape"])
        return cls(**{**d, **tup})


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
            "n_files": len(self.paths),
        }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return round(float(obj), 4)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------------------------
# Random anatomy and pose
# --------------------------------------------------------------------------------------------


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one synthetic patient's head: size, layer thicknesses, tissue densities, folding."""
    head = (rng.uniform(68, 79), rng.uniform(87, 99), rng.uniform(80, 92))
    grey = rng.uniform(35.0, 41.0)
    white = grey - rng.uniform(7.0, 11.0)
    n_waves = 9
    dirs = rng.normal(size=(n_waves, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    lam = rng.uniform(16.0, 26.0, size=n_waves)
    ks = dirs * (2 * np.pi / lam)[:, None]
    age_atrophy = rng.uniform(0.0, 1.0) ** 2  # most patients young-ish, some atrophic
    return Anatomy(
        head_axes=tuple(float(h) for h in head),
        scalp=float(rng.uniform(4.0, 7.0)),
        skull=float(rng.uniform(5.0, 9.0)),
        csf_rim=float(rng.uniform(1.2, 2.2) + 1.5 * age_atrophy),
        cortex=float(rng.uniform(2.5, 3.5)),
        sulcal_half_width=float(0.6 + 1.2 * age_atrophy),
        sulcal_depth=float(rng.uniform(9.0, 14.0)),
        ventricle_scale=float(rng.uniform(0.85, 1.1) + 0.35 * age_atrophy),
        grey_hu=float(grey),
        white_hu=float(white),
        deep_grey_hu=float(grey - rng.uniform(0.0, 3.0)),
        csf_hu=float(rng.uniform(2.0, 8.0)),
        scalp_hu=float(rng.uniform(30.0, 50.0)),
        fat_hu=float(rng.uniform(-100.0, -70.0)),
        cortical_bone_hu=float(rng.uniform(1200.0, 1800.0)),
        diploe_hu=float(rng.uniform(400.0, 750.0)),
        fold_k=tuple(tuple(float(c) for c in k) for k in ks),
        fold_phase=tuple(float(p) for p in rng.uniform(0, 2 * np.pi, size=n_waves)),
    )


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Anatomical -> scanner rotation: yaw about z (in-plane), pitch about x, roll about y."""
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    ry = np.array([[cr, 0, sr], [0, 1, 0], [-sr, 0, cr]])
    return rz @ rx @ ry


def _floor_w(v: np.ndarray | float, ax: tuple[float, float, float]) -> np.ndarray | float:
    """Skull-base height (w) under the cranial cavity: higher anteriorly, low posterior fossa."""
    hv, hw = ax[1], ax[2]
    t = np.clip((np.asarray(v) + 0.3 * hv) / hv, 0.0, 1.0)
    return -hw * (0.30 + 0.30 * t)


def _make_geometry(rng: np.random.Generator, anat: Anatomy, size: int, n_slices: int | None,
                   slice_thickness: float | None) -> PhantomGeometry:
    hu_, hv, hw = anat.head_axes
    dz = float(slice_thickness) if slice_thickness else float(rng.choice(SLICE_THICKNESSES))
    # The field of view is chosen from the head size, as a technologist would; the pixel size
    # then follows from the matrix (clipped to what scanners produce).
    fov = 2.0 * hv * rng.uniform(1.12, 1.28)
    px = max(fov / size, MIN_PIXEL)
    if size >= 128:  # small test matrices keep the whole head with coarser pixels
        px = min(px, MAX_PIXEL)
    px = float(px)
    fov = px * size
    yaw = math.radians(rng.uniform(-12, 12))
    pitch = math.radians(rng.uniform(-10, 10))
    roll = math.radians(rng.uniform(-3, 3))
    rot = _rotation(yaw, pitch, roll)
    # In-plane half-extent of the rotated head, to keep it inside the FOV.
    ext = np.sqrt(((rot[:2] * np.array(anat.head_axes)) ** 2).sum(axis=1))  # x, y half extents
    room = np.maximum(fov / 2 - ext - 3.0, 0.0)
    off = rng.uniform(-1, 1, size=2) * np.minimum(room, 0.06 * fov)
    table_z = rng.uniform(-80.0, 80.0)
    center = (float(off[0]), float(off[1]), float(table_z))
    # Coverage from just below the skull base to just above the vertex (scanner z).
    lo = np.array([0.0, 0.3 * hv, -0.62 * hw - 4.0]) @ rot.T
    top_z = math.sqrt((rot[2] * np.array(anat.head_axes)) @ (rot[2] * np.array(anat.head_axes)))
    z_lo, z_hi = table_z + lo[2], table_z + top_z + 4.0
    if n_slices is None:
        n = max(1, int(math.ceil((z_hi - z_lo) / dz)))
    else:
        n = int(n_slices)
    z_mid = 0.5 * (z_lo + z_hi) if n_slices is None else table_z + 0.5 * (lo[2] + 0.75 * top_z)
    z0 = z_mid - 0.5 * (n - 1) * dz
    origin = (-fov / 2 + px / 2, -fov / 2 + px / 2, float(z0))
    return PhantomGeometry(
        shape=(n, size, size), spacing=(dz, px, px), origin=tuple(float(o) for o in origin),
        head_center=center, rotation=tuple(tuple(float(c) for c in row) for row in rot),
        yaw_deg=math.degrees(yaw), pitch_deg=math.degrees(pitch), roll_deg=math.degrees(roll),
        slice_thickness=dz, noise_sigma=float(rng.uniform(3.0, 8.0)),
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _ellipsoid_depth(u, v, w, axes) -> np.ndarray:
    """Approximate signed distance (mm) *inside* an ellipsoid (positive inside).

    First-order: (1 - r) / |grad r| with r the normalised radius. Exact on the surface and good
    to a few per cent within ~30 mm of it, which is all the layered head needs.
    """
    a, b, c = axes
    qu, qv, qw = u / a, v / b, w / c
    r = np.sqrt(qu * qu + qv * qv + qw * qw)
    g = np.sqrt((qu / a) ** 2 + (qv / b) ** 2 + (qw / c) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(g > 1e-9, (1.0 - r) * r / np.maximum(g, 1e-9), min(axes))
    return d.astype(np.float32, copy=False)


def _in_ellipsoid(u, v, w, center, semi, angle=0.0) -> np.ndarray:
    du, dv, dw = u - center[0], v - center[1], w - center[2]
    if angle:
        ca, sa = math.cos(angle), math.sin(angle)
        du, dv = ca * du + sa * dv, -sa * du + ca * dv
    return (du / semi[0]) ** 2 + (dv / semi[1]) ** 2 + (dw / semi[2]) ** 2 <= 1.0


def _fold_field(anat: Anatomy, u, v, w) -> np.ndarray:
    """Sum of random plane waves; its zero set is a convoluted, gyrus-like surface."""
    f = np.zeros(np.shape(u), dtype=np.float32)
    for k, ph in zip(anat.fold_k, anat.fold_phase):
        f += np.cos(k[0] * u + k[1] * v + k[2] * w + ph, dtype=np.float32)
    return f * np.float32(math.sqrt(2.0 / len(anat.fold_phase)))


def _fold_gradient_scale(anat: Anatomy) -> float:
    """RMS |grad F| (per mm) so that |F| < eps maps to a band of known width in mm."""
    k2 = np.mean([kx * kx + ky * ky + kz * kz for kx, ky, kz in anat.fold_k])
    return float(math.sqrt(k2))


@dataclass
class _Ctx:
    """Per-render working arrays (all (z, y, x), float32 / bool)."""

    geom: PhantomGeometry
    anat: Anatomy
    vol: np.ndarray
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    u: np.ndarray
    v: np.ndarray
    w: np.ndarray
    us: np.ndarray  # u after midline shift (deep structures)
    depth: np.ndarray  # from the outer scalp surface
    d_in: np.ndarray  # from the inner table
    brain_depth: np.ndarray
    cavity: np.ndarray
    brain: np.ndarray
    skull: np.ndarray
    grey: np.ndarray
    white: np.ndarray
    deep_grey: np.ndarray
    ventricles: np.ndarray
    sulci: np.ndarray  # sulcal + fissural + cisternal CSF inside the brain envelope
    fold: np.ndarray


def _shift_profile(v, w, mm: float) -> np.ndarray:
    """Midline displacement (mm along u): maximal at the septum, zero at the vertex and base."""
    return (mm * np.exp(-((v - 0.0) ** 2) / (2 * 45.0**2) - ((w - 8.0) ** 2) / (2 * 28.0**2))
            ).astype(np.float32)


_Ellipsoid = tuple[tuple[float, float, float], tuple[float, float, float], float]


def _ventricle_parts(vw: float, vh: float,
                     side_scale: Mapping[str, float] | None = None) -> list[_Ellipsoid]:
    """Ellipsoids (centre, semi-axes, in-plane angle) of the ventricular system, in (u, v, w).

    vw / vh scale width / height (age, hydrocephalus); side_scale compresses one side.
    """
    parts = []
    for s in (-1.0, 1.0):
        k = float((side_scale or {}).get(str(int(s)), 1.0))
        parts += [  # body + frontal horn, atrium / occipital horn, temporal horn
            ((s * 6.0 * vw * k, -6.0, 14.0), (4.0 * vw * k, 26.0, 7.0 * vh), s * math.radians(8)),
            ((s * 13.0 * vw * k, 22.0, 7.0), (5.0 * vw * k, 12.0, 6.0 * vh), 0.0),
            ((s * 26.0, -2.0, -14.0), (3.0 * (0.6 + 0.4 * vw) * k, 14.0, 2.0 + 1.5 * (vh - 1.0)),
             0.0),
        ]
    parts.append(((0.0, 4.0, -2.0), (1.5 * vw, 14.0, 9.0), 0.0))  # third ventricle
    return parts


def _ventricle_factors(vs: float, hyd: float) -> tuple[float, float]:
    """Width and height factors of the ventricles for a patient scale and hydrocephalus factor."""
    return vs * hyd, vs * (1.0 + 0.8 * (hyd - 1.0))


def _render_anatomy(geom: PhantomGeometry, anat: Anatomy, mods: dict[str, Any]) -> _Ctx:
    nz, ny, nx = geom.shape
    dz, dy, dx = geom.spacing
    x = (geom.origin[0] + dx * np.arange(nx, dtype=np.float32))[None, None, :]
    y = (geom.origin[1] + dy * np.arange(ny, dtype=np.float32))[None, :, None]
    z = (geom.origin[2] + dz * np.arange(nz, dtype=np.float32))[:, None, None]
    r = np.asarray(geom.rotation, dtype=np.float32)
    cx, cy, cz = (np.float32(c) for c in geom.head_center)
    px_, py_, pz_ = x - cx, y - cy, z - cz
    u = r[0, 0] * px_ + r[1, 0] * py_ + r[2, 0] * pz_
    v = r[0, 1] * px_ + r[1, 1] * py_ + r[2, 1] * pz_
    w = r[0, 2] * px_ + r[1, 2] * py_ + r[2, 2] * pz_
    ax = anat.head_axes

    depth = _ellipsoid_depth(u, v, w, ax)
    vol = np.full(geom.shape, -1000.0, dtype=np.float32)
    head = depth > 0
    inner = anat.scalp + anat.skull
    d_in = depth - np.float32(inner)
    floor = _floor_w(v, ax).astype(np.float32)
    above_floor = w - floor

    # Scalp with a thin subcutaneous fat layer.
    scalp = head & (depth < anat.scalp)
    vol[scalp] = anat.scalp_hu
    fat = scalp & (np.abs(depth - 0.45 * anat.scalp) < 0.6)
    vol[fat] = anat.fat_hu
    # Calvarium: outer table, diploe, inner table.
    skull = (depth >= anat.scalp) & (d_in < 0)
    frac = (depth - anat.scalp) / anat.skull
    vol[skull] = np.where((frac[skull] < 0.3) | (frac[skull] > 0.7),
                          anat.cortical_bone_hu, anat.diploe_hu)
    # Below the cranial cavity: skull-base plate, soft tissue, a paranasal air sinus.
    below = (d_in >= 0) & (above_floor <= 0)
    vol[below] = anat.scalp_hu - 8.0  # fat / muscle mix of the skull base and face
    base_plate = below & (above_floor > -6.0)
    vol[base_plate] = 0.5 * (anat.cortical_bone_hu + anat.diploe_hu)
    skull = skull | base_plate
    fa = float(_floor_w(-0.55 * ax[1], ax))
    bidx = np.nonzero(below)
    bu, bv, bw = (np.broadcast_to(a, geom.shape)[bidx] for a in (u, v, w))
    sc = (0.0, -0.55 * ax[1], fa - 18.0)
    wall = _in_ellipsoid(bu, bv, bw, sc, (17.0, 15.0, 12.0))
    air = _in_ellipsoid(bu, bv, bw, sc, (15.0, 13.0, 10.0))
    vol[tuple(i[wall] for i in bidx)] = anat.cortical_bone_hu * 0.8
    vol[tuple(i[air] for i in bidx)] = -1000.0

    cavity = (d_in >= 0) & (above_floor > 0)
    vol[cavity] = anat.csf_hu
    brain_depth = np.minimum(d_in, above_floor) - np.float32(anat.csf_rim)
    brain_env = cavity & (brain_depth > 0)

    # Cortex: the folding field's zero set is a sulcus; a band around it is grey matter.
    sulc_mult = float(mods.get("sulcal_mult", 1.0))
    g = _fold_gradient_scale(anat)
    fold = np.zeros(geom.shape, dtype=np.float32)
    near = brain_env & (brain_depth < anat.sulcal_depth + anat.cortex + 1.0)
    fold[near] = _fold_field(anat, u[near], v[near], w[near])
    absf = np.abs(fold)
    eps_s = g * anat.sulcal_half_width * sulc_mult
    eps_g = g * (anat.sulcal_half_width * sulc_mult + anat.cortex)
    sulci = near & (absf < eps_s) & (brain_depth < anat.sulcal_depth)
    grey = brain_env & ((brain_depth < anat.cortex)
                        | (near & (absf < eps_g) & (brain_depth < anat.sulcal_depth + anat.cortex)))

    # Deep structures follow the (possibly shifted) midline.
    shift_mm = float(mods.get("shift_mm", 0.0))
    us = u - _shift_profile(v, w, shift_mm) if shift_mm else u
    # Interhemispheric fissure above the corpus callosum, and Sylvian fissures.
    fiss_hw = 1.2 + 0.5 * anat.sulcal_half_width * sulc_mult
    fiss_region = brain_env & (w > 22.0)
    fiss = fiss_region & (np.abs(us) < fiss_hw)
    grey |= fiss_region & (np.abs(us) < fiss_hw + anat.cortex)
    # Sylvian fissure: on axial slices a cleft from the lateral surface, running
    # postero-medially to the insula.
    ub = ax[0] - anat.scalp - anat.skull
    au = np.abs(u)
    syl_off = v - (-6.0 - 12.0 * (au - 33.0) / max(ub - 38.0, 1.0))
    syl_region = brain_env & (au > 31.0) & (w > -22.0) & (w < 6.0)
    syl_hw = 0.9 + anat.sulcal_half_width * sulc_mult
    syl = syl_region & (np.abs(syl_off) < syl_hw)
    grey |= syl_region & (np.abs(syl_off) < syl_hw + anat.cortex)

    white = brain_env & ~grey
    vol[white] = anat.white_hu
    vol[grey] = anat.grey_hu

    vs = anat.ventricle_scale
    hyd = float(mods.get("hydro_factor", 1.0))
    vw, vh = _ventricle_factors(vs, hyd)
    side_scale = mods.get("ventricle_side_scale", {})  # compressed ipsilateral ventricle
    # Ellipsoids are evaluated on the central region only (1-D gathers), not on the full grid.
    central = brain_env & (np.abs(us) < 48.0) & (np.abs(v) < 48.0) & (w > -60.0) & (w < 40.0)
    cidx = np.nonzero(central)
    cu, cv, cw = (np.broadcast_to(a, geom.shape)[cidx] for a in (us, v, w))
    cdeep = np.zeros(cu.shape, dtype=bool)
    cvent = np.zeros(cu.shape, dtype=bool)
    for s in (-1.0, 1.0):
        cdeep |= _in_ellipsoid(cu, cv, cw, (s * 22.0, -2.0, 0.0), (6.0, 14.0, 8.0))  # lentiform
        cdeep |= _in_ellipsoid(cu, cv, cw, (s * 10.0, 13.0, 4.0), (7.0, 10.0, 8.0))  # thalamus
        cdeep |= _in_ellipsoid(cu, cv, cw, (s * (8.0 + 4.0 * vw), -16.0, 12.0),
                               (4.0, 8.0, 7.0))  # caudate head
    for center, semi, angle in _ventricle_parts(vw, vh, side_scale):
        cvent |= _in_ellipsoid(cu, cv, cw, center, semi, angle)
    deep = np.zeros(geom.shape, dtype=bool)
    vent = np.zeros(geom.shape, dtype=bool)
    deep[cidx] = cdeep
    vent[cidx] = cvent
    deep &= brain_env & (brain_depth > 6.0)
    vent &= brain_env & (brain_depth > 4.0)
    vol[deep] = anat.deep_grey_hu
    fl0 = float(_floor_w(0.0, ax))
    cistern = np.zeros(geom.shape, dtype=bool)
    cistern[cidx] = _in_ellipsoid(cu, cv, cw, (0.0, 0.0, fl0 + 9.0), (11.0, 9.0, 5.0))
    csf_in = sulci | fiss | syl | cistern
    vol[csf_in] = anat.csf_hu
    vol[vent] = anat.csf_hu

    grey &= ~(csf_in | vent)
    white &= ~(csf_in | vent | deep)
    brain = brain_env & ~vent & ~csf_in
    return _Ctx(geom=geom, anat=anat, vol=vol, x=x, y=y, z=z, u=u, v=v, w=w, us=us, depth=depth,
                d_in=d_in, brain_depth=brain_depth, cavity=cavity, brain=brain, skull=skull,
                grey=grey, white=white, deep_grey=deep, ventricles=vent,
                sulci=csf_in, fold=fold)


# --------------------------------------------------------------------------------------------
# Finding placement helpers
# --------------------------------------------------------------------------------------------


def _brain_depth_point(anat: Anatomy, p: np.ndarray) -> float:
    d = float(_ellipsoid_depth(np.float32(p[0]), np.float32(p[1]), np.float32(p[2]),
                               anat.head_axes))
    d_in = d - anat.scalp - anat.skull
    return min(d_in, p[2] - float(_floor_w(p[1], anat.head_axes))) - anat.csf_rim


def _near_ventricles(p: np.ndarray, vw: float, vh: float, margin: float, slack_u: float) -> bool:
    """Would a lesion at p (radius ~margin) touch the ventricles (which may shift by slack_u)?"""
    for center, semi, angle in _ventricle_parts(vw, vh):
        du, dv, dw = p[0] - center[0], p[1] - center[1], p[2] - center[2]
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            du, dv = ca * du + sa * dv, -sa * du + ca * dv
        su = semi[0] + margin + slack_u
        if (du / su) ** 2 + (dv / (semi[1] + margin)) ** 2 + (dw / (semi[2] + margin)) ** 2 <= 1:
            return True
    return False


def _covered(geom: PhantomGeometry, p_uvw: np.ndarray, margin: float) -> bool:
    """Is the anatomical point inside the scanned slab (with a margin in mm) and the FOV?"""
    idx = geom.world_to_index(geom.to_world(p_uvw))
    if not (0 <= idx[1] <= geom.shape[1] - 1 and 0 <= idx[2] <= geom.shape[2] - 1):
        return False
    zw = float(geom.to_world(p_uvw)[2])
    z_first = geom.origin[2]
    z_last = z_first + (geom.shape[0] - 1) * geom.spacing[0]
    m = min(margin, 0.45 * (z_last - z_first))
    return z_first + m <= zw <= z_last - m


def _random_parenchyma_point(rng: np.random.Generator, geom: PhantomGeometry, anat: Anatomy,
                             min_depth: float, avoid: Sequence[np.ndarray] = (),
                             min_sep: float = 0.0, deep_bias: float = 0.0,
                             what: str = "lesion",
                             ventricles: tuple[float, float, float] = (1.0, 1.0, 0.0),
                             ) -> np.ndarray:
    """A point in brain parenchyma, at least `min_depth` mm under the cortex, inside the scan,
    clear of the ventricles (`ventricles` = width factor, height factor, possible shift mm)."""
    ax = np.array(anat.head_axes) - anat.scalp - anat.skull - anat.csf_rim
    depth_need = min_depth
    for attempt in range(400):
        if attempt and attempt % 100 == 0:
            depth_need *= 0.6  # small coverage: accept shallower sites rather than fail
        if rng.uniform() < deep_bias:  # basal ganglia / thalamus region
            p = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(18, 28), rng.uniform(-12, 16),
                          rng.uniform(-6, 10)])
        else:
            q = rng.normal(size=3)
            q *= rng.uniform() ** (1 / 3) / np.linalg.norm(q)
            p = q * ax
        if _brain_depth_point(anat, p) < depth_need or _near_ventricles(
                p, ventricles[0], ventricles[1], min(min_depth, 8.0), ventricles[2]):
            continue
        if not _covered(geom, p, margin=min(min_depth, 10.0)):
            continue
        if any(np.linalg.norm(p - a) < min_sep for a in avoid):
            continue
        return p
    raise _PlacementError(
        f"synthetic phantom: cannot place {what} inside the scanned brain "
        f"({geom.shape[0]} slices of {geom.spacing[0]:g} mm); use more slices (--slices)")


def _snap(geom: PhantomGeometry, p_uvw: np.ndarray) -> np.ndarray:
    """Move a lesion centre onto a voxel centre, so a lesion smaller than a voxel still shows."""
    idx = np.round(geom.world_to_index(geom.to_world(p_uvw)))
    return geom.to_anatomical(geom.index_to_world(idx))


def _bbox(ctx: _Ctx, center_uvw: np.ndarray, radius: float) -> tuple[slice, slice, slice]:
    """Voxel-index bounding box of a sphere given in anatomical coordinates."""
    c = ctx.geom.world_to_index(ctx.geom.to_world(center_uvw))
    dz, dy, dx = ctx.geom.spacing
    half = np.array([radius / dz, radius / dy, radius / dx]) + 1.5
    lo = np.maximum(np.floor(c - half), 0).astype(int)
    hi = np.minimum(np.ceil(c + half) + 1, np.array(ctx.geom.shape)).astype(int)
    return tuple(  # type: ignore[return-value]
        slice(int(a), int(max(a, b))) for a, b in zip(lo, hi))


def _sub(ctx: _Ctx, sl) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shp = ctx.vol[sl].shape
    return (np.broadcast_to(ctx.u, ctx.vol.shape)[sl].reshape(shp),
            np.broadcast_to(ctx.v, ctx.vol.shape)[sl].reshape(shp),
            np.broadcast_to(ctx.w, ctx.vol.shape)[sl].reshape(shp))


def _blob(ctx: _Ctx, p: dict[str, Any], sl) -> np.ndarray:
    """Normalised radius of an irregular ellipsoidal lesion in a sub-box (< 1 = inside)."""
    u, v, w = _sub(ctx, sl)
    c = np.asarray(p["center_uvw"])
    rot = np.asarray(p["axes_rot"])
    d = np.stack([u - c[0], v - c[1], w - c[2]], axis=-1) @ rot
    semi = np.asarray(p["semi_axes"])
    rr = np.sqrt(((d / semi) ** 2).sum(axis=-1))
    wob = p.get("wobble", 0.0)
    if wob:
        ang = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-6)
        k = np.asarray(p["wobble_dirs"])
        rr = rr * (1.0 + wob * np.sin(ang @ k.T * 3.0).mean(axis=-1))
    return rr


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
    ])


def _blob_params(rng: np.random.Generator, center: np.ndarray, radius: float,
                 elong: float = 0.3, wobble: float = 0.12) -> dict[str, Any]:
    semi = radius * rng.uniform(1 - elong, 1 + elong, size=3)
    return {"center_uvw": center, "radius": float(radius), "semi_axes": semi,
            "axes_rot": _random_rotation(rng), "wobble": float(wobble),
            "wobble_dirs": rng.normal(size=(3, 3))}


def _convexity_direction(rng: np.random.Generator, side: float, az_range, el_range) -> np.ndarray:
    az = math.radians(rng.uniform(*az_range))
    el = math.radians(rng.uniform(*el_range))
    return np.array([side * math.cos(el) * math.cos(az), math.cos(el) * math.sin(az),
                     math.sin(el)])


def _surface_point(anat: Anatomy, direction: np.ndarray, d_in: float) -> np.ndarray:
    """Point at depth `d_in` under the inner table along a normalised-ellipsoid direction."""
    ax = np.array(anat.head_axes)
    p = direction * ax  # on the outer surface (direction is in normalised coordinates)
    p = p / np.linalg.norm(direction)
    normal = p / ax**2
    normal /= np.linalg.norm(normal)
    return p - normal * (anat.scalp + anat.skull + d_in)


def _convexity_site(rng: np.random.Generator, geom: PhantomGeometry, anat: Anatomy, side: float,
                    az_range, el_range, depth: float, what: str) -> np.ndarray:
    for _ in range(300):
        d = _convexity_direction(rng, side, az_range, el_range)
        p = _surface_point(anat, d, depth)
        if p[2] > float(_floor_w(p[1], anat.head_axes)) + 10 and _covered(geom, p, 6.0):
            return d
        el_range = (el_range[0] - 5.0, el_range[1] + 5.0)  # widen for short coverage
    raise _PlacementError(f"synthetic phantom: cannot place {what} inside the scanned slab "
                          f"({geom.shape[0]} slices); use more slices (--slices)")


def _angle_to(ctx: _Ctx, mask: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Angle (rad) between each masked voxel's normalised-ellipsoid direction and `direction`."""
    ax = ctx.anat.head_axes
    full = ctx.vol.shape
    qu = np.broadcast_to(ctx.u, full)[mask] / ax[0]
    qv = np.broadcast_to(ctx.v, full)[mask] / ax[1]
    qw = np.broadcast_to(ctx.w, full)[mask] / ax[2]
    n = np.sqrt(qu * qu + qv * qv + qw * qw) + 1e-9
    dd = direction / np.linalg.norm(direction)
    cosang = (qu * dd[0] + qv * dd[1] + qw * dd[2]) / n
    return np.arccos(np.clip(cosang, -1.0, 1.0))


# --------------------------------------------------------------------------------------------
# Findings: sample (before the anatomy, for those that change it) and render
# --------------------------------------------------------------------------------------------


def _plan_findings(rngs: dict[str, np.random.Generator], findings: Sequence[str],
                   geom: PhantomGeometry, anat: Anatomy) -> tuple[dict[str, dict], dict]:
    """Draw every planted finding's parameters, and the anatomy modifiers they imply."""
    plan: dict[str, dict[str, Any]] = {}
    mods: dict[str, Any] = {}
    placed: list[np.ndarray] = []
    fs = set(findings)
    hyd = 1.0
    if "hydrocephalus" in fs:
        r = rngs["hydrocephalus"]
        hyd = float(r.uniform(1.45, 2.4))
        plan["hydrocephalus"] = {"ventricle_factor": hyd, "subtle": hyd < 1.65}
        mods["hydro_factor"] = hyd
        mods["sulcal_mult"] = 0.5  # effaced sulci
    # Parenchymal lesions keep clear of the ventricles, wherever a shift may move them.
    vent = (*_ventricle_factors(anat.ventricle_scale, hyd),
            16.0 if "midline_shift" in fs else 0.0)

    if "intraparenchymal_hemorrhage" in fs:
        r = rngs["intraparenchymal_hemorrhage"]
        radius = float(r.choice([r.uniform(3.0, 6.0), r.uniform(6.0, 18.0)], p=[0.35, 0.65]))
        c = _snap(geom, _random_parenchyma_point(r, geom, anat, radius + 4.0, deep_bias=0.5,
                                                 what="intraparenchymal_hemorrhage",
                                                 ventricles=vent))
        hu = float(r.uniform(52.0, 88.0))
        plan["intraparenchymal_hemorrhage"] = {
            **_blob_params(r, c, radius), "hu": hu, "side": float(np.sign(c[0]) or 1.0),
            "subtle": radius < 5.0 or hu < 58.0}
        placed.append(c)

    if "intracranial_mass" in fs or "vasogenic_edema" in fs:
        r = rngs["intracranial_mass"]
        radius = float(r.uniform(7.0, 22.0))
        c = _snap(geom, _random_parenchyma_point(r, geom, anat, radius + 5.0, avoid=placed,
                                                 min_sep=radius + 20.0, what="intracranial_mass",
                                                 ventricles=vent))
        placed.append(c)
        mp = {**_blob_params(r, c, radius, elong=0.25, wobble=0.15),
              "hu": float(r.uniform(40.0, 48.0)), "necrotic": bool(r.uniform() < 0.4),
              "core_hu": float(r.uniform(18.0, 24.0)), "side": float(np.sign(c[0]) or 1.0)}
        if "intracranial_mass" in fs:
            plan["intracranial_mass"] = {**mp, "subtle": radius < 10.0}
        if "vasogenic_edema" in fs:
            re = rngs["vasogenic_edema"]
            ext = float(re.uniform(8.0, 25.0))
            plan["vasogenic_edema"] = {
                "center_uvw": c, "lesion_radius": radius, "extent": ext,
                "drop_hu": float(re.uniform(8.0, 14.0)),
                "occult_lesion": "intracranial_mass" not in fs, "side": mp["side"],
                "wobble_dirs": re.normal(size=(4, 3)), "subtle": ext < 11.0}

    if "subdural_hemorrhage" in fs:
        r = rngs["subdural_hemorrhage"]
        side = float(r.choice([-1.0, 1.0]))
        d = _convexity_site(r, geom, anat, side, (-60, 50), (-5, 45), 3.0, "subdural_hemorrhage")
        t = float(r.choice([r.uniform(2.5, 5.0), r.uniform(5.0, 14.0)], p=[0.35, 0.65]))
        hu = float(r.uniform(50.0, 80.0))
        plan["subdural_hemorrhage"] = {"direction": d, "side": side, "thickness": t,
                                       "half_width_deg": float(r.uniform(45, 75)), "hu": hu,
                                       "subtle": t < 4.0 or hu < 56.0}

    if "epidural_hematoma" in fs:
        r = rngs["epidural_hematoma"]
        side = float(r.choice([-1.0, 1.0]))
        if "subdural_hemorrhage" in plan and plan["subdural_hemorrhage"]["side"] == side:
            side = -side
        d = _convexity_site(r, geom, anat, side, (-50, 40), (0, 40), 6.0, "epidural_hematoma")
        t = float(r.choice([r.uniform(5.0, 9.0), r.uniform(9.0, 24.0)], p=[0.3, 0.7]))
        hu = float(r.uniform(55.0, 90.0))
        plan["epidural_hematoma"] = {"direction": d, "side": side, "thickness": t,
                                     "half_width_deg": float(r.uniform(16, 30)), "hu": hu,
                                     "subtle": t < 8.0}

    if "midline_shift" in fs:
        r = rngs["midline_shift"]
        mm = float(r.choice([r.uniform(3.0, 5.0), r.uniform(5.0, 15.0)], p=[0.3, 0.7]))
        lesion_sides = [plan[k]["side"] for k in ("epidural_hematoma", "subdural_hemorrhage",
                                                   "intracranial_mass", "vasogenic_edema",
                                                   "intraparenchymal_hemorrhage") if k in plan]
        side = lesion_sides[0] if lesion_sides else float(r.choice([-1.0, 1.0]))
        # The midline moves away from the lesion side.
        plan["midline_shift"] = {"shift_mm": mm, "toward": -side, "subtle": mm < 5.0}
        mods["shift_mm"] = -side * mm
        mods["ventricle_side_scale"] = {str(int(side)): 0.65}

    if "acute_infarct" in fs:
        r = rngs["acute_infarct"]
        territory = str(r.choice(["MCA", "ACA", "PCA"], p=[0.6, 0.2, 0.2]))
        side = float(r.choice([-1.0, 1.0]))
        if territory == "MCA":
            c_az, hw, wr = r.uniform(-25, 20), r.uniform(14, 35), (r.uniform(-14, 0),
                                                                    r.uniform(18, 40))
        elif territory == "ACA":
            c_az, hw, wr = r.uniform(-85, -70), r.uniform(10, 16), (r.uniform(8, 20),
                                                                     r.uniform(45, 70))
        else:
            c_az, hw, wr = r.uniform(75, 95), r.uniform(12, 20), (r.uniform(-20, -8),
                                                                   r.uniform(12, 30))
        drop = float(r.uniform(3.0, 10.0))
        plan["acute_infarct"] = {"territory": territory, "side": side, "az_deg": float(c_az),
                                 "half_width_deg": float(hw), "w_range": (float(wr[0]),
                                                                          float(wr[1])),
                                 "inner_frac": float(r.uniform(0.35, 0.6)), "drop_hu": drop,
                                 "subtle": drop < 5.0}

    if "subarachnoid_hemorrhage" in fs:
        r = rngs["subarachnoid_hemorrhage"]
        pattern = str(r.choice(["basal", "convexity"], p=[0.5, 0.5]))
        hu = float(r.uniform(55.0, 80.0))
        fl0 = float(_floor_w(0.0, anat.head_axes))
        if pattern == "basal" and not _covered(geom, np.array([0.0, 0.0, fl0 + 10.0]), 2.0):
            pattern = "convexity"  # basal cisterns not in the scanned slab
        if pattern == "convexity":
            side = float(r.choice([-1.0, 1.0]))
            d = _convexity_site(r, geom, anat, side, (-70, 70), (10, 60), 8.0,
                                "subarachnoid_hemorrhage")
            radius = float(r.uniform(18.0, 40.0))
            center = _surface_point(anat, d, 6.0)
        else:
            side = 0.0
            center = np.array([0.0, 0.0, fl0 + 12.0])
            radius = float(r.uniform(28.0, 48.0))
        plan["subarachnoid_hemorrhage"] = {"pattern": pattern, "center_uvw": center,
                                           "radius": radius, "hu": hu, "side": side,
                                           "subtle": radius < 25.0 or hu < 60.0}

    if "intraventricular_hemorrhage" in fs:
        r = rngs["intraventricular_hemorrhage"]
        frac = float(r.choice([r.uniform(0.04, 0.12), r.uniform(0.12, 0.6)], p=[0.35, 0.65]))
        hu = float(r.uniform(50.0, 82.0))
        plan["intraventricular_hemorrhage"] = {"fill_fraction": frac, "hu": hu,
                                               "subtle": frac < 0.1}

    if "intracranial_calcification" in fs:
        r = rngs["intracranial_calcification"]
        n = int(r.integers(1, 4))
        foci = []
        for _ in range(n):
            c = _random_parenchyma_point(r, geom, anat, 6.0, avoid=placed, min_sep=12.0,
                                         deep_bias=0.4, what="intracranial_calcification",
                                         ventricles=vent)
            c = _snap(geom, c)
            foci.append({"center_uvw": c, "radius": float(r.uniform(0.8, 2.8)),
                         "hu": float(r.uniform(250.0, 900.0))})
        plan["intracranial_calcification"] = {"foci": foci,
                                              "subtle": max(f["radius"] for f in foci) < 1.5}

    if "skull_fracture" in fs:
        r = rngs["skull_fracture"]
        px = geom.spacing[1]
        plan["skull_fracture"] = {"gap_mm": float(max(r.uniform(1.5, 3.5), 1.6 * px)),
                                  "length_mm": float(r.uniform(25.0, 70.0)),
                                  "subtle": False, "seed": int(r.integers(2**31))}
    return plan, mods


def _render_ich(ctx: _Ctx, p: dict[str, Any]) -> None:
    sl = _bbox(ctx, p["center_uvw"], p["radius"] * 1.6 + 2.0)
    rr = _blob(ctx, p, sl)
    m = (rr <= 1.0) & (ctx.brain[sl] | ctx.sulci[sl])
    ctx.vol[sl][m] = p["hu"]
    p["voxels"] = int(m.sum())


def _render_mass(ctx: _Ctx, p: dict[str, Any]) -> None:
    sl = _bbox(ctx, p["center_uvw"], p["radius"] * 1.6 + 2.0)
    rr = _blob(ctx, p, sl)
    m = (rr <= 1.0) & ctx.cavity[sl]
    sub = ctx.vol[sl]
    sub[m] = p["hu"]
    if p.get("necrotic"):
        sub[m & (rr < 0.45)] = p["core_hu"]
    for arr in (ctx.brain, ctx.grey, ctx.white, ctx.sulci, ctx.ventricles):
        arr[sl][m] = False
    p["voxels"] = int(m.sum())


def _render_edema(ctx: _Ctx, p: dict[str, Any]) -> None:
    reach = p["lesion_radius"] + p["extent"]
    sl = _bbox(ctx, p["center_uvw"], reach * 1.3 + 2.0)
    u, v, w = _sub(ctx, sl)
    c = np.asarray(p["center_uvw"])
    d = np.stack([u - c[0], v - c[1], w - c[2]], axis=-1)
    dist = np.linalg.norm(d, axis=-1)
    ang = d / np.maximum(dist[..., None], 1e-6)
    k = np.asarray(p["wobble_dirs"])
    # Finger-like spread along white matter: reach varies with direction.
    lim = p["lesion_radius"] + p["extent"] * (0.65 + 0.35 * np.sin(ang @ k.T * 2.5).mean(axis=-1))
    m = (dist <= lim) & ctx.white[sl]
    ctx.vol[sl][m] = ctx.anat.white_hu - p["drop_hu"]
    p["voxels"] = int(m.sum())


def _render_extra_axial(ctx: _Ctx, p: dict[str, Any], lens: bool) -> None:
    tmax = p["thickness"]
    shell = ctx.cavity & (ctx.d_in < tmax)
    idx = np.nonzero(shell)
    ang = np.degrees(_angle_to(ctx, shell, np.asarray(p["direction"])))
    a = np.clip(ang / p["half_width_deg"], 0.0, 1.0)
    if lens:  # biconvex: elliptic thickness profile over a short arc
        t = tmax * np.sqrt(1.0 - a * a)
    else:  # crescent: nearly constant thickness over a long arc, tapering at the ends
        t = tmax * np.clip(1.0 - a**4, 0.0, 1.0) ** 0.5
    sel = (ctx.d_in[idx] < t) & (a < 1.0)
    pick = tuple(i[sel] for i in idx)
    ctx.vol[pick] = p["hu"]
    for arr in (ctx.brain, ctx.grey, ctx.white, ctx.sulci):
        arr[pick] = False
    p["voxels"] = int(sel.sum())
    p["center_uvw"] = _surface_point(ctx.anat, np.asarray(p["direction"]), 0.5 * tmax)


def _render_ivh(ctx: _Ctx, p: dict[str, Any]) -> None:
    vent = ctx.ventricles
    if not vent.any():
        raise _PlacementError("synthetic phantom: no ventricle inside the scanned slab for "
                              "intraventricular_hemorrhage; use more slices (--slices)")
    idx = np.nonzero(vent)
    # Blood layers in the dependent (posterior, +y for a supine patient) part of the ventricles.
    yv = np.broadcast_to(ctx.y, ctx.vol.shape)[idx]
    level = np.quantile(yv, 1.0 - p["fill_fraction"])
    sel = yv >= level
    pick = tuple(i[sel] for i in idx)
    ctx.vol[pick] = p["hu"]
    p["level_y_mm"] = float(level)
    p["voxels"] = int(sel.sum())
    cen = np.array([i[sel].mean() for i in idx])
    p["center_uvw"] = ctx.geom.to_anatomical(ctx.geom.index_to_world(cen))


def _render_sah(ctx: _Ctx, p: dict[str, Any]) -> None:
    sl = _bbox(ctx, p["center_uvw"], p["radius"] + 2.0)
    u, v, w = _sub(ctx, sl)
    c = np.asarray(p["center_uvw"])
    dist = np.sqrt((u - c[0]) ** 2 + (v - c[1]) ** 2 + (w - c[2]) ** 2)
    rim = ctx.cavity[sl] & (ctx.brain_depth[sl] <= 0) & ~ctx.ventricles[sl]
    m = (dist <= p["radius"]) & (ctx.sulci[sl] | rim)
    ctx.vol[sl][m] = p["hu"]
    p["voxels"] = int(m.sum())
    if p["voxels"] == 0:
        raise _PlacementError("synthetic phantom: subarachnoid_hemorrhage region falls outside "
                              "the scanned slab; use more slices (--slices)")


def _render_infarct(ctx: _Ctx, p: dict[str, Any]) -> None:
    s = p["side"]
    us, v, w = ctx.us, ctx.v, ctx.w
    brainish = ctx.brain | (ctx.sulci & (ctx.brain_depth > 0))
    idx = np.nonzero(brainish)
    full = ctx.vol.shape
    ui = np.broadcast_to(us, full)[idx] * s
    vi = np.broadcast_to(v, full)[idx]
    wi = np.broadcast_to(w, full)[idx]
    az = np.degrees(np.arctan2(vi, ui))
    ax = ctx.anat.head_axes
    rad = np.sqrt((ui / ax[0]) ** 2 + (vi / ax[1]) ** 2)
    sel = ((np.abs(az - p["az_deg"]) < p["half_width_deg"]) & (wi > p["w_range"][0])
           & (wi < p["w_range"][1]) & (rad > p["inner_frac"] * 0.8) & (ui > 0))
    pick = tuple(i[sel] for i in idx)
    # Loss of grey-white differentiation + hypodensity + sulcal effacement.
    ctx.vol[pick] = ctx.anat.white_hu - p["drop_hu"]
    p["voxels"] = int(sel.sum())
    if p["voxels"] == 0:
        raise _PlacementError("synthetic phantom: acute_infarct territory falls outside the "
                              "scanned slab; use more slices (--slices)")
    cen = np.array([i[sel].mean() for i in idx])
    p["center_uvw"] = ctx.geom.to_anatomical(ctx.geom.index_to_world(cen))


def _render_calcification(ctx: _Ctx, p: dict[str, Any]) -> None:
    total = 0
    for f in p["foci"]:
        sl = _bbox(ctx, f["center_uvw"], f["radius"] + 2.0)
        u, v, w = _sub(ctx, sl)
        c = np.asarray(f["center_uvw"])
        dist = np.sqrt((u - c[0]) ** 2 + (v - c[1]) ** 2 + (w - c[2]) ** 2)
        m = dist <= max(f["radius"], 0.05)
        ctx.vol[sl][m] = f["hu"]
        total += int(m.sum())
    p["voxels"] = total
    p["center_uvw"] = p["foci"][0]["center_uvw"]


def _render_fracture(ctx: _Ctx, p: dict[str, Any]) -> None:
    r = np.random.default_rng(p["seed"])
    geom = ctx.geom
    # A calvarial site (above the skull base, inside the slab away from its ends).
    zi = np.arange(geom.shape[0])
    edge = min(2, geom.shape[0] // 3)
    keep = (zi >= edge) & (zi <= geom.shape[0] - 1 - edge)
    calv = ctx.skull & (ctx.d_in < 0) & keep[:, None, None]
    calv &= (ctx.w - _floor_w(ctx.v, ctx.anat.head_axes)) > 12.0
    idx = np.nonzero(calv)
    if idx[0].size == 0:
        raise _PlacementError("synthetic phantom: no calvarium inside the scanned slab for "
                              "skull_fracture; use more slices (--slices)")
    j = int(r.integers(idx[0].size))
    site_idx = np.array([i[j] for i in idx], dtype=float)
    site = geom.index_to_world(site_idx)
    radial = site - np.asarray(geom.head_center)
    radial /= np.linalg.norm(radial)
    # The fracture plane contains the radial direction and runs roughly cranio-caudally, so it
    # cuts every axial slice it crosses as a full-thickness gap in the bone ring.
    along = np.array([0.0, 0.0, 1.0]) - radial * radial[2]
    along += 0.3 * r.normal(size=3)
    along -= radial * (along @ radial)
    along /= np.linalg.norm(along)
    normal = np.cross(radial, along)
    normal /= np.linalg.norm(normal)
    full = ctx.vol.shape
    px, py, pz = (np.broadcast_to(a, full)[idx] for a in (ctx.x, ctx.y, ctx.z))
    rel = np.stack([px, py, pz], axis=-1) - site
    sel = (np.abs(rel @ normal) < 0.5 * p["gap_mm"]) & (np.abs(rel @ along) < 0.5 * p["length_mm"])
    sel &= np.abs(rel @ radial) < 20.0
    pick = tuple(i[sel] for i in idx)
    ctx.vol[pick] = ctx.anat.scalp_hu
    ctx.skull[pick] = False
    p.update({"site_xyz": site, "site_index": site_idx, "normal": normal, "along": along,
              "voxels": int(sel.sum()),
              "center_uvw": geom.to_anatomical(site)})


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _finding_rngs(seed: int) -> dict[str, np.random.Generator]:
    """One independent stream per finding kind: planting A never changes how B looks."""
    return {k: np.random.default_rng([seed, i]) for i, k in enumerate(PHANTOM_FINDINGS)}


def check_findings(findings: Sequence[str]) -> tuple[str, ...]:
    """Validate requested keys; return them in canonical order without duplicates."""
    bad = [f for f in findings if f not in PHANTOM_FINDINGS]
    if bad:
        raise MolreError(f"synthetic phantom cannot plant {', '.join(map(repr, bad))}; "
                         f"plantable catalog keys: {', '.join(PHANTOM_FINDINGS)}")
    return tuple(k for k in PHANTOM_FINDINGS if k in set(findings))


def _check_shape_args(size: int, n_slices: int | None, slice_thickness: float | None) -> None:
    if not (MIN_SIZE <= int(size) <= MAX_SIZE):
        raise MolreError(f"synthetic phantom: size={size} is outside {MIN_SIZE}..{MAX_SIZE} "
                         f"pixels; use e.g. 128 or 512")
    if n_slices is not None and not (1 <= int(n_slices) <= 1000):
        raise MolreError(f"synthetic phantom: slices={n_slices} must be 1..1000")
    if slice_thickness is not None and not (0.5 <= float(slice_thickness) <= 10.0):
        raise MolreError(f"synthetic phantom: slice_thickness={slice_thickness} mm must be "
                         f"0.5..10 mm")


def _plan_and_render(rngs: dict[str, np.random.Generator], keys: Sequence[str],
                     geom: PhantomGeometry, anat: Anatomy) -> tuple[dict[str, dict], _Ctx]:
    plan, mods = _plan_findings(rngs, keys, geom, anat)
    ctx = _render_anatomy(geom, anat, mods)
    # Order: parenchymal changes first, then lesions on top, then extra-axial and bone.
    for key, render in _RENDER_ORDER:
        if key in plan:
            render(ctx, plan[key])
    for k in ("hydrocephalus", "midline_shift"):
        if k in plan:  # both are read off the ventricles, which must be in the slab
            plan[k]["voxels"] = int(ctx.ventricles.sum())

    for k, p in plan.items():
        if p.get("voxels", 1) == 0:  # planted but invisible would be a wrong label
            raise _PlacementError(f"synthetic phantom: {k} fell outside the scanned volume "
                                  f"({geom.shape[0]} slices of {geom.spacing[0]:g} mm); use more "
                                  f"slices (--slices)")
    return plan, ctx


#: Renderers in drawing order (later ones paint over earlier ones). Hydrocephalus and midline
#: shift are not here: they change the anatomy itself (planned in _plan_findings).
_RENDER_ORDER: tuple[tuple[str, Callable[[_Ctx, dict[str, Any]], None]], ...] = (
    ("acute_infarct", _render_infarct),
    ("vasogenic_edema", _render_edema),
    ("intracranial_mass", _render_mass),
    ("intraparenchymal_hemorrhage", _render_ich),
    ("subarachnoid_hemorrhage", _render_sah),
    ("intraventricular_hemorrhage", _render_ivh),
    ("subdural_hemorrhage", lambda ctx, p: _render_extra_axial(ctx, p, lens=False)),
    ("epidural_hematoma", lambda ctx, p: _render_extra_axial(ctx, p, lens=True)),
    ("intracranial_calcification", _render_calcification),
    ("skull_fracture", _render_fracture),
)


def render_phantom(rng: np.random.Generator, findings: Sequence[str] = (), *, size: int = 128,
                   n_slices: int | None = None, slice_thickness: float | None = None,
                   anatomy: Anatomy | None = None, noise: bool = True,
                   ) -> tuple[np.ndarray, PhantomGeometry, Anatomy, dict[str, dict[str, Any]]]:
    """Render one phantom in HU without writing it: (volume (z, y, x) float32, geometry,
    anatomy, per-finding details).

    The generator is split into fixed sub-streams (anatomy, pose, each finding kind, noise), so
    the same generator state with and without a finding gives the same head, pose and noise —
    the difference is the finding alone. That is what the tests use to check each finding.
    """
    keys = check_findings(findings)
    _check_shape_args(size, n_slices, slice_thickness)
    seeds = rng.integers(0, 2**63 - 1, size=4)
    anat = anatomy if anatomy is not None else sample_anatomy(np.random.default_rng(seeds[0]))
    for attempt in range(_PLACEMENT_TRIES):
        # A finding that does not fit a short slab gets a new (deterministic) pose.
        pose_rng = np.random.default_rng(seeds[1] if attempt == 0 else [int(seeds[1]), attempt])
        geom = _make_geometry(pose_rng, anat, int(size), n_slices, slice_thickness)
        try:
            plan, ctx = _plan_and_render(_finding_rngs(int(seeds[2])), keys, geom, anat)
            break
        except _PlacementError:
            if attempt == _PLACEMENT_TRIES - 1:
                raise
    vol = ctx.vol
    # Reconstruction-kernel blur (in plane), then quantum noise.
    vol = ndimage.gaussian_filter(vol, sigma=(0.0, 0.45, 0.45), mode="nearest")
    if noise:
        nrng = np.random.default_rng(seeds[3])
        vol += nrng.standard_normal(vol.shape, dtype=np.float32) * np.float32(geom.noise_sigma)
    np.clip(vol, -1024.0, 3071.0, out=vol)
    details = {k: {kk: vv for kk, vv in plan[k].items()
                   if kk not in ("axes_rot", "wobble_dirs", "seed")} for k in keys}
    return vol, geom, anat, details


# --------------------------------------------------------------------------------------------
# Writing DICOM
# --------------------------------------------------------------------------------------------

_KERNELS = ("H30s", "J40s", "FC21", "UB", "Hr38", "STANDARD")


def _uid(*parts: Any) -> str:
    """Deterministic UID from the generator's draws, so a seed reproduces the same study/series."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[_UID_PREFIX_ENTROPY, *map(str, parts)]))


def _patient_tags(rng: np.random.Generator, number: int) -> dict[str, Any]:
    """Synthetic demographics for one patient (name/ID are obviously synthetic)."""
    age = int(rng.integers(18, 91))
    return {"PatientName": f"SYNTH^{number:04d}", "PatientID": f"SYNTH-{number:04d}",
            "PatientSex": str(rng.choice(["F", "M"])), "_age": age}


def _series_tags(rng: np.random.Generator, geom: PhantomGeometry,
                 patient: Mapping[str, Any]) -> dict[str, Any]:
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
    tags.update({
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientAge": f"{age:03d}Y",
        "AccessionNumber": f"SY{int(rng.integers(0, 10**10)):010d}",
        "StudyID": str(int(rng.integers(1, 100000))),
        "StudyDescription": "CT HEAD WO CONTRAST",
        "SeriesDescription": f"Axial {thick:g}mm Brain",
        "ProtocolName": "ROUTINE HEAD",
        "BodyPartExamined": "HEAD",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "ConvolutionKernel": str(rng.choice(_KERNELS)),
        "KVP": "120",
        "XRayTubeCurrent": int(rng.integers(180, 360)),
        "ExposureTime": 1000,
        "SeriesNumber": int(rng.integers(2, 6)),
        "Manufacturer": "molre-node synthetic",
        "ManufacturerModelName": "head phantom",
        "InstitutionName": "molre synthetic",
        "PatientPosition": "HFS",
        "WindowCenter": "40",
        "WindowWidth": "80",
        "StudyDate": date, "SeriesDate": date, "AcquisitionDate": date, "ContentDate": date,
        "InstanceCreationDate": date,
        "StudyTime": t, "SeriesTime": t, "AcquisitionTime": t, "ContentTime": t,
        "InstanceCreationTime": t,
    })
    return tags


def write_phantom_series(out_dir: Path | str, rng: np.random.Generator,
                         findings: Sequence[str] = (), size: int = 128,
                         n_slices: int | None = None, slice_thickness: float | None = None, *,
                         anatomy: Anatomy | None = None,
                         patient: Mapping[str, Any] | None = None, **tags: Any) -> PhantomInfo:
    """Render a phantom with `findings` planted and write it as one CT Image Storage file per slice.

    `n_slices` / `slice_thickness` None draw a realistic coverage (skull base to vertex) and a
    thickness from SLICE_THICKNESSES. `**tags` override any DICOM attribute by keyword (e.g.
    PatientID, SeriesDescription). The same generator state reproduces the same pixels and UIDs
    (SOP Instance UIDs are fresh for every write). `anatomy` / `patient` (name, ID, sex, age as
    made by `generate_dataset`) let several series share one synthetic patient.
    """
    from molre.data.dicomio import write_ct_series

    vol, geom, anat, details = render_phantom(rng, findings, size=size, n_slices=n_slices,
                                              slice_thickness=slice_thickness, anatomy=anatomy)
    ids = rng.integers(0, 2**63 - 1, size=2)
    own = _patient_tags(rng, int(rng.integers(1, 10000)))
    all_tags = _series_tags(rng, geom, patient if patient is not None else own)
    all_tags.update(tags)
    study_uid = str(all_tags.pop("StudyInstanceUID", None) or _uid("study", ids[0]))
    series_uid = str(all_tags.pop("SeriesInstanceUID", None) or _uid("series", ids[1]))
    paths = write_ct_series(Path(out_dir), vol, spacing=geom.spacing, origin=geom.origin,
                            direction=geom.direction, study_uid=study_uid, series_uid=series_uid,
                            rescale=(1.0, -1024.0), **all_tags)
    return PhantomInfo(paths=list(paths), study_uid=study_uid, series_uid=series_uid,
                       patient_id=str(all_tags.get("PatientID", "")),
                       findings=check_findings(list(details)), details=details, geometry=geom,
                       anatomy=anat, tags=all_tags)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

EDEMA_WITH_MASS = 0.8  # P(vasogenic_edema | intracranial_mass)


def _prevalences(prevalence: float | Mapping[str, float], keys: Sequence[str]) -> dict[str, float]:
    if isinstance(prevalence, Mapping):
        unknown = [k for k in prevalence if k not in PHANTOM_FINDINGS]
        if unknown:
            raise MolreError(f"prevalence names unknown finding(s) {unknown}; plantable keys: "
                             f"{', '.join(PHANTOM_FINDINGS)}")
        out = {k: float(prevalence.get(k, 0.0)) for k in keys}
    else:
        out = {k: float(prevalence) for k in keys}
    for k, p in out.items():
        if not 0.0 <= p <= 1.0 or math.isnan(p):
            raise MolreError(f"prevalence of {k} is {p}; it must be between 0 and 1")
    return out


def sample_findings(rng: np.random.Generator, prevalence: Mapping[str, float],
                    normal_fraction: float = 0.0) -> tuple[str, ...]:
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


def _split_patients(rng: np.random.Generator, patients: Sequence[int],
                    splits: Sequence[float]) -> dict[int, str]:
    names = ("train", "val", "test")
    fr = np.asarray(splits, dtype=float)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise MolreError(f"splits={tuple(splits)} must be three non-negative fractions "
                         f"(train, val, test)")
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
        Path(job["out"]) / job["name"], np.random.default_rng(job["seed"]), job["findings"],
        size=job["size"], n_slices=job["n_slices"], slice_thickness=job["slice_thickness"],
        anatomy=anat, patient=job["patient"])
    return {"name": job["name"], "patient_id": info.patient_id, **info.to_dict()}


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MolreError(f"synth output {out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MolreError(f"synth output folder {out} is not empty; choose an empty folder "
                             f"or pass --overwrite to replace the phantoms in it")
        # Remove only what a previous synth run wrote there.
        for child in out.iterdir():
            if child.is_dir() and child.name.startswith("series_"):
                shutil.rmtree(child)
            elif child.name in ("manifest.csv", "phantoms.jsonl"):
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate_dataset(out: Path | str, count: int, seed: int, size: int = 128, *,
                     prevalence: float | Mapping[str, float] = 0.3,
                     normal_fraction: float = 0.25,
                     splits: Sequence[float] = (0.6, 0.2, 0.2),
                     unlabelled_fraction: float = 0.0, workers: int = 1,
                     n_slices: int | None = None, slice_thickness: float | None = None,
                     follow_up_fraction: float = 0.15, catalog: Any = None,
                     overwrite: bool = False, progress: bool = True) -> Path:
    """Write `count` phantom series under `out` (series_0001/ ...) and `out/manifest.csv`.

    Labels: 1/0 for the findings the phantom can plant, blank (not labelled) for the rest of
    the catalog, and blank everywhere for an `unlabelled_fraction` of series (semi-supervised
    use). Some patients get a follow-up series (same head, new study) so that the split by
    patient matters. `out/phantoms.jsonl` keeps the full ground truth (positions, sizes,
    geometry; no names). The result depends only on the arguments: the same seed gives the same
    labels and pixels, whatever the number of workers.
    """
    from molre.catalog import load_catalog

    if count < 1:
        raise MolreError(f"synth --count must be at least 1 (got {count})")
    if not 0.0 <= unlabelled_fraction <= 1.0:
        raise MolreError(f"unlabelled_fraction={unlabelled_fraction} must be between 0 and 1")
    if not 0.0 <= normal_fraction < 1.0:
        raise MolreError(f"normal_fraction={normal_fraction} must be in [0, 1)")
    _check_shape_args(size, n_slices, slice_thickness)
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

    jobs = []
    for i, seq in enumerate(series_seqs):
        srng = np.random.default_rng(seq)
        found = sample_findings(srng, prev, normal_fraction)
        jobs.append({"out": str(out), "name": f"series_{i + 1:04d}",
                     "seed": int(srng.integers(2**63 - 1)),
                     "anatomy_seed": anat_seed[patient_of[i]], "findings": found,
                     "size": int(size), "n_slices": n_slices, "slice_thickness": slice_thickness,
                     "patient": ptags[patient_of[i]]})

    results: list[dict[str, Any]] = []
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        tqdm = None
    bar = tqdm(total=count, desc="synth", unit="series", disable=None if progress else True) \
        if tqdm else None
    if workers > 1:
        with ProcessPoolExecutor(max_workers=int(workers)) as ex:
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
        rows.append({"path": r["name"], "patient_id": r["patient_id"],
                     "split": split_of[patient_of[i]], "labels": labels})
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
    log.info("synth.done", out=str(out), series=count, patients=len(patients),
             normal=sum(1 for r in results if not r["findings"]),
             **{k: counts[k] for k in plantable})
    return manifest


def dataset_summary(out: Path | str) -> dict[str, Any]:
    """Counts per finding / split from a generated folder (reads phantoms.jsonl)."""
    path = Path(out) / "phantoms.jsonl"
    if not path.is_file():
        raise MolreError(f"{path} not found: not a folder written by `molre-node synth`")
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    counts = Counter(k for r in recs for k in r["findings"])
    return {"series": len(recs), "normal": sum(1 for r in recs if not r["findings"]),
            "files": sum(r["n_files"] for r in recs),
            "splits": dict(Counter(r["split"] for r in recs)),
            "unlabelled": sum(1 for r in recs if not r["labelled"]),
            "findings": {k: counts.get(k, 0) for k in PHANTOM_FINDINGS}}
