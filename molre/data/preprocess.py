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
from collections.abc import Callable, Mapping
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
        raise ConfigError(f"unknown preprocessing recipe {name!r}; use one of "
                          f"{', '.join(_DEFAULTS)}")
    given = {}
    for key, value in params.items():
        canon = _ALIASES[name].get(key, key)
        if canon not in _DEFAULTS[name]:
            raise ConfigError(f"recipe {name!r}: unknown parameter {key!r}; allowed: "
                              f"{', '.join(_DEFAULTS[name])}")
        given[canon] = value
    p = json.loads(json.dumps(_DEFAULTS[name])) | given
    orient = str(p["orientation"]).upper()
    if not _valid_axcodes(orient):
        raise ConfigError(f"recipe {name!r}: orientation {p['orientation']!r} is not 3 axis codes "
                          "such as 'SPL'")
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
                raise ConfigError(f"recipe {name!r}: windows must be (center, width) pairs") from None
            if not p["windows"] or any(w <= 0 for _, w in p["windows"]):
                raise ConfigError(f"recipe {name!r}: windows must be non-empty (center, width) "
                                  "pairs with width > 0")
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
                raise ConfigError(f"recipe {name!r}: {key} must be >= 1"
                                  + (" (or 0 = every slice)" if key == "n_slices" else ""))
        try:
            windows = [[float(c), float(w)] for c, w in p["windows"]]
        except (TypeError, ValueError):
            raise ConfigError(f"recipe {name!r}: windows must be 3 (center, width) pairs") from None
        if len(windows) != 3 or any(w <= 0 for _, w in windows):
            raise ConfigError(f"recipe {name!r}: windows must be 3 (center, width) pairs with "
                              "width > 0 (one per channel)")
        p["windows"] = windows
        norm = p["normalize"]
        if norm is not None and not (isinstance(norm, str) and norm in NORMALIZATIONS):
            raise ConfigError(f"recipe {name!r}: normalize must be null or one of "
                              f"{', '.join(NORMALIZATIONS)}")
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

        canon = json.dumps({"name": self.name, "params": self.params, "data": DATA_VERSION,
                            "monai": ".".join(monai.__version__.split(".")[:2])},
                           sort_keys=True, separators=(",", ":"))
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
        """3-D recipes: the output as a MetaTensor whose affine maps output voxels to RAS mm."""
        if self.name != "ctfm-3d":
            raise ValueError("transform_meta is only defined for 3-D recipes")
        from monai.transforms import CenterSpatialCrop, ScaleIntensityRange, Spacing, SpatialPad

        p = self.params
        img = self.oriented(volume)
        if p["antialias"]:
            from monai.transforms import GaussianSmooth

            factor = [t / float(s) for t, s in zip(p["spacing"], img.pixdim)]
            sigma = [max(0.0, (f - 1.0) / 2.0) for f in factor]
            if any(sg > 0 for sg in sigma):
                img = GaussianSmooth(sigma=sigma)(img)
        img = Spacing(pixdim=p["spacing"], mode=p["mode"], padding_mode="border",
                      dtype=np.float32)(img)
        if p["windows"]:
            chans = [((img - (c - w / 2.0)) / w).clamp(0.0, 1.0) for c, w in p["windows"]]
            img = torch.cat(chans, dim=0)
        else:
            lo, hi = p["hu_range"]
            img = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(img)
        img = SpatialPad(spatial_size=p["roi"], method="symmetric", mode="constant", value=0.0)(img)
        img = CenterSpatialCrop(roi_size=p["roi"])(img)
        return img

    def __call__(self, volume: SeriesVolume) -> torch.Tensor:
        if self.name == "ctfm-3d":
            out = self.transform_meta(volume)
            return torch.as_tensor(out.as_tensor() if hasattr(out, "as_tensor") else out,
                                   dtype=torch.float32).contiguous()
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
                slices, (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2),
                mode="constant", value=air)
        size = p["size"]
        slices = torch.nn.functional.interpolate(slices[:, None], size=(size, size),
                                                 mode="bilinear", align_corners=False,
                                                 antialias=True)[:, 0]
        chans = []
        for center, width in p["windows"]:
            low = center - width / 2
            chans.append(((slices - low) / width).clamp(0.0, 1.0))
        out = torch.stack(chans, dim=1)  # (S, 3, H, W)
        if p["normalize"] is not None:
            mean, std = NORMALIZATIONS[p["normalize"]]
            out = (out - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        return out.contiguous()


def make_recipe(name: str, **params: Any) -> Recipe:
    """Build a recipe by name; unknown names/params raise ConfigError naming them."""
    return Recipe(name, params)


def recipe_names() -> list[str]:
    return list(_DEFAULTS)


__all__ = ["DATA_VERSION", "NORMALIZATIONS", "Recipe", "make_recipe", "recipe_names"]
