"""Findings: what a phantom can show, where each one is placed, and how it is painted.

Each finding has its own random stream (`finding_rngs`), so planting A never changes how B looks.
Planning happens before the anatomy is rendered (hydrocephalus and midline shift change the
anatomy itself); the renderers then paint HU values into the rendered head and record the voxels
they painted in ``ctx.masks`` (the ground truth used for dense supervision).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from common.errors import MolreError

from .anatomy import (
    Anatomy,
    RenderContext,
    ellipsoid_depth,
    floor_w,
    ventricle_factors,
    ventricle_parts,
)
from .geometry import PhantomGeometry, PlacementError

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


def _brain_depth_point(anat: Anatomy, p: np.ndarray) -> float:
    d = float(ellipsoid_depth(np.float32(p[0]), np.float32(p[1]), np.float32(p[2]), anat.head_axes))
    d_in = d - anat.scalp - anat.skull
    return min(d_in, p[2] - float(floor_w(p[1], anat.head_axes))) - anat.csf_rim


def _near_ventricles(p: np.ndarray, vw: float, vh: float, margin: float, slack_u: float) -> bool:
    """Would a lesion at p (radius ~margin) touch the ventricles (which may shift by slack_u)?"""
    for center, semi, angle in ventricle_parts(vw, vh):
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
    last = geom.shape[0] - 1
    m = min(margin / geom.spacing[0], 0.45 * last)  # in slices (table steps)
    return m <= float(idx[0]) <= last - m


def _random_parenchyma_point(
    rng: np.random.Generator,
    geom: PhantomGeometry,
    anat: Anatomy,
    min_depth: float,
    avoid: Sequence[np.ndarray] = (),
    min_sep: float = 0.0,
    deep_bias: float = 0.0,
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
            p = np.array(
                [
                    rng.choice([-1.0, 1.0]) * rng.uniform(18, 28),
                    rng.uniform(-12, 16),
                    rng.uniform(-6, 10),
                ]
            )
        else:
            q = rng.normal(size=3)
            q *= rng.uniform() ** (1 / 3) / np.linalg.norm(q)
            p = q * ax
        if _brain_depth_point(anat, p) < depth_need or _near_ventricles(
            p, ventricles[0], ventricles[1], min(min_depth, 8.0), ventricles[2]
        ):
            continue
        if not _covered(geom, p, margin=min(min_depth, 10.0)):
            continue
        if any(np.linalg.norm(p - a) < min_sep for a in avoid):
            continue
        return p
    raise PlacementError(
        f"synthetic phantom: cannot place {what} inside the scanned brain "
        f"({geom.shape[0]} slices of {geom.spacing[0]:g} mm); use more slices (--slices)"
    )


def _snap(geom: PhantomGeometry, p_uvw: np.ndarray) -> np.ndarray:
    """Move a lesion centre onto a voxel centre, so a lesion smaller than a voxel still shows."""
    idx = np.round(geom.world_to_index(geom.to_world(p_uvw)))
    return geom.to_anatomical(geom.index_to_world(idx))


def _bbox(ctx: RenderContext, center_uvw: np.ndarray, radius: float) -> tuple[slice, slice, slice]:
    """Voxel-index bounding box of a sphere given in anatomical coordinates."""
    c = ctx.geom.world_to_index(ctx.geom.to_world(center_uvw))
    dz, dy, dx = ctx.geom.spacing
    # with gantry tilt a sphere spans more table steps (the grid is sheared)
    tilt = abs(math.tan(math.radians(ctx.geom.tilt_deg)))
    half = np.array([radius * (1.0 + tilt) / dz, radius / dy, radius / dx]) + 1.5
    lo = np.maximum(np.floor(c - half), 0).astype(int)
    hi = np.minimum(np.ceil(c + half) + 1, np.array(ctx.geom.shape)).astype(int)
    return tuple(  # type: ignore[return-value]
        slice(int(a), int(max(a, b))) for a, b in zip(lo, hi)
    )


def _sub(ctx: RenderContext, sl) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    shp = ctx.vol[sl].shape
    return (
        np.broadcast_to(ctx.u, ctx.vol.shape)[sl].reshape(shp),
        np.broadcast_to(ctx.v, ctx.vol.shape)[sl].reshape(shp),
        np.broadcast_to(ctx.w, ctx.vol.shape)[sl].reshape(shp),
    )


def _blob(ctx: RenderContext, p: dict[str, Any], sl) -> np.ndarray:
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


def _mark(ctx: RenderContext, key: str, where: Any, sl: Any = None) -> None:
    """Record painted voxels as ground truth: `where` is a bool mask of sub-box `sl`, or (with
    ``sl=None``) an index tuple into the full volume."""
    full = ctx.masks.get(key)
    if full is None:
        full = ctx.masks[key] = np.zeros(ctx.vol.shape, dtype=bool)
    if sl is None:
        full[where] = True
    else:
        full[sl] |= where


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ]
    )


def _blob_params(
    rng: np.random.Generator,
    center: np.ndarray,
    radius: float,
    elong: float = 0.3,
    wobble: float = 0.12,
) -> dict[str, Any]:
    semi = radius * rng.uniform(1 - elong, 1 + elong, size=3)
    return {
        "center_uvw": center,
        "radius": float(radius),
        "semi_axes": semi,
        "axes_rot": _random_rotation(rng),
        "wobble": float(wobble),
        "wobble_dirs": rng.normal(size=(3, 3)),
    }


def _convexity_direction(rng: np.random.Generator, side: float, az_range, el_range) -> np.ndarray:
    az = math.radians(rng.uniform(*az_range))
    el = math.radians(rng.uniform(*el_range))
    return np.array([side * math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])


def _surface_point(anat: Anatomy, direction: np.ndarray, d_in: float) -> np.ndarray:
    """Point at depth `d_in` under the inner table along a normalised-ellipsoid direction."""
    ax = np.array(anat.head_axes)
    p = direction * ax  # on the outer surface (direction is in normalised coordinates)
    p = p / np.linalg.norm(direction)
    normal = p / ax**2
    normal /= np.linalg.norm(normal)
    return p - normal * (anat.scalp + anat.skull + d_in)


def _convexity_site(
    rng: np.random.Generator,
    geom: PhantomGeometry,
    anat: Anatomy,
    side: float,
    az_range,
    el_range,
    depth: float,
    what: str,
) -> np.ndarray:
    for _ in range(300):
        d = _convexity_direction(rng, side, az_range, el_range)
        p = _surface_point(anat, d, depth)
        if p[2] > float(floor_w(p[1], anat.head_axes)) + 10 and _covered(geom, p, 6.0):
            return d
        el_range = (el_range[0] - 5.0, el_range[1] + 5.0)  # widen for short coverage
    raise PlacementError(
        f"synthetic phantom: cannot place {what} inside the scanned slab "
        f"({geom.shape[0]} slices); use more slices (--slices)"
    )


def _angle_to(ctx: RenderContext, mask: np.ndarray, direction: np.ndarray) -> np.ndarray:
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


def plan_findings(
    rngs: dict[str, np.random.Generator],
    findings: Sequence[str],
    geom: PhantomGeometry,
    anat: Anatomy,
) -> tuple[dict[str, dict], dict]:
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
    vent = (*ventricle_factors(anat.ventricle_scale, hyd), 16.0 if "midline_shift" in fs else 0.0)

    if "intraparenchymal_hemorrhage" in fs:
        r = rngs["intraparenchymal_hemorrhage"]
        radius = float(r.choice([r.uniform(3.0, 6.0), r.uniform(6.0, 18.0)], p=[0.35, 0.65]))
        c = _snap(
            geom,
            _random_parenchyma_point(
                r,
                geom,
                anat,
                radius + 4.0,
                deep_bias=0.5,
                what="intraparenchymal_hemorrhage",
                ventricles=vent,
            ),
        )
        hu = float(r.uniform(52.0, 88.0))
        plan["intraparenchymal_hemorrhage"] = {
            **_blob_params(r, c, radius),
            "hu": hu,
            "side": float(np.sign(c[0]) or 1.0),
            "subtle": radius < 5.0 or hu < 58.0,
        }
        placed.append(c)

    if "intracranial_mass" in fs or "vasogenic_edema" in fs:
        r = rngs["intracranial_mass"]
        radius = float(r.uniform(7.0, 22.0))
        c = _snap(
            geom,
            _random_parenchyma_point(
                r,
                geom,
                anat,
                radius + 5.0,
                avoid=placed,
                min_sep=radius + 20.0,
                what="intracranial_mass",
                ventricles=vent,
            ),
        )
        placed.append(c)
        mp = {
            **_blob_params(r, c, radius, elong=0.25, wobble=0.15),
            "hu": float(r.uniform(40.0, 48.0)),
            "necrotic": bool(r.uniform() < 0.4),
            "core_hu": float(r.uniform(18.0, 24.0)),
            "side": float(np.sign(c[0]) or 1.0),
        }
        if "intracranial_mass" in fs:
            plan["intracranial_mass"] = {**mp, "subtle": radius < 10.0}
        if "vasogenic_edema" in fs:
            re = rngs["vasogenic_edema"]
            ext = float(re.uniform(8.0, 25.0))
            plan["vasogenic_edema"] = {
                "center_uvw": c,
                "lesion_radius": radius,
                "extent": ext,
                "drop_hu": float(re.uniform(8.0, 14.0)),
                "occult_lesion": "intracranial_mass" not in fs,
                "side": mp["side"],
                "wobble_dirs": re.normal(size=(4, 3)),
                "subtle": ext < 11.0,
            }

    if "subdural_hemorrhage" in fs:
        r = rngs["subdural_hemorrhage"]
        side = float(r.choice([-1.0, 1.0]))
        d = _convexity_site(r, geom, anat, side, (-60, 50), (-5, 45), 3.0, "subdural_hemorrhage")
        t = float(r.choice([r.uniform(2.5, 5.0), r.uniform(5.0, 14.0)], p=[0.35, 0.65]))
        hu = float(r.uniform(50.0, 80.0))
        plan["subdural_hemorrhage"] = {
            "direction": d,
            "side": side,
            "thickness": t,
            "half_width_deg": float(r.uniform(45, 75)),
            "hu": hu,
            "subtle": t < 4.0 or hu < 56.0,
        }

    if "epidural_hematoma" in fs:
        r = rngs["epidural_hematoma"]
        side = float(r.choice([-1.0, 1.0]))
        if "subdural_hemorrhage" in plan and plan["subdural_hemorrhage"]["side"] == side:
            side = -side
        d = _convexity_site(r, geom, anat, side, (-50, 40), (0, 40), 6.0, "epidural_hematoma")
        t = float(r.choice([r.uniform(5.0, 9.0), r.uniform(9.0, 24.0)], p=[0.3, 0.7]))
        hu = float(r.uniform(55.0, 90.0))
        plan["epidural_hematoma"] = {
            "direction": d,
            "side": side,
            "thickness": t,
            "half_width_deg": float(r.uniform(16, 30)),
            "hu": hu,
            "subtle": t < 8.0,
        }

    if "midline_shift" in fs:
        r = rngs["midline_shift"]
        mm = float(r.choice([r.uniform(3.0, 5.0), r.uniform(5.0, 15.0)], p=[0.3, 0.7]))
        lesion_sides = [
            plan[k]["side"]
            for k in (
                "epidural_hematoma",
                "subdural_hemorrhage",
                "intracranial_mass",
                "vasogenic_edema",
                "intraparenchymal_hemorrhage",
            )
            if k in plan
        ]
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
            c_az, hw, wr = (
                r.uniform(-25, 20),
                r.uniform(14, 35),
                (r.uniform(-14, 0), r.uniform(18, 40)),
            )
        elif territory == "ACA":
            c_az, hw, wr = (
                r.uniform(-85, -70),
                r.uniform(10, 16),
                (r.uniform(8, 20), r.uniform(45, 70)),
            )
        else:
            c_az, hw, wr = (
                r.uniform(75, 95),
                r.uniform(12, 20),
                (r.uniform(-20, -8), r.uniform(12, 30)),
            )
        drop = float(r.uniform(3.0, 10.0))
        plan["acute_infarct"] = {
            "territory": territory,
            "side": side,
            "az_deg": float(c_az),
            "half_width_deg": float(hw),
            "w_range": (float(wr[0]), float(wr[1])),
            "inner_frac": float(r.uniform(0.35, 0.6)),
            "drop_hu": drop,
            "subtle": drop < 5.0,
        }

    if "subarachnoid_hemorrhage" in fs:
        r = rngs["subarachnoid_hemorrhage"]
        pattern = str(r.choice(["basal", "convexity"], p=[0.5, 0.5]))
        hu = float(r.uniform(55.0, 80.0))
        fl0 = float(floor_w(0.0, anat.head_axes))
        if pattern == "basal" and not _covered(geom, np.array([0.0, 0.0, fl0 + 10.0]), 2.0):
            pattern = "convexity"  # basal cisterns not in the scanned slab
        if pattern == "convexity":
            side = float(r.choice([-1.0, 1.0]))
            d = _convexity_site(
                r, geom, anat, side, (-70, 70), (10, 60), 8.0, "subarachnoid_hemorrhage"
            )
            radius = float(r.uniform(18.0, 40.0))
            center = _surface_point(anat, d, 6.0)
        else:
            side = 0.0
            center = np.array([0.0, 0.0, fl0 + 12.0])
            radius = float(r.uniform(28.0, 48.0))
        plan["subarachnoid_hemorrhage"] = {
            "pattern": pattern,
            "center_uvw": center,
            "radius": radius,
            "hu": hu,
            "side": side,
            "subtle": radius < 25.0 or hu < 60.0,
        }

    if "intraventricular_hemorrhage" in fs:
        r = rngs["intraventricular_hemorrhage"]
        frac = float(r.choice([r.uniform(0.04, 0.12), r.uniform(0.12, 0.6)], p=[0.35, 0.65]))
        hu = float(r.uniform(50.0, 82.0))
        plan["intraventricular_hemorrhage"] = {
            "fill_fraction": frac,
            "hu": hu,
            "subtle": frac < 0.1,
        }

    if "intracranial_calcification" in fs:
        r = rngs["intracranial_calcification"]
        n = int(r.integers(1, 4))
        foci = []
        for _ in range(n):
            c = _random_parenchyma_point(
                r,
                geom,
                anat,
                6.0,
                avoid=placed,
                min_sep=12.0,
                deep_bias=0.4,
                what="intracranial_calcification",
                ventricles=vent,
            )
            c = _snap(geom, c)
            foci.append(
                {
                    "center_uvw": c,
                    "radius": float(r.uniform(0.8, 2.8)),
                    "hu": float(r.uniform(250.0, 900.0)),
                }
            )
        plan["intracranial_calcification"] = {
            "foci": foci,
            "subtle": max(f["radius"] for f in foci) < 1.5,
        }

    if "skull_fracture" in fs:
        r = rngs["skull_fracture"]
        px = geom.spacing[1]
        plan["skull_fracture"] = {
            "gap_mm": float(max(r.uniform(1.5, 3.5), 1.6 * px)),
            "length_mm": float(r.uniform(25.0, 70.0)),
            "subtle": False,
            "seed": int(r.integers(2**31)),
        }
    return plan, mods


def _render_ich(ctx: RenderContext, p: dict[str, Any]) -> None:
    sl = _bbox(ctx, p["center_uvw"], p["radius"] * 1.6 + 2.0)
    rr = _blob(ctx, p, sl)
    m = (rr <= 1.0) & (ctx.brain[sl] | ctx.sulci[sl])
    ctx.vol[sl][m] = p["hu"]
    _mark(ctx, "intraparenchymal_hemorrhage", m, sl)
    p["voxels"] = int(m.sum())


def _render_mass(ctx: RenderContext, p: dict[str, Any]) -> None:
    sl = _bbox(ctx, p["center_uvw"], p["radius"] * 1.6 + 2.0)
    rr = _blob(ctx, p, sl)
    m = (rr <= 1.0) & ctx.cavity[sl]
    sub = ctx.vol[sl]
    sub[m] = p["hu"]
    if p.get("necrotic"):
        sub[m & (rr < 0.45)] = p["core_hu"]
    for arr in (ctx.brain, ctx.grey, ctx.white, ctx.sulci, ctx.ventricles):
        arr[sl][m] = False
    _mark(ctx, "intracranial_mass", m, sl)
    p["voxels"] = int(m.sum())


def _render_edema(ctx: RenderContext, p: dict[str, Any]) -> None:
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
    _mark(ctx, "vasogenic_edema", m, sl)
    p["voxels"] = int(m.sum())


def _render_extra_axial(ctx: RenderContext, p: dict[str, Any], lens: bool, key: str) -> None:
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
    _mark(ctx, key, pick)
    p["voxels"] = int(sel.sum())
    p["center_uvw"] = _surface_point(ctx.anat, np.asarray(p["direction"]), 0.5 * tmax)


def _render_ivh(ctx: RenderContext, p: dict[str, Any]) -> None:
    vent = ctx.ventricles
    if not vent.any():
        raise PlacementError(
            "synthetic phantom: no ventricle inside the scanned slab for "
            "intraventricular_hemorrhage; use more slices (--slices)"
        )
    idx = np.nonzero(vent)
    # Blood layers in the dependent (posterior, +y for a supine patient) part of the ventricles.
    yv = np.broadcast_to(ctx.y, ctx.vol.shape)[idx]
    level = np.quantile(yv, 1.0 - p["fill_fraction"])
    sel = yv >= level
    pick = tuple(i[sel] for i in idx)
    ctx.vol[pick] = p["hu"]
    _mark(ctx, "intraventricular_hemorrhage", pick)
    p["level_y_mm"] = float(level)
    p["voxels"] = int(sel.sum())
    cen = np.array([i[sel].mean() for i in idx])
    p["center_uvw"] = ctx.geom.to_anatomical(ctx.geom.index_to_world(cen))


def _render_sah(ctx: RenderContext, p: dict[str, Any]) -> None:
    sl = _bbox(ctx, p["center_uvw"], p["radius"] + 2.0)
    u, v, w = _sub(ctx, sl)
    c = np.asarray(p["center_uvw"])
    dist = np.sqrt((u - c[0]) ** 2 + (v - c[1]) ** 2 + (w - c[2]) ** 2)
    rim = ctx.cavity[sl] & (ctx.brain_depth[sl] <= 0) & ~ctx.ventricles[sl]
    m = (dist <= p["radius"]) & (ctx.sulci[sl] | rim)
    ctx.vol[sl][m] = p["hu"]
    _mark(ctx, "subarachnoid_hemorrhage", m, sl)
    p["voxels"] = int(m.sum())
    if p["voxels"] == 0:
        raise PlacementError(
            "synthetic phantom: subarachnoid_hemorrhage region falls outside "
            "the scanned slab; use more slices (--slices)"
        )


def _render_infarct(ctx: RenderContext, p: dict[str, Any]) -> None:
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
    sel = (
        (np.abs(az - p["az_deg"]) < p["half_width_deg"])
        & (wi > p["w_range"][0])
        & (wi < p["w_range"][1])
        & (rad > p["inner_frac"] * 0.8)
        & (ui > 0)
    )
    pick = tuple(i[sel] for i in idx)
    # Loss of grey-white differentiation + hypodensity + sulcal effacement.
    ctx.vol[pick] = ctx.anat.white_hu - p["drop_hu"]
    _mark(ctx, "acute_infarct", pick)
    p["voxels"] = int(sel.sum())
    if p["voxels"] == 0:
        raise PlacementError(
            "synthetic phantom: acute_infarct territory falls outside the "
            "scanned slab; use more slices (--slices)"
        )
    cen = np.array([i[sel].mean() for i in idx])
    p["center_uvw"] = ctx.geom.to_anatomical(ctx.geom.index_to_world(cen))


def _render_calcification(ctx: RenderContext, p: dict[str, Any]) -> None:
    total = 0
    for f in p["foci"]:
        sl = _bbox(ctx, f["center_uvw"], f["radius"] + 2.0)
        u, v, w = _sub(ctx, sl)
        c = np.asarray(f["center_uvw"])
        dist = np.sqrt((u - c[0]) ** 2 + (v - c[1]) ** 2 + (w - c[2]) ** 2)
        m = dist <= max(f["radius"], 0.05)
        ctx.vol[sl][m] = f["hu"]
        _mark(ctx, "intracranial_calcification", m, sl)
        total += int(m.sum())
    p["voxels"] = total
    p["center_uvw"] = p["foci"][0]["center_uvw"]


def _render_fracture(ctx: RenderContext, p: dict[str, Any]) -> None:
    r = np.random.default_rng(p["seed"])
    geom = ctx.geom
    # A calvarial site (above the skull base, inside the slab away from its ends).
    zi = np.arange(geom.shape[0])
    edge = min(2, geom.shape[0] // 3)
    keep = (zi >= edge) & (zi <= geom.shape[0] - 1 - edge)
    calv = ctx.skull & (ctx.d_in < 0) & keep[:, None, None]
    calv &= (ctx.w - floor_w(ctx.v, ctx.anat.head_axes)) > 12.0
    idx = np.nonzero(calv)
    if idx[0].size == 0:
        raise PlacementError(
            "synthetic phantom: no calvarium inside the scanned slab for "
            "skull_fracture; use more slices (--slices)"
        )
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
    _mark(ctx, "skull_fracture", pick)
    p.update(
        {
            "site_xyz": site,
            "site_index": site_idx,
            "normal": normal,
            "along": along,
            "voxels": int(sel.sum()),
            "center_uvw": geom.to_anatomical(site),
        }
    )


#: Renderers in drawing order (later ones paint over earlier ones). Hydrocephalus and midline
#: shift are not here: they change the anatomy itself (planned in _plan_findings).
RENDER_ORDER: tuple[tuple[str, Callable[[RenderContext, dict[str, Any]], None]], ...] = (
    ("acute_infarct", _render_infarct),
    ("vasogenic_edema", _render_edema),
    ("intracranial_mass", _render_mass),
    ("intraparenchymal_hemorrhage", _render_ich),
    ("subarachnoid_hemorrhage", _render_sah),
    ("intraventricular_hemorrhage", _render_ivh),
    (
        "subdural_hemorrhage",
        lambda ctx, p: _render_extra_axial(ctx, p, False, "subdural_hemorrhage"),
    ),
    ("epidural_hematoma", lambda ctx, p: _render_extra_axial(ctx, p, True, "epidural_hematoma")),
    ("intracranial_calcification", _render_calcification),
    ("skull_fracture", _render_fracture),
)


def finding_rngs(seed: int) -> dict[str, np.random.Generator]:
    """One independent stream per finding kind: planting A never changes how B looks."""
    return {k: np.random.default_rng([seed, i]) for i, k in enumerate(PHANTOM_FINDINGS)}


def check_findings(findings: Sequence[str]) -> tuple[str, ...]:
    """Validate requested keys; return them in canonical order without duplicates."""
    bad = [f for f in findings if f not in PHANTOM_FINDINGS]
    if bad:
        raise MolreError(
            f"synthetic phantom cannot plant {', '.join(map(repr, bad))}; "
            f"plantable catalog keys: {', '.join(PHANTOM_FINDINGS)}"
        )
    return tuple(k for k in PHANTOM_FINDINGS if k in set(findings))
