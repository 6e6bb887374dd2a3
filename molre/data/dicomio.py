"""The one place in molre-node that *writes* CT DICOM.

Synthetic phantoms, test fixtures and the node's own helpers all need realistic CT objects. Writing
them in one module keeps the attribute set (and its mistakes) in one place: if a validator such as
`dciodvfy` or a PACS complains about a missing Type 2 attribute, it is fixed here once.

Geometry convention (same as `molre.data.volume.SeriesVolume`): volumes are indexed (z, y, x);
`direction` is a 3x3 matrix whose *rows* are the unit vectors of the x, y and z array axes in
patient LPS coordinates; `origin` is the LPS position of voxel (0, 0, 0); `spacing` is (z, y, x)
in mm. Slice k of a series lies at ``origin + k * spacing_z * direction[2]``.
ImageOrientationPatient is ``direction[0] + direction[1]`` (x = along a row = increasing column
index first, then y = increasing row index) and PixelSpacing is ``(spacing_y, spacing_x)``
(row spacing first, as DICOM orders it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import random
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from common.errors import MolreError

CT_IMAGE_STORAGE = CTImageStorage
ENHANCED_CT_IMAGE_STORAGE = EnhancedCTImageStorage
JPEG_LOSSLESS_P14 = UID("1.2.840.10008.1.2.4.57")

#: Transfer syntaxes `compress_file` can produce (pydicom encoders; dcmtk for JPEG Lossless).
LOSSLESS_SYNTAXES: tuple[UID, ...] = (
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: Defaults for identifying / descriptive attributes; anything can be overridden via ``**tags``.
DEFAULT_TAGS: dict[str, Any] = {
    "PatientName": "Phantom^Synthetic",
    "PatientID": "MOLRE-PHANTOM",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "PatientAge": "056Y",
    "StudyID": "1",
    "StudyDescription": "CT HEAD WO CONTRAST",
    "SeriesDescription": "Head 5mm axial",
    "SeriesNumber": 2,
    "AcquisitionNumber": 1,
    "ReferringPhysicianName": "",
    "InstitutionName": "molre synthetic",
    "StationName": "MOLRESIM",
    "Manufacturer": "molre-node synthetic",
    "ManufacturerModelName": "phantom",
    "DeviceSerialNumber": "0001",
    "SoftwareVersions": "molre-node",
    "BodyPartExamined": "HEAD",
    "ProtocolName": "HEAD ROUTINE",
    "PatientPosition": "HFS",
    "KVP": "120",
    "XRayTubeCurrent": 250,
    "ExposureTime": 1000,
    "ConvolutionKernel": "H30s",
    "GantryDetectorTilt": "0",
    "RotationDirection": "CW",
    "ScanOptions": "HELICAL",
    "WindowCenter": "40",
    "WindowWidth": "80",
    "PositionReferenceIndicator": "",
}


def new_uid() -> UID:
    """A fresh DICOM UID (pydicom's UUID-derived root) — never reuse UIDs across objects."""
    return generate_uid()


def frame_of_reference_for(study_uid: str) -> UID:
    """A Frame of Reference UID derived from the study, so all series of a study share one."""
    return generate_uid(entropy_srcs=[str(study_uid), "frame-of-reference"])


def _now() -> tuple[str, str]:
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def _fmt_ds(value: float) -> str:
    """Format a decimal string with as much precision as the 16-character DS limit allows.

    Positions of 1000+ mm with sub-mm slice steps need every digit: rounding to 6 significant
    digits would turn 0.625 mm steps into 0.61/0.62 mm ones.
    """
    v = float(value)
    if abs(v) < 1e-10:
        return "0"
    s = format_number_as_ds(v)
    if s.endswith(".0") and "e" not in s:
        s = s[:-2]
    return s


def _ds_list(values: Sequence[float]) -> list[str]:
    return [_fmt_ds(v) for v in values]


def _stored_values(pixels_hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """HU -> stored integers; picks unsigned when every value is >= 0 (the usual CT case)."""
    if slope == 0:
        raise ValueError("rescale slope must not be 0")
    stored = np.rint((np.asarray(pixels_hu, dtype=np.float64) - intercept) / slope)
    lo, hi = float(stored.min()), float(stored.max())
    if lo >= 0 and hi <= 65535:
        return stored.astype(np.uint16)
    if lo >= -32768 and hi <= 32767:
        return stored.astype(np.int16)
    raise ValueError(
        f"HU range {float(np.min(pixels_hu))}..{float(np.max(pixels_hu))} does not fit 16 bits "
        f"with RescaleSlope={slope}, RescaleIntercept={intercept}; choose another rescale"
    )


def _file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MOLRE_NODE"
    return meta


def _apply_tags(ds: Dataset, tags: Mapping[str, Any]) -> None:
    for keyword, value in tags.items():
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"{keyword!r} is not a DICOM keyword")
        if value is None:
            if keyword in ds:
                del ds[keyword]
            continue
        setattr(ds, keyword, value)


def _default_accession(study_uid: str) -> str:
    return "A" + hashlib.sha256(study_uid.encode()).hexdigest()[:10].upper()


def _set_pixel_module(ds: Dataset, stored: np.ndarray, frames: int | None = None) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    if frames is not None:
        ds.NumberOfFrames = frames
    # Little-endian bytes regardless of host; pydicom writes OW for 16-bit native data.
    ds.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()


def ct_slice_dataset(
    pixels_hu: np.ndarray,
    *,
    position: Sequence[float],
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_thickness: float,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    instance_number: int,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **tags: Any,
) -> Dataset:
    """One CT Image Storage object (single axial slice) with file meta, ready for `save_as`.

    ``pixels_hu`` is (rows, cols) in Hounsfield units; it is stored as 16-bit integers through the
    given rescale, so values are rounded to the rescale's step. ``**tags`` override any attribute by
    DICOM keyword (None deletes it), e.g. ``PatientID="X"``, ``GantryDetectorTilt="12"``.
    """
    pixels_hu = np.asarray(pixels_hu)
    if pixels_hu.ndim != 2:
        raise ValueError(f"pixels_hu must be 2-D (rows, cols), got shape {pixels_hu.shape}")
    if len(position) != 3 or len(orientation) != 6 or len(pixel_spacing) != 2:
        raise ValueError("position needs 3 values, orientation 6, pixel_spacing 2")
    sop_uid = sop_uid or new_uid()
    date, time = _now()

    ds = Dataset()
    ds.file_meta = _file_meta(CT_IMAGE_STORAGE, sop_uid, transfer_syntax)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.AccessionNumber = _default_accession(str(study_uid))
    ds.Modality = "CT"
    for keyword, value in DEFAULT_TAGS.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = UID(study_uid)
    ds.SeriesInstanceUID = UID(series_uid)
    ds.FrameOfReferenceUID = frame_of_reference_for(study_uid)
    ds.InstanceNumber = int(instance_number)
    ds.SliceThickness = _fmt_ds(slice_thickness)
    ds.ImagePositionPatient = _ds_list(position)
    ds.ImageOrientationPatient = _ds_list(orientation)
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    ds.SliceLocation = _fmt_ds(float(np.dot(normal, np.asarray(position, float))))
    ds.PixelSpacing = _ds_list(pixel_spacing)
    ds.RescaleIntercept = _fmt_ds(rescale_intercept)
    ds.RescaleSlope = _fmt_ds(rescale_slope)
    ds.RescaleType = "HU"
    ds.ReconstructionDiameter = _fmt_ds(float(pixel_spacing[1]) * pixels_hu.shape[1])
    ds.DataCollectionDiameter = "500"
    _set_pixel_module(ds, _stored_values(pixels_hu, rescale_slope, rescale_intercept))
    _apply_tags(ds, tags)
    return ds


def _geometry(
    shape: Sequence[int],
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: np.ndarray | Sequence[Sequence[float]] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(shape) != 3:
        raise ValueError(f"hu_volume must be 3-D (z, y, x), got shape {tuple(shape)}")
    if len(spacing) != 3 or len(origin) != 3:
        raise ValueError("spacing and origin need 3 values each")
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    if d.shape != (3, 3):
        raise ValueError(f"direction must be 3x3, got {d.shape}")
    return np.asarray(spacing, np.float64), np.asarray(origin, np.float64), d


def _per_slice_rescale(
    rescale: tuple[float, float] | Sequence[tuple[float, float]],
    n: int,
) -> list[tuple[float, float]]:
    if len(rescale) == 2 and all(np.isscalar(v) for v in rescale):
        return [(float(rescale[0]), float(rescale[1]))] * n  # type: ignore[index]
    pairs = [(float(s), float(i)) for s, i in rescale]  # type: ignore[misc]
    if len(pairs) != n:
        raise ValueError(f"rescale list has {len(pairs)} entries for {n} slices")
    return pairs


def write_ct_series(
    out_dir: Path | str,
    hu_volume: np.ndarray,
    *,
    spacing: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | Sequence[Sequence[float]] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    rescale: tuple[float, float] | Sequence[tuple[float, float]] = (1.0, -1024.0),
    transfer_syntax: str = ExplicitVRLittleEndian,
    shuffle_names: bool = False,
    instance_numbers: Sequence[int] | None = None,
    rng: random.Random | None = None,
    **tags: Any,
) -> list[Path]:
    """Write ``hu_volume`` (z, y, x) as one CT Image Storage file per slice; paths in z order.

    ``shuffle_names`` names files so that directory order differs from slice order (a reader must
    sort by geometry). ``instance_numbers`` overrides InstanceNumber per slice (e.g. to test that a
    reader does not trust it). ``transfer_syntax`` may be an uncompressed syntax or any syntax
    `compress_file` supports (compression is done in memory with the same encoders).
    """
    vol = np.asarray(hu_volume)
    sp, org, d = _geometry(vol.shape, spacing, origin, direction)
    n = vol.shape[0]
    pairs = _per_slice_rescale(rescale, n)
    study_uid = study_uid or new_uid()
    series_uid = series_uid or new_uid()
    if instance_numbers is not None and len(instance_numbers) != n:
        raise ValueError(f"instance_numbers has {len(instance_numbers)} entries for {n} slices")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    date, time = _now()
    common = {"StudyDate": date, "StudyTime": time, "SeriesDate": date, "SeriesTime": time}
    common.update(tags)
    names = list(range(n))
    if shuffle_names:
        (rng or random.Random(0)).shuffle(names)
    orientation = list(d[0]) + list(d[1])
    ts = _check_syntax(transfer_syntax)
    paths: list[Path] = []
    for k in range(n):
        slope, intercept = pairs[k]
        ds = ct_slice_dataset(
            vol[k],
            position=org + k * sp[0] * d[2],
            orientation=orientation,
            pixel_spacing=(sp[1], sp[2]),
            slice_thickness=abs(sp[0]),
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=(instance_numbers[k] if instance_numbers is not None else k + 1),
            rescale_slope=slope,
            rescale_intercept=intercept,
            transfer_syntax=ts if ts in _UNCOMPRESSED else ExplicitVRLittleEndian,
            **common,
        )
        if ts not in _UNCOMPRESSED:
            _compress_in_memory(ds, ts)
        path = out / (f"IM{names[k]:05d}.dcm" if shuffle_names else f"CT{k + 1:05d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_enhanced_ct(
    path: Path | str,
    hu_volume: np.ndarray,
    *,
    spacing: Sequence[float],
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | Sequence[Sequence[float]] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    rescale: tuple[float, float] | Sequence[tuple[float, float]] = (1.0, -1024.0),
    frame_order: Sequence[int] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **tags: Any,
) -> Path:
    """Write ``hu_volume`` as one multi-frame Enhanced CT Image Storage object.

    Geometry and (if per-frame) rescale live in the Per-frame Functional Groups, the rest in the
    Shared Functional Groups, as modern scanners export it. ``frame_order`` stores the slices in a
    different order (frame i holds slice ``frame_order[i]``) so readers must sort by position.
    """
    vol = np.asarray(hu_volume)
    sp, org, d = _geometry(vol.shape, spacing, origin, direction)
    n = vol.shape[0]
    pairs = _per_slice_rescale(rescale, n)
    per_frame_rescale = len(set(pairs)) > 1
    order = list(frame_order) if frame_order is not None else list(range(n))
    if sorted(order) != list(range(n)):
        raise ValueError("frame_order must be a permutation of the slice indices")
    study_uid = study_uid or new_uid()
    series_uid = series_uid or new_uid()
    sop_uid = new_uid()
    date, time = _now()
    stored = [_stored_values(vol[k], *pairs[k]) for k in order]
    signed = any(s.dtype == np.int16 for s in stored)
    frames = np.stack([s.astype(np.int16 if signed else np.uint16) for s in stored])

    ds = Dataset()
    ds.file_meta = _file_meta(ENHANCED_CT_IMAGE_STORAGE, sop_uid, ExplicitVRLittleEndian)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = date
    ds.AcquisitionDateTime = date + time
    ds.StudyTime = ds.SeriesTime = time
    ds.ContentDate, ds.ContentTime = date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.AccessionNumber = _default_accession(str(study_uid))
    ds.Modality = "CT"
    for keyword, value in DEFAULT_TAGS.items():
        if keyword in (
            "WindowCenter",
            "WindowWidth",
            "KVP",
            "XRayTubeCurrent",
            "ExposureTime",
            "ConvolutionKernel",
            "GantryDetectorTilt",
            "RotationDirection",
            "ScanOptions",
        ):
            continue  # these live in functional groups in the enhanced IOD
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = UID(study_uid)
    ds.SeriesInstanceUID = UID(series_uid)
    ds.FrameOfReferenceUID = frame_of_reference_for(study_uid)
    ds.InstanceNumber = 1
    ds.ContentQualification = "PRODUCT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.AcquisitionDuration = 1.0 * n

    dim_uid = new_uid()
    ds.DimensionOrganizationSequence = DicomSequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationType = "3D"
    idx = Dataset()
    idx.DimensionOrganizationUID = dim_uid
    idx.DimensionIndexPointer = pydicom.tag.Tag("ImagePositionPatient")
    idx.FunctionalGroupPointer = pydicom.tag.Tag("PlanePositionSequence")
    idx.DimensionDescriptionLabel = "Image Position"
    ds.DimensionIndexSequence = DicomSequence([idx])

    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = _ds_list((sp[1], sp[2]))
    pm.SliceThickness = _fmt_ds(abs(sp[0]))
    shared.PixelMeasuresSequence = DicomSequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = _ds_list(list(d[0]) + list(d[1]))
    shared.PlaneOrientationSequence = DicomSequence([po])
    ft = Dataset()
    ft.FrameType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ft.PixelPresentation = "MONOCHROME"
    ft.VolumetricProperties = "VOLUME"
    ft.VolumeBasedCalculationTechnique = "NONE"
    shared.CTImageFrameTypeSequence = DicomSequence([ft])
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = "40", "80"
    shared.FrameVOILUTSequence = DicomSequence([voi])
    fov = _fmt_ds(sp[2] * vol.shape[2])
    shared.FrameAnatomySequence = DicomSequence(
        [
            _item(
                FrameLaterality="U",
                AnatomicRegionSequence=DicomSequence(
                    [_item(CodeValue="69536005", CodingSchemeDesignator="SCT", CodeMeaning="Head")]
                ),
            )
        ]
    )
    shared.CTAcquisitionTypeSequence = DicomSequence(
        [_item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO", FluoroscopyFlag="NO")]
    )
    shared.CTAcquisitionDetailsSequence = DicomSequence(
        [
            _item(
                DataCollectionDiameter="500",
                RevolutionTime="1",
                SingleCollimationWidth="0.6",
                TotalCollimationWidth="38.4",
                TableHeight="150",
                GantryDetectorTilt="0",
                RotationDirection="CW",
            )
        ]
    )
    shared.CTTableDynamicsSequence = DicomSequence(
        [_item(TableSpeed="30", TableFeedPerRotation="30", SpiralPitchFactor="0.8")]
    )
    shared.CTPositionSequence = DicomSequence(
        [
            _item(
                TablePosition="0",
                ReconstructionTargetCenterPatient=_ds_list(org),
                DataCollectionCenterPatient=_ds_list(org),
            )
        ]
    )
    shared.CTGeometrySequence = DicomSequence(
        [_item(DistanceSourceToDetector="1040", DistanceSourceToDataCollectionCenter="570")]
    )
    shared.CTReconstructionSequence = DicomSequence(
        [
            _item(
                ReconstructionAlgorithm="FILTER_BACK_PROJ",
                ConvolutionKernel="H30s",
                ConvolutionKernelGroup="BRAIN",
                ReconstructionFieldOfView=[fov, fov],
                ReconstructionPixelSpacing=_ds_list((sp[1], sp[2])),
                ReconstructionAngle="360",
                ImageFilter="NONE",
            )
        ]
    )
    shared.CTExposureSequence = DicomSequence(
        [
            _item(
                ExposureTimeInms=1000.0,
                XRayTubeCurrentInmA=250.0,
                ExposureInmAs=250.0,
                ExposureModulationType="NONE",
            )
        ]
    )
    shared.CTXRayDetailsSequence = DicomSequence(
        [_item(KVP="120", FocalSpots="0.7", FilterType="FLAT", FilterMaterial="ALUMINUM")]
    )
    shared.IrradiationEventIdentificationSequence = DicomSequence(
        [_item(IrradiationEventUID=new_uid())]
    )
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = DicomSequence([_pvt(*pairs[0])])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    per_frame = []
    for k in order:
        item = Dataset()
        fc = Dataset()
        fc.FrameAcquisitionNumber = 1
        fc.InStackPositionNumber = k + 1
        fc.StackID = "1"
        fc.DimensionIndexValues = [k + 1]
        fc.FrameReferenceDateTime = fc.FrameAcquisitionDateTime = date + time
        fc.FrameAcquisitionDuration = 1000.0
        item.FrameContentSequence = DicomSequence([fc])
        pp = Dataset()
        pp.ImagePositionPatient = _ds_list(org + k * sp[0] * d[2])
        item.PlanePositionSequence = DicomSequence([pp])
        if per_frame_rescale:
            item.PixelValueTransformationSequence = DicomSequence([_pvt(*pairs[k])])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _set_pixel_module(ds, frames, frames=n)
    _apply_tags(ds, tags)
    ts = _check_syntax(transfer_syntax)
    if ts not in _UNCOMPRESSED:
        _compress_in_memory(ds, ts)
    elif ts != ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ts
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def _check_syntax(transfer_syntax: str) -> UID:
    ts = UID(transfer_syntax)
    if ts == ExplicitVRBigEndian:
        raise ValueError(
            "Explicit VR Big Endian is retired in DICOM and not written by molre; "
            "use Explicit or Implicit VR Little Endian"
        )
    if not ts.is_transfer_syntax:
        raise ValueError(f"{ts} is not a transfer syntax UID")
    return ts


def _set_native(ds: Dataset, ts: UID) -> None:
    """Store the pixels uncompressed (little endian) in ``ts``."""
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    ds.file_meta.TransferSyntaxUID = ts


def _item(**attrs: Any) -> Dataset:
    """A sequence item; numbers are coerced to the attribute's VR (FD/FL floats, DS strings)."""
    item = Dataset()
    for keyword, value in attrs.items():
        vr = dictionary_VR(keyword)
        if vr in ("FD", "FL"):
            value = [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value)
        elif vr == "DS" and not isinstance(value, (str, list, tuple)):
            value = _fmt_ds(value)
        setattr(item, keyword, value)
    return item


def _pvt(slope: float, intercept: float) -> Dataset:
    item = Dataset()
    item.RescaleIntercept = _fmt_ds(intercept)
    item.RescaleSlope = _fmt_ds(slope)
    item.RescaleType = "HU"
    return item


def _compress_in_memory(ds: Dataset, ts: UID) -> None:
    if ts in (JPEGLosslessSV1, JPEG_LOSSLESS_P14):
        # No pydicom encoder for JPEG Lossless: round-trip through dcmtk on disk.
        with tempfile.TemporaryDirectory(prefix="molre-cjpeg-") as tmp:
            src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
            ds.save_as(src, enforce_file_format=True)
            _dcmtk_jpeg_lossless(src, dst, ts)
            new = pydicom.dcmread(dst)
        ds.clear()
        ds.update(new)
        ds.file_meta = new.file_meta
        return
    if ts == JPEG2000Lossless and min(int(ds.Rows), int(ds.Columns)) < 32:
        # openjpeg's default of 6 resolution levels needs >= 32 pixels per side; the pydicom
        # plugin does not expose the level count.
        raise MolreError(
            f"JPEG 2000 encoding needs images of at least 32x32 pixels "
            f"(got {ds.Rows}x{ds.Columns}); use RLE or JPEG-LS for smaller images"
        )
    try:
        ds.compress(ts)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        raise MolreError(
            f"cannot encode transfer syntax {ts} ({ts.name}): {exc}; install an encoder plugin "
            "(pylibjpeg-openjpeg for JPEG 2000, pyjpegls for JPEG-LS) or choose another syntax"
        ) from exc


def _dcmtk_jpeg_lossless(src: Path, dst: Path, ts: UID) -> None:
    exe = shutil.which("dcmcjpeg")
    if exe is None:
        raise MolreError(
            f"cannot encode {ts.name}: pydicom has no JPEG Lossless encoder and dcmtk's 'dcmcjpeg' "
            "is not on PATH (install the Debian package dcmtk), or choose RLE / JPEG-LS / "
            "JPEG 2000"
        )
    mode = "--encode-lossless-sv1" if ts == JPEGLosslessSV1 else "--encode-lossless"
    res = subprocess.run([exe, mode, str(src), str(dst)], capture_output=True, text=True)
    if res.returncode != 0:
        raise MolreError(f"dcmcjpeg failed for {src}: {res.stderr.strip() or res.stdout.strip()}")


def compress_file(src: Path | str, dst: Path | str, transfer_syntax: str) -> Path:
    """Re-encode one DICOM file with ``transfer_syntax`` (RLE, JPEG-LS, JPEG 2000, JPEG Lossless).

    Why: test fixtures and interoperability checks need real compressed objects as a PACS would
    send them. pydicom 3 encodes RLE Lossless (own or pylibjpeg-rle), JPEG-LS Lossless (pyjpegls)
    and JPEG 2000 Lossless (pylibjpeg-openjpeg); it has no JPEG Lossless (Process 14 / SV1)
    encoder, so those go through dcmtk's ``dcmcjpeg``. An uncompressed target decompresses.
    """
    src, dst = Path(src), Path(dst)
    ts = _check_syntax(transfer_syntax)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if ts in (JPEGLosslessSV1, JPEG_LOSSLESS_P14):
        ds = pydicom.dcmread(src)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
            with tempfile.TemporaryDirectory(prefix="molre-cjpeg-") as tmp:
                plain = Path(tmp) / "plain.dcm"
                ds.save_as(plain, enforce_file_format=True)
                _dcmtk_jpeg_lossless(plain, dst, ts)
        else:
            _dcmtk_jpeg_lossless(src, dst, ts)
        return dst
    ds = pydicom.dcmread(src)
    current = ds.file_meta.TransferSyntaxUID
    if ts in _UNCOMPRESSED:
        _set_native(ds, ts)
        ds.save_as(dst, enforce_file_format=True)
        return dst
    if current.is_compressed:
        ds.decompress()
    _compress_in_memory(ds, ts)
    ds.save_as(dst, enforce_file_format=True)
    return dst


__all__ = [
    "CT_IMAGE_STORAGE",
    "DEFAULT_TAGS",
    "ENHANCED_CT_IMAGE_STORAGE",
    "JPEG_LOSSLESS_P14",
    "LOSSLESS_SYNTAXES",
    "compress_file",
    "frame_of_reference_for",
    "ct_slice_dataset",
    "new_uid",
    "write_ct_series",
    "write_enhanced_ct",
]
