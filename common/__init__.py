"""Basics shared by every package of molre-node: logging, errors, JSON values, atomic writes,
DICOM constants. Depends on no other package of the project (and never on torch), so the
service (node/, storage/, cli/) and the ML package (molre/) can both use it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("molre-node")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
