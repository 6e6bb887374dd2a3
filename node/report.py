"""The result objects: a TID 1500 Comprehensive 3D SR (and optionally a Secondary Capture summary).

Why these choices (IHE AI Results, AIR):
- the SR goes into the *original study* as a new series, so the PACS files it next to the CT;
- observer = the node as a device, procedure reported = CT of head (SCT 303653007);
- one measurement group per catalog finding: finding type = the finding's code, a qualitative
  evaluation "Presence of property" (DCM 121052) = Present (SCT 52101004) / Absent
  (SCT 272519000) by the checkpoint's threshold, and the model's "Probability" (DCM 122157,
  UCUM "1"); algorithm identification = model name + checkpoint hash as version;
- evidence = the CT instances the model actually read;
- Contributing Equipment Sequence names the algorithm (manufacturer, model name, software
  versions) with purpose of reference DCM 109102 "Processing Equipment" (the code pydicom's
  concept dictionary has; AIR's wording is "processing algorithm");
- the local `99MOLRE` coding scheme is declared in the Coding Scheme Identification Sequence;
- SeriesDescription starts with "AI RESULTS – NOT FOR DIAGNOSTIC USE" (+ " – DEMO MODEL" for the
  packaged demo checkpoint). The text contains an en dash, so the SR is UTF-8 (ISO_IR 192).
- the content says so too (a viewer may show the tree, not the header): the root container has
  a "Qualitative Evaluations" container (UMLS C0034375, TID 1500) with TEXT items
  99MOLRE "usage" (not for diagnostic use) and 99MOLRE "processing" (what the node did to the
  source geometry before reading it: tilt resampled, spacing regularised, gaps filled, or
  "none"); the processing text is also the Contributing Equipment's ContributionDescription.

Versions: a series reopened by late instances is reported again as a *new SR instance* (new SOP
Instance UID, InstanceNumber = series version) in the *same* result series — the result series
UID is derived from the source series UID, so all versions sit together and the newest has the
highest instance number.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from common import __version__

SERIES_DESCRIPTION = "AI RESULTS – NOT FOR DIAGNOSTIC USE"
DEMO_SUFFIX = " – DEMO MODEL"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
LOCAL_SCHEME = "99MOLRE"

PRESENCE = Code("121052", "DCM", "Presence of property")
PRESENT = Code("52101004", "SCT", "Present")
ABSENT = Code("272519000", "SCT", "Absent")
PROBABILITY = Code("122157", "DCM", "Probability")
NO_UNITS = Code("1", "UCUM", "no units")
CT_OF_HEAD = Code("303653007", "SCT", "CT of head")
HEAD = Code("69536005", "SCT", "Head")
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
ILLUSTRATION_OF_ROI = Code("121200", "DCM", "Illustration of ROI")
USAGE = Code("usage", LOCAL_SCHEME, "Usage restriction")
PROCESSING = Code("processing", LOCAL_SCHEME, "Processing of the source images")
USAGE_TEXT = (
    "AI RESULTS – NOT FOR DIAGNOSTIC USE. Output of research software; it must not be "
    "used for diagnosis or treatment decisions."
)
DEMO_TEXT = (
    " DEMO MODEL: trained on synthetic phantoms only; it detects what phantoms show and "
    "says nothing about patients. Not for clinical use."
)

# Type 2 attributes highdicom copies from the evidence and refuses when absent.
_TYPE2_FILL = (
    "StudyID",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
)


@dataclass
class NodeIdentity:
    """Who wrote the report: the node as a device."""

    ae_title: str = "MOLRE"
    manufacturer: str = "molre-node project"
    device_name: str = "MOLRE-NODE"
    institution_name: str = ""

    @property
    def device_uid(self) -> str:
        """Stable per AE title, so every report of one node names the same device."""
        return generate_uid(entropy_srcs=["molre-node device", self.ae_title])


def result_series_uid(source_series_uid: str, kind: str = "sr") -> str:
    """Deterministic UID of the result series for one source series (all versions share it)."""
    return generate_uid(entropy_srcs=["molre-node result series", kind, source_series_uid])


def read_sources(paths: Sequence[str | Path]) -> list[Dataset]:
    """Headers (no pixels) of the CT instances used, as evidence for the SR."""
    return [pydicom.dcmread(str(p), stop_before_pixels=True) for p in paths]


def recorded_sources(paths: Sequence[str | Path], records: Mapping[str, Any]) -> list[Dataset]:
    """Evidence for the SR without reading every header again: the first instance's header
    from its file (the SR copies the patient and study modules from it), the others as the four
    UIDs the evidence sequence needs, from `records` (spool path -> the receiver's instance row,
    read from the same headers). A path without a complete row is read from its file.

    Why: a 480-slice series meant 480 header reads in the node after the inference process had
    just read them all; the rows are already in memory."""
    out: list[Dataset] = []
    for n, p in enumerate(paths):
        r = records.get(str(p))
        uids = (
            getattr(r, "sop_class_uid", None),
            getattr(r, "sop_instance_uid", None),
            getattr(r, "study_uid", None),
            getattr(r, "series_uid", None),
        )
        if n == 0 or not all(uids):
            out.append(pydicom.dcmread(str(p), stop_before_pixels=True))
            continue
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = uids
        out.append(ds)
    return out


def _filled(ds: Dataset) -> Dataset:
    """A copy with empty values for missing Type 2 attributes (real sources do lack them)."""
    out = copy.copy(ds)
    for kw in _TYPE2_FILL:
        if kw not in out:
            setattr(out, kw, "")
    return out


def _series_description(is_demo: bool) -> str:
    return SERIES_DESCRIPTION + (DEMO_SUFFIX if is_demo else "")


def _finding_code(f: Any) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(
        value=str(f.value), scheme_designator=str(f.scheme), meaning=str(f.meaning)
    )


def _coding_scheme_item() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "molre-node local finding codes"
    item.CodingSchemeVersion = "1"
    item.CodingSchemeResponsibleOrganization = "molre-node project"
    return item


def processing_description(prediction: Mapping[str, Any]) -> str:
    """What was done to the source geometry before the model read it (from the reader's
    corrections), in words; ST allows 1024 characters."""
    done = [
        str(c.get("description") or c.get("kind"))
        for c in (prediction.get("corrections") or [])
        if isinstance(c, Mapping)
    ]
    text = (
        "Source geometry corrected before reading: " + "; ".join(done)
        if done
        else "Source geometry used as acquired (no correction)."
    )
    return text[:1024]


def _notes_container(prediction: Mapping[str, Any]) -> hd.sr.ContainerContentItem:
    """Usage restriction and processing description as TEXT content items (see module doc)."""
    box = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    usage = USAGE_TEXT + (DEMO_TEXT if prediction.get("is_demo") else "")
    skipped = list(prediction.get("not_assessed") or [])
    if skipped:  # findings the model has no validation evidence for are not reported at all
        usage += (
            f" Findings assessed: {len(prediction.get('probabilities') or {})}; "
            f"{len(skipped)} other catalog finding(s) were not assessed by this model "
            "and are not reported (neither present nor absent)."
        )
    box.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(name=USAGE, value=usage, relationship_type="CONTAINS"),
            hd.sr.TextContentItem(
                name=PROCESSING,
                value=processing_description(prediction),
                relationship_type="CONTAINS",
            ),
        ]
    )
    return box


def _contributing_equipment(
    identity: NodeIdentity, prediction: Mapping[str, Any]
) -> hd.ContributingEquipment:
    versions = [
        f"molre-node {__version__}",
        str(prediction.get("model_version") or ""),
        f"checkpoint {str(prediction.get('checkpoint_hash') or '')[:16]}",
    ]
    return hd.ContributingEquipment(
        manufacturer=identity.manufacturer,
        purpose_of_reference=PROCESSING_EQUIPMENT,
        manufacturer_model_name=str(prediction.get("model_name") or "molre")[:64],
        software_versions=[v[:64] for v in versions if v],
        institution_name=identity.institution_name or None,
        station_name=identity.ae_title,
        contribution_description=(
            "AI inference of head-CT findings (molre-node). " + processing_description(prediction)
        )[:1024],
    )


def _source_images(
    evidence_images: Sequence[Any], key: str
) -> list[hd.sr.SourceImageForMeasurementGroup] | None:
    """The CT slices that drove finding `key` (its key images' sources), once each."""
    refs: dict[str, str] = {}
    for e in evidence_images:
        if e.finding == key:
            refs.setdefault(e.source_sop_instance_uid, e.source_sop_class_uid)
    return [
        hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=cls, referenced_sop_instance_uid=uid
        )
        for uid, cls in refs.items()
    ] or None


def build_sr(
    sources: Sequence[Dataset],
    prediction: Mapping[str, Any],
    catalog: Any,
    *,
    version: int = 1,
    identity: NodeIdentity | None = None,
    sop_instance_uid: str | None = None,
    evidence_images: Sequence[Any] = (),
) -> Dataset:
    """Build the TID 1500 Comprehensive 3D SR for one prediction.

    `sources`: headers of the CT instances read (evidence; the first gives patient/study).
    `prediction`: `Prediction.to_dict()` (probabilities, decisions, checkpoint_hash, model_name,
    model_version, is_demo). `catalog`: the checkpoint's `Catalog` (order and codes).
    `evidence_images`: `node.evidence.EvidenceImage`s; each finding's measurement group then
    names its key CT slices as Source images and its key images as "Illustration of ROI".
    """
    if not sources:
        raise ValueError("build_sr needs at least one source instance")
    identity = identity or NodeIdentity()
    # patient/study come from the first source only (highdicom); the others are UID references
    evidence = [_filled(sources[0]), *sources[1:]] + [_filled(e.dataset) for e in evidence_images]
    probs: Mapping[str, float] = prediction["probabilities"]
    decisions: Mapping[str, bool] = prediction["decisions"]
    model_name = str(prediction.get("model_name") or "molre")[:64]
    ckpt_hash = str(prediction.get("checkpoint_hash") or "unknown")
    algorithm = hd.sr.AlgorithmIdentification(name=model_name, version=ckpt_hash[:64])
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid,
            name=identity.device_name,
            manufacturer_name=identity.manufacturer,
            model_name=model_name,
        ),
    )
    context = hd.sr.ObservationContext(observer_device_context=observer)
    source_series = str(evidence[0].SeriesInstanceUID)
    groups = []
    for f in catalog:
        if f.key not in probs:
            continue
        p = float(np.clip(probs[f.key], 0.0, 1.0))
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=generate_uid(entropy_srcs=[source_series, str(version), f.key]),
                    identifier=f"{f.key}"[:64],
                ),
                finding_type=_finding_code(f),
                algorithm_id=algorithm,
                finding_sites=[hd.sr.FindingSite(anatomic_location=HEAD)],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=PRESENCE, value=PRESENT if decisions.get(f.key) else ABSENT
                    )
                ],
                measurements=[
                    hd.sr.Measurement(name=PROBABILITY, value=round(p, 6), unit=NO_UNITS)
                ],
                source_images=_source_images(evidence_images, f.key),
            )
        )
        for e in evidence_images:  # the key images of this finding (node.evidence)
            if e.finding == f.key:
                groups[-1][0].ContentSequence.append(
                    hd.sr.ImageContentItem(
                        name=ILLUSTRATION_OF_ROI,
                        referenced_sop_class_uid=e.dataset.SOPClassUID,
                        referenced_sop_instance_uid=e.dataset.SOPInstanceUID,
                        relationship_type="CONTAINS",
                    )
                )
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=CT_OF_HEAD, imaging_measurements=groups
    )
    report[0].ContentSequence.append(_notes_container(prediction))
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=result_series_uid(source_series, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=int(version),
        manufacturer=identity.manufacturer,
        institution_name=identity.institution_name or None,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=[_contributing_equipment(identity, prediction)],
    )
    sr.SpecificCharacterSet = "ISO_IR 192"
    sr.SeriesDescription = _series_description(bool(prediction.get("is_demo")))
    sr.CodingSchemeIdentificationSequence = [_coding_scheme_item()]
    return sr


# ---------------------------------------------------------------------------------------------
# Secondary Capture summary (for viewers that do not render SR)
# ---------------------------------------------------------------------------------------------


def _render_summary(lines: Sequence[str], size: int = 512) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=16)
    except TypeError:  # older Pillow
        font = ImageFont.load_default()
    if len(lines) > summary_capacity(size):
        raise ValueError(
            f"{len(lines)} summary lines do not fit {size} px (at most "
            f"{summary_capacity(size)}); summary_lines must shorten them"
        )
    y = 10
    for line in lines:
        draw.text((10, y), line, fill=255, font=font)
        y += 20
    return np.asarray(img, dtype=np.uint8)


def summary_capacity(size: int = 512) -> int:
    """Lines of text the rendered summary image holds (20 px per line, 10 px margins)."""
    return (size - 20) // 20


def summary_lines(
    prediction: Mapping[str, Any], catalog: Any, max_lines: int | None = None
) -> list[str]:
    """Text of the summary image: the positive findings with their probabilities, most probable
    first. When they do not all fit, the last line says how many were left out (never a silent
    cut): the SR holds every finding."""
    probs = prediction["probabilities"]
    decisions = prediction["decisions"]
    max_lines = summary_capacity() if max_lines is None else max_lines
    head = ["AI RESULTS - NOT FOR DIAGNOSTIC USE"]
    if prediction.get("is_demo"):
        head.append("DEMO MODEL - random weights, meaningless output")
    head.append(f"model {str(prediction.get('model_name'))[:40]}")
    head.append("")
    positives = [f for f in catalog if decisions.get(f.key)]
    positives.sort(key=lambda f: -float(probs.get(f.key, 0.0)))
    if not positives:
        return head + ["No finding above its threshold."]
    head.append(f"Positive findings ({len(positives)}):")
    shown = [f"  {f.name[:44]}  p={float(probs[f.key]):.2f}" for f in positives]
    room = max_lines - len(head)
    if len(shown) > room:
        left = len(shown) - (room - 1)
        shown = shown[: room - 1] + [
            f"  ... {left} more positive finding(s) not shown (see the SR)"
        ]
    return head + shown


def build_summary_sc(
    sources: Sequence[Dataset],
    prediction: Mapping[str, Any],
    catalog: Any,
    *,
    version: int = 1,
    identity: NodeIdentity | None = None,
) -> Dataset:
    """A Secondary Capture image listing the positive findings (rendered text)."""
    identity = identity or NodeIdentity()
    ref = _filled(sources[0])
    pixels = _render_summary(summary_lines(prediction, catalog))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=result_series_uid(str(ref.SeriesInstanceUID), "sc"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=int(version),
        manufacturer=identity.manufacturer,
        patient_orientation=("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[_contributing_equipment(identity, prediction)],
    )
    sc.SpecificCharacterSet = "ISO_IR 192"
    sc.SeriesDescription = _series_description(bool(prediction.get("is_demo"))) + " (summary)"
    sc.BurnedInAnnotation = "YES"
    if "Laterality" not in sc:
        sc.Laterality = ""  # Type 2C in General Series; dciodvfy cannot evaluate the condition
    return sc


def to_bytes(ds: Dataset) -> bytes:
    """Encode as a DICOM Part-10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


__all__ = [
    "NodeIdentity",
    "build_sr",
    "build_summary_sc",
    "processing_description",
    "read_sources",
    "recorded_sources",
    "result_series_uid",
    "summary_capacity",
    "summary_lines",
    "to_bytes",
]
