"""Selection rules: which complete series are read, and the reason for every skip."""

from __future__ import annotations

from typing import Any

import pytest

from node.config import SelectionConfig
from node.selection import choose_preferred, evaluate, summarize

AXIAL_IOP = [1, 0, 0, 0, 1, 0]


def meta(**over: Any) -> dict[str, Any]:
    m = {"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
         "BodyPartExamined": "HEAD", "StudyDescription": "CT HEAD WO",
         "SeriesDescription": "Head 5mm", "ProtocolName": "HEAD ROUTINE", "SliceThickness": 5.0,
         "ConvolutionKernel": "H30s", "ImageOrientationPatient": AXIAL_IOP}
    m.update(over)
    return {k: v for k, v in m.items() if v is not None}


def series(n: int = 32, uid: str = "1.2.3", **over: Any):
    return summarize(uid, [meta(**over) for _ in range(n)], study_uid="1.2")


RULES = SelectionConfig()


def test_a_plain_head_ct_is_selected() -> None:
    d = evaluate(series(), RULES)
    assert d.selected and d.reason is None


@pytest.mark.parametrize("over, n, reason", [
    ({"Modality": "MR"}, 32, "modality: MR"),
    ({"Modality": None}, 32, "modality: missing"),
    ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, 3, "image_type: LOCALIZER"),
    ({"ImageType": ["DERIVED", "SECONDARY", "AXIAL"]}, 32, "image_type: DERIVED"),
    ({"ImageType": ["ORIGINAL", "PRIMARY", "REFORMATTED"]}, 32, "image_type: REFORMATTED"),
    ({"ImageType": ["ORIGINAL"]}, 32, "lacks PRIMARY"),
    ({"ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
      "ImageOrientationPatient": [1, 0, 0, 0, 0, -1]}, 32, "not axial"),
    ({}, 5, "slices: 5 < 16"),
    ({"SliceThickness": 12.0}, 32, "slice_thickness: 12 mm outside 0.4..10"),
    ({"SliceThickness": None}, 32, "slice_thickness: missing"),
    ({"BodyPartExamined": "CHEST", "StudyDescription": "CT THORAX", "SeriesDescription": "Lung",
      "ProtocolName": "CHEST"}, 32, "body_part: no head pattern"),
    ({"ContrastBolusAgent": "Iohexol"}, 32, "contrast: ContrastBolusAgent 'Iohexol'"),
])
def test_skips_have_reasons(over: dict, n: int, reason: str) -> None:
    d = evaluate(series(n, **over), RULES)
    assert not d.selected
    assert reason in d.reason


def test_head_patterns_match_any_field_case_insensitively() -> None:
    s = series(BodyPartExamined=None, StudyDescription="CCT Schädel nativ",
               SeriesDescription="x", ProtocolName="y")
    assert evaluate(s, RULES).selected
    s = series(BodyPartExamined="", StudyDescription="", SeriesDescription="BRAIN 2.5",
               ProtocolName="")
    assert evaluate(s, RULES).selected


def test_orientation_decides_when_image_type_has_no_third_value() -> None:
    assert evaluate(series(ImageType=["ORIGINAL", "PRIMARY"]), RULES).selected
    tilted = [1, 0, 0, 0, 0.94, -0.34]  # ~20 degrees gantry tilt
    assert evaluate(series(ImageType=["ORIGINAL", "PRIMARY"],
                           ImageOrientationPatient=tilted), RULES).selected


def test_rules_are_configurable() -> None:
    rules = SelectionConfig(min_slices=4, require_head=False, exclude_contrast=False)
    assert evaluate(series(5, BodyPartExamined="CHEST", StudyDescription="", SeriesDescription="",
                           ProtocolName="", ContrastBolusAgent="Iomeron"), rules).selected


def test_enhanced_ct_counts_frames() -> None:
    s = summarize("1.9", [meta(NumberOfFrames=40)])
    assert s.slices == 40 and evaluate(s, RULES).selected


def test_preference_thinnest_soft_tissue() -> None:
    thick = series(uid="1.1", SliceThickness=5.0, ConvolutionKernel="H30s")
    thin_soft = series(64, uid="1.2", SliceThickness=1.0, ConvolutionKernel="H30s")
    thin_bone = series(64, uid="1.3", SliceThickness=0.6, ConvolutionKernel="H70h")
    chosen, skipped = choose_preferred([thick, thin_soft, thin_bone], RULES)
    assert [c.series_uid for c in chosen] == ["1.2"]
    assert set(skipped) == {"1.1", "1.3"}
    assert skipped["1.3"].startswith("preference: series 1.2 preferred")
    assert "not soft tissue" in skipped["1.3"]
    assert "5 mm" in skipped["1.1"]


def test_preference_without_soft_kernels_takes_thinnest_and_all_keeps_all() -> None:
    a = series(uid="1.1", SliceThickness=5.0, ConvolutionKernel="XYZ")
    b = series(uid="1.2", SliceThickness=2.0, ConvolutionKernel="XYZ")
    chosen, skipped = choose_preferred([a, b], RULES)
    assert [c.series_uid for c in chosen] == ["1.2"] and list(skipped) == ["1.1"]
    chosen, skipped = choose_preferred([a, b], SelectionConfig(prefer="all"))
    assert len(chosen) == 2 and skipped == {}
