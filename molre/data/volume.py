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
- Gaps (> 1.5 x median spacing) are filled by linear interpolation between the neighbours and
  reported; more than ``max_missing_fraction`` missing -> SeriesError. Non-uniform spacing is
  resampled linearly onto the median spacing.
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

from molre.errors import SeriesError
from molre.log import get_logger

log = get_logger("molre.data.volume")

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.2"
_MULTIFRAME_CT = (ENHANCED_CT_IMAGE, LEGACY_ENHANCED_CT_IMAGE)
_CT_CLASSES = (CT_IMAGE, *_MULTIFRAME_CT)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
        return MetaTensor(torch.from_numpy(np.ascontiguousarray(self.hu, np.float32))[None],
                          affine=torch.as_tensor(self.affine("RAS"), dtype=torch.float64),
                          meta=meta)


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
    t: float = 0.0


def _floats(value: Any, n: int, tag: str, where: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise SeriesError(f"{where}: {tag} is missing or not numeric ({value!r})") from None
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise SeriesError(f"{where}: {tag} must have {n} numeric values, got {value!r}")
    return arr


def _fg_attr(ds: Dataset, frame_item: Dataset | None, seq: str, attr: str) -> Any:
    """Look an attribute up in the per-frame functional group, then the shared one."""
    for holder in (frame_item, _first(ds, "SharedFunctionalGroupsSequence")):
        if holder is None:
            continue
        item = _first(holder, seq)
        if item is not None and attr in item:
            return item[attr].value
    return ds.get(attr)


def _first(ds: Dataset | None, seq: str) -> Dataset | None:
    if ds is None or seq not in ds:
        return None
    value = ds[seq].value
    return value[0] if value else None


def _rescale(ds: Dataset, where: str, warnings: list[str], slope: Any, intercept: Any
             ) -> tuple[float, float]:
    if slope is None or intercept is None:
        warnings.append(f"{where}: RescaleSlope/RescaleIntercept missing; assumed 1 and 0 "
                        "(values may not be HU)")
        return (1.0 if slope is None else float(slope),
                0.0 if intercept is None else float(intercept))
    try:
        return float(slope), float(intercept)
    except (TypeError, ValueError):
        raise SeriesError(f"{where}: RescaleSlope/RescaleIntercept not numeric "
                          f"({slope!r}, {intercept!r})") from None


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
    if str(ds.SOPClassUID) in _MULTIFRAME_CT:
        n = int(ds.get("NumberOfFrames") or 1)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if per_frame is None or len(per_frame) != n:
            raise SeriesError(f"{where}: PerFrameFunctionalGroupsSequence must have one item per "
                              f"frame (NumberOfFrames={n})")
        out = []
        for i in range(n):
            item = per_frame[i]
            fw = f"{where} frame {i + 1}"
            pos = _fg_attr(ds, item, "PlanePositionSequence", "ImagePositionPatient")
            ori = _fg_attr(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient")
            spc = _fg_attr(ds, item, "PixelMeasuresSequence", "PixelSpacing")
            slope = _fg_attr(ds, item, "PixelValueTransformationSequence", "RescaleSlope")
            icpt = _fg_attr(ds, item, "PixelValueTransformationSequence", "RescaleIntercept")
            out.append(_Frame(
                path, i, sop_uid, inst,
                _floats(pos, 3, "PlanePositionSequence/ImagePositionPatient", fw),
                _floats(ori, 6, "PlaneOrientationSequence/ImageOrientationPatient", fw),
                tuple(_floats(spc, 2, "PixelMeasuresSequence/PixelSpacing", fw)),  # type: ignore
                rows, cols, *_rescale(ds, fw, warnings, slope, icpt)))
        return out
    return [_Frame(
        path, None, sop_uid, inst,
        _floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient (0020,0032)", where),
        _floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient (0020,0037)", where),
        tuple(_floats(ds.get("PixelSpacing"), 2, "PixelSpacing (0028,0030)", where)),  # type: ignore
        rows, cols,
        *_rescale(ds, where, warnings, ds.get("RescaleSlope"), ds.get("RescaleIntercept")))]


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
        if sop_class not in _CT_CLASSES:
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
        warnings.append(f"{legacy} file(s) without DICOM preamble/file meta (legacy format); "
                        "read with the encoding pydicom detected")
    if not headers:
        raise SeriesError(f"no CT image objects among {len(files)} file(s)"
                          + (f" ({'; '.join(warnings)})" if warnings else ""))
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in headers)
    if len(series) > 1:
        detail = ", ".join(f"{uid or '<missing>'} ({n} files)" for uid, n in series.most_common())
        raise SeriesError(f"files belong to {len(series)} series (SeriesInstanceUID {detail}); "
                          "give one series at a time")
    classes = Counter(str(ds.SOPClassUID) for _, ds in headers)
    if CT_IMAGE in classes and len(classes) > 1:
        raise SeriesError("series mixes single-frame CT Image Storage and Enhanced CT objects "
                          f"(SOPClassUID {dict(classes)}); export one form only")
    sops = Counter(str(ds.get("SOPInstanceUID", "")) for _, ds in headers)
    dup_sops = [u for u, n in sops.items() if n > 1]
    if dup_sops:
        warnings.append(f"{len(dup_sops)} SOPInstanceUID(s) present in more than one file; "
                        "keeping the first copy")
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
    return frames, {"meta": meta, "study_uid": str(first.get("StudyInstanceUID", "")),
                    "series_uid": str(first.get("SeriesInstanceUID", "")),
                    "datasets": dict(headers)}


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
            pydicom.uid.ImplicitVRLittleEndian if implicit
            else pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
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
        raise SeriesError(f"inconsistent {tag} inside the series ({shown}); the slices do not "
                          "form one volume — check that the folder holds a single reconstruction")

    sizes = Counter((f.rows, f.cols) for f in frames)
    if len(sizes) > 1:
        fail("Rows/Columns (0028,0010)/(0028,0011)",
             Counter({f"{r}x{c}": n for (r, c), n in sizes.items()}))
    ref = frames[0].orientation
    if any(np.max(np.abs(f.orientation - ref)) > 1e-3 for f in frames):
        fail("ImageOrientationPatient (0020,0037)",
             Counter(",".join(f"{v:.3g}" for v in f.orientation) for f in frames))
    sp = np.array([f.pixel_spacing for f in frames])
    if np.any(sp <= 0):
        bad = next(f for f in frames if min(f.pixel_spacing) <= 0)
        values = [float(v) for v in bad.pixel_spacing]
        raise SeriesError(f"{bad.path}: PixelSpacing (0028,0030) {values} must be positive; the "
                          "series geometry is unusable")
    if np.max(np.abs(sp - sp[0])) > 1e-3 * max(1.0, float(sp[0].max())):
        fail("PixelSpacing (0028,0030)", Counter(f"{a:g}\\{b:g}" for a, b in sp))
    r, c = ref[:3], ref[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-2 or abs(np.linalg.norm(c) - 1) > 1e-2 or abs(r @ c) > 1e-2:
        raise SeriesError(f"ImageOrientationPatient (0020,0037) {list(ref)} is not two orthogonal "
                          "unit vectors")


# ------------------------------------------------------------------------------------------
# pixels
# ------------------------------------------------------------------------------------------
def _load_pixels(frames: list[_Frame], datasets: dict[Path, Dataset]
                 ) -> dict[tuple[Path, int | None], np.ndarray]:
    """Decode each needed file once, from the dataset the header pass read (popped so its
    pixel bytes are released after decoding); returns HU slices keyed by (path, frame)."""
    by_path: dict[Path, list[_Frame]] = {}
    for f in frames:
        by_path.setdefault(f.path, []).append(f)
    out: dict[tuple[Path, int | None], np.ndarray] = {}
    for path, fs in by_path.items():
        ds = _with_transfer_syntax(datasets.pop(path))
        try:
            arr = ds.pixel_array
        except Exception as exc:  # decoder errors come in many types
            ts = "unknown"
            try:
                ts = ds.file_meta.TransferSyntaxUID.name
            except Exception:
                pass
            raise SeriesError(f"{path}: cannot decode pixel data (transfer syntax {ts}): {exc}. "
                              "Install the pylibjpeg plugins / pyjpegls, or send the series "
                              "uncompressed") from exc
        for f in fs:
            if f.frame is None:
                raw = arr if arr.ndim == 2 else arr[0]
            else:
                raw = arr[f.frame] if arr.ndim == 3 else arr
            if raw.shape != (f.rows, f.cols):
                raise SeriesError(f"{path}: decoded pixel shape {raw.shape} does not match "
                                  f"Rows/Columns {f.rows}x{f.cols}")
            hu = raw.astype(np.float32)
            if f.slope != 1.0:
                hu *= np.float32(f.slope)
            if f.intercept != 0.0:
                hu += np.float32(f.intercept)
            out[(f.path, f.frame)] = hu
    return out


def _deskew(slices: list[np.ndarray], offsets_px: np.ndarray, fill: float) -> list[np.ndarray]:
    from scipy import ndimage

    out = []
    for img, (dy, dx) in zip(slices, offsets_px, strict=True):
        if abs(dy) < 1e-3 and abs(dx) < 1e-3:
            out.append(img)
        else:
            out.append(ndimage.shift(img, (dy, dx), order=1, mode="constant", cval=fill)
                       .astype(np.float32))
    return out


def _regular_grid(t: np.ndarray, slices: list[np.ndarray], step: float
                  ) -> tuple[np.ndarray, int]:
    """Place slices at positions ``t`` onto a grid t0 + m*step; interpolate the gaps linearly."""
    n_out = int(round((t[-1] - t[0]) / step)) + 1
    grid = t[0] + step * np.arange(n_out)
    vol = np.empty((n_out, *slices[0].shape), np.float32)
    exact = 0
    for m, g in enumerate(grid):
        i = int(np.searchsorted(t, g))
        if i < len(t) and abs(t[i] - g) <= 0.1 * step:
            vol[m] = slices[i]
            exact += 1
            continue
        if i > 0 and abs(t[i - 1] - g) <= 0.1 * step:
            vol[m] = slices[i - 1]
            exact += 1
            continue
        lo, hi = max(i - 1, 0), min(i, len(t) - 1)
        w = 0.0 if hi == lo else (g - t[lo]) / (t[hi] - t[lo])
        vol[m] = (1 - w) * slices[lo] + w * slices[hi]
    return vol, n_out - exact


def read_series(
    source: Path | str | Sequence[Path],
    *,
    min_slices: int = 3,
    max_missing_fraction: float = 0.10,
    tilt: str = "resample",
    max_tilt_deg: float = 30.0,
) -> SeriesVolume:
    """Assemble one CT series (folder or list of files) into a `SeriesVolume`.

    Headers are read first without pixels to sort and validate; pixels are decoded only for the
    slices kept. See the module docstring for every policy; ``min_slices``,
    ``max_missing_fraction``, ``tilt`` ("resample" | "refuse") and ``max_tilt_deg`` tune them.
    """
    if tilt not in ("resample", "refuse"):
        raise ValueError("tilt must be 'resample' or 'refuse'")
    warnings: list[str] = []
    files = _list_files(source if isinstance(source, (str, Path)) else list(source))
    frames, info = _collect(files, warnings)
    if len(frames) < min_slices:
        raise SeriesError(f"series {info['series_uid']} has {len(frames)} CT slice(s); at least "
                          f"{min_slices} are needed for a volume")
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
        raise SeriesError(f"series {info['series_uid']} has {len(kept)} distinct slice position(s) "
                          f"(ImagePositionPatient); at least {min_slices} are needed")

    pixels = _load_pixels(kept + [f for g in dup_groups for f in g if f not in kept],
                          info["datasets"])
    if dup_groups:
        same = sum(all(np.array_equal(pixels[(f.path, f.frame)], pixels[(g[0].path, g[0].frame)])
                       for f in g) for g in dup_groups)
        dropped = sum(len(g) - 1 for g in dup_groups)
        warnings.append(f"duplicate slice positions: {len(dup_groups)} position(s), {dropped} "
                        f"slice(s) dropped ({same} with identical pixels, "
                        f"{len(dup_groups) - same} with different pixels); kept the lowest "
                        "InstanceNumber")

    ts = np.array([f.t for f in kept])
    steps = np.diff(ts)
    step = float(np.median(steps))
    if step <= 0:
        raise SeriesError("slice positions along the normal do not increase (ImagePositionPatient)")

    # gaps and missing-slice policy
    gap_idx = np.nonzero(steps > 1.5 * step)[0]
    missing = int(sum(round(steps[i] / step) - 1 for i in gap_idx))
    if missing:
        frac = missing / (len(kept) + missing)
        where = ", ".join(f"{ts[i]:.1f}..{ts[i + 1]:.1f} mm" for i in gap_idx[:5])
        msg = (f"{missing} missing slice(s) ({frac:.0%} of the extent) in {len(gap_idx)} gap(s) "
               f"at {where}")
        if frac > max_missing_fraction:
            raise SeriesError(f"series {info['series_uid']}: {msg}; more than "
                              f"{max_missing_fraction:.0%} missing — resend the complete series")
        warnings.append(msg + "; filled by linear interpolation")
    elif np.max(np.abs(steps - step)) > 0.1 * step:
        warnings.append(f"non-uniform slice spacing ({steps.min():.3g}..{steps.max():.3g} mm); "
                        f"resampled to {step:.3g} mm")

    # gantry tilt / in-plane offsets between slices
    p0 = kept[0].position
    spacing_y, spacing_x = kept[0].pixel_spacing
    rel = np.array([f.position - p0 for f in kept])
    inplane = rel - np.outer(rel @ normal, normal)
    offsets_px = np.stack([inplane @ col_dir / spacing_y, inplane @ row_dir / spacing_x], axis=1)
    slices = [pixels[(f.path, f.frame)] for f in kept]
    extent = float(ts[-1] - ts[0])
    shift_mm = float(np.linalg.norm(inplane[-1]))
    angle = math.degrees(math.atan2(shift_mm, extent)) if extent > 0 else 0.0
    if np.max(np.abs(offsets_px)) > 0.05:
        tag_tilt = info["meta"]["gantry_detector_tilt"]
        reason = (f"slice positions are not along the slice normal (gantry tilt about {angle:.1f} "
                  f"degrees; GantryDetectorTilt {','.join(tag_tilt)}; in-plane offsets up to "
                  f"{np.max(np.abs(offsets_px)):.1f} pixels)")
        if tilt == "refuse" or angle > max_tilt_deg:
            raise SeriesError(f"series {info['series_uid']}: {reason}; "
                              + ("tilted series are refused by configuration" if tilt == "refuse"
                                 else f"more than {max_tilt_deg:g} degrees cannot be corrected"))
        fill = float(min(float(s.min()) for s in slices))
        slices = _deskew(slices, offsets_px, fill)
        warnings.append(reason + "; resampled onto an orthogonal grid")
    elif any(v not in ("0", "0.0", "") for v in info["meta"]["gantry_detector_tilt"]):
        warnings.append("GantryDetectorTilt is not 0 but slice positions are orthogonal; "
                        "geometry used as given")

    hu, n_interp = _regular_grid(ts, slices, step)
    direction = np.stack([row_dir, col_dir, normal])
    volume = SeriesVolume(
        hu=hu,
        spacing=(step, float(spacing_y), float(spacing_x)),
        origin=p0.copy(),
        direction=direction,
        sop_instance_uids=list(dict.fromkeys(f.sop_uid for f in kept)),
        series_uid=info["series_uid"],
        study_uid=info["study_uid"],
        warnings=warnings,
        meta=info["meta"] | {"interpolated_slices": n_interp},
    )
    log.debug("series assembled", series_uid=volume.series_uid, slices=len(kept),
             shape=list(hu.shape), warnings=len(warnings))
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


__all__ = ["SeriesVolume", "read_nifti", "read_series", "read_volume"]
