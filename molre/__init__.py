"""molre: MoLRE (Mixture of Low-Rank Experts) adapters, backbones, data and training for head CT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("molre-node")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
