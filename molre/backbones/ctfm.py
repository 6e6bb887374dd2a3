"""3D CNN backbones: CT-FM (MONAI SegResEncoder) and its tiny sibling for CPU tests/demo.

Why a subclass of MONAI's ``SegResEncoder`` and not a wrapper: its state-dict keys are then
exactly those of the published CT-FM checkpoint (``conv_init.weight``, ``layers.N...``), so the
weights load without renaming, and MoLRE target regexes name the same layers as the paper code.
"""

from __future__ import annotations

from typing import Any

import torch

from .registry import BackboneSpec, register_backbone

CTFM_HINT = (
    "CT-FM weights (Pai et al. 2025) are published as project-lighter/ct_fm_feature_extractor. "
    "On a machine with internet: `huggingface-cli download project-lighter/ct_fm_feature_extractor "
    "--local-dir ./weights/ct-fm`, copy the folder here and pass it as --weights ./weights/ct-fm "
    "(or use hf://project-lighter/ct_fm_feature_extractor with a copied Hugging Face cache)."
)


_ENCODER: Any = None


def _encoder_class() -> Any:
    """`CTFMEncoder`, defined on first use: MONAI is imported only by a process that builds a
    CT-FM-family backbone (importing MONAI imports all of it: ~340 MB and seconds)."""
    global _ENCODER
    if _ENCODER is None:
        from monai.networks.nets.segresnet_ds import SegResEncoder

        class CTFMEncoder(SegResEncoder):
            """SegResEncoder whose ``forward`` returns one feature vector per volume.

            The vector is the global average pool of the deepest feature map, as in CT-FM's feature
            extractor; ``feature_maps`` gives the 5 (or fewer) maps for inspection and tests.
            Input sides must be divisible by ``2 ** (levels - 1)``.
            """

            def __init__(
                self,
                init_filters: int = 32,
                blocks_down: tuple[int, ...] = (1, 2, 2, 4, 4),
                in_channels: int = 1,
                **kwargs: Any,
            ) -> None:
                super().__init__(
                    spatial_dims=3,
                    init_filters=init_filters,
                    in_channels=in_channels,
                    blocks_down=tuple(blocks_down),
                    **kwargs,
                )
                self.feature_dim = init_filters * 2 ** (len(blocks_down) - 1)
                self.stride = 2 ** (len(blocks_down) - 1)

            def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
                """All level outputs (channels init_filters·2^i, stride 2^i)."""
                return self._forward(x)

            def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, D, H, W) -> (B, F)
                if x.ndim != 5:
                    raise ValueError(
                        f"3D backbone expects (B, C, D, H, W), got shape {tuple(x.shape)}"
                    )
                bad = [s for s in x.shape[2:] if s % self.stride]
                if bad:
                    raise ValueError(
                        f"3D backbone input sides {tuple(x.shape[2:])} must be divisible by {self.stride}"
                    )
                return self._forward(x)[-1].mean(dim=(2, 3, 4))

        CTFMEncoder.__module__, CTFMEncoder.__qualname__ = __name__, "CTFMEncoder"
        _ENCODER = CTFMEncoder
    return _ENCODER


def __getattr__(name: str) -> Any:  # module attribute CTFMEncoder, built on first access
    if name == "CTFMEncoder":
        return _encoder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_ctfm(**overrides: Any) -> Any:  # a CTFMEncoder
    kw: dict[str, Any] = dict(init_filters=32, blocks_down=(1, 2, 2, 4, 4))
    kw.update(overrides)
    return _encoder_class()(**kw)


def _build_tiny3d(**overrides: Any) -> Any:  # a CTFMEncoder
    kw: dict[str, Any] = dict(init_filters=8, blocks_down=(1, 1, 1, 1))
    kw.update(overrides)
    return _encoder_class()(**kw)


# MoLRE adapter placements (presets). "paper" is the default; docs/backbones.md gives the
# parameter overhead of each and the reasoning, in short:
# The paper adapts a ViT's patch embedding (the layer that reads pixels, where scanner and
# reconstruction shifts act) and the attention projections of every block (the layers that mix
# positions, at every depth). A SegResEncoder has neither, but it has their counterparts:
# - ``conv_init`` reads the HU volume: the patch embedding's counterpart, always adapted;
# - in every block of a stage, ``conv1``/``conv2`` (3x3x3) are what mixes positions: the
#   counterpart of the attention projections; the stride-2 ``downsample`` conv that embeds a
#   stage's input grid is the counterpart of a hierarchical ViT's patch merging.
# These are adapted in every stage of stride >= 4 (128/256/512 channels at CT-FM's size). In the
# two full-resolution stages (32/64 channels) a mixture of 6 rank-8 experts is 48 channels wide:
# not a low-rank update of a 32/64-channel conv but a bigger-than-the-layer one, which would add
# ~+65 % compute at full resolution for no low-rank benefit; they are left frozen.
# "light" is the old single-conv (resp. two-conv for tiny-3d) placement, < 0.5 % parameters.


def _ctfm_paper(module: Any) -> list[str]:  # a CTFMEncoder
    """conv_init + every block conv and the embedding downsample of the stride >= 4 stages."""
    levels = len(module.blocks_down)
    deep = list(range(min(2, levels - 1), levels))
    stages = "|".join(str(i) for i in deep)
    feeds = "|".join(str(i - 1) for i in deep if i >= 1)
    out = [r"^conv_init$", rf"^layers\.({stages})\.blocks\.\d+\.conv[12]$"]
    if feeds:
        out.append(rf"^layers\.({feeds})\.downsample$")
    return out


def _ctfm_targets(module: Any) -> list[str]:  # a CTFMEncoder
    """Light: the last conv of the second-deepest level (layers.3.blocks.3.conv2 at default size)."""
    level = max(0, len(module.blocks_down) - 2)
    block = module.blocks_down[level] - 1
    return [rf"^layers\.{level}\.blocks\.{block}\.conv2$"]


def _tiny3d_light(module: Any) -> list[str]:  # a CTFMEncoder
    """Light: the last conv of each of the two deepest levels."""
    levels = len(module.blocks_down)
    return [
        rf"^layers\.{i}\.blocks\.{module.blocks_down[i] - 1}\.conv2$"
        for i in range(max(0, levels - 2), levels)
    ]


def _presets(light):
    return lambda m: {"paper": _ctfm_paper(m), "light": light(m)}


CTFM_TARGETS = [
    r"^conv_init$",
    r"^layers\.(2|3|4)\.blocks\.\d+\.conv[12]$",
    r"^layers\.(1|2|3)\.downsample$",
]
CTFM_LIGHT = [r"^layers\.3\.blocks\.3\.conv2$"]
TINY3D_TARGETS = [
    r"^conv_init$",
    r"^layers\.(2|3)\.blocks\.\d+\.conv[12]$",
    r"^layers\.(1|2)\.downsample$",
]
TINY3D_LIGHT = [r"^layers\.2\.blocks\.0\.conv2$", r"^layers\.3\.blocks\.0\.conv2$"]

register_backbone(
    BackboneSpec(
        name="ct-fm",
        dims=3,
        feature_dim=512,
        recipe={"name": "ctfm-3d", "spacing": [5.0, 2.0, 2.0], "roi": [48, 128, 128]},
        default_targets=CTFM_TARGETS,
        description="CT-FM 3D SegResEncoder (MONAI), 77.8M params, GAP of the 512-ch stride-16 map",
        weights_hint=CTFM_HINT,
        target_presets={"paper": CTFM_TARGETS, "light": CTFM_LIGHT},
        requires_weights=True,
    ),
    _build_ctfm,
    presets_for=_presets(_ctfm_targets),
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
        target_presets={"paper": TINY3D_TARGETS, "light": TINY3D_LIGHT},
    ),
    _build_tiny3d,
    presets_for=_presets(_tiny3d_light),
)
