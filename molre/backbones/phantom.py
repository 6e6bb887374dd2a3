"""phantom-3d: a compact 3-D U-Net pretrained on synthetic phantoms, the stand-in foundation model.

Why: no head-CT foundation weights can be downloaded here, and a random-init network is useless as
a frozen feature extractor. The project therefore makes its own the way foundation models are
made: pretrain once with dense supervision on many generated phantoms from several simulated
sites (`molre.training.pretrain`: voxel masks of every planted finding + per-finding presence),
then freeze; MoLRE / LoRA adapters are trained on top exactly as they would be on CT-FM.

Architecture (MONAI blocks): a stride-2 stem, residual encoder levels at 1/2, 1/4 and 1/8 of the
input, a bottleneck, and a light decoder back to 1/2 with skip connections. The backbone's
feature vector is ``[avg(bottleneck), max(bottleneck), avg(decoder), max(decoder),
max(finding maps)]``: the max pools keep small localised abnormalities (a 2 mm calcification, a
fracture line) that a global average would wash out, and the peak of each pretrained finding map
(the 1x1x1 `seg_head` on the decoder) carries what dense pretraining learnt where to look.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .registry import BackboneSpec, register_backbone

#: CT windows (center, width) of the three input channels: blood/brain, subdural, bone.
PHANTOM_WINDOWS = [[40.0, 80.0], [60.0, 200.0], [500.0, 2000.0]]
#: Architectures: network widths and the input grid they read. "v1" (3 mm in-plane) is the
#: shipped backbone and the one the MoLRE-vs-LoRA figures were measured on. "v2" (2 mm in-plane,
#: so that a 1.5 mm fracture gap or a 1 mm calcification still changes a voxel; 2x the widths)
#: costs 4.3x v1 per training sample (0.45 vs 0.105 s on 2 CPU cores): it is meant to be
#: pretrained on a GPU (`--arch v2 --device cuda --amp true`, docs/training.md). Shipping it means
#: PHANTOM_ARCH = "v2", its weights and card in resources/phantom-3d, and a rebuilt demo.
PHANTOM_ARCHS: dict[str, dict[str, Any]] = {
    "v1": {
        "channels": (16, 32, 64, 96),
        "decoder": (32, 8, 16),
        "spacing": [5.0, 3.0, 3.0],
        "roi": [32, 72, 72],
    },
    "v2": {
        "channels": (24, 48, 96, 128),
        "decoder": (48, 12, 24),
        "spacing": [5.0, 2.0, 2.0],
        "roi": [32, 112, 112],
    },
}
PHANTOM_ARCH = "v1"


def phantom_recipe(arch: str = PHANTOM_ARCH) -> dict[str, Any]:
    a = PHANTOM_ARCHS[arch]
    return {
        "name": "ctfm-3d",
        "spacing": list(a["spacing"]),
        "roi": list(a["roi"]),
        "windows": PHANTOM_WINDOWS,
        "antialias": True,
    }


def phantom_sizes(arch: str = PHANTOM_ARCH) -> dict[str, Any]:
    """PhantomUNet keyword arguments of an architecture."""
    a = PHANTOM_ARCHS[arch]
    return {"channels": tuple(a["channels"]), "decoder": tuple(a["decoder"])}


PHANTOM_RECIPE = phantom_recipe()
#: Where the packaged weights live (inside the installed package), and how a model card names them.
WEIGHTS_RESOURCE = "phantom-3d"
PACKAGED_PREFIX = "packaged:"


class _ADN(nn.Sequential):
    """MONAI's ADN with ordering "NDA", instance norm (affine) and PReLU, no dropout."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.add_module("N", nn.InstanceNorm3d(channels, affine=True))
        self.add_module("A", nn.PReLU())


class Convolution(nn.Sequential):
    """``monai.networks.blocks.Convolution(3, c_in, c_out, strides, kernel_size=3,
    norm=("instance", {"affine": True}), act="PRELU")``: same modules, names, parameters and
    computation (conv 3x3x3 padding 1 -> InstanceNorm3d -> PReLU).

    Why a copy: importing any MONAI module imports all of MONAI (torchvision, transformers,
    scipy.signal, ...): +340 MB resident and ~6 s in every inference process, for two blocks.
    The weights (packaged phantom-3d, state-dict keys) are unchanged."""

    def __init__(self, c_in: int, c_out: int, strides: int = 1) -> None:
        super().__init__()
        self.add_module("conv", nn.Conv3d(c_in, c_out, 3, strides, 1, bias=True))
        self.add_module("adn", _ADN(c_out))


class ResidualUnit(nn.Module):
    """``monai.networks.blocks.ResidualUnit`` with the options `_res` used (see Convolution):
    ``subunits`` Convolutions (the first strided) plus a residual path (identity, a 1x1x1 conv
    when only the channels change, a strided 3x3x3 conv otherwise); built in MONAI's order, so
    a seeded random init draws the same numbers."""

    def __init__(self, c_in: int, c_out: int, strides: int = 1, subunits: int = 2) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.residual: nn.Module = nn.Identity()
        ch, st = c_in, strides
        for su in range(max(1, subunits)):
            self.conv.add_module(f"unit{su:d}", Convolution(ch, c_out, st))
            ch, st = c_out, 1
        if strides != 1 or c_in != c_out:
            k, pad = (3, 1) if strides != 1 else (1, 0)
            self.residual = nn.Conv3d(c_in, c_out, k, strides, pad, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.residual(x)
        return self.conv(x) + res


def _res(c_in: int, c_out: int, stride: int = 1, subunits: int = 2) -> ResidualUnit:
    return ResidualUnit(c_in, c_out, stride, subunits)


class PhantomUNet(nn.Module):
    """Compact 3-D U-Net; ``forward`` returns the feature vector, ``dense`` the mask logits."""

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, ...] = PHANTOM_ARCHS[PHANTOM_ARCH]["channels"],
        decoder: tuple[int, int, int] = PHANTOM_ARCHS[PHANTOM_ARCH]["decoder"],
        num_classes: int = 12,
    ) -> None:
        super().__init__()
        c0, c1, c2, c3 = channels
        d1, dr, d0 = decoder
        self.stem = Convolution(in_channels, c0, strides=2)  # 1/2
        self.enc1 = _res(c0, c0, subunits=1)  # 1/2
        self.enc2 = _res(c0, c1, 2)  # 1/4
        self.enc3 = _res(c1, c2, 2)  # 1/8
        self.bottleneck = _res(c2, c3)  # 1/8
        self.dec2 = _res(c3 + c1, d1)  # 1/4
        self.reduce = nn.Conv3d(d1, dr, kernel_size=1)  # few channels to carry up to 1/2
        self.dec1 = _res(dr + c0, d0, subunits=1)  # 1/2
        self.seg_head = nn.Conv3d(d0, num_classes, kernel_size=1)
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.pooled_dim = 2 * (c3 + d0)  # what `dense` pools
        self.feature_dim = self.pooled_dim + num_classes
        self.stride = 8

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 5:
            raise ValueError(f"phantom-3d expects (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"phantom-3d expects {self.in_channels} input channels (CT windows), "
                f"got {x.shape[1]}"
            )
        bad = [s for s in x.shape[2:] if s % self.stride]
        if bad:
            raise ValueError(
                f"phantom-3d input sides {tuple(x.shape[2:])} must be divisible by {self.stride}"
            )
        s1 = self.enc1(self.stem(x))
        s2 = self.enc2(s1)
        b = self.bottleneck(self.enc3(s2))
        u2 = self.dec2(
            torch.cat(
                [F.interpolate(b, size=s2.shape[2:], mode="trilinear", align_corners=False), s2],
                dim=1,
            )
        )
        u1 = self.dec1(
            torch.cat(
                [
                    F.interpolate(
                        self.reduce(u2), size=s1.shape[2:], mode="trilinear", align_corners=False
                    ),
                    s1,
                ],
                dim=1,
            )
        )
        return b, u1

    @staticmethod
    def _pool(b: torch.Tensor, u1: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                b.mean(dim=(2, 3, 4)),
                b.amax(dim=(2, 3, 4)),
                u1.mean(dim=(2, 3, 4)),
                u1.amax(dim=(2, 3, 4)),
            ],
            dim=1,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, D, H, W) -> (B, F)
        """The volume vector: pooled bottleneck and decoder features, and the peak of each
        pretrained finding map (a foundation model's dense outputs are features too)."""
        feats, seg = self.dense(x)
        return torch.cat([feats, seg.amax(dim=(2, 3, 4))], dim=1)

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features (B, 2·(C_b + C_d)), mask logits (B, classes, D/2, H/2, W/2))."""
        b, u1 = self._run(x)
        return self._pool(b, u1), self.seg_head(u1)


def packaged_weights() -> Path | None:
    """The shipped weights file, or None when the package was installed without them."""
    p = (
        Path(__file__).resolve().parent.parent
        / "resources"
        / WEIGHTS_RESOURCE
        / "model.safetensors"
    )
    return p if p.is_file() else None


def packaged_card() -> dict[str, Any]:
    p = Path(__file__).resolve().parent.parent / "resources" / WEIGHTS_RESOURCE / "card.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def _build(pretrained: bool = True, **overrides: Any) -> PhantomUNet:
    """The architecture; with `pretrained` (default) and the default sizes, the shipped weights
    are loaded, so `create_backbone("phantom-3d")` is the frozen pretrained backbone."""
    net = PhantomUNet(**overrides)
    on_meta = next(net.parameters()).device.type == "meta"  # counting parameters only
    path = packaged_weights() if pretrained and not overrides and not on_meta else None
    if path is not None:
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(path)), strict=True)
        net.weights_source = f"{PACKAGED_PREFIX}{WEIGHTS_RESOURCE}"
    return net


#: Adapter placements. "paper": every 3x3x3 conv of the bottleneck and the decoder, the layers
#: whose outputs are pooled into the feature vector and feed the finding maps (the 3-D analogue of
#: adapting the attention projections of every block; +56 % parameters on this 0.9 M-parameter
#: network, because a rank-48 update is not small next to 16-128-channel convs); "light": the
#: 1x1x1 projections of those blocks only (residual paths and the decoder's channel reduction,
#: the closest analogue of LoRA on linear projections; a few per cent).
PHANTOM_PRESETS = {
    "paper": [
        r"^bottleneck\.conv\.unit[01]\.conv$",
        r"^dec2\.conv\.unit[01]\.conv$",
        r"^dec1\.conv\.unit0\.conv$",
    ],
    "light": [r"^bottleneck\.residual$", r"^dec2\.residual$", r"^reduce$", r"^dec1\.residual$"],
}

register_backbone(
    BackboneSpec(
        name="phantom-3d",
        dims=3,
        feature_dim=2
        * (PHANTOM_ARCHS[PHANTOM_ARCH]["channels"][-1] + PHANTOM_ARCHS[PHANTOM_ARCH]["decoder"][-1])
        + 12,
        recipe=dict(PHANTOM_RECIPE),
        default_targets=list(PHANTOM_PRESETS["paper"]),
        description=(
            "Compact 3-D U-Net (MONAI blocks) pretrained on multi-site synthetic "
            "phantoms with dense supervision; weights ship with the package"
        ),
        weights_hint=(
            "phantom-3d weights ship with molre-node (molre/resources/phantom-3d); "
            "regenerate them with `python -m molre.training.pretrain`."
        ),
        target_presets={k: list(v) for k, v in PHANTOM_PRESETS.items()},
    ),
    _build,
)
