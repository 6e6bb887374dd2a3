"""Selection rules: which complete series are read, and the reason for every skip."""

from __future__ import annotations

from typing import Any

import pytest

from node.config import SelectionConfig
from node.selection import choose_preferred, evaluate, summarize

AXIAL_IOP = [1, 0, 0, 0, 1, 0]


def meta(**over: Any) -> dict[str, Any]:
    m = {
        "Modality": "CT",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "BodyPartExamined": "HEAD",
        "StudyDescription": "CT HEAD WO",
        "SeriesDescription": "Head 5mm",
        "ProtocolName": "HEAD ROUTINE",
        "SliceThickness": 5.0,
        "ConvolutionKernel": "H30s",
        "ImageOrientationPatient": AXIAL_IOP,
    }
    m.update(over)
    return {k: v for k, v in m.items() if v is not None}


def series(n: int = 32, uid: str = "1.2.3", **over: Any):
    return summarize(uid, [meta(**over) for _ in range(n)], study_uid="1.2")


RULES = SelectionConfig()


def test_a_plain_head_ct_is_selected() -> None:
    d = evaluate(series(), RULES)
    assert d.selected and d.reason is None


@pytest.mark.parametrize(
    "over, n, reason",
    [
        ({"Modality": "MR"}, 32, "modality: MR"),
        ({"Modality": None}, 32, "modality: missing"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, 3, "image_type: LOCALIZER"),
        ({"ImageType": ["DERIVED", "SECONDARY", "AXIAL"]}, 32, "image_type: DERIVED"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "REFORMATTED"]}, 32, "image_type: REFORMATTED"),
        ({"ImageType": ["ORIGINAL"]}, 32, "lacks PRIMARY"),
        (
            {
                "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
                "ImageOrientationPatient": [1, 0, 0, 0, 0, -1],
            },
            32,
            "not axial",
        ),
        ({}, 5, "slices: 5 < 16"),
        (
            {"SliceThickness": 12.0},
            32,
            "slice_thickness: 12 mm slices, thicker than the 10 mm limit (selection.slice_thickness_max_mm)",
        ),
        (
            {"SliceThickness": 0.2},
            32,
            "slice_thickness: 0.2 mm slices, thinner than the 0.4 mm minimum",
        ),
        ({"RescaleSlope": 0.0}, 32, "rescale: RescaleSlope (0028,1053) is 0"),
        (
            {"RescaleSlope": "nan"},
            32,
            "rescale: RescaleSlope (0028,1053) is nan (not a finite number)",
        ),
        ({"RescaleIntercept": "inf"}, 32, "rescale: RescaleIntercept (0028,1052) is inf"),
        (
            {"PixelSpacing": [60.0, 60.0]},
            32,
            "pixel_spacing: PixelSpacing (0028,0030) 60.0\\60.0 mm is outside 0.01..10 mm",
        ),
        ({"PixelSpacing": [0.0, 0.0]}, 32, "pixel_spacing: PixelSpacing (0028,0030) 0.0\\0.0 mm"),
        (
            {"PixelSpacing": [5.0, 5.0], "Rows": 512, "Columns": 512},
            32,
            "pixel_spacing: Rows/Columns x PixelSpacing (0028,0030) give a 2560 mm field of view",
        ),
        ({"SliceThickness": None}, 32, "slice_thickness: missing"),
        (
            {
                "BodyPartExamined": "CHEST",
                "StudyDescription": "CT THORAX",
                "SeriesDescription": "Lung",
                "ProtocolName": "CHEST",
            },
            32,
            "body_part: no head pattern",
        ),
        ({"ContrastBolusAgent": "Iohexol"}, 32, "contrast: ContrastBolusAgent 'Iohexol'"),
    ],
)
def test_skips_have_reasons(over: dict, n: int, reason: str) -> None:
    d = evaluate(series(n, **over), RULES)
    assert not d.selected
    assert reason in d.reason


def test_head_patterns_match_any_field_case_insensitively() -> None:
    s = series(
        BodyPartExamined=None,
        StudyDescription="CCT Schädel nativ",
        SeriesDescription="x",
        ProtocolName="y",
    )
    assert evaluate(s, RULES).selected
    s = series(
        BodyPartExamined="", StudyDescription="", SeriesDescription="BRAIN 2.5", ProtocolName=""
    )
    assert evaluate(s, RULES).selected


def test_orientation_decides_when_image_type_has_no_third_value() -> None:
    assert evaluate(series(ImageType=["ORIGINAL", "PRIMARY"]), RULES).selected
    tilted = [1, 0, 0, 0, 0.94, -0.34]  # ~20 degrees gantry tilt
    assert evaluate(
        series(ImageType=["ORIGINAL", "PRIMARY"], ImageOrientationPatient=tilted), RULES
    ).selected


def test_rules_are_configurable() -> None:
    rules = SelectionConfig(min_slices=4, require_head=False, exclude_contrast=False)
    assert evaluate(
        series(
            5,
            BodyPartExamined="CHEST",
            StudyDescription="",
            SeriesDescription="",
            ProtocolName="",
            ContrastBolusAgent="Iomeron",
        ),
        rules,
    ).selected


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


def test_preference_reasons_name_the_rule_that_decided() -> None:
    best = series(64, uid="1.2", SliceThickness=1.0)
    thicker = series(64, uid="1.5", SliceThickness=5.0)
    fewer = series(32, uid="1.1", SliceThickness=1.0)
    tie = series(64, uid="1.9", SliceThickness=1.0)
    chosen, skipped = choose_preferred([thicker, fewer, tie, best], RULES)
    assert [c.series_uid for c in chosen] == ["1.2"]
    assert skipped["1.5"].endswith("(5 mm slices, thicker than its 1 mm)")
    assert skipped["1.1"].endswith("(same 1 mm slices, fewer slices (32 < 64))")
    assert skipped["1.9"].endswith("tie broken by the lower Series Instance UID)")


def test_stepped_protocol_thickness_is_a_real_slice_thickness() -> None:
    """14 slices at 4 mm + 14 at 7 mm: the series is 4 mm (ties go to the thinner), never the
    5.5 mm median no slice has; a majority decides otherwise."""
    stepped = summarize("1.7", [meta(SliceThickness=4.0)] * 14 + [meta(SliceThickness=7.0)] * 14)
    assert stepped.slice_thickness == 4.0 and stepped.slice_thickness_values == [4.0, 7.0]
    assert evaluate(stepped, RULES).selected
    mostly_7 = summarize("1.8", [meta(SliceThickness=4.0)] * 10 + [meta(SliceThickness=7.0)] * 18)
    assert mostly_7.slice_thickness == 7.0
