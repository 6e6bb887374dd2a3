"""3D CNN backbones: CT-FM (MONAI SegResEncoder) and its tiny sibling for CPU tests/demo.

Why a subclass of MONAI's ``SegResEncoder`` and not a wrapper: its state-dict keys are then
exactly those of the published CT-FM checkpoint (``conv_init.weight``, ``layers.N...``), so the
weights load without renaming, and MoLRE target regexes name the same layers as the paper code.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets.segresnet_ds import SegResEncoder

from .registry import BackboneSpec, register_backbone

CTFM_HINT = (
    "CT-FM weights (Pai et al. 2025) are published as project-lighter/ct_fm_feature_extractor. "
    "On a machine with internet: `huggingface-cli download project-lighter/ct_fm_feature_extractor "
    "--local-dir ./weights/ct-fm`, copy the folder here and pass it as --weights ./weights/ct-fm "
    "(or use hf://project-lighter/ct_fm_feature_extractor with a copied Hugging Face cache)."
)


class CTFMEncoder(SegResEncoder):
    """SegResEncoder whose ``forward`` returns one feature vector per volume.

    The vector is the global average pool of the deepest feature map, as in CT-FM's feature
    extractor; ``feature_maps`` gives the 5 (or fewer) maps for inspection and tests.
    Input sides must be divisible by ``2 ** (levels - 1)``.
    """

    def __init__(self, init_filters: int = 32, blocks_down: tuple[int, ...] = (1, 2, 2, 4, 4),
                 in_channels: int = 1, **kwargs: Any) -> None:
        super().__init__(spatial_dims=3, init_filters=init_filters, in_channels=in_channels,
                         blocks_down=tuple(blocks_down), **kwargs)
        self.feature_dim = init_filters * 2 ** (len(blocks_down) - 1)
        self.stride = 2 ** (len(blocks_down) - 1)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All level outputs (channels init_filters·2^i, stride 2^i)."""
        return self._forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, D, H, W) -> (B, F)
        if x.ndim != 5:
            raise ValueError(f"3D backbone expects (B, C, D, H, W), got shape {tuple(x.shape)}")
        bad = [s for s in x.shape[2:] if s % self.stride]
        if bad:
            raise ValueError(
                f"3D backbone input sides {tuple(x.shape[2:])} must be divisible by {self.stride}"
            )
        return self._forward(x)[-1].mean(dim=(2, 3, 4))


def _build_ctfm(**overrides: Any) -> CTFMEncoder:
    kw: dict[str, Any] = dict(init_filters=32, blocks_down=(1, 2, 2, 4, 4))
    kw.update(overrides)
    return CTFMEncoder(**kw)


def _build_tiny3d(**overrides: Any) -> CTFMEncoder:
    kw: dict[str, Any] = dict(init_filters=8, blocks_down=(1, 1, 1, 1))
    kw.update(overrides)
    return CTFMEncoder(**kw)


# MoLRE targets: 3x3x3 convs are expensive to adapt (rank·27·C_in per expert), so only a few
# layers of the deeper stages are wrapped; see docs/backbones.md for the measured overhead.
CTFM_TARGETS = [r"^layers\.3\.blocks\.3\.conv2$"]


def _ctfm_targets(module: CTFMEncoder) -> list[str]:
    """Last conv of the second-deepest level (layers.3.blocks.3.conv2 at default size)."""
    level = max(0, len(module.blocks_down) - 2)
    block = module.blocks_down[level] - 1
    return [rf"^layers\.{level}\.blocks\.{block}\.conv2$"]


TINY3D_TARGETS = [r"^layers\.2\.blocks\.0\.conv2$", r"^layers\.3\.blocks\.0\.conv2$"]

register_backbone(
    BackboneSpec(
        name="ct-fm",
        dims=3,
        feature_dim=512,
        recipe={"name": "ctfm-3d", "spacing": [5.0, 2.0, 2.0], "roi": [48, 128, 128]},
        default_targets=CTFM_TARGETS,
        description="CT-FM 3D SegResEncoder (MONAI), 77.8M params, GAP of the 512-ch stride-16 map",
        weights_hint=CTFM_HINT,
    ),
    _build_ctfm,
    targets_for=_ctfm_targets,
)

register_backbone(
    BackboneSpec(
        name="tiny-3d",
        dims=3,
        feature_dim=64,
        recipe={"name": "ctfm-3d", "spacing": [5.0, 4.0, 4.0], "roi": [32, 64, 64]},
        default_targets=TINY3D_TARGETS,
        description="Tiny SegResEncoder (same code path as ct-fm) for the CPU demo and tests",
        weights_hint="tiny-3d has no published weights; it is trained from random init by the demo.",
    ),
    _build_tiny3d,
)
