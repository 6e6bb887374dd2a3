"""The synthetic patient: head shape, tissue densities, and the healthy anatomy rendered in HU.

A phantom is an analytic head (scalp, skull with diploe, CSF, grey/white matter with a folded
cortex, deep grey nuclei, ventricles, cisterns) evaluated on the scanner grid. Everything is
vectorised numpy and driven by one `numpy.random.Generator`, so a seed reproduces the same head.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .geometry import PhantomGeometry


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


def floor_w(v: np.ndarray | float, ax: tuple[float, float, float]) -> np.ndarray | float:
    """Skull-base height (w) under the cranial cavity: higher anteriorly, low posterior fossa."""
    hv, hw = ax[1], ax[2]
    t = np.clip((np.asarray(v) + 0.3 * hv) / hv, 0.0, 1.0)
    return -hw * (0.30 + 0.30 * t)


def ellipsoid_depth(u, v, w, axes) -> np.ndarray:
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


def in_ellipsoid(u, v, w, center, semi, angle=0.0) -> np.ndarray:
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
class RenderContext:
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
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # finding key -> voxels it changed


def _shift_profile(v, w, mm: float) -> np.ndarray:
    """Midline displacement (mm along u): maximal at the septum, zero at the vertex and base."""
    return (
        mm * np.exp(-((v - 0.0) ** 2) / (2 * 45.0**2) - ((w - 8.0) ** 2) / (2 * 28.0**2))
    ).astype(np.float32)


_Ellipsoid = tuple[tuple[float, float, float], tuple[float, float, float], float]


def ventricle_parts(
    vw: float, vh: float, side_scale: Mapping[str, float] | None = None
) -> list[_Ellipsoid]:
    """Ellipsoids (centre, semi-axes, in-plane angle) of the ventricular system, in (u, v, w).

    vw / vh scale width / height (age, hydrocephalus); side_scale compresses one side.
    """
    parts = []
    for s in (-1.0, 1.0):
        k = float((side_scale or {}).get(str(int(s)), 1.0))
        parts += [  # body + frontal horn, atrium / occipital horn, temporal horn
            ((s * 6.0 * vw * k, -6.0, 14.0), (4.0 * vw * k, 26.0, 7.0 * vh), s * math.radians(8)),
            ((s * 13.0 * vw * k, 22.0, 7.0), (5.0 * vw * k, 12.0, 6.0 * vh), 0.0),
            (
                (s * 26.0, -2.0, -14.0),
                (3.0 * (0.6 + 0.4 * vw) * k, 14.0, 2.0 + 1.5 * (vh - 1.0)),
                0.0,
            ),
        ]
    parts.append(((0.0, 4.0, -2.0), (1.5 * vw, 14.0, 9.0), 0.0))  # third ventricle
    return parts


def ventricle_factors(vs: float, hyd: float) -> tuple[float, float]:
    """Width and height factors of the ventricles for a patient scale and hydrocephalus factor."""
    return vs * hyd, vs * (1.0 + 0.8 * (hyd - 1.0))


def _deep_structures(
    shape, cidx, cu, cv, cw, vw: float, vh: float, side_scale: Mapping[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Deep grey nuclei and ventricles (full-grid bool masks) from the central-region gathers."""
    cdeep = np.zeros(cu.shape, dtype=bool)
    cvent = np.zeros(cu.shape, dtype=bool)
    for s in (-1.0, 1.0):
        cdeep |= in_ellipsoid(cu, cv, cw, (s * 22.0, -2.0, 0.0), (6.0, 14.0, 8.0))  # lentiform
        cdeep |= in_ellipsoid(cu, cv, cw, (s * 10.0, 13.0, 4.0), (7.0, 10.0, 8.0))  # thalamus
        cdeep |= in_ellipsoid(
            cu, cv, cw, (s * (8.0 + 4.0 * vw), -16.0, 12.0), (4.0, 8.0, 7.0)
        )  # caudate head
    for center, semi, angle in ventricle_parts(vw, vh, side_scale):
        cvent |= in_ellipsoid(cu, cv, cw, center, semi, angle)
    deep = np.zeros(shape, dtype=bool)
    vent = np.zeros(shape, dtype=bool)
    deep[cidx] = cdeep
    vent[cidx] = cvent
    return deep, vent


def render_anatomy(geom: PhantomGeometry, anat: Anatomy, mods: dict[str, Any]) -> RenderContext:
    """The healthy head (with the anatomy modifiers of hydrocephalus / midline shift) in HU.

    The context also carries the tissue masks the finding renderers paint into; ``masks``
    collects the voxels each finding changed (the ground truth for dense supervision).
    """
    x, y, z = geom.grid()
    r = np.asarray(geom.rotation, dtype=np.float32)
    cx, cy, cz = (np.float32(c) for c in geom.head_center)
    px_, py_, pz_ = x - cx, y - cy, z - cz
    u = r[0, 0] * px_ + r[1, 0] * py_ + r[2, 0] * pz_
    v = r[0, 1] * px_ + r[1, 1] * py_ + r[2, 1] * pz_
    w = r[0, 2] * px_ + r[1, 2] * py_ + r[2, 2] * pz_
    ax = anat.head_axes

    depth = ellipsoid_depth(u, v, w, ax)
    vol = np.full(geom.shape, -1000.0, dtype=np.float32)
    head = depth > 0
    inner = anat.scalp + anat.skull
    d_in = depth - np.float32(inner)
    floor = floor_w(v, ax).astype(np.float32)
    above_floor = w - floor

    # Scalp with a thin subcutaneous fat layer.
    scalp = head & (depth < anat.scalp)
    vol[scalp] = anat.scalp_hu
    fat = scalp & (np.abs(depth - 0.45 * anat.scalp) < 0.6)
    vol[fat] = anat.fat_hu
    # Calvarium: outer table, diploe, inner table.
    skull = (depth >= anat.scalp) & (d_in < 0)
    frac = (depth - anat.scalp) / anat.skull
    vol[skull] = np.where(
        (frac[skull] < 0.3) | (frac[skull] > 0.7), anat.cortical_bone_hu, anat.diploe_hu
    )
    # Below the cranial cavity: skull-base plate, soft tissue, a paranasal air sinus.
    below = (d_in >= 0) & (above_floor <= 0)
    vol[below] = anat.scalp_hu - 8.0  # fat / muscle mix of the skull base and face
    base_plate = below & (above_floor > -6.0)
    vol[base_plate] = 0.5 * (anat.cortical_bone_hu + anat.diploe_hu)
    skull = skull | base_plate
    fa = float(floor_w(-0.55 * ax[1], ax))
    bidx = np.nonzero(below)
    bu, bv, bw = (np.broadcast_to(a, geom.shape)[bidx] for a in (u, v, w))
    sc = (0.0, -0.55 * ax[1], fa - 18.0)
    wall = in_ellipsoid(bu, bv, bw, sc, (17.0, 15.0, 12.0))
    air = in_ellipsoid(bu, bv, bw, sc, (15.0, 13.0, 10.0))
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
    grey = brain_env & (
        (brain_depth < anat.cortex)
        | (near & (absf < eps_g) & (brain_depth < anat.sulcal_depth + anat.cortex))
    )

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
    vw, vh = ventricle_factors(vs, hyd)
    side_scale = mods.get("ventricle_side_scale", {})  # compressed ipsilateral ventricle
    # Ellipsoids are evaluated on the central region only (1-D gathers), not on the full grid.
    central = brain_env & (np.abs(us) < 48.0) & (np.abs(v) < 48.0) & (w > -60.0) & (w < 40.0)
    cidx = np.nonzero(central)
    cu, cv, cw = (np.broadcast_to(a, geom.shape)[cidx] for a in (us, v, w))
    deep, vent = _deep_structures(geom.shape, cidx, cu, cv, cw, vw, vh, side_scale)
    deep &= brain_env & (brain_depth > 6.0)
    vent &= brain_env & (brain_depth > 4.0)
    vol[deep] = anat.deep_grey_hu
    fl0 = float(floor_w(0.0, ax))
    cistern = np.zeros(geom.shape, dtype=bool)
    cistern[cidx] = in_ellipsoid(cu, cv, cw, (0.0, 0.0, fl0 + 9.0), (11.0, 9.0, 5.0))
    csf_in = sulci | fiss | syl | cistern
    vol[csf_in] = anat.csf_hu
    vol[vent] = anat.csf_hu

    grey &= ~(csf_in | vent)
    white &= ~(csf_in | vent | deep)
    brain = brain_env & ~vent & ~csf_in
    return RenderContext(
        geom=geom,
        anat=anat,
        vol=vol,
        x=x,
        y=y,
        z=z,
        u=u,
        v=v,
        w=w,
        us=us,
        depth=depth,
        d_in=d_in,
        brain_depth=brain_depth,
        cavity=cavity,
        brain=brain,
        skull=skull,
        grey=grey,
        white=white,
        deep_grey=deep,
        ventricles=vent,
        sulci=csf_in,
        fold=fold,
    )
