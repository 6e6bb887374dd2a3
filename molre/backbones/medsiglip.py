"""MedSigLIP-448 vision tower (the image encoder of MedGemma) via ``transformers``.

Why optional: ``transformers`` is a large dependency (install ``molre-node[medsiglip]``) that only
this backbone needs, so it is imported lazily and its absence is a clear ``MolreError``. The
published checkpoint ``google/medsiglip-448`` is a full SigLIP model (vision + text towers): the
loader keeps ``vision_model.*`` and drops the text tower and ``logit_scale``/``logit_bias``.
The slice feature is the pooled output (SigLIP's attention-pooling head).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.errors import MolreError

from .registry import BackboneSpec, register_backbone

MEDSIGLIP_HINT = (
    "MedSigLIP weights are gated (Health AI Developer Foundations terms; accept them on Hugging "
    "Face). On a machine with internet: `huggingface-cli download google/medsiglip-448 "
    "--local-dir ./weights/medsiglip` and pass --weights ./weights/medsiglip "
    "(or hf://google/medsiglip-448 with a copied Hugging Face cache)."
)

# google/medsiglip-448 vision_config (SigLIP so400m/14 at 448 px).
MEDSIGLIP_VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_channels=3,
    image_size=448,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise MolreError(
            "backbone 'medsiglip' needs the optional dependency `transformers`: "
            "pip install 'molre-node[medsiglip]' (or pip install 'transformers>=4.45')"
        ) from exc
    return transformers


def transformers_available() -> bool:
    """Whether the medsiglip backbone can be built in this environment."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


class SiglipSliceEncoder(nn.Module):
    """(N, 3, H, W) → (N, hidden) pooled SigLIP vision features."""

    def __init__(self, vision_config: dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__()
        tf = _transformers()
        cfg = dict(MEDSIGLIP_VISION)
        cfg.update(vision_config or {})
        cfg.update(overrides)
        config = tf.SiglipVisionConfig(**cfg)
        config.vision_use_head = True
        self.model = tf.SiglipVisionModel(config)
        self.feature_dim = int(config.hidden_size)
        self.image_size = int(config.image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"2D backbone expects (N, 3, H, W), got shape {tuple(x.shape)}")
        return self.model(pixel_values=x).pooler_output


def _config_from_weights(cfg: dict) -> dict:
    """Use the published config's vision part, so a checkpoint variant builds its own shape."""
    vision = cfg.get(
        "vision_config", cfg if cfg.get("model_type") == "siglip_vision_model" else None
    )
    if not isinstance(vision, dict):
        return {}
    keep = set(MEDSIGLIP_VISION)
    return {"vision_config": {k: v for k, v in vision.items() if k in keep}}


#: The paper's placement: patch embedding + every encoder layer's attention projections. The
#: patch embedding can be wrapped because MoLRE layers expose the base ``weight`` (transformers'
#: SigLIP reads ``patch_embedding.weight.dtype``).
SIGLIP_PAPER = [
    r"^model\.embeddings\.patch_embedding$",
    r"^model\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$",
]


def _targets(depth: int, last: int = 2) -> list[str]:
    """Light preset: q/k/v/out projections of the last two encoder layers (0.35 % extra at
    experts=6, rank=8), the pre-paper default."""
    layers = "|".join(str(i) for i in range(max(0, depth - last), depth))
    return [rf"^model\.encoder\.layers\.({layers})\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"]


register_backbone(
    BackboneSpec(
        name="medsiglip",
        dims=2,
        feature_dim=MEDSIGLIP_VISION["hidden_size"],
        # n_slices 0 = every slice of the series (HeadCTClassifier chunks them)
        recipe={"name": "slices-2d", "n_slices": 0, "size": 448, "normalize": "siglip"},
        default_targets=list(SIGLIP_PAPER),
        description="MedSigLIP-448 vision tower (SigLIP so400m/14, ~429M), pooled output per slice; "
        "needs transformers",
        weights_hint=MEDSIGLIP_HINT,
        target_presets={
            "paper": list(SIGLIP_PAPER),
            "light": _targets(MEDSIGLIP_VISION["num_hidden_layers"]),
        },
        requires_weights=True,
    ),
    SiglipSliceEncoder,
    weights_target=lambda m: m.model,
    weights_ignore=(r"^text_model\.", r"^logit_(scale|bias)$"),
    config_from_weights=_config_from_weights,
    presets_for=lambda m: {
        "paper": list(SIGLIP_PAPER),
        "light": _targets(len(m.model.encoder.layers)),
    },
)
