"""SR builder: TID 1500 content, dciodvfy validity, srread/dsrdump round trip, SC summary."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from molre.catalog import load_catalog
from molre.data.dicomio import write_ct_series
from node.report import (
    NodeIdentity,
    build_sr,
    build_summary_sc,
    read_sources,
    result_series_uid,
    summary_lines,
    to_bytes,
)
from tests.nodeproc import dciodvfy_errors


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("ct")
    vol = np.full((4, 32, 32), 30.0, dtype=np.float32)
    # real sources lack Type 2 attributes sometimes: no StudyID, no ReferringPhysicianName
    paths = write_ct_series(out, vol, spacing=(5.0, 0.8, 0.8))
    for p in paths:
        ds = pydicom.dcmread(p)
        for kw in ("StudyID", "ReferringPhysicianName"):
            if kw in ds:
                delattr(ds, kw)
        ds.save_as(p)
    return paths


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def prediction(catalog, positives: set[str], demo: bool = False) -> dict:
    rng = np.random.default_rng(1)
    probs = {
        k: float(0.6 + 0.39 * rng.random()) if k in positives else float(0.4 * rng.random())
        for k in catalog.keys
    }
    return {
        "probabilities": probs,
        "decisions": {k: k in positives for k in catalog.keys},
        "checkpoint_hash": "f" * 64,
        "model_name": "molre-test",
        "model_version": "1.0",
        "is_demo": demo,
        "used_sop_instance_uids": [],
    }


def test_sr_content_roundtrip_and_validity(tmp_path: Path, ct, catalog) -> None:
    positives = {"subdural_hemorrhage", "hydrocephalus", "midline_shift"}
    pred = prediction(catalog, positives)
    sources = read_sources(ct)
    ident = NodeIdentity(ae_title="MOLRE", manufacturer="ACME", device_name="NODE1")
    sr = build_sr(sources, pred, catalog, version=2, identity=ident)
    path = tmp_path / "sr.dcm"
    path.write_bytes(to_bytes(sr))

    assert dciodvfy_errors(path) == []
    if shutil.which("dsrdump"):
        res = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
        assert res.returncode == 0 and "CT of head" in res.stdout

    back = hd.sr.srread(path)
    src = sources[0]
    assert back.StudyInstanceUID == src.StudyInstanceUID  # original study
    assert back.SeriesInstanceUID not in {s.SeriesInstanceUID for s in sources}  # new series
    assert back.SeriesInstanceUID == result_series_uid(src.SeriesInstanceUID)
    assert back.PatientID == src.PatientID and back.StudyID == ""
    assert back.InstanceNumber == 2
    assert back.SeriesDescription.startswith("AI RESULTS – NOT FOR DIAGNOSTIC USE")
    assert "DEMO" not in back.SeriesDescription
    schemes = [i.CodingSchemeDesignator for i in back.CodingSchemeIdentificationSequence]
    assert "99MOLRE" in schemes
    (eq,) = [e for e in back.ContributingEquipmentSequence if e.Manufacturer == "ACME"]
    assert eq.ManufacturerModelName == "molre-test"
    assert eq.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert any("checkpoint ffff" in v for v in eq.SoftwareVersions)
    evidence = {
        r.ReferencedSOPInstanceUID
        for st in back.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    assert evidence == {s.SOPInstanceUID for s in sources}

    report = back.content
    proc = [i for i in back.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert proc[0].ConceptCodeSequence[0].CodeValue == "303653007"
    observers = report.get_observer_contexts()
    assert observers and "NODE1" in str(observers[0])
    groups = report.get_image_measurement_groups()
    assert len(groups) == len(catalog)
    seen = {}
    for g in groups:
        key = g.tracking_identifier
        finding = catalog.get(key)
        assert g.finding_type.value == finding.value
        assert g.finding_type.scheme_designator == finding.scheme
        (qual,) = g.get_qualitative_evaluations()
        assert qual.name.value == "121052"
        (m,) = g.get_measurements()
        assert m.name.value == "122157" and m.unit.value == "1"
        assert m.value == pytest.approx(pred["probabilities"][key], abs=1e-5)
        seen[key] = qual.value.value
    assert {k for k, v in seen.items() if v == "52101004"} == positives
    assert {v for k, v in seen.items() if k not in positives} == {"272519000"}


def test_demo_model_is_labelled_and_versions_share_a_series(ct, catalog) -> None:
    sources = read_sources(ct)
    a = build_sr(sources, prediction(catalog, set(), demo=True), catalog, version=1)
    b = build_sr(sources, prediction(catalog, set(), demo=True), catalog, version=2)
    assert a.SeriesDescription.endswith("DEMO MODEL")
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert (a.InstanceNumber, b.InstanceNumber) == (1, 2)


def test_summary_secondary_capture(tmp_path: Path, ct, catalog) -> None:
    pred = prediction(catalog, {"acute_infarct"})
    lines = summary_lines(pred, catalog)
    assert any(catalog.get("acute_infarct").name[:20] in ln for ln in lines)
    assert not any(catalog.get("hydrocephalus").name in ln for ln in lines)
    sc = build_summary_sc(read_sources(ct), pred, catalog)
    path = tmp_path / "sc.dcm"
    path.write_bytes(to_bytes(sc))
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == read_sources(ct)[0].StudyInstanceUID
    assert back.pixel_array.max() == 255  # text was rendered
    assert back.SeriesDescription.startswith("AI RESULTS")


def _notes(sr) -> dict[str, str]:
    (box,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    return {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue for i in box.ContentSequence}


def test_sr_content_states_usage_and_the_processing_done(tmp_path: Path, ct, catalog) -> None:
    """'Not for diagnostic use' is in the content tree (not only SeriesDescription), and every
    geometry correction of the reader is stated in the content and the Contributing Equipment."""
    pred = prediction(catalog, {"hydrocephalus"}, demo=True) | {
        "corrections": [
            {
                "kind": "gantry_tilt_resampled",
                "description": "gantry tilt about 18.5 degrees; resampled onto an orthogonal grid",
            },
            {
                "kind": "slice_spacing_regularised",
                "description": "stepped slice spacing (4 mm, 7 mm); resampled to 4 mm",
            },
        ]
    }
    sr = build_sr(read_sources(ct), pred, catalog)
    path = tmp_path / "sr.dcm"
    path.write_bytes(to_bytes(sr))
    assert dciodvfy_errors(path) == []
    back = hd.sr.srread(path)
    notes = _notes(back)
    assert "NOT FOR DIAGNOSTIC USE" in notes["usage"] and "DEMO MODEL" in notes["usage"]
    assert "gantry tilt about 18.5 degrees" in notes["processing"]
    assert "resampled to 4 mm" in notes["processing"]
    (eq,) = [
        e
        for e in back.ContributingEquipmentSequence
        if e.Manufacturer == NodeIdentity().manufacturer
    ]
    assert "gantry tilt about 18.5 degrees" in eq.ContributionDescription
    assert len(back.content.get_image_measurement_groups()) == len(catalog)
    plain = _notes(build_sr(read_sources(ct), prediction(catalog, set()), catalog))
    assert "DEMO" not in plain["usage"] and "no correction" in plain["processing"]


def test_summary_never_drops_findings_silently(catalog) -> None:
    from node.report import summary_capacity

    everything = set(catalog.keys)
    lines = summary_lines(prediction(catalog, everything, demo=True), catalog)
    assert len(lines) == summary_capacity()
    assert f"Positive findings ({len(everything)}):" in lines
    shown = sum(1 for ln in lines if " p=" in ln)
    assert lines[-1].strip() == (
        f"... {len(everything) - shown} more positive finding(s) not shown (see the SR)"
    )
    few = summary_lines(prediction(catalog, {"hydrocephalus"}), catalog)
    assert not any("not shown" in ln for ln in few)
