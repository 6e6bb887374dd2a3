"""2D ViT backbones: DINOv3 S/B/L (timm ``Eva``) and a tiny Eva for CPU tests.

Why timm's own DINOv3 definitions: the module names (``patch_embed.proj``, ``blocks.N.attn.qkv``)
and state-dict keys are those of timm's published ``timm/vit_*_patch16_dinov3.lvd1689m`` weights,
and timm's ``checkpoint_filter_fn`` converts Meta's original DINOv3 checkpoints. Each slice is one
image; the CLS token (``global_pool='token'``, as upstream DINOv3) is the slice feature.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .registry import BackboneSpec, register_backbone

_DINO_HINT = (
    "DINOv3 weights are licensed by Meta (accept the licence on Hugging Face). On a machine with "
    "internet: `huggingface-cli download timm/{model}.lvd1689m --local-dir ./weights/{name}` and pass "
    "--weights ./weights/{name} (or hf://timm/{model}.lvd1689m with a copied Hugging Face cache). "
    "Meta's original .pth checkpoints are converted on load."
)


def _make_builder(timm_name: str, defaults: dict[str, Any] | None = None):
    def build(**overrides: Any) -> nn.Module:
        import timm  # on first use: importing every backbone's library costs each process

        if timm_name not in timm.list_models(timm_name):
            raise RuntimeError(
                f"timm {timm.__version__} has no model {timm_name!r}; DINOv3 needs timm >= 1.0.20"
            )
        kw: dict[str, Any] = dict(pretrained=False, num_classes=0, global_pool="token")
        kw.update(defaults or {})
        kw.update(overrides)
        model = timm.create_model(timm_name, **kw)
        model.feature_dim = int(model.num_features)
        model.image_size = int(model.patch_embed.img_size[0])
        return model

    return build


def _convert_dinov3(state: dict, model: nn.Module) -> dict:
    """Meta's original DINOv3 layout (``storage_tokens``, ...) → timm Eva keys."""
    from timm.models.eva import checkpoint_filter_fn

    if not any("storage_tokens" in k or k.startswith("visual.") for k in state):
        return {}
    return checkpoint_filter_fn(state, model)


#: The paper's placement: the patch embedding (reads the pixels, where scanner and
#: reconstruction shifts act) and the attention projections (qkv, proj) of *every* block.
VIT_PAPER = [r"^patch_embed\.proj$", r"^blocks\.\d+\.attn\.(qkv|proj)$"]


def _vit_targets(
    depth: int, last_blocks: int, *, patch: bool = True, proj: bool = True
) -> list[str]:
    """Light preset: patch embedding (optional) + attention qkv (and proj) of the last blocks.

    The pre-paper default, kept selectable (``preset="light"``): it stays under 0.5 % extra
    parameters with experts=6, rank=8, where the paper's placement costs 3-9 % (docs/backbones.md).
    """
    blocks = "|".join(str(i) for i in range(depth - last_blocks, depth))
    layers = "qkv|proj" if proj else "qkv"
    out = [r"^patch_embed\.proj$"] if patch else []
    return out + [rf"^blocks\.({blocks})\.attn\.({layers})$"]


_DINO_SIZES = {
    # name: (timm model, depth, dim, params, light: adapted last blocks, patch embed, attn proj)
    "dinov3-small": ("vit_small_patch16_dinov3", 12, 384, "21.6M", 1, False, False),
    "dinov3-base": ("vit_base_patch16_dinov3", 12, 768, "85.6M", 1, True, True),
    "dinov3-large": ("vit_large_patch16_dinov3", 24, 1024, "303M", 3, True, True),
}


def _presets_for(last: int, patch: bool, proj: bool):
    def presets(module: nn.Module) -> dict[str, list[str]]:
        depth = len(module.blocks)
        return {
            "paper": list(VIT_PAPER),
            "light": _vit_targets(depth, min(last, depth), patch=patch, proj=proj),
        }

    return presets


for _name, (_timm, _depth, _dim, _params, _last, _patch, _proj) in _DINO_SIZES.items():
    register_backbone(
        BackboneSpec(
            name=_name,
            dims=2,
            feature_dim=_dim,
            # n_slices 0 = every slice of the series (HeadCTClassifier chunks them)
            recipe={"name": "slices-2d", "n_slices": 0, "size": 224, "normalize": "imagenet"},
            default_targets=list(VIT_PAPER),
            description=f"DINOv3 ViT/16 ({_timm}, timm Eva, {_params}), CLS token per slice",
            weights_hint=_DINO_HINT.format(model=_timm, name=_name),
            target_presets={
                "paper": list(VIT_PAPER),
                "light": _vit_targets(_depth, _last, patch=_patch, proj=_proj),
            },
            requires_weights=True,
        ),
        _make_builder(_timm),
        weights_convert=_convert_dinov3,
        presets_for=_presets_for(_last, _patch, _proj),
    )

register_backbone(
    BackboneSpec(
        name="tiny-2d",
        dims=2,
        feature_dim=64,
        recipe={"name": "slices-2d", "n_slices": 0, "size": 64, "normalize": "imagenet"},
        default_targets=list(VIT_PAPER),
        description="Tiny DINOv3-style Eva (dim 64, depth 2, 64 px; same code path) for CPU tests",
        weights_hint="tiny-2d has no published weights; it is trained from random init by the demo.",
        target_presets={
            "paper": list(VIT_PAPER),
            "light": _vit_targets(2, 1, patch=False, proj=False),
        },
    ),
    _make_builder(
        "vit_small_patch16_dinov3",
        # layer scale starts at 1 (DINOv3: 1e-5): at random init the blocks would
        # otherwise barely touch the CLS token and every slice would look the same
        dict(embed_dim=64, depth=2, num_heads=2, img_size=64, init_values=1.0),
    ),
    weights_convert=_convert_dinov3,
    presets_for=_presets_for(1, False, False),
)
