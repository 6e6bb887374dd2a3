"""Manifest CSV round-trip and validation; NIfTI volumes through read_volume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from common.errors import MolreError
from molre.catalog import load_catalog
from molre.data.dicomio import write_ct_series
from molre.data.manifest import ManifestRow, read_manifest, read_volume, write_manifest

CAT = load_catalog()


def _header(*keys: str) -> str:
    return ",".join(["path", "patient_id", "split", *keys])


def test_round_trip_with_blank_labels_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "data" / "a").mkdir(parents=True)
    outside = tmp_path / "elsewhere" / "b"
    outside.mkdir(parents=True)
    labels = np.full(len(CAT), np.nan, np.float32)
    labels[CAT.index("subdural_hemorrhage")] = 1
    labels[CAT.index("skull_fracture")] = 0
    rows = [
        ManifestRow(tmp_path / "data" / "a", "P1", "train", labels),
        {
            "path": outside,
            "patient_id": "P2",
            "split": "test",
            "labels": {"hydrocephalus": 1, "midline_shift": 0, "acute_infarct": None},
        },
    ]
    m = write_manifest(tmp_path / "data" / "manifest.csv", rows, CAT)
    lines = m.read_text().splitlines()
    assert lines[0] == _header(*CAT.keys)
    assert lines[1].startswith("a,P1,train,")  # inside the folder -> relative
    assert lines[2].startswith(f"{outside},P2,test,")
    back = read_manifest(m, CAT)
    assert [r.path for r in back] == [tmp_path / "data" / "a", outside]
    assert [(r.patient_id, r.split) for r in back] == [("P1", "train"), ("P2", "test")]
    np.testing.assert_array_equal(back[0].labels, labels)
    d = back[1].label_dict(CAT)
    assert d["hydrocephalus"] == 1.0 and d["midline_shift"] == 0.0
    assert math.isnan(d["acute_infarct"]) and math.isnan(d["subdural_hemorrhage"])
    assert int(np.isnan(back[1].labels).sum()) == len(CAT) - 2
    assert back[0].labels.dtype == np.float32


def test_partial_columns_and_dicom_volume(tmp_path: Path) -> None:
    vol = np.random.default_rng(1).integers(-1000, 1000, (4, 16, 16)).astype(np.float32)
    write_ct_series(tmp_path / "s1", vol, spacing=(5, 1, 1))
    (tmp_path / "m.csv").write_text(
        f"{_header('hydrocephalus', 'epidural_hematoma')}\ns1,P9,VAL,1,\n\n"
    )
    (row,) = read_manifest(tmp_path / "m.csv", CAT)
    assert row.split == "val" and row.labels[CAT.index("hydrocephalus")] == 1
    assert np.isnan(row.labels[CAT.index("epidural_hematoma")])
    assert np.array_equal(row.volume().hu, vol)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (f"{_header('subdural_bleed')}\nx,P,train,1\n", "line 1: column(s) 'subdural_bleed'"),
        (
            f"{_header('hydrocephalus')}\nx,P,train,yes\n",
            "line 2, column hydrocephalus: label 'yes'",
        ),
        (f"{_header('hydrocephalus')}\nx,P,train,1\nx,P,training,0\n", "line 3, column split"),
        ("path,split,hydrocephalus\nx,train,1\n", "missing column(s) patient_id"),
        (f"{_header('hydrocephalus')}\nx,P,train\n", "line 2: 3 values for 4 columns"),
        (f"{_header('hydrocephalus')}\nx,,train,1\n", "line 2, column patient_id: empty"),
        (
            f"{_header('hydrocephalus')}\nx,P,train,1\ny,Q,val,0\nz,P,test,1\n",
            "line 4: the patient of line 2 (train) appears again in test",
        ),
        (f"{_header('hydrocephalus', 'hydrocephalus')}\nx,P,train,1,1\n", "duplicate column"),
    ],
)
def test_validation_errors_name_line_and_column(tmp_path: Path, text: str, needle: str) -> None:
    m = tmp_path / "bad.csv"
    m.write_text(text)
    with pytest.raises(MolreError) as err:
        read_manifest(m, CAT, check_paths=False)
    assert needle in str(err.value) and str(m) in str(err.value)


def test_missing_path_and_overlap_override(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text(f"{_header('hydrocephalus')}\nnot_there,P,train,1\n")
    with pytest.raises(MolreError, match="line 2, column path: not_there does not exist"):
        read_manifest(m, CAT)
    m.write_text(f"{_header('hydrocephalus')}\na,P,train,1\nb,P,test,0\n")
    rows = read_manifest(m, CAT, check_paths=False, allow_patient_overlap=True)
    assert [r.split for r in rows] == ["train", "test"]
    with pytest.raises(MolreError, match="split 'dev'"):
        write_manifest(
            tmp_path / "w.csv",
            [{"path": "a", "patient_id": "P", "split": "dev", "labels": {}}],
            CAT,
        )
    with pytest.raises(MolreError, match="label 0.5"):
        write_manifest(
            tmp_path / "w.csv",
            [{"path": "a", "patient_id": "P", "split": "val", "labels": {"hydrocephalus": 0.5}}],
            CAT,
        )


def test_nifti_volume_has_the_same_geometry_as_dicom(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    hu = np.random.default_rng(2).integers(-1000, 1500, (5, 12, 14)).astype(np.float32)
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # unusual axes
    write_ct_series(
        tmp_path / "dcm", hu, spacing=(3, 0.8, 0.6), origin=(7, -5, 40), direction=direction
    )
    dcm = read_volume(tmp_path / "dcm")
    # NIfTI: array (i, j, k) = (x, y, z), affine in RAS
    lps = np.eye(4)
    lps[:3, 0] = dcm.direction[0] * dcm.spacing[2]
    lps[:3, 1] = dcm.direction[1] * dcm.spacing[1]
    lps[:3, 2] = dcm.direction[2] * dcm.spacing[0]
    lps[:3, 3] = dcm.origin
    img = nib.Nifti1Image(dcm.hu.transpose(2, 1, 0).copy(), np.diag([-1, -1, 1, 1]) @ lps)
    nib.save(img, tmp_path / "vol.nii.gz")
    nii = read_volume(tmp_path / "vol.nii.gz")
    assert np.array_equal(nii.hu, dcm.hu)
    assert np.allclose(nii.spacing, dcm.spacing) and np.allclose(nii.origin, dcm.origin)
    assert np.allclose(nii.direction, dcm.direction) and np.allclose(nii.affine(), dcm.affine())
    # rows along y and columns along x make the normal point to the feet: written order kept
    assert np.array_equal(dcm.hu, hu) and np.allclose(dcm.direction, direction)
