"""Head-CT multi-label classifier: frozen backbone (+ MoLRE adapters) → pooling → linear head.

Why two paths: 3D backbones (CT-FM) see the whole volume, so their global-average-pooled feature
is the volume vector and MoLRE routes once per volume. 2D backbones (DINOv3, MedSigLIP) read the
scan slice by slice: all slices of all volumes go through the backbone as one batch (so MoLRE
routes per slice, as in the paper), each slice's feature is kept, and a learned query
attention-pools the slices into one volume vector (softmax(H·q/√d) weighted sum), which also
tells which slices drove a prediction (``last_attention``).

Only adapters, pooling and head are trained; the backbone's base weights stay frozen and its
BatchNorm statistics stay fixed (the backbone is kept in eval mode even while training).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molre.adapters import DEFAULT_TARGETS, MoLREConfig, adapted_layers, inject_adapters
from molre.backbones import BackboneSpec, create_backbone
from molre.errors import ConfigError
from molre.log import get_logger

log = get_logger(__name__)


class AttentionPool(nn.Module):
    """Learned-query attention pooling over slices: w = softmax(H·q/√d), v = Σ_s w_s H_s.

    The query starts at zero, i.e. as plain mean pooling, so an untrained pool is a sane
    baseline and training only moves away from it when slices differ in usefulness.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.query = nn.Parameter(torch.zeros(self.dim))

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, F) [+ (B, S) bool mask of real slices] → pooled (B, F), weights (B, S)."""
        scores = (h.float() @ self.query.float()) / math.sqrt(self.dim)
        if mask is not None:
            scores = scores.masked_fill(~mask.bool(), float("-inf"))
        weights = torch.softmax(scores, dim=1)
        pooled = torch.einsum("bs,bsf->bf", weights.to(h.dtype), h)
        return pooled, weights


class HeadCTClassifier(nn.Module):
    """Backbone + (2D: slice attention pooling) + dropout + Linear head → logits (B, F).

    3D input: (B, 1, D, H, W). 2D input: (B, S, 3, H, W); ``slice_mask`` (B, S) marks real
    slices when volumes were padded to a common S. ``slice_chunk`` bounds how many slices go
    through the backbone at once (memory); routing stays per slice either way.
    """

    def __init__(self, backbone: nn.Module, num_findings: int, dropout: float = 0.1,
                 slice_chunk: int | None = None) -> None:
        super().__init__()
        spec = getattr(backbone, "spec", None)
        if not isinstance(spec, BackboneSpec):
            raise TypeError("HeadCTClassifier needs a backbone from molre.backbones.create_backbone "
                            "(it carries .spec)")
        if int(num_findings) < 1:
            raise ValueError(f"num_findings must be >= 1, got {num_findings}")
        self.backbone = backbone
        self.spec: BackboneSpec = spec
        self.num_findings = int(num_findings)
        self.feature_dim = int(spec.feature_dim)
        self.slice_chunk = slice_chunk
        self.pool: AttentionPool | None = AttentionPool(self.feature_dim) if spec.dims == 2 else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, self.num_findings)
        self.adapter_config: MoLREConfig | None = None
        self.adapted: list[str] = []
        self.last_attention: torch.Tensor | None = None
        self.catalog: Any = None
        self.eval()

    # -- modes -----------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> HeadCTClassifier:
        """Train head/pool/adapters; keep the frozen backbone (BatchNorm stats, dropout) in eval."""
        super().train(mode)
        self.backbone.eval()
        for layer in adapted_layers(self.backbone).values():
            layer.train(mode)  # adapter dropout, router, balance-loss bookkeeping
        return self

    # -- forward ---------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, slice_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The volume vector (B, F) that the head reads."""
        if self.spec.dims == 3:
            if x.ndim != 5:
                raise ValueError(f"{self.spec.name}: expected (B, 1, D, H, W), got {tuple(x.shape)}")
            return self.backbone(x)
        if x.ndim != 5:
            raise ValueError(f"{self.spec.name}: expected (B, S, 3, H, W), got {tuple(x.shape)}")
        b, s = x.shape[:2]
        flat = x.reshape(b * s, *x.shape[2:])
        if self.slice_chunk and b * s > self.slice_chunk:
            feats = torch.cat([self.backbone(c) for c in flat.split(self.slice_chunk)], dim=0)
        else:
            feats = self.backbone(flat)  # (B·S, F): MoLRE routes per slice
        h = feats.reshape(b, s, -1)
        assert self.pool is not None
        pooled, weights = self.pool(h, slice_mask)
        self.last_attention = weights.detach()
        return pooled

    def forward(self, x: torch.Tensor, slice_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.dropout(self.features(x, slice_mask)))

    # -- state -----------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter + router tensors and everything outside the backbone (pooling, head).

        Same keys as ``molre.adapters.adapter_state_dict(model)`` when adapters are present
        (head and pooling are trainable parameters outside the frozen bases) and as
        ``molre.checkpoint.trainable_state_dict``; with no adapters (linear probe) just pooling
        and head. The frozen backbone is never included.
        """
        adapter_ids = {id(p) for layer in adapted_layers(self.backbone).values()
                       for p in layer.adapter_parameters()}
        adapter_names = {f"backbone.{n}" for n, p in self.backbone.named_parameters()
                         if id(p) in adapter_ids}
        return {k: v.detach() for k, v in self.state_dict().items()
                if k in adapter_names or not k.startswith("backbone.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Inverse of ``trainable_state_dict`` (strict: exactly the same keys and shapes)."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if strict and (missing or unexpected):
            raise ConfigError(f"trainable state does not fit the model: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
        bad = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
        if bad:
            raise ConfigError(f"trainable state shape mismatch for {bad[:10]}")
        self.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _num_findings(catalog: Any) -> int:
    if isinstance(catalog, int):
        return catalog
    try:
        return len(catalog)
    except TypeError:
        raise ConfigError(f"build_model: catalog must be a Catalog (or a number of findings), "
                          f"got {type(catalog).__name__}") from None


def resolve_adapter_config(adapter: MoLREConfig, spec: BackboneSpec) -> MoLREConfig:
    """The config actually injected: the backbone's default targets unless the config names its own.

    A config whose targets are still ``molre.adapters.DEFAULT_TARGETS`` (the generic default)
    counts as "no targets given", because those patterns are not right for every backbone.
    """
    if list(adapter.targets) == list(DEFAULT_TARGETS):
        return replace(adapter, targets=list(spec.default_targets))
    return adapter


def build_model(
    backbone: str | nn.Module,
    catalog: Any,
    adapter: MoLREConfig | None = None,
    weights: str | Path | None = None,
    dropout: float = 0.1,
    **overrides: Any,
) -> HeadCTClassifier:
    """Backbone (by name, or an already built module) + MoLRE adapters + pooling + head.

    The backbone is frozen; ``adapter=None`` is a linear probe (only pooling and head train).
    ``catalog`` gives the number of findings (a ``Catalog``, or an int for tests).
    """
    if isinstance(backbone, str):
        module = create_backbone(backbone, weights=weights, **overrides)
    else:
        if weights is not None or overrides:
            raise ConfigError("build_model: pass weights/overrides only with a backbone name; "
                              "this backbone module is already built")
        module = backbone
    spec: BackboneSpec = module.spec
    for p in module.parameters():
        p.requires_grad_(False)
    config = None
    names: list[str] = []
    if adapter is not None:
        if not isinstance(adapter, MoLREConfig):
            raise ConfigError(f"build_model: adapter must be a MoLREConfig or None, got {type(adapter).__name__}")
        config = resolve_adapter_config(adapter, spec)
        names = inject_adapters(module, config)
    model = HeadCTClassifier(module, _num_findings(catalog), dropout=dropout)
    model.adapter_config = config
    model.adapted = names
    model.catalog = None if isinstance(catalog, int) else catalog
    log.info("model_built", backbone=spec.name, findings=model.num_findings,
             adapted_layers=len(names), experts=config.experts if config else 0,
             trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
    return model
