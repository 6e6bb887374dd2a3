"""Sites: the scanner and protocol a phantom is acquired with, applied *in the pixels*.

The MoLRE paper's premise is heterogeneous data (many centres, scanners and protocols). A site
here fixes what differs between hospitals: reconstruction kernel (smooth vs edge-enhanced, which
shapes both the anatomy and the noise texture), slice thickness and spacing (with a slice
profile along z), dose (noise level), calibration (HU gain and offset), beam hardening near the
skull (pseudo-enhancement of the brain next to the inner table), field of view and matrix, and
gantry tilt, plus the DICOM tags a scanner of that kind writes. Per-series values are drawn from
the site's ranges, so two series of one site differ a little and two sites differ a lot.
Finding prevalence never depends on the site.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from common.errors import MolreError

from .anatomy import Anatomy, RenderContext
from .geometry import PhantomGeometry, rotation_matrix

SLICE_THICKNESSES: tuple[float, ...] = (2.5, 3.0, 4.0, 5.0)
MIN_SIZE, MAX_SIZE = 32, 512
MIN_PIXEL, MAX_PIXEL = 0.45, 1.8

Range = tuple[float, float]


@dataclass(frozen=True)
class Site:
    """One scanner + protocol. Ranges are (low, high) drawn uniformly per series."""

    name: str
    description: str
    manufacturer: str
    model: str
    kernel: str  # ConvolutionKernel tag
    kernel_sigma_mm: float  # in-plane Gaussian blur of the reconstruction (signal and noise)
    sharpen: float  # unsharp-mask gain (edge enhancement); 0 = none
    thickness_mm: tuple[float, ...]  # SliceThickness choices
    spacing_ratio: float  # table step / thickness (< 1 = overlapping reconstruction)
    noise_hu: Range  # noise standard deviation in HU after the kernel
    hu_gain: Range
    hu_offset: Range
    cupping_hu: Range  # pseudo-enhancement at the inner table, decaying inward
    fov_factor: Range  # field of view / head length
    matrix: int  # default matrix (rows = columns)
    tilt_deg: Range  # gantry tilt
    kvp: str = "120"
    slice_profile: bool = True  # blur along z with FWHM = slice thickness

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SITES: dict[str, Site] = {
    s.name: s
    for s in (
        Site(
            "metro",
            "smooth kernel, 5 mm, low noise, well calibrated",
            "SIM-SIEMENS",
            "Definition AS sim",
            "H31s",
            0.9,
            0.0,
            (5.0,),
            1.0,
            (2.5, 4.0),
            (0.99, 1.01),
            (-2.0, 2.0),
            (2.0, 5.0),
            (1.12, 1.22),
            128,
            (0.0, 0.0),
        ),
        Site(
            "coastal",
            "edge-enhancing kernel, 2.5 mm, noisy, tilted gantry, +HU offset",
            "SIM-GE",
            "Revolution sim",
            "DETAIL",
            0.45,
            0.9,
            (2.5,),
            1.0,
            (7.0, 10.0),
            (1.0, 1.03),
            (5.0, 10.0),
            (2.0, 4.0),
            (1.15, 1.30),
            160,
            (12.0, 20.0),
        ),
        Site(
            "valley",
            "standard kernel, 3 mm, strong beam hardening, low gain, -HU offset",
            "SIM-PHILIPS",
            "Ingenuity sim",
            "UB",
            0.7,
            0.3,
            (3.0,),
            1.0,
            (4.0, 6.0),
            (0.95, 0.98),
            (-12.0, -6.0),
            (8.0, 14.0),
            (1.20, 1.35),
            128,
            (0.0, 0.0),
        ),
        Site(
            "uplands",
            "low-dose, smooth kernel, 5 mm reconstructed every 4 mm, wide field",
            "SIM-CANON",
            "Aquilion sim",
            "FC21",
            1.1,
            0.0,
            (5.0,),
            0.8,
            (9.0, 13.0),
            (1.02, 1.05),
            (0.0, 6.0),
            (4.0, 8.0),
            (1.28, 1.42),
            144,
            (0.0, 6.0),
        ),
    )
}
#: The scanner of phantoms written without a site (the generator's original, neutral scanner).
GENERIC = Site(
    "generic",
    "neutral scanner (phantoms without a site)",
    "molre-node synthetic",
    "head phantom",
    "STANDARD",
    0.8,
    0.0,
    SLICE_THICKNESSES,
    1.0,
    (3.0, 8.0),
    (1.0, 1.0),
    (0.0, 0.0),
    (0.0, 0.0),
    (1.12, 1.28),
    128,
    (0.0, 0.0),
    slice_profile=False,
)


def get_site(name: str | None) -> Site:
    if name is None or name == GENERIC.name:
        return GENERIC
    try:
        return SITES[name]
    except KeyError:
        raise MolreError(
            f"unknown synthetic site {name!r}; built-in sites: {', '.join(SITES)}"
        ) from None


def check_sites(names: Any) -> tuple[str, ...]:
    """Validate a list of site names (None or empty = every built-in site)."""
    if not names:
        return tuple(SITES)
    out = tuple(dict.fromkeys(str(n).strip() for n in names if str(n).strip()))
    for n in out:
        get_site(n)
    return out


def make_geometry(
    rng: np.random.Generator,
    anat: Anatomy,
    site: Site,
    size: int | None,
    n_slices: int | None,
    slice_thickness: float | None,
) -> PhantomGeometry:
    """Field of view, matrix, slice grid, tilt and head pose of one acquisition at `site`."""
    hu_, hv, hw = anat.head_axes
    size = int(size or site.matrix)
    thick = float(slice_thickness) if slice_thickness else float(rng.choice(site.thickness_mm))
    dz = thick * (site.spacing_ratio if not slice_thickness else 1.0)
    # The field of view is chosen from the head size, as a technologist would; the pixel size
    # then follows from the matrix (clipped to what scanners produce).
    fov = 2.0 * hv * rng.uniform(*site.fov_factor)
    px = max(fov / size, MIN_PIXEL)
    if size >= 128:  # small test matrices keep the whole head with coarser pixels
        px = min(px, MAX_PIXEL)
    px = float(px)
    fov = px * size
    tilt = float(rng.uniform(*site.tilt_deg)) if site.tilt_deg[1] > 0 else 0.0
    yaw = math.radians(rng.uniform(-12, 12))
    pitch = math.radians(rng.uniform(-10, 10))
    roll = math.radians(rng.uniform(-3, 3))
    rot = rotation_matrix(yaw, pitch, roll)
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
    t = math.radians(tilt)
    if n_slices is None:  # a tilted slab must also cover the head's front and back
        extra = 2.0 * hv * abs(math.tan(t))
        n = max(1, int(math.ceil((z_hi - z_lo + extra) / dz)))
    else:
        n = int(n_slices)
    z_mid = 0.5 * (z_lo + z_hi) if n_slices is None else table_z + 0.5 * (lo[2] + 0.75 * top_z)
    # The tilted image plane pivots about the field's centre row (y = 0 at the centre row).
    half = 0.5 * (size - 1) * px
    z0 = z_mid - 0.5 * (n - 1) * dz - half * math.sin(t)
    origin = (-fov / 2 + px / 2, -half * math.cos(t), float(z0))
    return PhantomGeometry(
        shape=(n, size, size),
        spacing=(dz, px, px),
        origin=tuple(float(o) for o in origin),
        head_center=center,
        rotation=tuple(tuple(float(c) for c in row) for row in rot),
        yaw_deg=math.degrees(yaw),
        pitch_deg=math.degrees(pitch),
        roll_deg=math.degrees(roll),
        slice_thickness=thick,
        noise_sigma=float(rng.uniform(*site.noise_hu)),
        tilt_deg=tilt,
    )


def draw_scanner(rng: np.random.Generator, site: Site) -> dict[str, float]:
    """Per-series calibration and beam-hardening values of `site`."""
    return {
        "hu_gain": float(rng.uniform(*site.hu_gain)),
        "hu_offset": float(rng.uniform(*site.hu_offset)),
        "cupping_hu": float(rng.uniform(*site.cupping_hu)),
        "cupping_depth_mm": float(rng.uniform(6.0, 12.0)),
    }


def _kernel(img: np.ndarray, site: Site, px: float) -> np.ndarray:
    """In-plane reconstruction kernel: Gaussian blur, then optional unsharp edge enhancement."""
    s = site.kernel_sigma_mm / px
    out = ndimage.gaussian_filter(img, sigma=(0.0, s, s), mode="nearest")
    if site.sharpen:
        wide = ndimage.gaussian_filter(
            out, sigma=(0.0, 2.0 * s + 0.5, 2.0 * s + 0.5), mode="nearest"
        )
        out += np.float32(site.sharpen) * (out - wide)
    return out


def acquire(
    ctx: RenderContext, site: Site, scanner: dict[str, float], noise_rng: np.random.Generator | None
) -> np.ndarray:
    """The scanner's image of the rendered head: beam hardening, slice profile, kernel, noise
    (textured by the kernel) and calibration, clipped to the 12-bit CT range."""
    geom = ctx.geom
    vol = ctx.vol.copy()
    if scanner["cupping_hu"]:
        near = ctx.cavity & (ctx.d_in >= 0)
        vol[near] += np.float32(scanner["cupping_hu"]) * np.exp(
            -ctx.d_in[near] / np.float32(scanner["cupping_depth_mm"])
        ).astype(np.float32)
    # slice sensitivity profile: FWHM = slice thickness, in table steps
    sz = geom.slice_thickness / (2.355 * geom.spacing[0])
    if site.slice_profile and sz > 0.3 and vol.shape[0] > 1:
        vol = ndimage.gaussian_filter1d(vol, sigma=sz, axis=0, mode="nearest")
    px = geom.spacing[1]
    vol = _kernel(vol, site, px)
    if noise_rng is not None and geom.noise_sigma > 0:
        n = noise_rng.standard_normal(vol.shape, dtype=np.float32)
        n = _kernel(n, site, px)
        sd = float(n.std()) or 1.0
        vol += n * np.float32(geom.noise_sigma / sd)
    if scanner["hu_gain"] != 1.0 or scanner["hu_offset"]:
        vol = vol * np.float32(scanner["hu_gain"]) + np.float32(scanner["hu_offset"])
    np.clip(vol, -1024.0, 3071.0, out=vol)
    return vol


def site_tags(site: Site, geom: PhantomGeometry) -> dict[str, Any]:
    """The DICOM attributes a scanner of this site writes for the series."""
    tags: dict[str, Any] = {
        "Manufacturer": site.manufacturer,
        "ManufacturerModelName": site.model,
        "ConvolutionKernel": site.kernel,
        "KVP": site.kvp,
        "SliceThickness": f"{geom.slice_thickness:g}",
        "SpacingBetweenSlices": f"{geom.spacing[0]:g}",
        "GantryDetectorTilt": f"{geom.tilt_deg:.1f}",
    }
    if site is not GENERIC:
        tags["InstitutionName"] = f"molre synthetic {site.name}"
        tags["StationName"] = f"SIM{site.name.upper()[:12]}"
    return tags
