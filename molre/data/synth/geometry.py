"""Where a phantom's voxels are: the scanner grid (with optional gantry tilt) and the head's pose.

Coordinates: the scanner (patient LPS) frame is x = patient left, y = posterior, z = superior,
in mm. The anatomy lives in its own frame (u, v, w) = (left, posterior, superior) centred on the
head; a rotation (yaw in-plane, pitch = head flexion, small roll) and an offset place it in the
scanner. Volumes are indexed (z, y, x) with slice 0 the most inferior.

Gantry tilt: the image rows stay along x, the columns run along (0, cos t, sin t), and the table
still moves along z, so the grid is sheared, exactly as a tilted acquisition is stored in DICOM
(ImageOrientationPatient tilted, ImagePositionPatient stepping along z).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from common.errors import MolreError


class PlacementError(MolreError):
    """A drawn finding does not fit the scanned slab (raised after the last pose retry)."""


def rotation_matrix(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Anatomical -> scanner rotation: yaw about z (in-plane), pitch about x, roll about y."""
    cy, sy = math.cos(yaw), math.sin(yaw)
    cp, sp = math.cos(pitch), math.sin(pitch)
    cr, sr = math.cos(roll), math.sin(roll)
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    ry = np.array([[cr, 0, sr], [0, 1, 0], [-sr, 0, cr]])
    return rz @ rx @ ry


@dataclass(frozen=True)
class PhantomGeometry:
    """Where the voxels are and where the anatomy sits in them (all mm, LPS)."""

    shape: tuple[int, int, int]  # (z, y, x)
    spacing: tuple[float, float, float]  # (z = table step, y, x)
    origin: tuple[float, float, float]  # (x, y, z) of voxel (0, 0, 0)
    head_center: tuple[float, float, float]  # (x, y, z)
    rotation: tuple[tuple[float, float, float], ...]  # 3x3, anatomical -> scanner
    yaw_deg: float
    pitch_deg: float
    roll_deg: float
    slice_thickness: float
    noise_sigma: float
    tilt_deg: float = 0.0

    @property
    def direction(self) -> np.ndarray:
        """Rows = unit vectors of the x / y (column) / z (table step) voxel axes in LPS."""
        t = math.radians(self.tilt_deg)
        return np.array([[1.0, 0.0, 0.0], [0.0, math.cos(t), math.sin(t)], [0.0, 0.0, 1.0]])

    def index_matrix(self) -> np.ndarray:
        """3x3 M with world = origin + M @ (k, j, i)."""
        d = self.direction
        dz, dy, dx = self.spacing
        return np.stack([d[2] * dz, d[1] * dy, d[0] * dx], axis=1)

    def to_world(self, uvw: np.ndarray) -> np.ndarray:
        """Anatomical (u, v, w) mm -> scanner (x, y, z) mm; accepts (..., 3)."""
        r = np.asarray(self.rotation)
        return np.asarray(uvw, dtype=float) @ r.T + np.asarray(self.head_center)

    def to_anatomical(self, xyz: np.ndarray) -> np.ndarray:
        r = np.asarray(self.rotation)
        return (np.asarray(xyz, dtype=float) - np.asarray(self.head_center)) @ r

    def world_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """Scanner (x, y, z) mm -> fractional voxel index (z, y, x)."""
        rel = np.asarray(xyz, dtype=float) - np.asarray(self.origin)
        return rel @ np.linalg.inv(self.index_matrix()).T

    def index_to_world(self, zyx: np.ndarray) -> np.ndarray:
        zyx = np.asarray(zyx, dtype=float)
        return zyx @ self.index_matrix().T + np.asarray(self.origin)

    def grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable scanner x (1, 1, nx), y (1, ny, 1) and z (nz, ny, 1) of every voxel."""
        nz, ny, nx = self.shape
        dz, dy, dx = self.spacing
        t = math.radians(self.tilt_deg)
        x = (self.origin[0] + dx * np.arange(nx, dtype=np.float32))[None, None, :]
        j = np.arange(ny, dtype=np.float32)
        y = (self.origin[1] + dy * math.cos(t) * j)[None, :, None].astype(np.float32)
        z = (
            self.origin[2]
            + dz * np.arange(nz, dtype=np.float32)[:, None, None]
            + np.float32(dy * math.sin(t)) * j[None, :, None]
        ).astype(np.float32)
        return x, y, z

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhantomGeometry:
        """Inverse of `to_dict` (e.g. from `phantoms.jsonl`), to locate findings in pixels."""
        tup = {k: tuple(v) for k, v in d.items() if isinstance(v, list)}
        tup["rotation"] = tuple(tuple(r) for r in d["rotation"])
        tup["shape"] = tuple(int(n) for n in d["shape"])
        return cls(**{**d, **tup})
