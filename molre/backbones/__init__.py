"""Backbone registry (CT-FM, DINOv3, MedSigLIP and tiny CPU variants).

``create_backbone(name, weights=None, **overrides)`` builds one by name, in the spirit of timm's
``create_model``; the result carries ``.spec`` (a ``BackboneSpec``) so that training, checkpoints
and the node agree on preprocessing and adapter targets. Weights are only ever read locally.
"""

from __future__ import annotations

from . import ctfm, medsiglip, phantom, vit2d  # noqa: F401,I001  (register the entries, in listing order)
from .registry import (
    DEFAULT_PRESET,
    BackboneSpec,
    base_state_dict,
    create_backbone,
    describe_backbone,
    get_spec,
    list_backbones,
    preset_targets,
    register_backbone,
    weights_digest,
)
from .weights import LoadReport, load_weights_into, resolve_weights

__all__ = [
    "DEFAULT_PRESET",
    "BackboneSpec",
    "LoadReport",
    "base_state_dict",
    "create_backbone",
    "describe_backbone",
    "get_spec",
    "list_backbones",
    "load_weights_into",
    "preset_targets",
    "register_backbone",
    "resolve_weights",
    "weights_digest",
]
