"""DICOM CT series (or NIfTI file) -> one HU volume with its geometry.

Why this is more than ``np.stack``: real series arrive shuffled, with per-slice rescale values,
duplicated or missing slices, localizer images and dose screens mixed in, gantry tilt, compressed
transfer syntaxes, or as one multi-frame Enhanced CT object. A model given a wrongly stacked
volume still produces confident numbers, so every assumption is checked here and anything the
reader cannot fix raises `SeriesError` naming the tag and what is wrong.

Conventions (see docs/architecture.md):

- ``hu`` is float32 indexed ``(z, y, x)``: z = slice (ascending along the slice normal), y = image
  row, x = image column.
- ``direction`` rows are the unit vectors of the x, y and z array axes in patient **LPS**
  (DICOM) coordinates: x = ImageOrientationPatient[:3], y = ImageOrientationPatient[3:],
  z = their cross product (the slice normal). So slices always run along +normal; for a
  standard axial head CT that means inferior -> superior.
- ``origin`` is the LPS position (mm) of voxel (0, 0, 0); ``spacing`` is (z, y, x) mm.
- ``affine()`` maps an index ``(k, j, i, 1)`` in the array's own (z, y, x) order to LPS mm.
- ``to_metatensor()`` returns a MONAI MetaTensor of shape (1, z, y, x) whose affine is the same
  mapping in **RAS** (MONAI's default space, ``meta["space"] == "RAS"``), so MONAI's
  ``Orientation(axcodes=...)`` letters mean what they say. A standard axial head CT is already
  "SPL" (z -> superior, y -> posterior, x -> patient left).

Policies (all recorded in ``warnings`` when they change data):

- Slice order comes from ImagePositionPatient projected on the normal, never InstanceNumber.
- Every slice is rescaled with its own RescaleSlope / RescaleIntercept.
- Duplicate positions: one slice is kept (lowest InstanceNumber), the warning says whether the
  dropped pixels were identical.
- Stepped spacing (head protocols acquire the posterior fossa thinner, e.g. 14 slices at 4 mm
  then 14 at 7 mm): runs of >= 3 equal steps are acquisition blocks; the volume is resampled onto
  a regular grid at the finest block spacing by linear interpolation between acquired slices.
- Gaps (a step > 1.5 x the spacing of the run around it, i.e. slices dropped inside a uniformly
  spaced run) are filled by linear interpolation between the neighbours and reported; more than
  ``max_missing_fraction`` missing -> SeriesError. Other non-uniform spacing is resampled
  linearly onto the median spacing.
- Sanity before any pixel is resampled (SeriesError naming the tag): RescaleSlope 0 or
  non-finite RescaleSlope / RescaleIntercept, PixelSpacing outside ``PIXEL_SPACING_MM``, a field
  of view above ``MAX_FIELD_OF_VIEW_MM``, a slice spacing above ``MAX_SLICE_SPACING_MM``, a
  regular grid of more than ``max_voxels`` voxels, and a constant volume (every voxel equal).
- Every change to the geometry (tilt resampled, spacing regularised, gaps filled, duplicates
  dropped) is listed in ``meta["corrections"]`` (kind + description) for the audit trail.
- ``meta["slice_thickness"]`` is the SliceThickness (0018,0050) of most slices (ties: the
  thinner), ``meta["slice_thickness_values"]`` every distinct value: never inferred from spacing.
- Gantry tilt (slice positions not along the normal): each slice is shifted in-plane (linear
  interpolation) onto an orthogonal grid, as dcm2niix does, up to ``max_tilt_deg``; above that,
  or with ``tilt="refuse"``, SeriesError.
- Non-DICOM files, non-image objects (SR, KO, PR, ...), localizers and other image SOP classes
  (e.g. secondary-capture dose screens) are skipped with a warning; single-frame CT mixed with
  Enhanced CT, or more than one SeriesInstanceUID -> SeriesError.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage

from common.dicom import (
    CT_STORAGE_CLASSES,
    MAX_FIELD_OF_VIEW_MM,
    MULTIFRAME_CT_CLASSES,
    PIXEL_SPACING_MM,
    functional_group_value,
)
from common.errors import SeriesError
from common.log import get_logger

log = get_logger("molre.data.volume")


_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Like common.dicom's PIXEL_SPACING_MM and MAX_FIELD_OF_VIEW_MM: beyond it the header is
#: corrupt or hostile.
MAX_SLICE_SPACING_MM = 20.0
#: Default bound on the voxels of the regular grid (float32: 4 bytes each); callers pass theirs.
DEFAULT_MAX_VOXELS = 512 * 512 * 2048
#: A run of at least this many equal steps is an acquisition block (stepped-spacing protocols).
_MIN_BLOCK_STEPS = 3
_STEP_TOL = 0.1


@dataclass
class SeriesVolume:
    """A CT volume in HU with the geometry needed to resample it and to cite its sources."""

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: np.ndarray
    direction: np.ndarray
    sop_instance_uids: list[str]
    series_uid: str
    study_uid: str
    warnings: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def affine(self, space: str = "LPS") -> np.ndarray:
        """4x4 matrix mapping (k, j, i, 1) — array (z, y, x) index order — to patient mm."""
        a = np.eye(4)
        sz, sy, sx = self.spacing
        a[:3, 0] = self.direction[2] * sz
        a[:3, 1] = self.direction[1] * sy
        a[:3, 2] = self.direction[0] * sx
        a[:3, 3] = self.origin
        if space.upper() == "RAS":
            return _LPS_TO_RAS @ a
        if space.upper() != "LPS":
            raise ValueError(f"space must be 'LPS' or 'RAS', not {space!r}")
        return a

    def world(self, index: Sequence[float]) -> np.ndarray:
        """LPS position (mm) of a (z, y, x) voxel index."""
        return (self.affine() @ np.array([*index, 1.0]))[:3]

    def to_metatensor(self) -> Any:
        """MONAI MetaTensor (1, z, y, x) with the RAS affine (MONAI's convention)."""
        import torch
        from monai.data import MetaTensor

        meta = {
            "space": "RAS",
            "series_uid": self.series_uid,
            "study_uid": self.study_uid,
            "filename_or_obj": self.series_uid,
            "original_affine": torch.as_tensor(self.affine("RAS"), dtype=torch.float64),
        }
        return MetaTensor(
            torch.from_numpy(np.ascontiguousarray(self.hu, np.float32))[None],
            affine=torch.as_tensor(self.affine("RAS"), dtype=torch.float64),
            meta=meta,
        )


class DeferredSeriesVolume(SeriesVolume):
    """A `SeriesVolume` whose pixels are decoded when first needed (``read_series(...,
    defer_pixels=True)``).

    Why: a thin-slice series (480 x 512 x 512) is 500 MB of float32 that the 3-D recipes
    immediately shrink a hundredfold. Geometry, UIDs, shape and header warnings are there at
    once; ``hu`` decodes the full volume on first access (anything that needs it still works);
    `reduce_slices` hands every slice to a linear in-plane map as it is decoded instead, so the
    full-resolution volume is never held. Pixel-stage warnings (duplicate slices, tilt
    resampling) are appended to ``warnings`` / ``meta["corrections"]`` when pixels are read.
    """

    def __init__(self, pixels: Any, shape: tuple[int, int, int], **geometry: Any) -> None:
        self._pixels = pixels
        self._shape = tuple(int(v) for v in shape)
        self._hu: np.ndarray | None = None
        super().__init__(hu=None, **geometry)  # type: ignore[arg-type]

    @property
    def hu(self) -> np.ndarray:
        if self._hu is None:
            self._hu = self._pixels.full()
        return self._hu

    @hu.setter
    def hu(self, value: np.ndarray | None) -> None:
        self._hu = value

    @property
    def loaded(self) -> bool:
        return self._hu is not None

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape  # type: ignore[return-value]

    def reduce_slices(self, fn: Any, out_hw: tuple[int, int]) -> np.ndarray | None:
        """``fn`` (a *linear* map of one (rows, cols) HU slice to an ``out_hw`` array) applied
        to each acquired slice as it is decoded, then the regular grid along z (linear too, so
        the order does not change the result). Returns (z, *out_hw) float32, or None when the
        pixels are already decoded (use ``hu``) or the slices must be shifted first (tilt)."""
        if self._hu is not None:
            return None
        return self._pixels.reduced(fn, out_hw)

    def __repr__(self) -> str:  # the dataclass repr would decode the pixels
        return (
            f"DeferredSeriesVolume(series_uid={self.series_uid!r}, shape={self.shape}, "
            f"spacing={self.spacing}, loaded={self.loaded})"
        )


# ------------------------------------------------------------------------------------------
# header collection
# ------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    path: Path
    frame: int | None  # None for single-frame objects
    sop_uid: str
    instance_number: int
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int
    slope: float
    intercept: float
    thickness: float | None = None
    t: float = 0.0


def _floats(value: Any, n: int, tag: str, where: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise SeriesError(f"{where}: {tag} is missing or not numeric ({value!r})") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise SeriesError(f"{where}: {tag} must have {n} numeric values, got {value!r}")
    return arr


def _rescale(
    ds: Dataset, where: str, warnings: list[str], slope: Any, intercept: Any
) -> tuple[float, float]:
    if slope is None or intercept is None:
        warnings.append(
            f"{where}: RescaleSlope/RescaleIntercept missing; assumed 1 and 0 "
            "(values may not be HU)"
        )
        slope = 1.0 if slope is None else slope
        intercept = 0.0 if intercept is None else intercept
    try:
        s, i = float(slope), float(intercept)
    except (TypeError, ValueError):
        raise SeriesError(
            f"{where}: RescaleSlope/RescaleIntercept not numeric ({slope!r}, {intercept!r})"
        ) from None
    for tag, v in (("RescaleSlope (0028,1053)", s), ("RescaleIntercept (0028,1052)", i)):
        if not math.isfinite(v):
            raise SeriesError(
                f"{where}: {tag} is {v} (not a finite number); the pixel values "
                "cannot be converted to HU"
            )
    if s == 0:
        raise SeriesError(
            f"{where}: RescaleSlope (0028,1053) is 0: every voxel would have the "
            "same value; the series is unusable"
        )
    return s, i


def _frames_of(path: Path, ds: Dataset, warnings: list[str]) -> list[_Frame]:
    where = str(path)
    sop_uid = str(ds.get("SOPInstanceUID", ""))
    if not sop_uid:
        raise SeriesError(f"{where}: SOPInstanceUID (0008,0018) missing")
    for tag in ("Rows", "Columns"):
        if tag not in ds:
            raise SeriesError(f"{where}: {tag} missing")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SeriesError(f"{where}: SamplesPerPixel={ds.SamplesPerPixel}; CT must be grey-scale")
    rows, cols = int(ds.Rows), int(ds.Columns)
    inst = int(ds.get("InstanceNumber") or 0)
    if str(ds.SOPClassUID) in MULTIFRAME_CT_CLASSES:
        n = int(ds.get("NumberOfFrames") or 1)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is None or len(per_frame) != n:
            raise SeriesError(
                f"{where}: PerFrameFunctionalGroupsSequence must have one item per "
                f"frame (NumberOfFrames={n})"
            )
        out = []
        for i in range(n):
            item = per_frame[i]
            fw = f"{where} frame {i + 1}"
            pos = functional_group_value(ds, item, "PlanePositionSequence", "ImagePositionPatient")
            ori = functional_group_value(
                ds, item, "PlaneOrientationSequence", "ImageOrientationPatient"
            )
            spc = functional_group_value(ds, item, "PixelMeasuresSequence", "PixelSpacing")
            slope = functional_group_value(
                ds, item, "PixelValueTransformationSequence", "RescaleSlope"
            )
            icpt = functional_group_value(
                ds, item, "PixelValueTransformationSequence", "RescaleIntercept"
            )
            thick = _float_or_none(
                functional_group_value(ds, item, "PixelMeasuresSequence", "SliceThickness")
            )
            out.append(
                _Frame(
                    path,
                    i,
                    sop_uid,
                    inst,
                    _floats(pos, 3, "PlanePositionSequence/ImagePositionPatient", fw),
                    _floats(ori, 6, "PlaneOrientationSequence/ImageOrientationPatient", fw),
                    tuple(_floats(spc, 2, "PixelMeasuresSequence/PixelSpacing", fw)),  # type: ignore
                    rows,
                    cols,
                    *_rescale(ds, fw, warnings, slope, icpt),
                    thick,
                )
            )
        return out
    return [
        _Frame(
            path,
            None,
            sop_uid,
            inst,
            _floats(
                _ds_value(ds, "ImagePositionPatient"), 3, "ImagePositionPatient (0020,0032)", where
            ),
            _floats(
                _ds_value(ds, "ImageOrientationPatient"),
                6,
                "ImageOrientationPatient (0020,0037)",
                where,
            ),
            tuple(
                _floats(
                    _ds_value(ds, "PixelSpacing"),
                    2,
                    "PixelSpacing (0028,0030)",  # type: ignore
                    where,
                )
            ),
            rows,
            cols,
            *_rescale(
                ds,
                where,
                warnings,
                _ds_value(ds, "RescaleSlope"),
                _ds_value(ds, "RescaleIntercept"),
            ),
            _float_or_none(_ds_value(ds, "SliceThickness")),
        )
    ]


#: Decimal-string (DS) attributes every slice's geometry needs, by keyword.
_DS_TAGS = {
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "PixelSpacing": 0x00280030,
    "RescaleSlope": 0x00281053,
    "RescaleIntercept": 0x00281052,
    "SliceThickness": 0x00180050,
}


def _ds_value(ds: Dataset, keyword: str) -> Any:
    """``ds.get(keyword)`` for a DS attribute: parsed straight from its raw bytes while pydicom
    has not converted it yet (a float, a list of floats, or None when empty/absent), else
    pydicom's value. Why: pydicom builds and validates one DSfloat object per number, which was
    a third of the header pass of a 480-slice series; anything the plain parse does not accept
    goes through pydicom, with its messages."""
    elem = ds.get_item(_DS_TAGS[keyword])
    if elem is None:
        return None
    raw = getattr(elem, "value", None)
    if isinstance(raw, bytes) and getattr(elem, "VR", None) in (None, "DS"):
        try:
            parts = [float(v) for v in raw.split(b"\\")] if raw.strip() else []
        except ValueError:
            return ds.get(keyword)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else parts
    return ds.get(keyword)


def _list_files(source: Path | Sequence[Path]) -> list[Path]:
    if isinstance(source, (str, Path)):
        src = Path(source)
        if src.is_dir():
            files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif src.is_file():
            files = [src]
        else:
            raise SeriesError(f"{src} does not exist; give a DICOM series folder or files")
    else:
        files = [Path(p) for p in source]
        absent = [str(p) for p in files if not p.is_file()]
        if absent:
            raise SeriesError(f"{len(absent)} file(s) do not exist, e.g. {absent[0]}")
    if not files:
        raise SeriesError(f"{source}: no files found")
    return files


def _collect(files: list[Path], warnings: list[str]) -> tuple[list[_Frame], dict[str, Any]]:
    """Read each file once (pixel data deferred) and keep the CT image objects of one series.

    ``info["datasets"]`` maps each kept path to its dataset so the pixel stage decodes from it
    instead of reading the file a second time."""
    skipped: Counter[str] = Counter()
    headers: list[tuple[Path, Dataset]] = []
    legacy = 0
    for p in files:
        ds = _read_header(p)
        if ds is None:
            skipped["not a readable DICOM file"] += 1
            continue
        legacy += "TransferSyntaxUID" not in ds.file_meta
        sop_class = str(ds.get("SOPClassUID", ""))
        if "Rows" not in ds or not sop_class:
            skipped[f"non-image object ({_class_name(sop_class)})"] += 1
            continue
        if sop_class not in CT_STORAGE_CLASSES:
            skipped[f"image of another SOP class ({_class_name(sop_class)})"] += 1
            continue
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if "LOCALIZER" in image_type:
            skipped["localizer (ImageType LOCALIZER)"] += 1
            continue
        headers.append((p, ds))
    for reason, count in sorted(skipped.items()):
        warnings.append(f"skipped {count} file(s): {reason}")
    if legacy:
        warnings.append(
            f"{legacy} file(s) without DICOM preamble/file meta (legacy format); "
            "read with the encoding pydicom detected"
        )
    if not headers:
        raise SeriesError(
            f"no CT image objects among {len(files)} file(s)"
            + (f" ({'; '.join(warnings)})" if warnings else "")
        )
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in headers)
    if len(series) > 1:
        detail = ", ".join(f"{uid or '<missing>'} ({n} files)" for uid, n in series.most_common())
        raise SeriesError(
            f"files belong to {len(series)} series (SeriesInstanceUID {detail}); "
            "give one series at a time"
        )
    classes = Counter(str(ds.SOPClassUID) for _, ds in headers)
    if CTImageStorage in classes and len(classes) > 1:
        raise SeriesError(
            "series mixes single-frame CT Image Storage and Enhanced CT objects "
            f"(SOPClassUID {dict(classes)}); export one form only"
        )
    sops = Counter(str(ds.get("SOPInstanceUID", "")) for _, ds in headers)
    dup_sops = [u for u, n in sops.items() if n > 1]
    if dup_sops:
        warnings.append(
            f"{len(dup_sops)} SOPInstanceUID(s) present in more than one file; "
            "keeping the first copy"
        )
        seen: set[str] = set()
        unique = []
        for p, ds in headers:
            uid = str(ds.get("SOPInstanceUID", ""))
            if uid not in seen:
                seen.add(uid)
                unique.append((p, ds))
        headers = unique
    frames: list[_Frame] = []
    for p, ds in headers:
        frames.extend(_frames_of(p, ds, warnings))
    first = headers[0][1]
    tilt_values = {str(ds.get("GantryDetectorTilt", "0") or "0") for _, ds in headers}
    meta = {
        "sop_class_uid": str(first.SOPClassUID),
        "modality": str(first.get("Modality", "")),
        "manufacturer": str(first.get("Manufacturer", "")),
        "convolution_kernel": str(first.get("ConvolutionKernel", "")),
        "slice_thickness": _float_or_none(first.get("SliceThickness")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "gantry_detector_tilt": sorted(tilt_values),
        "files": len(headers),
    }
    return frames, {
        "meta": meta,
        "study_uid": str(first.get("StudyInstanceUID", "")),
        "series_uid": str(first.get("SeriesInstanceUID", "")),
        "datasets": dict(headers),
    }


#: Values above this size (pixel data) are read from the file only when accessed, so the header
#: pass does not load pixels and the pixel pass does not parse the file again.
_DEFER = "64 KB"


def _read_header(path: Path) -> Dataset | None:
    """Header with deferred pixel data; accepts legacy files lacking preamble and file meta."""
    try:
        return pydicom.dcmread(path, defer_size=_DEFER)
    except InvalidDicomError:
        pass
    except (EOFError, OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    try:  # no "DICM" prefix: only accept it if it really parses as an image-ish dataset
        ds = pydicom.dcmread(path, defer_size=_DEFER, force=True)
        return ds if "SOPClassUID" in ds and "SOPInstanceUID" in ds else None
    except Exception:  # arbitrary bytes make the forced parser fail in arbitrary ways
        return None


def _with_transfer_syntax(ds: Dataset) -> Dataset:
    """Give a legacy dataset (no file meta) the transfer syntax pydicom detected, for decoding."""
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # legacy file without file meta: tell the decoder the encoding pydicom detected
        implicit, little = ds.original_encoding
        if meta is None:
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if implicit
            else pydicom.uid.ExplicitVRLittleEndian
            if little
            else pydicom.uid.ExplicitVRBigEndian
        )
    return ds


def _float_or_none(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _class_name(uid: str) -> str:
    if not uid:
        return "no SOPClassUID"
    try:
        return f"{pydicom.uid.UID(uid).name}"
    except Exception:  # pragma: no cover - name lookup never matters
        return uid


def _check_consistent(frames: list[_Frame]) -> None:
    def fail(tag: str, values: Counter) -> None:
        shown = "; ".join(f"{k} x{n}" for k, n in values.most_common(4))
        raise SeriesError(
            f"inconsistent {tag} inside the series ({shown}); the slices do not "
            "form one volume — check that the folder holds a single reconstruction"
        )

    sizes = Counter((f.rows, f.cols) for f in frames)
    if len(sizes) > 1:
        fail(
            "Rows/Columns (0028,0010)/(0028,0011)",
            Counter({f"{r}x{c}": n for (r, c), n in sizes.items()}),
        )
    ref = frames[0].orientation
    if any(np.max(np.abs(f.orientation - ref)) > 1e-3 for f in frames):
        fail(
            "ImageOrientationPatient (0020,0037)",
            Counter(",".join(f"{v:.3g}" for v in f.orientation) for f in frames),
        )
    sp = np.array([f.pixel_spacing for f in frames])
    if np.any(sp <= 0):
        bad = next(f for f in frames if min(f.pixel_spacing) <= 0)
        values = [float(v) for v in bad.pixel_spacing]
        raise SeriesError(
            f"{bad.path}: PixelSpacing (0028,0030) {values} must be positive; the "
            "series geometry is unusable"
        )
    if np.max(np.abs(sp - sp[0])) > 1e-3 * max(1.0, float(sp[0].max())):
        fail("PixelSpacing (0028,0030)", Counter(f"{a:g}\\{b:g}" for a, b in sp))
    lo, hi = PIXEL_SPACING_MM
    if not (np.all(np.isfinite(sp[0])) and lo <= sp[0].min() and sp[0].max() <= hi):
        raise SeriesError(
            f"PixelSpacing (0028,0030) {[float(v) for v in sp[0]]} mm is outside "
            f"{lo:g}..{hi:g} mm, not a CT pixel size; refused rather than "
            "resampled (check the header)"
        )
    f0 = frames[0]
    fov = (f0.rows * float(sp[0][0]), f0.cols * float(sp[0][1]))
    if max(fov) > MAX_FIELD_OF_VIEW_MM:
        raise SeriesError(
            f"Rows x PixelSpacing (0028,0010)/(0028,0030) give a field of view of "
            f"{fov[0]:.0f} x {fov[1]:.0f} mm, more than {MAX_FIELD_OF_VIEW_MM:g} mm; "
            "refused rather than resampled (check the header)"
        )
    r, c = ref[:3], ref[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-2 or abs(np.linalg.norm(c) - 1) > 1e-2 or abs(r @ c) > 1e-2:
        raise SeriesError(
            f"ImageOrientationPatient (0020,0037) {list(ref)} is not two orthogonal unit vectors"
        )


# ------------------------------------------------------------------------------------------
# pixels
# ------------------------------------------------------------------------------------------
#: Transfer syntaxes whose Pixel Data is the raw little-endian sample array (read directly).
_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    """The stored sample values of every frame: (rows, cols) or (frames, rows, cols).

    Uncompressed 16-bit little-endian grey-scale (what CT mostly is) is viewed straight from the
    Pixel Data bytes (what ``pixel_array`` returns for it, without its per-call machinery);
    anything else goes through pydicom's decoders."""
    ds = _with_transfer_syntax(ds)
    rows, cols = int(ds.Rows), int(ds.Columns)
    n = int(ds.get("NumberOfFrames") or 1)
    if (
        str(ds.file_meta.TransferSyntaxUID) in _NATIVE_LE
        and ds.get("BitsAllocated") == 16
        and ds.get("BitsStored") == 16
        and int(ds.get("SamplesPerPixel", 1)) == 1
        and "PixelData" in ds
    ):
        dtype = "<i2" if int(ds.get("PixelRepresentation", 0)) else "<u2"
        count = n * rows * cols
        elem = ds.get_item(0x7FE00010, keep_deferred=True)
        tell = getattr(elem, "value_tell", None)
        arr = None
        if (
            getattr(elem, "value", b"") is None
            and tell is not None
            and ds.filename
            and getattr(elem, "length", 0) >= 2 * count
        ):
            # deferred by the header pass: read the samples straight into the array
            try:
                arr = np.fromfile(ds.filename, dtype=dtype, count=count, offset=int(tell))
            except (OSError, ValueError):
                arr = None
            if arr is not None and arr.size != count:
                arr = None
        if arr is None:
            data = ds.PixelData
            if isinstance(data, bytes) and len(data) >= 2 * count:
                arr = np.frombuffer(data, dtype=dtype, count=count)
        if arr is not None:
            return arr.reshape(rows, cols) if n == 1 else arr.reshape(n, rows, cols)
    try:
        return ds.pixel_array
    except Exception as exc:  # decoder errors come in many types
        ts = "unknown"
        try:
            ts = ds.file_meta.TransferSyntaxUID.name
        except Exception:
            pass
        raise SeriesError(
            f"{path}: cannot decode pixel data (transfer syntax {ts}): {exc}. "
            "Install the pylibjpeg plugins / pyjpegls, or send the series "
            "uncompressed"
        ) from exc


def _frame_of(arr: np.ndarray, f: _Frame) -> np.ndarray:
    if f.frame is None:
        raw = arr if arr.ndim == 2 else arr[0]
    else:
        raw = arr[f.frame] if arr.ndim == 3 else arr
    if raw.shape != (f.rows, f.cols):
        raise SeriesError(
            f"{f.path}: decoded pixel shape {raw.shape} does not match "
            f"Rows/Columns {f.rows}x{f.cols}"
        )
    return raw


def _to_hu(raw: np.ndarray, f: _Frame, out: np.ndarray | None = None) -> np.ndarray:
    """Stored values -> HU in float32 (into `out` when given): the slice's own rescale."""
    if out is None:
        out = raw.astype(np.float32)
    else:
        out[...] = raw
    if f.slope != 1.0:
        out *= np.float32(f.slope)
    if f.intercept != 0.0:
        out += np.float32(f.intercept)
    return out


@dataclass
class _PixelPass:
    """What the header pass decided about the pixels: which frames, in which order, how the
    regular grid is made of them, whether slices must be shifted (tilt). Decodes on demand,
    each file once per pass; datasets read by the header pass are used (and released) first."""

    series_uid: str
    kept: list[_Frame]
    dup_groups: list[list[_Frame]]
    datasets: dict[Path, Dataset]
    grid: list[tuple[int, int, float]]  # per grid plane: kept indices (lo, hi) and weight of hi
    offsets_px: np.ndarray | None  # in-plane shift per kept slice (tilt), None = none needed
    tilt_reason: str | None
    warnings: list[str]
    corrections: list[dict[str, str]]
    reported: bool = False

    def _dataset(self, path: Path) -> Dataset:
        ds = self.datasets.pop(path, None)
        if ds is None:  # released by an earlier pass: read it again
            ds = _read_header(path)
            if ds is None:
                raise SeriesError(f"{path}: the file can no longer be read as DICOM")
        return ds

    def _slices(self, frames: list[_Frame], into: Any = None):
        """Yield (index, HU slice) in order; ``into(k)`` gives the (rows, cols) float32 array
        to write slice k into (None: a new array each). A multi-frame file is decoded once
        while its frames are consumed."""
        remaining = Counter(f.path for f in frames)
        cache: dict[Path, np.ndarray] = {}
        for k, f in enumerate(frames):
            arr = cache.get(f.path)
            if arr is None:
                arr = _decode(self._dataset(f.path), f.path)
                if remaining[f.path] > 1:
                    cache[f.path] = arr
            remaining[f.path] -= 1
            if not remaining[f.path]:
                cache.pop(f.path, None)
            yield k, _to_hu(_frame_of(arr, f), f, None if into is None else into(k))

    def _check_duplicates(self) -> None:
        if not self.dup_groups or self.reported:
            return
        same = 0
        for g in self.dup_groups:
            ref = None
            equal = True
            for _, hu in self._slices(list(g)):
                if ref is None:
                    ref = hu
                elif not np.array_equal(hu, ref):
                    equal = False
            same += equal
        dropped = sum(len(g) - 1 for g in self.dup_groups)
        msg = (
            f"duplicate slice positions: {len(self.dup_groups)} position(s), {dropped} "
            f"slice(s) dropped ({same} with identical pixels, "
            f"{len(self.dup_groups) - same} with different pixels); kept the lowest "
            "InstanceNumber"
        )
        self.warnings.append(msg)
        self.corrections.append({"kind": "duplicate_slices_dropped", "description": msg})

    def _finish(self, lo_hu: float, hi_hu: float) -> None:
        if lo_hu == hi_hu:
            raise SeriesError(
                f"series {self.series_uid}: every voxel is {lo_hu:g} after "
                "RescaleSlope (0028,1053) / RescaleIntercept (0028,1052): a "
                "constant volume has nothing to read (check the rescale values "
                "and Pixel Data)"
            )
        if self.reported:
            return
        self.reported = True
        if self.tilt_reason:
            self.warnings.append(self.tilt_reason + "; resampled onto an orthogonal grid")
            self.corrections.append(
                {
                    "kind": "gantry_tilt_resampled",
                    "description": self.tilt_reason + "; resampled onto an orthogonal grid",
                }
            )

    def _gridded(self, stack: np.ndarray) -> np.ndarray:
        """The kept slices (first axis of `stack`) on the regular grid; `stack` itself when the
        grid is the acquired slices."""
        if len(self.grid) == len(stack) and all(
            lo == m and w == 0.0 for m, (lo, _, w) in enumerate(self.grid)
        ):
            return stack
        out = np.empty((len(self.grid), *stack.shape[1:]), np.float32)
        for m, (lo, hi, w) in enumerate(self.grid):
            # w is a float64 scalar: the blend is computed in float64, then stored as float32
            out[m] = stack[lo] if w == 0.0 else (1 - w) * stack[lo] + w * stack[hi]
        return out

    def full(self) -> np.ndarray:
        """The HU volume on the regular grid, decoded into one preallocated array."""
        self._check_duplicates()
        f0 = self.kept[0]
        stack = np.empty((len(self.kept), f0.rows, f0.cols), np.float32)
        lo_hu, hi_hu = math.inf, -math.inf
        for k, _ in self._slices(self.kept, stack.__getitem__):
            lo_hu = min(lo_hu, float(stack[k].min()))
            hi_hu = max(hi_hu, float(stack[k].max()))
        self._finish(lo_hu, hi_hu)
        if self.offsets_px is not None:
            _deskew_into(stack, self.offsets_px, lo_hu)
        return self._gridded(stack)

    def reduced(self, fn: Any, out_hw: tuple[int, int]) -> np.ndarray | None:
        """`fn` (a linear map of one HU slice to an (h, w) array) applied to every acquired slice
        as it is decoded, then the regular grid: the full-resolution volume never exists. None
        when slices must be shifted first (tilt: the shift needs every slice's minimum)."""
        if self.offsets_px is not None:
            return None
        self._check_duplicates()
        f0 = self.kept[0]
        buf = np.empty((f0.rows, f0.cols), np.float32)
        out = np.empty((len(self.kept), *out_hw), np.float32)
        lo_hu, hi_hu = math.inf, -math.inf
        for k, hu in self._slices(self.kept, lambda _k: buf):
            lo_hu = min(lo_hu, float(hu.min()))
            hi_hu = max(hi_hu, float(hu.max()))
            out[k] = fn(hu)
        self._finish(lo_hu, hi_hu)
        return self._gridded(out)


def _deskew_into(stack: np.ndarray, offsets_px: np.ndarray, fill: float) -> None:
    """Shift each slice in-plane by its offset (linear interpolation), in place."""
    from scipy import ndimage

    for k, (dy, dx) in enumerate(offsets_px):
        if abs(dy) >= 1e-3 or abs(dx) >= 1e-3:
            stack[k] = ndimage.shift(stack[k], (dy, dx), order=1, mode="constant", cval=fill)


@dataclass
class _SpacingPlan:
    step: float  # spacing of the regular grid
    missing: int = 0  # slices judged dropped (gaps)
    gap_idx: list[int] = field(default_factory=list)  # steps that are gaps
    blocks: list[tuple[float, float, float]] = field(default_factory=list)  # stepped: (from,
    # to, spacing) per acquisition block, empty for a uniformly spaced series
    nonuniform: bool = False


def _runs(steps: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of >= _MIN_BLOCK_STEPS steps within _STEP_TOL of the run's first."""
    out: list[tuple[int, int]] = []
    i, n = 0, len(steps)
    while i < n:
        j = i + 1
        while j < n and abs(steps[j] - steps[i]) <= _STEP_TOL * steps[i]:
            j += 1
        if j - i >= _MIN_BLOCK_STEPS:
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def _spacing_plan(ts: np.ndarray, thickness: Sequence[float | None]) -> _SpacingPlan:
    """Tell a stepped-spacing protocol from dropped slices, and pick the grid spacing.

    Uniform series (one spacing, possibly with holes): the median step; a step > 1.5 x it is a
    gap. Stepped series (acquisition blocks of different spacing): the finest block spacing; a
    step outside the blocks is a gap when it is > 1.5 x the spacing of the blocks around it, and
    a whole block whose spacing is k x (k >= 2) a neighbour's while its slices are thinner than
    its spacing (SliceThickness) is that neighbour's run with every other slice dropped.
    """
    steps = np.diff(ts)
    median = float(np.median(steps))
    runs = _runs(steps) if median > 0 else []
    spacing = [float(np.median(steps[a:b])) for a, b in runs]
    if len(runs) < 2 or max(spacing) <= (1 + _STEP_TOL) * min(spacing):
        gap_idx = [int(i) for i in np.nonzero(steps > 1.5 * median)[0]] if median > 0 else []
        missing = int(sum(round(steps[i] / median) - 1 for i in gap_idx))
        nonuniform = bool(median > 0 and np.max(np.abs(steps - median)) > _STEP_TOL * median)
        return _SpacingPlan(median, missing, gap_idx, [], nonuniform)
    ref = list(spacing)  # the spacing each block's acquisition really had
    for b, (a, e) in enumerate(runs):
        for nb in (b - 1, b + 1):
            if not 0 <= nb < len(runs):
                continue
            ratio = spacing[b] / spacing[nb]
            k = round(ratio)
            if k >= 2 and abs(ratio - k) <= _STEP_TOL * k:
                th = [t for t in thickness[a : e + 1] if t]
                if not th or spacing[b] > 1.5 * float(np.median(th)):
                    ref[b] = min(ref[b], spacing[nb])
    block_of = np.full(len(steps), -1)
    for b, (a, e) in enumerate(runs):
        block_of[a:e] = b
    gap_idx: list[int] = []
    missing = 0
    for i, st in enumerate(steps):
        b = int(block_of[i])
        if b >= 0:
            r = ref[b]
        else:
            left = [k for k, (_, e) in enumerate(runs) if e <= i]
            right = [k for k, (a, _) in enumerate(runs) if a > i]
            near = ([ref[left[-1]]] if left else []) + ([ref[right[0]]] if right else [])
            r = max(near) if near else median
        if st > 1.5 * r:
            gap_idx.append(i)
            missing += int(round(st / r)) - 1
    stepped = max(ref) > (1 + _STEP_TOL) * min(ref)  # else: one spacing with slices dropped
    blocks = (
        [(float(ts[a]), float(ts[e]), spacing[b]) for b, (a, e) in enumerate(runs)]
        if stepped
        else []
    )
    return _SpacingPlan(min(ref), missing, gap_idx, blocks, True)


def _grid_plan(t: np.ndarray, step: float) -> tuple[list[tuple[int, int, Any]], int]:
    """Each plane of the regular grid t0 + m*step as (lo, hi, w): the acquired slice lo when
    one lies within 0.1 step (w = 0), else (1 - w) * slice lo + w * slice hi (linear
    interpolation across a gap); and how many planes are interpolated."""
    n_out = int(round((t[-1] - t[0]) / step)) + 1
    grid = t[0] + step * np.arange(n_out)
    plan: list[tuple[int, int, float]] = []
    exact = 0
    for g in grid:
        i = int(np.searchsorted(t, g))
        if i < len(t) and abs(t[i] - g) <= 0.1 * step:
            plan.append((i, i, 0.0))
            exact += 1
            continue
        if i > 0 and abs(t[i - 1] - g) <= 0.1 * step:
            plan.append((i - 1, i - 1, 0.0))
            exact += 1
            continue
        lo, hi = max(i - 1, 0), min(i, len(t) - 1)
        w = np.float64(0.0) if hi == lo else np.float64((g - t[lo]) / (t[hi] - t[lo]))
        plan.append((lo, hi, w))
    return plan, n_out - exact


def read_series(
    source: Path | str | Sequence[Path],
    *,
    min_slices: int = 3,
    max_missing_fraction: float = 0.10,
    tilt: str = "resample",
    max_tilt_deg: float = 30.0,
    max_voxels: int | None = None,
    defer_pixels: bool = False,
) -> SeriesVolume:
    """Assemble one CT series (folder or list of files) into a `SeriesVolume`.

    Headers are read first without pixels to sort and validate (every refusal that headers can
    decide happens before a pixel is decoded); pixels are decoded only for the slices kept, into
    one preallocated array. See the module docstring for every policy; ``min_slices``,
    ``max_missing_fraction``, ``tilt`` ("resample" | "refuse"), ``max_tilt_deg`` and
    ``max_voxels`` (the regular grid; None = ``DEFAULT_MAX_VOXELS``) tune them.

    ``defer_pixels=True`` returns a `DeferredSeriesVolume` after the header pass: geometry,
    UIDs and header warnings are there at once, pixels are decoded when first needed (``hu``),
    or reduced slice by slice as they are decoded (`DeferredSeriesVolume.reduce_slices`, what
    the 3-D preprocessing uses so that a thin-slice series never exists at full resolution).
    Pixel problems (undecodable data, a constant volume) then raise SeriesError at that point.
    """
    if tilt not in ("resample", "refuse"):
        raise ValueError("tilt must be 'resample' or 'refuse'")
    warnings: list[str] = []
    files = _list_files(source if isinstance(source, (str, Path)) else list(source))
    frames, info = _collect(files, warnings)
    if len(frames) < min_slices:
        raise SeriesError(
            f"series {info['series_uid']} has {len(frames)} CT slice(s); at least "
            f"{min_slices} are needed for a volume"
        )
    _check_consistent(frames)
    orient = frames[0].orientation
    row_dir = orient[:3] / np.linalg.norm(orient[:3])
    col_dir = orient[3:] / np.linalg.norm(orient[3:])
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    for f in frames:
        f.t = float(f.position @ normal)
    frames.sort(key=lambda f: (f.t, f.instance_number, f.sop_uid, f.frame or 0))

    # duplicates: positions closer than 1 % of the typical spacing
    ts = np.array([f.t for f in frames])
    diffs = np.diff(ts)
    positive = diffs[diffs > 1e-3]
    typical = float(np.median(positive)) if positive.size else 0.0
    tol = max(1e-3, 0.01 * typical)
    groups: list[list[_Frame]] = [[frames[0]]]
    for f in frames[1:]:
        if abs(f.t - groups[-1][0].t) <= tol:
            groups[-1].append(f)
        else:
            groups.append([f])
    dup_groups = [g for g in groups if len(g) > 1]
    kept = [min(g, key=lambda f: (f.instance_number, f.sop_uid, f.frame or 0)) for g in groups]
    if len(kept) < min_slices:
        raise SeriesError(
            f"series {info['series_uid']} has {len(kept)} distinct slice position(s) "
            f"(ImagePositionPatient); at least {min_slices} are needed"
        )

    # geometry first (cheap, headers only): refuse before decoding or allocating anything big
    ts = np.array([f.t for f in kept])
    plan = _spacing_plan(ts, [f.thickness for f in kept])
    step = plan.step
    if step <= 0:
        raise SeriesError("slice positions along the normal do not increase (ImagePositionPatient)")
    if step > MAX_SLICE_SPACING_MM:
        raise SeriesError(
            f"series {info['series_uid']}: slice spacing {step:.4g} mm (from "
            f"ImagePositionPatient (0020,0032)) is more than "
            f"{MAX_SLICE_SPACING_MM:g} mm, not a CT volume; refused rather than "
            "resampled (check the header)"
        )
    corrections: list[dict[str, str]] = []
    if plan.missing:
        frac = plan.missing / (len(kept) + plan.missing)
        where = ", ".join(f"{ts[i]:.1f}..{ts[i + 1]:.1f} mm" for i in plan.gap_idx[:5])
        msg = (
            f"{plan.missing} missing slice(s) ({frac:.0%} of the extent) in "
            f"{len(plan.gap_idx)} gap(s) at {where}"
        )
        if frac > max_missing_fraction:
            raise SeriesError(
                f"series {info['series_uid']}: {msg}; more than "
                f"{max_missing_fraction:.0%} missing — resend the complete series"
            )
        warnings.append(msg + "; filled by linear interpolation")
        corrections.append(
            {
                "kind": "missing_slices_interpolated",
                "description": msg + "; filled by linear interpolation",
            }
        )
    if plan.blocks:
        runs = ", ".join(f"{sp:.3g} mm from {a:.1f} to {b:.1f} mm" for a, b, sp in plan.blocks)
        msg = (
            f"stepped slice spacing ({runs}); resampled onto a regular {step:.3g} mm grid by "
            "linear interpolation between acquired slices"
        )
        warnings.append(msg)
        corrections.append({"kind": "slice_spacing_regularised", "description": msg})
    elif not plan.missing and plan.nonuniform:
        steps = np.diff(ts)
        msg = (
            f"non-uniform slice spacing ({steps.min():.3g}..{steps.max():.3g} mm); "
            f"resampled to {step:.3g} mm"
        )
        warnings.append(msg)
        corrections.append({"kind": "slice_spacing_regularised", "description": msg})
    n_out = int(round((ts[-1] - ts[0]) / step)) + 1
    grid_voxels = n_out * kept[0].rows * kept[0].cols
    limit = DEFAULT_MAX_VOXELS if max_voxels is None else int(max_voxels)
    if grid_voxels > limit:
        raise SeriesError(
            f"series {info['series_uid']}: the regular grid would have "
            f"{n_out} x {kept[0].rows} x {kept[0].cols} = {grid_voxels:,} voxels, "
            f"more than the limit of {limit:,} (model.max_resampled_voxels); "
            "refused rather than resampled"
        )

    # gantry tilt / in-plane offsets between slices (headers only: refused before decoding)
    p0 = kept[0].position
    spacing_y, spacing_x = kept[0].pixel_spacing
    rel = np.array([f.position - p0 for f in kept])
    inplane = rel - np.outer(rel @ normal, normal)
    offsets_px = np.stack([inplane @ col_dir / spacing_y, inplane @ row_dir / spacing_x], axis=1)
    extent = float(ts[-1] - ts[0])
    shift_mm = float(np.linalg.norm(inplane[-1]))
    angle = math.degrees(math.atan2(shift_mm, extent)) if extent > 0 else 0.0
    tilt_reason = None
    if np.max(np.abs(offsets_px)) > 0.05:
        tag_tilt = info["meta"]["gantry_detector_tilt"]
        tilt_reason = (
            f"slice positions are not along the slice normal (gantry tilt about "
            f"{angle:.1f} degrees; GantryDetectorTilt {','.join(tag_tilt)}; in-plane "
            f"offsets up to {np.max(np.abs(offsets_px)):.1f} pixels)"
        )
        if tilt == "refuse" or angle > max_tilt_deg:
            raise SeriesError(
                f"series {info['series_uid']}: {tilt_reason}; "
                + (
                    "tilted series are refused by configuration"
                    if tilt == "refuse"
                    else f"more than {max_tilt_deg:g} degrees cannot be corrected"
                )
            )
    elif any(v not in ("0", "0.0", "") for v in info["meta"]["gantry_detector_tilt"]):
        warnings.append(
            "GantryDetectorTilt is not 0 but slice positions are orthogonal; geometry used as given"
        )

    grid, n_interp = _grid_plan(ts, step)
    pixels = _PixelPass(
        series_uid=info["series_uid"],
        kept=kept,
        dup_groups=dup_groups,
        datasets=info["datasets"],
        grid=grid,
        offsets_px=offsets_px if tilt_reason else None,
        tilt_reason=tilt_reason,
        warnings=warnings,
        corrections=corrections,
    )
    direction = np.stack([row_dir, col_dir, normal])
    thick = Counter(round(f.thickness, 4) for f in kept if f.thickness is not None)
    geometry: dict[str, Any] = dict(
        spacing=(step, float(spacing_y), float(spacing_x)),
        origin=p0.copy(),
        direction=direction,
        sop_instance_uids=list(dict.fromkeys(f.sop_uid for f in kept)),
        series_uid=info["series_uid"],
        study_uid=info["study_uid"],
        warnings=warnings,
        meta=info["meta"]
        | {
            "interpolated_slices": n_interp,
            "slice_thickness": (min(thick, key=lambda t: (-thick[t], t)) if thick else None),
            "slice_thickness_values": sorted(thick),
            "corrections": corrections,
        },
    )
    shape = (len(grid), kept[0].rows, kept[0].cols)
    if defer_pixels:
        return DeferredSeriesVolume(pixels, shape, **geometry)
    volume = SeriesVolume(hu=pixels.full(), **geometry)
    log.debug(
        "series assembled",
        series_uid=volume.series_uid,
        slices=len(kept),
        shape=list(shape),
        warnings=len(warnings),
    )
    return volume


# ------------------------------------------------------------------------------------------
# NIfTI and dispatch
# ------------------------------------------------------------------------------------------
def read_nifti(path: Path | str) -> SeriesVolume:
    """Load a NIfTI CT volume (values assumed HU, e.g. from dcm2niix) as a `SeriesVolume`."""
    try:
        import nibabel as nib
    except ImportError as exc:  # pragma: no cover - nibabel is a test extra
        raise SeriesError(f"{path}: reading NIfTI needs nibabel (pip install nibabel)") from exc
    p = Path(path)
    try:
        img = nib.load(str(p))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:
        raise SeriesError(f"{p}: cannot read NIfTI: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SeriesError(f"{p}: NIfTI must be a 3-D volume, got shape {data.shape}")
    lps = _LPS_TO_RAS @ np.asarray(img.affine, np.float64)  # the flip is its own inverse
    cols = lps[:3, :3]
    zooms = np.linalg.norm(cols, axis=0)
    if np.any(zooms <= 0):
        raise SeriesError(f"{p}: NIfTI affine has a zero-length axis")
    direction = (cols / zooms).T  # rows: unit vectors of NIfTI i (x), j (y), k (z)
    uid = pydicom.uid.generate_uid(entropy_srcs=[str(p.resolve())])
    return SeriesVolume(
        hu=np.ascontiguousarray(data.transpose(2, 1, 0), dtype=np.float32),
        spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
        origin=lps[:3, 3].copy(),
        direction=direction,
        sop_instance_uids=[],
        series_uid=str(uid),
        study_uid="",
        warnings=[],
        meta={"source": "nifti"},
    )


def read_volume(path: Path | str, **kwargs: Any) -> SeriesVolume:
    """A DICOM series folder / file, or a .nii / .nii.gz file, as a `SeriesVolume`."""
    p = Path(path)
    name = p.name.lower()
    if p.is_file() and (name.endswith(".nii") or name.endswith(".nii.gz")):
        return read_nifti(p)
    return read_series(p, **kwargs)


__all__ = ["DeferredSeriesVolume", "SeriesVolume", "read_nifti", "read_series", "read_volume"]
