"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

Why warm-up: adapters start at ΔW = 0 and the head at random; a few small steps let AdamW's
moment estimates settle before full-size updates. Cosine then decays smoothly, with a floor so the
last epochs still learn a little.
"""

from __future__ import annotations

import math

import torch

__all__ = ["warmup_cosine", "warmup_cosine_factor"]


def warmup_cosine_factor(
    step: int, total_steps: int, warmup_steps: int, floor: float = 0.0
) -> float:
    """Multiplier of the base LR at optimizer step `step` (0-based)."""
    total_steps = max(1, int(total_steps))
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    if warmup_steps and step < warmup_steps:
        return float(step + 1) / float(warmup_steps)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, floor: float = 0.01
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR implementing `warmup_cosine_factor` (its state_dict resumes exactly)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine_factor(s, total_steps, warmup_steps, floor)
    )
