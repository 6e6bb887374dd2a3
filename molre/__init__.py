"""molre: MoLRE (Mixture of Low-Rank Experts) adapters, backbones, data and training for head CT."""

from common import __version__

__all__ = ["__version__"]
