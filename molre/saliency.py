"""Saliency: where in the series the model looked for a finding, mapped back to the series' slices.

Why input gradients: they need nothing from the backbone (no named layer to hook, no per-backbone
code), they work for the 3-D recipes and for the 2-D slice-by-slice recipes alike, and they are
computed from the very model that reported the finding (one backward pass per finding). The map
is ``|d logit_f / d x|`` summed over the input channels (CT windows), smoothed with a Gaussian
(``SMOOTH_SIGMA_VOXELS`` voxels of the model's input grid) because raw gradients are speckled at
the scale of single voxels. ``method="grad_x_input"`` weights it by the input (zero where the
windowed input is zero, e.g. air); both are documented in docs/operations.md.

Geometry (why the maps are resampled, not re-indexed): the model reads a *preprocessed* grid
(reoriented, resampled to the recipe's spacing, padded and centre-cropped for ``ctfm-3d``;
slices sampled along z, padded to a square and resized for ``slices-2d``). Each recipe's output
index -> patient RAS mm mapping is known exactly (``input_affine``), the series volume's index ->
RAS mapping too (`SeriesVolume.affine`), so every voxel of the series volume is looked up in the
input-grid map by trilinear interpolation (outside the model's field of view: 0). The result is
on the `SeriesVolume` grid, whose planes are the acquired slices (``read_series`` keeps rows and
columns; planes lie at ``origin + z * spacing[0]`` along the slice normal), so the node can find
the source instance of each plane from ImagePositionPatient.

Everything returned is plain (dicts, lists, numpy arrays): it crosses the inference process's
pipe and is turned into DICOM by `node.evidence` without importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "METHODS",
    "SMOOTH_SIGMA_VOXELS",
    "MIN_RELATIVE_SCORE",
    "explain",
    "input_affine",
    "input_saliency",
    "key_planes",
    "map_to_volume",
]

METHODS = ("gradient", "grad_x_input")
#: Gaussian smoothing of the input-grid map (voxels of that grid, every axis).
SMOOTH_SIGMA_VOXELS = 1.0
#: A plane is a key plane only when its peak is at least this fraction of the volume's peak:
#: the slices that drove a finding, not the N highest of a flat map.
MIN_RELATIVE_SCORE = 0.5
#: Largest in-plane size of the returned per-plane maps (the node scales them to the slice).
MAX_PLANE_PX = 128


def input_affine(recipe: Any, volume: Any) -> tuple[torch.Tensor, np.ndarray]:
    """The model input for `volume` and the 4x4 matrix mapping its spatial index to RAS mm.

    ``ctfm-3d``: input (C, D, H, W), index (d, h, w). ``slices-2d``: input (S, 3, H, W), index
    (s, h, w) -- slice s of the oriented volume sampled at z = s (Z-1)/(S-1), each slice padded
    to a square (air) and resized to ``size`` (``Recipe._slices_2d``)."""
    if recipe.name == "ctfm-3d":
        out = recipe.transform_meta(volume)
        x = torch.as_tensor(
            out.as_tensor() if hasattr(out, "as_tensor") else out, dtype=torch.float32
        ).contiguous()
        return x, np.asarray(out.affine, dtype=np.float64)
    if recipe.name != "slices-2d":
        raise ValueError(f"saliency: no geometry for recipe {recipe.name!r}")
    p = recipe.params
    img = recipe.oriented(volume)
    a_or = np.asarray(img.affine, dtype=np.float64)  # oriented (z, y, x) index -> RAS
    z, h, w = (int(v) for v in img.shape[1:])
    pixdim = [float(v) for v in img.pixdim]
    n = p["n_slices"] or z
    if n < 2:
        raise ValueError("saliency: the recipe samples fewer than 2 slices; no z geometry")
    side_mm = max(h * pixdim[1], w * pixdim[2])
    pad_y = int(round((side_mm - h * pixdim[1]) / pixdim[1]))
    pad_x = int(round((side_mm - w * pixdim[2]) / pixdim[2]))
    size = p["size"]
    sy, sx = (h + pad_y) / size, (w + pad_x) / size  # resize (align_corners=False)
    m = np.eye(4)
    m[0, 0] = (z - 1) / (n - 1) if p["n_slices"] else 1.0
    m[1, 1], m[1, 3] = sy, 0.5 * sy - 0.5 - pad_y // 2
    m[2, 2], m[2, 3] = sx, 0.5 * sx - 0.5 - pad_x // 2
    return recipe(volume), a_or @ m


def _smooth(sal: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return sal
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(sal, sigma=sigma, mode="constant")


def input_saliency(
    model: torch.nn.Module,
    x: torch.Tensor,
    indices: Mapping[str, int],
    *,
    slices_2d: bool = False,
    method: str = "gradient",
    device: Any = "cpu",
    sigma: float = SMOOTH_SIGMA_VOXELS,
) -> dict[str, np.ndarray]:
    """Per finding, the smoothed gradient map on the input grid: (D, H, W) for a 3-D input
    (C, D, H, W), (S, H, W) for a 2-D one (S, 3, H, W). One forward, one backward per finding.

    The model stays in eval mode; only the input gets a gradient (frozen weights need none)."""
    if method not in METHODS:
        raise ValueError(f"saliency method must be one of {', '.join(METHODS)}, not {method!r}")
    xb = x.detach().to(device, torch.float32).unsqueeze(0).requires_grad_(True)
    out: dict[str, np.ndarray] = {}
    with torch.enable_grad():
        logits = model(xb)
        keys = list(indices)
        for n, key in enumerate(keys):
            (g,) = torch.autograd.grad(logits[0, indices[key]], xb, retain_graph=n < len(keys) - 1)
            g = g[0].float()
            if method == "grad_x_input":
                g = g * xb[0].detach()
            g = g.abs()
            # channels: axis 0 of a 3-D input (C, D, H, W), axis 1 of a 2-D one (S, 3, H, W)
            sal = g.sum(dim=1 if slices_2d else 0)
            out[key] = _smooth(sal.cpu().numpy().astype(np.float32), sigma)
    return out


def map_to_volume(
    sal: np.ndarray,
    in_affine: np.ndarray,
    vol_affine: np.ndarray,
    vol_shape: Sequence[int],
    stride: Sequence[int] = (1, 1),
    chunk: int = 16,
) -> np.ndarray:
    """Resample an input-grid map onto the series volume's grid.

    `in_affine`: input index (d, h, w) -> RAS mm; `vol_affine`: volume index (z, y, x) -> RAS
    mm; `stride` (y, x) subsamples each plane (the node scales the plane back up). Returns
    (Z, ceil(Y/sy), ceil(X/sx)) float32, 0 outside the model's field of view."""
    d, h, w = sal.shape
    if min(d, h, w) < 2:
        raise ValueError(f"saliency map {sal.shape} too small to interpolate")
    vol_to_in = np.linalg.inv(in_affine) @ vol_affine
    zs = np.arange(int(vol_shape[0]), dtype=np.float64)
    ys = np.arange(0, int(vol_shape[1]), int(stride[0]), dtype=np.float64)
    xs = np.arange(0, int(vol_shape[2]), int(stride[1]), dtype=np.float64)
    src = torch.from_numpy(np.ascontiguousarray(sal, np.float32))[None, None]
    scale = np.array([2.0 / (d - 1), 2.0 / (h - 1), 2.0 / (w - 1)])
    out = np.empty((len(zs), len(ys), len(xs)), np.float32)
    for a in range(0, len(zs), chunk):
        kk, jj, ii = np.meshgrid(zs[a : a + chunk], ys, xs, indexing="ij")
        idx = np.stack([kk, jj, ii], axis=-1)  # (n, h, w, 3) volume indices
        tgt = idx @ vol_to_in[:3, :3].T + vol_to_in[:3, 3]  # input indices (d, h, w)
        norm = tgt * scale - 1.0
        grid = torch.from_numpy(norm[..., ::-1].astype(np.float32).copy())[None]  # (x, y, z)
        vals = torch.nn.functional.grid_sample(
            src, grid, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        out[a : a + chunk] = vals[0, 0].numpy()
    return out


def key_planes(
    vol_map: np.ndarray, n: int, min_relative: float = MIN_RELATIVE_SCORE
) -> tuple[list[float], list[int]]:
    """(per-plane scores relative to the peak, the chosen planes in slice order): the planes
    whose peak is within `min_relative` of the volume's peak, at most `n`, highest first; the
    peak plane is always chosen."""
    peaks = vol_map.reshape(vol_map.shape[0], -1).max(axis=1)
    top = float(peaks.max()) if peaks.size else 0.0
    if not math.isfinite(top) or top <= 0:
        return [0.0] * int(vol_map.shape[0]), []
    scores = (peaks / top).astype(float)
    order = [int(k) for k in np.argsort(-scores, kind="stable")]
    chosen = [k for k in order if scores[k] >= min_relative][: max(1, int(n))]
    return [round(float(s), 6) for s in scores], sorted(chosen)


def explain(
    model: torch.nn.Module,
    recipe: Any,
    volume: Any,
    indices: Mapping[str, int],
    *,
    key_images: int = 3,
    method: str = "gradient",
    device: Any = "cpu",
    max_plane_px: int = MAX_PLANE_PX,
    min_relative: float = MIN_RELATIVE_SCORE,
) -> dict[str, Any]:
    """Saliency of each finding in `indices` (key -> logit index), mapped to the series volume.

    Returns ``{"method", "grid": {"shape", "spacing", "origin", "direction"} (the SeriesVolume
    grid, LPS), "findings": {key: {"plane_scores": [Z floats], "stride": [sy, sx],
    "key_planes": [{"z", "score", "map": uint8 (h, w), 0..255 relative to the finding's
    peak}]}}}``."""
    x, in_aff = input_affine(recipe, volume)
    maps = input_saliency(
        model, x, indices, slices_2d=recipe.name == "slices-2d", method=method, device=device
    )
    shape = tuple(int(v) for v in volume.shape)
    stride = (
        max(1, math.ceil(shape[1] / max_plane_px)),
        max(1, math.ceil(shape[2] / max_plane_px)),
    )
    vol_aff = np.asarray(volume.affine("RAS"), dtype=np.float64)
    findings: dict[str, Any] = {}
    for key, sal in maps.items():
        vm = map_to_volume(sal, in_aff, vol_aff, shape, stride)
        scores, chosen = key_planes(vm, key_images, min_relative)
        peak = float(vm.max()) if vm.size else 0.0
        planes = []
        for k in chosen:
            rel = vm[k] / peak if peak > 0 else np.zeros_like(vm[k])
            planes.append(
                {
                    "z": int(k),
                    "score": scores[k],
                    "map": np.clip(np.rint(rel * 255.0), 0, 255).astype(np.uint8),
                }
            )
        findings[key] = {"plane_scores": scores, "stride": list(stride), "key_planes": planes}
    return {
        "method": method,
        "grid": {
            "shape": list(shape),
            "spacing": [float(s) for s in volume.spacing],
            "origin": [float(v) for v in np.asarray(volume.origin)],
            "direction": np.asarray(volume.direction, dtype=float).tolist(),
        },
        "findings": findings,
    }
