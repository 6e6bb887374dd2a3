"""Per-backbone preprocessing: `SeriesVolume` (HU, LPS geometry) -> the tensor a backbone expects.

Why recipes are data (name + params) rather than code paths: the recipe a model was trained with
must be reproduced exactly at inference, so it is stored in the model card, compared when a
checkpoint is loaded, and hashed into the preprocessing cache key (`Recipe.cache_key`).

Recipes
-------
``ctfm-3d`` (CT-FM and other 3-D encoders) -> ``(1, D, H, W)`` float32 in 0..1:
    orientation SPL (axis 0 inferior->superior, axis 1 anterior->posterior, axis 2 patient
    right->left, i.e. the radiological view), resample to ``spacing`` mm (same S, P, L order),
    clip ``hu_range`` and scale to 0..1, pad with the minimum (0 = ``hu_range[0]``) and centre
    crop to ``roi``. Defaults follow CT-FM's head-CT recipe: spacing (5, 2, 2), roi (48, 128, 128),
    HU -1024..2048. With ``windows`` (a list of (center, width) CT windows) the output has one
    channel per window instead, ``(C, D, H, W)``, each scaled to 0..1 (blood, subdural and bone
    windows let a small network see both a 60 HU bleed and a 2 mm fracture). ``antialias``
    smooths before downsampling (Gaussian, sigma = (factor - 1) / 2 voxels per axis), so that a
    lesion smaller than the output voxel is averaged in rather than hit or missed by the grid.
``slices-2d`` (2-D encoders read the scan slice by slice) -> ``(S, 3, H, W)`` float32:
    orientation SPL, every axial slice of the series when ``n_slices`` is 0 (or null; the default
    of the 2-D backbones, so S varies with the series), else ``n_slices`` slices sampled evenly
    along z (linear interpolation between neighbours), each padded to a square field of view with air and resized to
    ``size`` x ``size``; three CT windows (default brain 40/80, subdural 75/215, bone 600/2800)
    become the 3 channels, each scaled to 0..1; then optional ``normalize``: ``"imagenet"``
    (DINOv3 / timm), ``"siglip"`` (mean = std = 0.5, MedSigLIP) or None (keep 0..1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError
from molre.data.volume import SeriesVolume

#: Bump when a recipe's output changes for the same params (invalidates caches).
DATA_VERSION = "molre-preprocess-1"

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "ctfm-3d": {
        "spacing": [5.0, 2.0, 2.0],
        "roi": [48, 128, 128],
        "hu_range": [-1024.0, 2048.0],
        "orientation": "SPL",
        "mode": "bilinear",
        "windows": None,
        "antialias": False,
    },
    "slices-2d": {
        "n_slices": 16,
        "size": 224,
        "windows": [[40.0, 80.0], [75.0, 215.0], [600.0, 2800.0]],
        "normalize": "imagenet",
        "orientation": "SPL",
    },
}
#: Accepted alternative parameter names -> canonical name.
_ALIASES: dict[str, dict[str, str]] = {"slices-2d": {"slices": "n_slices"}, "ctfm-3d": {}}


def _triple(name: str, key: str, value: Any, cast: Callable[[Any], Any]) -> list[Any]:
    try:
        vals = [cast(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"recipe {name!r}: {key} must be 3 numbers, got {value!r}") from None
    if len(vals) != 3 or any(v <= 0 for v in vals):
        raise ConfigError(f"recipe {name!r}: {key} must be 3 positive numbers, got {value!r}")
    return vals


def _validate(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    if name not in _DEFAULTS:
        raise ConfigError(
            f"unknown preprocessing recipe {name!r}; use one of {', '.join(_DEFAULTS)}"
        )
    given = {}
    for key, value in params.items():
        canon = _ALIASES[name].get(key, key)
        if canon not in _DEFAULTS[name]:
            raise ConfigError(
                f"recipe {name!r}: unknown parameter {key!r}; allowed: {', '.join(_DEFAULTS[name])}"
            )
        given[canon] = value
    p = json.loads(json.dumps(_DEFAULTS[name])) | given
    orient = str(p["orientation"]).upper()
    if not _valid_axcodes(orient):
        raise ConfigError(
            f"recipe {name!r}: orientation {p['orientation']!r} is not 3 axis codes such as 'SPL'"
        )
    p["orientation"] = orient
    if name == "ctfm-3d":
        p["spacing"] = _triple(name, "spacing", p["spacing"], float)
        p["roi"] = _triple(name, "roi", p["roi"], int)
        lo, hi = (float(v) for v in p["hu_range"])
        if not lo < hi:
            raise ConfigError(f"recipe {name!r}: hu_range must be (low, high) with low < high")
        p["hu_range"] = [lo, hi]
        if p["mode"] not in ("bilinear", "nearest"):
            raise ConfigError(f"recipe {name!r}: mode must be 'bilinear' or 'nearest'")
        if p["windows"] is not None:
            try:
                p["windows"] = [[float(c), float(w)] for c, w in p["windows"]]
            except (TypeError, ValueError):
                raise ConfigError(
                    f"recipe {name!r}: windows must be (center, width) pairs"
                ) from None
            if not p["windows"] or any(w <= 0 for _, w in p["windows"]):
                raise ConfigError(
                    f"recipe {name!r}: windows must be non-empty (center, width) "
                    "pairs with width > 0"
                )
        p["antialias"] = bool(p["antialias"])
    else:
        if p["n_slices"] is None:  # null = every slice
            p["n_slices"] = 0
        for key in ("n_slices", "size"):
            try:
                p[key] = int(p[key])
            except (TypeError, ValueError):
                raise ConfigError(f"recipe {name!r}: {key} must be an integer") from None
            if p[key] < (0 if key == "n_slices" else 1):
                raise ConfigError(
                    f"recipe {name!r}: {key} must be >= 1"
                    + (" (or 0 = every slice)" if key == "n_slices" else "")
                )
        try:
            windows = [[float(c), float(w)] for c, w in p["windows"]]
        except (TypeError, ValueError):
            raise ConfigError(f"recipe {name!r}: windows must be 3 (center, width) pairs") from None
        if len(windows) != 3 or any(w <= 0 for _, w in windows):
            raise ConfigError(
                f"recipe {name!r}: windows must be 3 (center, width) pairs with "
                "width > 0 (one per channel)"
            )
        p["windows"] = windows
        norm = p["normalize"]
        if norm is not None and not (isinstance(norm, str) and norm in NORMALIZATIONS):
            raise ConfigError(
                f"recipe {name!r}: normalize must be null or one of {', '.join(NORMALIZATIONS)}"
            )
    return p


def _valid_axcodes(codes: str) -> bool:
    pairs = [set("LR"), set("AP"), set("IS")]
    return len(codes) == 3 and all(sum(c in pair for c in codes) == 1 for pair in pairs)


@dataclass
class Recipe:
    """A named, parameterised preprocessing; call it on a `SeriesVolume`."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.params = _validate(self.name, self.params)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Flat ``{"name": ..., **params}`` — the form BackboneSpec.recipe and model cards use."""
        return {"name": self.name, **json.loads(json.dumps(self.params))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        """Accepts the flat form or ``{"name": ..., "params": {...}}``."""
        if "name" not in data:
            raise ConfigError(f"a recipe needs a 'name' (one of {', '.join(_DEFAULTS)})")
        if set(data) == {"name", "params"}:
            return cls(str(data["name"]), dict(data["params"]))
        return cls(str(data["name"]), {k: v for k, v in data.items() if k != "name"})

    def cache_key(self) -> str:
        """Stable hash of name + params + preprocessing data version (+ MONAI's major.minor)."""
        import monai

        canon = json.dumps(
            {
                "name": self.name,
                "params": self.params,
                "data": DATA_VERSION,
                "monai": ".".join(monai.__version__.split(".")[:2]),
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canon.encode()).hexdigest()[:32]

    def output_shape(self) -> tuple[int, ...]:
        """Shape of the output; for ``slices-2d`` with ``n_slices`` 0 the first entry is 0,
        meaning "the series' slice count" (it varies)."""
        p = self.params
        if self.name == "ctfm-3d":
            return (len(p["windows"] or [None]), *p["roi"])
        return (p["n_slices"], 3, p["size"], p["size"])

    # -- application ----------------------------------------------------------------------------
    def oriented(self, volume: SeriesVolume) -> Any:
        """The volume as a MONAI MetaTensor (1, ...) in this recipe's orientation (RAS affine)."""
        from monai.transforms import Orientation

        # our MetaTensors carry RAS affines: say so, rather than rely on MONAI's changing default
        labels = (("L", "R"), ("P", "A"), ("I", "S"))
        orient = Orientation(axcodes=self.params["orientation"], labels=labels)
        return orient(volume.to_metatensor())

    def transform_meta(self, volume: SeriesVolume) -> Any:
        """3-D recipes: the output as a MetaTensor whose affine maps output voxels to RAS mm.

        Orientation, antialiasing and resampling are computed as one separable linear map per
        axis (`_separable`), applied to each slice as it is decoded; geometries it does not
        cover use MONAI's transforms (`_resampled_monai`). Both give the same volume within
        float32 rounding (tests/test_thin_series.py)."""
        if self.name != "ctfm-3d":
            raise ValueError("transform_meta is only defined for 3-D recipes")
        fast = self._separable(volume)
        if fast is None:
            return self._window_pad_crop(self._resampled_monai(volume))
        from monai.data import MetaTensor

        x, affine = fast
        return MetaTensor(
            x,
            affine=torch.as_tensor(affine, dtype=torch.float64),
            meta={
                "space": "RAS",
                "series_uid": volume.series_uid,
                "study_uid": volume.study_uid,
                "filename_or_obj": volume.series_uid,
                "original_affine": torch.as_tensor(volume.affine("RAS")),
            },
        )

    def _resampled_monai(self, volume: SeriesVolume) -> Any:
        """Reference path: MONAI Orientation -> GaussianSmooth (antialias) -> Spacing on the
        full-resolution volume."""
        from monai.transforms import Spacing

        p = self.params
        img = self.oriented(volume)
        if p["antialias"]:
            from monai.transforms import GaussianSmooth

            factor = [t / float(s) for t, s in zip(p["spacing"], img.pixdim)]
            sigma = [max(0.0, (f - 1.0) / 2.0) for f in factor]
            if any(sg > 0 for sg in sigma):
                img = GaussianSmooth(sigma=sigma)(img)
        return Spacing(
            pixdim=p["spacing"], mode=p["mode"], padding_mode="border", dtype=np.float32
        )(img)

    def _window_pad_crop(self, img: Any) -> Any:
        from monai.transforms import CenterSpatialCrop, ScaleIntensityRange, SpatialPad

        p = self.params
        if p["windows"]:
            chans = [((img - (c - w / 2.0)) / w).clamp(0.0, 1.0) for c, w in p["windows"]]
            img = torch.cat(chans, dim=0)
        else:
            lo, hi = p["hu_range"]
            img = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(img)
        img = SpatialPad(spatial_size=p["roi"], method="symmetric", mode="constant", value=0.0)(img)
        img = CenterSpatialCrop(roi_size=p["roi"])(img)
        return img

    def _separable(self, volume: SeriesVolume) -> tuple[torch.Tensor, np.ndarray] | None:
        """What `_resampled_monai` + `_window_pad_crop` compute, as three per-axis matrices:
        the (C, D, H, W) float32 model input and its output-index -> RAS affine.

        Why this is the same thing: Orientation only permutes and flips axes; Spacing (not
        ``diagonal``) keeps the direction cosines, so each output index maps to an input index
        along the same axis (an axis-wise scale + offset, sampled linearly with the border
        clamped, as grid_sample does); GaussianSmooth is separable (zero padding). Each axis is
        therefore one matrix W (n_out x n_in) = interpolation @ Gaussian, and the volume is
        Wz . (Wy @ slice @ Wx^T): the in-plane part runs on every slice as it is decoded
        (`DeferredSeriesVolume.reduce_slices`), so a 480 x 512 x 512 series costs a few
        megabytes instead of gigabytes of float copies and 3-D convolutions, and MONAI (whose
        import alone is ~340 MB) is not needed. The geometry follows MONAI's rules (nibabel's
        io_orientation, zoom_affine, compute_shape_offset, symmetric pad, centre crop); tests
        compare both paths. None when the geometry is not axis-wise or the mode is not
        bilinear: the caller uses MONAI."""
        from scipy import sparse

        from molre.data.volume import DeferredSeriesVolume

        if self.name != "ctfm-3d":
            return None
        nz, ny, nx = (int(v) for v in volume.shape)
        plan = _separable_plan(self.params, (nz, ny, nx), volume.affine("RAS"))
        if plan is None:
            return None
        (wz, wy, wx), transpose, affine = plan
        my = sparse.csr_matrix(wy)
        mx = sparse.csr_matrix(wx)

        def inplane(hu: np.ndarray) -> np.ndarray:
            return np.asarray((mx @ np.asarray(my @ hu).T).T)

        hw = (wy.shape[0], wx.shape[0])
        reduced = None
        if isinstance(volume, DeferredSeriesVolume):
            reduced = volume.reduce_slices(inplane, hw)
        if reduced is None:
            hu = volume.hu
            reduced = np.empty((hu.shape[0], *hw), np.float32)
            for k in range(hu.shape[0]):
                reduced[k] = inplane(hu[k])
        out = np.tensordot(wz, reduced, axes=(1, 0)).astype(np.float32, copy=False)
        img = torch.from_numpy(np.ascontiguousarray(np.transpose(out, transpose)))[None]
        return _window_pad_crop_array(self.params, img, affine)

    def __call__(self, volume: SeriesVolume) -> torch.Tensor:
        if self.name == "ctfm-3d":
            fast = self._separable(volume)  # no MONAI import on this path (inference process)
            if fast is not None:
                return fast[0].contiguous()
            out = self.transform_meta(volume)
            return torch.as_tensor(
                out.as_tensor() if hasattr(out, "as_tensor") else out, dtype=torch.float32
            ).contiguous()
        return self._slices_2d(volume)

    def _slices_2d(self, volume: SeriesVolume) -> torch.Tensor:
        p = self.params
        img = self.oriented(volume)
        vol = torch.as_tensor(img.as_tensor()[0], dtype=torch.float32)  # (z, y, x) oriented
        pixdim = [float(v) for v in img.pixdim]  # spacing of the oriented axes
        n = p["n_slices"]
        z = vol.shape[0]
        if n == 0:  # every slice, as acquired
            slices = vol
        else:
            pos = torch.linspace(0, z - 1, n) if n > 1 else torch.tensor([(z - 1) / 2])
            lo = pos.floor().long().clamp(0, z - 1)
            hi = (lo + 1).clamp(max=z - 1)
            w = (pos - lo.float()).view(-1, 1, 1)
            slices = (1 - w) * vol[lo] + w * vol[hi]  # (S, y, x)
        # square field of view in mm, padded with air, so anatomy keeps its aspect ratio
        h_mm, w_mm = slices.shape[1] * pixdim[1], slices.shape[2] * pixdim[2]
        side_mm = max(h_mm, w_mm)
        pad_y = int(round((side_mm - h_mm) / pixdim[1]))
        pad_x = int(round((side_mm - w_mm) / pixdim[2]))
        air = float(min(-1024.0, float(slices.min())))
        if pad_y or pad_x:
            slices = torch.nn.functional.pad(
                slices,
                (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2),
                mode="constant",
                value=air,
            )
        size = p["size"]
        slices = torch.nn.functional.interpolate(
            slices[:, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[:, 0]
        chans = []
        for center, width in p["windows"]:
            low = center - width / 2
            chans.append(((slices - low) / width).clamp(0.0, 1.0))
        out = torch.stack(chans, dim=1)  # (S, 3, H, W)
        if p["normalize"] is not None:
            mean, std = NORMALIZATIONS[p["normalize"]]
            out = (out - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        return out.contiguous()


#: Tolerance on the index maps of `_separable_plan` (a matrix entry below it counts as zero).
_AXIS_TOL = 1e-6
#: MONAI's AFFINE_TOL (monai.data.utils): spacings / affines closer than this count as equal.
_MONAI_AFFINE_TOL = 1e-3
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _io_orientation(affine: np.ndarray) -> list[tuple[int, int]]:
    """nibabel.orientations.io_orientation (what MONAI's Orientation uses): for each array
    axis, the closest world axis and its direction (+1 / -1)."""
    rzs = affine[:3, :3]
    zooms = np.sqrt(np.sum(rzs * rzs, axis=0))
    zooms[zooms == 0] = 1
    p_, s_, qs = np.linalg.svd(rzs / zooms, full_matrices=False)
    tol = s_.max() * 3 * np.finfo(s_.dtype).eps
    keep = s_ > tol
    r = np.dot(p_[:, keep], qs[keep])
    out: list[tuple[int, int]] = [(-1, 0)] * 3
    for in_ax in np.argsort(np.min(-(r**2), axis=0), kind="stable"):
        col = r[:, in_ax]
        if np.allclose(col, 0):
            raise ValueError("degenerate affine")
        out_ax = int(np.argmax(np.abs(col)))
        out[int(in_ax)] = (out_ax, -1 if col[out_ax] < 0 else 1)
        r[out_ax, :] = 0
    return out


def _oriented_affine(
    src: np.ndarray, shape: tuple[int, int, int], axcodes: str
) -> tuple[np.ndarray, list[int], list[tuple[int, bool]]]:
    """MONAI Orientation(axcodes, labels=RAS) on an array with affine `src`: the new affine,
    shape, and for each new axis the source axis and whether it is flipped."""
    ornt = _io_orientation(src)
    want = []  # per output axis: (world axis, direction)
    for code in axcodes:
        for w, (lo, hi) in enumerate(_RAS_LABELS):
            if code in (lo, hi):
                want.append((w, 1 if code == hi else -1))
    src_axis: list[tuple[int, bool]] = []
    for w, d in want:
        a = next(i for i, (ow, _) in enumerate(ornt) if ow == w)
        src_axis.append((a, ornt[a][1] != d))
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for k, (a, flip) in enumerate(src_axis):
        m[a, k] = -1.0 if flip else 1.0
        if flip:
            m[a, 3] = shape[a] - 1
    return src @ m, [shape[a] for a, _ in src_axis], src_axis


def _spacing_geometry(
    a_in: np.ndarray, shape: list[int], pixdim: Sequence[float]
) -> tuple[np.ndarray, list[int]]:
    """MONAI Spacing(pixdim, diagonal=False, scale_extent=False): output affine and shape."""
    orig = np.sqrt(np.sum(a_in[:3, :3] ** 2, axis=0))
    out_d = np.array([float(v) for v in pixdim])
    for i in range(3):  # a spacing within AFFINE_TOL of the target is kept as it is
        if out_d[i] - _MONAI_AFFINE_TOL <= orig[i] <= out_d[i] + _MONAI_AFFINE_TOL:
            out_d[i] = orig[i]
    out_d[out_d == 0] = 1.0
    rzs = a_in[:3, :3]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    new = np.eye(4)
    new[:3, :3] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(out_d))
    corners = np.asarray(np.meshgrid(*[(0.0, n - 1.0) for n in shape], indexing="ij")).reshape(
        (3, -1)
    )
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    corners_out = np.linalg.solve(new, a_in) @ corners
    world = a_in @ corners
    all_dist = corners_out[:-1].copy()
    corners_out = corners_out[:-1] / corners_out[-1]
    out_shape = np.round(np.ptp(corners_out, axis=1) + 1.0)
    offset = None
    for i in range(world.shape[1]):
        if np.allclose(np.min(all_dist - all_dist[:, i : i + 1], 1), 0.0, rtol=_MONAI_AFFINE_TOL):
            offset = world[:-1, i]
            break
    if offset is None:
        shp = np.array(shape, dtype=float)
        offset = a_in[:-1, :-1] @ (shp / 2.0) + a_in[:-1, -1] - new[:-1, :-1] @ (out_shape / 2.0)
    new[:3, 3] = offset
    return new, [int(v) for v in out_shape]


def _gaussian_1d(sigma: float) -> np.ndarray:
    """monai.networks.layers.convutils.gaussian_1d(sigma, truncated=4.0, approx="erf"), the
    same float32 torch arithmetic."""
    sg = torch.as_tensor(sigma, dtype=torch.float)
    tail = int(max(float(sg) * 4.0, 0.5) + 0.5)
    x = torch.arange(-tail, tail + 1, dtype=torch.float)
    t = 0.70710678 / torch.abs(sg)
    out = 0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())
    return out.clamp(min=0).numpy().astype(np.float64)


def _separable_plan(
    p: Mapping[str, Any], shape: tuple[int, int, int], ras_affine: np.ndarray
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[int, int, int], np.ndarray] | None:
    """Per-axis matrices (for the volume's z, y, x axes) of orientation + antialias +
    resampling, the transpose from (z, y, x) to the output axes, and the resampled grid's
    affine (RAS)."""
    if p["mode"] != "bilinear":
        return None
    src = np.asarray(ras_affine, dtype=np.float64)
    try:
        a_or, shape_or, src_axis = _oriented_affine(src, shape, p["orientation"])
        a_out, shape_out = _spacing_geometry(a_or, shape_or, p["spacing"])
    except (ValueError, StopIteration, np.linalg.LinAlgError):
        return None
    if sorted(a for a, _ in src_axis) != [0, 1, 2] or min(shape_out) < 1:
        return None
    xform = np.linalg.solve(a_or, a_out)  # output index -> oriented index: axis-wise?
    off = xform[:3, :3] - np.diag(np.diag(xform[:3, :3]))
    if np.max(np.abs(off)) > _AXIS_TOL * max(1.0, float(np.max(np.abs(xform[:3, :3])))):
        return None
    unchanged = (np.allclose(a_or, a_out, atol=_MONAI_AFFINE_TOL) and shape_or == shape_out) or (
        np.allclose(xform, np.eye(4), atol=_MONAI_AFFINE_TOL) and shape_or == shape_out
    )
    pixdim = np.sqrt((a_or[:3, :3] ** 2).sum(axis=0))
    sigma = [0.0, 0.0, 0.0]
    if p["antialias"]:
        sigma = [max(0.0, (t / float(s) - 1.0) / 2.0) for t, s in zip(p["spacing"], pixdim)]
    smooth = any(sg > 0 for sg in sigma)
    mats: list[np.ndarray | None] = [None, None, None]
    for k in range(3):
        n, n_out = shape_or[k], shape_out[k]
        if unchanged:  # MONAI returns the image as it is (no resampling)
            m = np.eye(n)
        else:
            x = np.clip(xform[k, k] * np.arange(n_out) + xform[k, 3], 0.0, n - 1)
            i0 = np.floor(x).astype(np.int64)
            w = x - i0
            i1 = np.minimum(i0 + 1, n - 1)
            m = np.zeros((n_out, n))
            np.add.at(m, (np.arange(n_out), i0), 1.0 - w)
            np.add.at(m, (np.arange(n_out), i1), w)
        if smooth and sigma[k] > 0:  # zero-padded correlation, as GaussianSmooth does:
            kern = _gaussian_1d(sigma[k])  # m @ G with G[i, i + d] = kern[tail + d]
            tail = (len(kern) - 1) // 2
            mg = np.zeros_like(m)
            for d in range(-min(tail, n - 1), min(tail, n - 1) + 1):
                if d >= 0:
                    mg[:, d:] += m[:, : n - d] * kern[d + tail]
                else:
                    mg[:, : n + d] += m[:, -d:] * kern[d + tail]
            m = mg
        a, flip = src_axis[k]
        if flip:
            m = m[:, ::-1]
        mats[a] = np.ascontiguousarray(m, dtype=np.float32)
    transpose = tuple(src_axis[k][0] for k in range(3))
    return (mats[0], mats[1], mats[2]), transpose, a_or if unchanged else a_out  # type: ignore


def _window_pad_crop_array(
    p: Mapping[str, Any], img: torch.Tensor, affine: np.ndarray
) -> tuple[torch.Tensor, np.ndarray]:
    """`Recipe._window_pad_crop` without MONAI: windows (or the HU range) to 0..1, symmetric
    zero padding to ``roi``, centre crop to ``roi``; the affine follows the voxels."""
    if p["windows"]:
        img = torch.cat(
            [((img - (c - w / 2.0)) / w).clamp(0.0, 1.0) for c, w in p["windows"]], dim=0
        )
    else:
        lo, hi = p["hu_range"]
        img = ((img - lo) / (hi - lo)) * (1.0 - 0.0) + 0.0
        img = img.clamp(0.0, 1.0).to(torch.float32)
    roi = [int(v) for v in p["roi"]]
    size = list(img.shape[1:])
    before = [max(r - n, 0) // 2 for r, n in zip(roi, size)]
    after = [max(r - n, 0) - b for r, n, b in zip(roi, size, before)]
    if any(before) or any(after):
        img = torch.nn.functional.pad(
            img,
            [v for b, a in zip(reversed(before), reversed(after)) for v in (b, a)],
            mode="constant",
            value=0.0,
        )
    size = list(img.shape[1:])
    start = [max(n // 2 - r // 2, 0) for n, r in zip(size, roi)]
    img = img[
        :, start[0] : start[0] + roi[0], start[1] : start[1] + roi[1], start[2] : start[2] + roi[2]
    ]
    shift = np.eye(4)
    shift[:3, 3] = np.array(start, dtype=float) - np.array(before, dtype=float)
    return img.contiguous(), affine @ shift


def make_recipe(name: str, **params: Any) -> Recipe:
    """Build a recipe by name; unknown names/params raise ConfigError naming them."""
    return Recipe(name, params)


def recipe_names() -> list[str]:
    return list(_DEFAULTS)


__all__ = ["DATA_VERSION", "NORMALIZATIONS", "Recipe", "make_recipe", "recipe_names"]
