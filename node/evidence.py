"""Evidence images: for each finding reported Present, the slices that drove it, as key images.

What a viewer gets (why these choices):
- one **Secondary Capture** image (RGB, series 9903 "AI EVIDENCE – NOT FOR DIAGNOSTIC USE") per
  key slice: the source CT slice in a brain window with the model's saliency map blended over
  it (transparent below ``OVERLAY_FLOOR`` of the finding's peak, yellow -> red above), and a
  banner above the image naming the finding, the probability and "not for diagnostic use".
  Every PACS viewer shows an SC; a colour overlay needs no presentation-state support. Small
  slices are scaled up (integer factor) so the banner text is legible; PixelSpacing is the
  source's divided by that factor, and the banner is above row 0 of the image (nothing of the
  slice is hidden). Source Image Sequence names the CT slice; Derivation Description says how
  the map was made.
- the SR links them from the finding's measurement group (TID 1501): the key CT slices as
  "Source" images (`hd.sr.SourceImageForMeasurementGroup`) and each evidence SC as an IMAGE
  item "Illustration of ROI" (DCM 121200) -- see `node.report.build_sr(evidence_images=...)`.

The saliency itself comes from the model in the inference process (`molre.saliency.explain`):
plain arrays on the series volume's grid. This module maps each chosen volume plane to the
source instance at that position (ImagePositionPatient along the slice normal) and renders.
Multi-frame sources (Enhanced CT) are not supported yet: the caller audits the refusal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from common.errors import MolreError

EVIDENCE_SERIES_NUMBER = 9903
EVIDENCE_DESCRIPTION = "AI EVIDENCE – NOT FOR DIAGNOSTIC USE"
#: Window (center, width HU) of the grey image under the overlay: brain/blood.
WINDOW = (40.0, 80.0)
#: Saliency below this fraction of the finding's peak is not drawn.
OVERLAY_FLOOR = 0.25
#: Opacity of the overlay at the peak.
OVERLAY_ALPHA = 0.6
#: Key images are scaled up to at least this many pixels across (integer factor).
MIN_SIZE_PX = 512
BANNER_PX = 44


class EvidenceError(MolreError):
    """Evidence images cannot be made for this series (the SR is still sent)."""


@dataclass
class EvidenceImage:
    """One key image: the SC, the finding it illustrates and the CT slice it shows."""

    finding: str
    dataset: Dataset
    source_sop_class_uid: str
    source_sop_instance_uid: str
    score: float


def _position_t(ds: Dataset, normal: np.ndarray, origin: np.ndarray) -> float:
    ipp = np.array([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
    return float((ipp - origin) @ normal)


def key_slices(
    sources: Sequence[Dataset], saliency: Mapping[str, Any]
) -> dict[str, list[tuple[Dataset, Mapping[str, Any]]]]:
    """Finding key -> [(source header, key plane)] in slice order: each key plane of the
    saliency is the source instance at the same position along the slice normal (nearest;
    within one plane spacing), each source slice at most once per finding."""
    grid = saliency["grid"]
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in sources):
        raise EvidenceError(
            "multi-frame (Enhanced CT) sources: evidence images are made for "
            "single-frame CT series only"
        )
    direction = np.asarray(grid["direction"], dtype=np.float64)
    normal = direction[2] / np.linalg.norm(direction[2])
    origin = np.asarray(grid["origin"], dtype=np.float64)
    step = float(grid["spacing"][0])
    if not step > 0:
        raise EvidenceError(f"saliency grid has slice spacing {step!r}")
    try:
        planes = np.array([_position_t(ds, normal, origin) / step for ds in sources])
    except (AttributeError, TypeError, ValueError):
        raise EvidenceError(
            "a source instance lacks a numeric ImagePositionPatient (0020,0032)"
        ) from None
    out: dict[str, list[tuple[Dataset, Mapping[str, Any]]]] = {}
    for key, f in saliency["findings"].items():
        chosen: list[tuple[Dataset, Mapping[str, Any]]] = []
        seen: set[str] = set()
        for kp in f["key_planes"]:
            i = int(np.argmin(np.abs(planes - float(kp["z"]))))
            uid = str(sources[i].SOPInstanceUID)
            if abs(planes[i] - float(kp["z"])) > 1.0 or uid in seen:
                continue
            seen.add(uid)
            chosen.append((sources[i], kp))
        out[key] = sorted(chosen, key=lambda c: float(c[1]["z"]))
    return out


def _grey(ds: Dataset) -> np.ndarray:
    """The slice in the brain window as uint8 (rows, cols)."""
    px = ds.pixel_array.astype(np.float32)
    if px.ndim != 2:
        raise EvidenceError(
            f"source instance {ds.SOPInstanceUID}: pixel data of shape "
            f"{px.shape}, expected one 2-D frame"
        )
    hu = px * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
        getattr(ds, "RescaleIntercept", 0) or 0
    )
    c, w = WINDOW
    return np.clip((hu - (c - w / 2.0)) / w * 255.0, 0, 255).astype(np.uint8)


def _upsampled_map(m: np.ndarray, stride: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """The plane map (subsampled by `stride`) at the slice's size, 0..1."""
    from PIL import Image

    h, w = m.shape
    full = Image.fromarray(m).resize(
        (w * int(stride[1]), h * int(stride[0])), Image.Resampling.BILINEAR
    )
    arr = np.asarray(full, dtype=np.float32)[: shape[0], : shape[1]] / 255.0
    if arr.shape != shape:  # stride grid shorter than the slice (rounding): pad with 0
        arr = np.pad(arr, ((0, shape[0] - arr.shape[0]), (0, shape[1] - arr.shape[1])))
    return arr


def render_key_image(
    grey: np.ndarray, sal: np.ndarray, lines: Sequence[str]
) -> tuple[np.ndarray, int]:
    """RGB uint8 (banner + scaled slice with the overlay) and the scale factor used."""
    from PIL import Image, ImageDraw, ImageFont

    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=2)
    a = np.clip((sal - OVERLAY_FLOOR) / (1.0 - OVERLAY_FLOOR), 0.0, 1.0)
    colour = np.stack([np.full_like(a, 255.0), 255.0 * (1.0 - a), np.zeros_like(a)], axis=2)
    alpha = (OVERLAY_ALPHA * a * (sal >= OVERLAY_FLOOR))[..., None]
    blended = (rgb * (1.0 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)
    factor = max(1, math.ceil(MIN_SIZE_PX / max(grey.shape)))
    img = Image.fromarray(blended, "RGB")
    if factor > 1:
        img = img.resize(
            (grey.shape[1] * factor, grey.shape[0] * factor), Image.Resampling.BILINEAR
        )
    canvas = Image.new("RGB", (img.width, img.height + BANNER_PX), (0, 0, 0))
    canvas.paste(img, (0, BANNER_PX))
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # older Pillow
        font = ImageFont.load_default()
    for n, line in enumerate(lines[:2]):
        draw.text((6, 4 + 19 * n), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8), factor


def _source_ref(ds: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def build_evidence(
    sources: Sequence[Dataset],
    paths: Mapping[str, str | Path],
    prediction: Mapping[str, Any],
    catalog: Any,
    *,
    version: int = 1,
    identity: Any = None,
) -> list[EvidenceImage]:
    """The key images of every finding in ``prediction["saliency"]`` (only Present findings
    are explained by the inference process).

    `sources`: CT headers used as SR evidence; `paths`: SOP Instance UID -> file (pixels are
    read for the chosen slices only). Raises EvidenceError (or a pydicom/highdicom error) when
    they cannot be made; the caller audits it and still sends the SR."""
    from node.report import (
        NodeIdentity,
        _contributing_equipment,
        _filled,
        _series_description,
        result_series_uid,
    )

    saliency = prediction.get("saliency")
    if not saliency or not saliency.get("findings"):
        return []
    identity = identity or NodeIdentity()
    names = {f.key: f.name for f in catalog}
    probs = prediction.get("probabilities") or {}
    method = {"gradient": "input gradient", "grad_x_input": "gradient x input"}.get(
        str(saliency.get("method")), str(saliency.get("method"))
    )
    series_uid = result_series_uid(str(sources[0].SeriesInstanceUID), "evidence")
    description = _series_description(bool(prediction.get("is_demo"))).replace(
        "AI RESULTS", "AI EVIDENCE"
    )
    images: list[EvidenceImage] = []
    number = (int(version) - 1) * 1000
    for key, chosen in key_slices(sources, saliency).items():
        stride = saliency["findings"][key].get("stride") or (1, 1)
        name = str(names.get(key, key))
        for header, kp in chosen:
            uid = str(header.SOPInstanceUID)
            if uid not in paths:
                raise EvidenceError(f"no stored file for source instance {uid}")
            ds = pydicom.dcmread(str(paths[uid]))
            grey = _grey(ds)
            sal = _upsampled_map(np.asarray(kp["map"], dtype=np.uint8), stride, grey.shape)
            lines = [
                f"{name[:48]}  p={float(probs.get(key, float('nan'))):.2f}",
                f"AI EVIDENCE - NOT FOR DIAGNOSTIC USE - saliency ({method})",
            ]
            pixels, factor = render_key_image(grey, sal, lines)
            spacing = None
            if "PixelSpacing" in ds:
                spacing = tuple(float(v) / factor for v in ds.PixelSpacing)
            number += 1
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=_filled(header),
                pixel_array=pixels,
                photometric_interpretation="RGB",
                bits_allocated=8,
                coordinate_system="PATIENT",
                series_instance_uid=series_uid,
                series_number=EVIDENCE_SERIES_NUMBER,
                sop_instance_uid=generate_uid(),
                instance_number=number,
                manufacturer=identity.manufacturer,
                # highdicom annotates pixel_spacing as tuple[int, int]; it is mm (DS), floats
                pixel_spacing=spacing,  # type: ignore[arg-type]
                patient_orientation=_orientation(header),
                transfer_syntax_uid=ExplicitVRLittleEndian,
                contributing_equipment=[_contributing_equipment(identity, prediction)],
            )
            sc.SpecificCharacterSet = "ISO_IR 192"
            sc.SeriesDescription = description
            sc.BurnedInAnnotation = "YES"
            sc.ImageType = ["DERIVED", "SECONDARY"]
            sc.DerivationDescription = (
                f"Saliency of the AI finding '{name}' ({method}, "
                f"relative score {float(kp['score']):.2f}) blended over "
                "the source slice; AI output, not for diagnostic use"
            )[:1024]
            sc.SourceImageSequence = [_source_ref(header)]
            sc.ImageComments = f"{key} evidence; source slice {uid}"[:10240]
            if "Laterality" not in sc:
                sc.Laterality = ""  # Type 2C in General Series; dciodvfy cannot evaluate it
            images.append(
                EvidenceImage(
                    finding=key,
                    dataset=sc,
                    source_sop_class_uid=str(header.SOPClassUID),
                    source_sop_instance_uid=uid,
                    score=float(kp["score"]),
                )
            )
    return images


def _orientation(ds: Dataset) -> tuple[str, str]:
    """PatientOrientation (row, column directions) of the slice from ImageOrientationPatient:
    the dominant LPS axis of each, e.g. ("L", "P") for a standard axial slice."""
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return ("L", "P")
    letters = (("L", "R"), ("P", "A"), ("H", "F"))

    def axis(v: Sequence[float]) -> str:
        k = int(np.argmax(np.abs(v)))
        return letters[k][0] if v[k] >= 0 else letters[k][1]

    return axis(iop[:3]), axis(iop[3:])


__all__ = [
    "EVIDENCE_DESCRIPTION",
    "EVIDENCE_SERIES_NUMBER",
    "EvidenceError",
    "EvidenceImage",
    "build_evidence",
    "key_slices",
    "render_key_image",
]
