"""Training, metrics and LR schedule for MoLRE adapters (`molre-node train`)."""

from molre.training.loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
