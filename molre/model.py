"""Head-CT multi-label classifier: frozen backbone (+ MoLRE adapters) → pooling → linear head.

Why two paths: 3D backbones (CT-FM) see the whole volume, so their global-average-pooled feature
is the volume vector and MoLRE routes once per volume. 2D backbones (DINOv3, MedSigLIP) read the
scan slice by slice: all slices of all volumes go through the backbone as one batch (so MoLRE
routes per slice, as in the paper), each slice's feature is kept, and a learned query
attention-pools the slices into one volume vector (softmax(H·q/√d) weighted sum), which also
tells which slices drove a prediction (``last_attention``).

Only adapters, pooling and head are trained; the backbone's base weights stay frozen and its
BatchNorm statistics stay fixed (the backbone is kept in eval mode even while training).
``trainable_parameter_names`` / ``trainable_state_dict`` are the one definition of "what training
changes": the training loop unfreezes exactly that and checkpoints save exactly that.

2D series have as many slices as were acquired (recipes read every slice by default), so a batch
of volumes is padded to its longest series by ``pad_slices`` and the padded slices are masked
out of the attention pooling; the backbone reads them in chunks of ``slice_chunk`` slices.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import ConfigError
from common.log import get_logger
from molre.adapters import (
    DEFAULT_TARGETS,
    MoLREConfig,
    adapted_layers,
    adapter_parameter_names,
    inject_adapters,
)
from molre.backbones import BackboneSpec, create_backbone, preset_targets

log = get_logger(__name__)

#: Slices a 2D backbone reads at once (bounds activation memory at inference on long series).
DEFAULT_SLICE_CHUNK = 32
_BACKBONE = "backbone."


# -- what training changes (one definition) ------------------------------------------------------


def _is_trainable(key: str, adapter_names: set[str]) -> bool:
    """Adapter/router tensors, and everything outside the backbone (pooling, head)."""
    return key in adapter_names or not key.startswith(_BACKBONE)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that training updates: every adapter/router parameter of the
    backbone (``molre.adapters.adapter_parameter_names``) and every parameter outside
    ``backbone.`` (pooling, head). The backbone's base weights never are."""
    adapter = set(adapter_parameter_names(model))
    return [n for n, _ in model.named_parameters() if _is_trainable(n, adapter)]


def set_trainable(model: nn.Module) -> int:
    """requires_grad on exactly ``trainable_parameter_names`` (off elsewhere); returns the count
    of trainable scalars."""
    names = set(trainable_parameter_names(model))
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
        n += p.numel() if name in names else 0
    return n


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: ``model.state_dict()`` restricted to adapter/router
    tensors and everything outside the backbone. The frozen backbone is never included (it comes
    from its own weights; the card records their digest)."""
    adapter = set(adapter_parameter_names(model))
    return {k: v.detach() for k, v in model.state_dict().items() if _is_trainable(k, adapter)}


def pad_slices(volumes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack preprocessed volumes into a batch.

    3D (1, D, H, W) volumes (equal shapes) stack as they are, mask None. 2D (S_i, 3, H, W) series
    of different lengths are zero-padded to the longest; the (B, S) bool mask marks real slices
    (None when no padding was needed).
    """
    if not volumes:
        raise ValueError("pad_slices: no volumes")
    shapes = {tuple(v.shape) for v in volumes}
    if len(shapes) == 1:
        return torch.stack(volumes), None
    rest = {tuple(v.shape[1:]) for v in volumes}
    if len(rest) != 1:
        raise ValueError(
            f"pad_slices: volumes differ in more than their slice count: {sorted(shapes)}"
        )
    s_max = max(int(v.shape[0]) for v in volumes)
    x = volumes[0].new_zeros((len(volumes), s_max, *volumes[0].shape[1:]))
    mask = torch.zeros((len(volumes), s_max), dtype=torch.bool)
    for i, v in enumerate(volumes):
        x[i, : v.shape[0]] = v
        mask[i, : v.shape[0]] = True
    return x, mask


class AttentionPool(nn.Module):
    """Learned-query attention pooling over slices: w = softmax(H·q/√d), v = Σ_s w_s H_s.

    The query starts at zero, i.e. as plain mean pooling, so an untrained pool is a sane
    baseline and training only moves away from it when slices differ in usefulness.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = int(dim)
        self.query = nn.Parameter(torch.zeros(self.dim))

    def forward(
        self, h: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
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

    def __init__(
        self,
        backbone: nn.Module,
        num_findings: int,
        dropout: float = 0.1,
        slice_chunk: int | None = DEFAULT_SLICE_CHUNK,
    ) -> None:
        super().__init__()
        spec = getattr(backbone, "spec", None)
        if not isinstance(spec, BackboneSpec):
            raise TypeError(
                "HeadCTClassifier needs a backbone from molre.backbones.create_backbone "
                "(it carries .spec)"
            )
        if int(num_findings) < 1:
            raise ValueError(f"num_findings must be >= 1, got {num_findings}")
        self.backbone = backbone
        self.spec: BackboneSpec = spec
        self.num_findings = int(num_findings)
        self.feature_dim = int(spec.feature_dim)
        self.slice_chunk = slice_chunk
        self.pool: AttentionPool | None = (
            AttentionPool(self.feature_dim) if spec.dims == 2 else None
        )
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
                raise ValueError(
                    f"{self.spec.name}: expected (B, 1, D, H, W), got {tuple(x.shape)}"
                )
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
        """``molre.model.trainable_state_dict(self)``: adapter + router tensors and everything
        outside the backbone (pooling, head); the same keys as
        ``molre.adapters.adapter_state_dict(model)`` when adapters are present. The frozen
        backbone is never included."""
        return trainable_state_dict(self)

    def load_trainable_state_dict(
        self, state: dict[str, torch.Tensor], strict: bool = True
    ) -> None:
        """Inverse of ``trainable_state_dict`` (strict: exactly the same keys and shapes)."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if strict and (missing or unexpected):
            raise ConfigError(
                f"trainable state does not fit the model: missing {missing[:10]}, "
                f"unexpected {unexpected[:10]}"
            )
        bad = [
            k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
        ]
        if bad:
            raise ConfigError(f"trainable state shape mismatch for {bad[:10]}")
        self.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _num_findings(catalog: Any) -> int:
    if isinstance(catalog, int):
        return catalog
    try:
        return len(catalog)
    except TypeError:
        raise ConfigError(
            f"build_model: catalog must be a Catalog (or a number of findings), "
            f"got {type(catalog).__name__}"
        ) from None


def resolve_adapter_config(
    adapter: MoLREConfig, spec: BackboneSpec, preset: str | None = None
) -> MoLREConfig:
    """The config actually injected: the targets of the backbone's adapter ``preset`` (None =
    the default, ``"paper"``) unless the config names its own.

    A config whose targets are still ``molre.adapters.DEFAULT_TARGETS`` (the generic default)
    counts as "no targets given", because those patterns are not right for every backbone.
    """
    if list(adapter.targets) == list(DEFAULT_TARGETS):
        return adapter.replace(targets=preset_targets(spec, preset))
    return adapter


def build_model(
    backbone: str | nn.Module,
    catalog: Any,
    adapter: MoLREConfig | None = None,
    weights: str | Path | None = None,
    dropout: float = 0.1,
    preset: str | None = None,
    slice_chunk: int | None = DEFAULT_SLICE_CHUNK,
    **overrides: Any,
) -> HeadCTClassifier:
    """Backbone (by name, or an already built module) + MoLRE adapters + pooling + head.

    The backbone is frozen; ``adapter=None`` is a linear probe (only pooling and head train).
    ``catalog`` gives the number of findings (a ``Catalog``, or an int for tests). ``preset``
    picks the adapter placement when the adapter config names no targets (None = "paper").
    """
    if isinstance(backbone, str):
        module = create_backbone(backbone, weights=weights, **overrides)
    else:
        if weights is not None or overrides:
            raise ConfigError(
                "build_model: pass weights/overrides only with a backbone name; "
                "this backbone module is already built"
            )
        module = backbone
    spec: BackboneSpec = module.spec
    for p in module.parameters():
        p.requires_grad_(False)
    config = None
    names: list[str] = []
    if adapter is not None:
        if not isinstance(adapter, MoLREConfig):
            raise ConfigError(
                f"build_model: adapter must be a MoLREConfig or None, got {type(adapter).__name__}"
            )
        config = resolve_adapter_config(adapter, spec, preset)
        names = inject_adapters(module, config)
    model = HeadCTClassifier(
        module, _num_findings(catalog), dropout=dropout, slice_chunk=slice_chunk
    )
    model.adapter_config = config
    model.adapted = names
    model.catalog = None if isinstance(catalog, int) else catalog
    log.info(
        "model_built",
        backbone=spec.name,
        findings=model.num_findings,
        adapted_layers=len(names),
        experts=config.experts if config else 0,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    return model
