"""Multi-label focal loss with prevalence class weights and masking of unlabelled entries.

Why focal (gamma = 2): head-CT findings are rare and most volumes are easy negatives; the focal
term down-weights well-classified entries so rare positives drive the gradient (as in the MoLRE
paper). Labels come from reports, so many (volume, finding) pairs are simply *not labelled*: they
are NaN in the label matrix and must contribute nothing — neither to the loss nor to its
normaliser.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["focal_loss", "prevalence_weights"]


def prevalence_weights(labels: np.ndarray | torch.Tensor, max_weight: float = 20.0) -> torch.Tensor:
    """Per-finding weight for the positive term: n_negative / n_positive, clipped to [1, max_weight].

    Counted over labelled entries only (NaN ignored). A finding with no labelled positives gets
    weight 1 (there is nothing to up-weight), so the loss stays finite.
    """
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    if y.ndim != 2:
        raise ValueError(f"labels must be (N, F), got shape {tuple(y.shape)}")
    labelled = ~torch.isnan(y)
    pos = torch.where(labelled, y, torch.zeros_like(y)).sum(0)
    neg = (labelled & (y == 0)).sum(0).to(torch.float32)
    w = torch.where(pos > 0, neg / pos.clamp(min=1e-6), torch.ones_like(pos))
    return w.clamp(min=1.0, max=float(max_weight))


def focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 2.0,
    pos_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Binary focal loss per (sample, finding); NaN targets are masked out.

    loss = -[w_f * y * (1-p)^gamma * log p + (1-y) * p^gamma * log(1-p)]

    `reduction="mean"` averages over *labelled* entries only (0 when nothing is labelled, with a
    gradient that is zero but still attached, so DDP and accumulation code need no special case);
    `"sum"` sums them; `"none"` returns the (N, F) matrix with zeros at masked entries.
    Computed in float32 from log-sigmoid for numerical stability under bf16 autocast.
    """
    logits = logits.float()
    targets = targets.to(logits.device, torch.float32)
    mask = ~torch.isnan(targets)
    y = torch.where(mask, targets, torch.zeros_like(targets))
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    p = log_p.exp()
    pos_term = y * (1.0 - p).pow(gamma) * log_p
    if pos_weight is not None:
        pos_term = pos_term * pos_weight.to(logits.device, torch.float32)
    neg_term = (1.0 - y) * p.pow(gamma) * log_1mp
    loss = -(pos_term + neg_term)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}")
    return loss.sum() / mask.sum().clamp(min=1)
