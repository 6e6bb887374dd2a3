"""Series -> volume assembly on real DICOM files written with molre.data.dicomio."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLosslessSV1, JPEGLSLossless

from common.errors import SeriesError
from molre.data.dicomio import (
    LOSSLESS_SYNTAXES,
    compress_file,
    new_uid,
    write_ct_series,
    write_enhanced_ct,
)
from molre.data.volume import read_series

SPACING = (5.0, 0.5, 0.75)


def _vol(n: int = 8, rows: int = 16, cols: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 2500, (n, rows, cols)).astype(np.float32)


def _edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.save_as(path)


def test_shuffled_names_and_misleading_instance_numbers(tmp_path: Path) -> None:
    vol = _vol()
    paths = write_ct_series(
        tmp_path / "s",
        vol,
        spacing=SPACING,
        origin=(-4, -6, 10),
        shuffle_names=True,
        instance_numbers=[3, 1, 8, 2, 7, 5, 4, 6],
    )
    # directory order is not slice order
    assert sorted(paths) != paths
    v = read_series(tmp_path / "s")
    assert v.hu.dtype == np.float32 and np.array_equal(v.hu, vol)
    assert v.spacing == SPACING and np.allclose(v.origin, (-4, -6, 10))
    assert np.allclose(v.direction, np.eye(3)) and v.warnings == []
    assert v.sop_instance_uids == [pydicom.dcmread(p).SOPInstanceUID for p in paths]
    # the affine maps the last voxel to its patient position
    assert np.allclose(v.world((7, 15, 19)), (-4 + 19 * 0.75, -6 + 15 * 0.5, 10 + 35))
    # the file list form gives the same volume
    assert np.array_equal(read_series(list(reversed(paths))).hu, vol)


def test_reversed_acquisition_is_sorted_along_the_normal(tmp_path: Path) -> None:
    vol = _vol()
    down = np.diag([1.0, 1.0, -1.0])  # slices written head -> feet
    write_ct_series(tmp_path / "s", vol, spacing=SPACING, origin=(0, 0, 100), direction=down)
    v = read_series(tmp_path / "s")
    assert np.array_equal(v.hu, vol[::-1])
    assert np.allclose(v.origin, (0, 0, 100 - 7 * 5)) and np.allclose(v.direction[2], (0, 0, 1))


def test_per_slice_rescale_is_applied(tmp_path: Path) -> None:
    vol = _vol() // 4 * 4  # representable with slope 2 and 4
    rescale = [
        (1, -1024),
        (2, -2048),
        (1, 0),
        (4, -4096),
        (1, -1000),
        (1, -1024),
        (2, -1024),
        (1, -1024),
    ]
    paths = write_ct_series(tmp_path / "s", vol, spacing=SPACING, rescale=rescale)
    assert pydicom.dcmread(paths[2]).PixelRepresentation == 1  # negative stored values -> signed
    assert float(pydicom.dcmread(paths[3]).RescaleSlope) == 4
    assert np.array_equal(read_series(tmp_path / "s").hu, vol)


def test_gap_is_interpolated_with_warning_and_large_gaps_are_refused(tmp_path: Path) -> None:
    vol = _vol(n=12)
    paths = write_ct_series(tmp_path / "s", vol, spacing=SPACING)
    paths[5].unlink()
    v = read_series(tmp_path / "s")
    assert v.hu.shape == vol.shape and len(v.sop_instance_uids) == 11
    assert np.allclose(v.hu[5], (vol[4] + vol[6]) / 2)
    assert np.array_equal(v.hu[6], vol[6])
    assert any("1 missing slice" in w for w in v.warnings)
    paths[6].unlink()
    paths[7].unlink()  # 3 of 12 missing = 25 %
    with pytest.raises(SeriesError, match="3 missing slice"):
        read_series(tmp_path / "s")
    assert read_series(tmp_path / "s", max_missing_fraction=0.3).hu.shape == vol.shape


def test_mixed_orientation_size_and_spacing_name_the_tag(tmp_path: Path) -> None:
    vol = _vol(n=5)
    paths = write_ct_series(tmp_path / "o", vol, spacing=SPACING)
    _edit(paths[2], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with pytest.raises(SeriesError, match=r"inconsistent ImageOrientationPatient \(0020,0037\)"):
        read_series(tmp_path / "o")

    paths = write_ct_series(tmp_path / "p", vol, spacing=SPACING)
    _edit(paths[1], PixelSpacing=[0.9, 0.9])
    with pytest.raises(SeriesError, match=r"inconsistent PixelSpacing"):
        read_series(tmp_path / "p")
    for p in paths:
        _edit(p, PixelSpacing=[0, 0])
    with pytest.raises(SeriesError, match=r"PixelSpacing \(0028,0030\) \[0.0, 0.0\] must be"):
        read_series(tmp_path / "p")

    study, series = new_uid(), new_uid()
    write_ct_series(tmp_path / "r", vol, spacing=SPACING, study_uid=study, series_uid=series)
    write_ct_series(
        tmp_path / "r" / "extra",
        _vol(n=1, rows=24),
        spacing=SPACING,
        origin=(0, 0, 50),
        study_uid=study,
        series_uid=series,
    )
    with pytest.raises(SeriesError, match=r"inconsistent Rows/Columns.*16x20 x5; 24x20 x1"):
        read_series(tmp_path / "r")


def test_duplicate_positions_keep_one_and_say_whether_pixels_differ(tmp_path: Path) -> None:
    vol = _vol(n=6)
    paths = write_ct_series(tmp_path / "s", vol, spacing=SPACING)
    same = pydicom.dcmread(paths[2])
    same.SOPInstanceUID = same.file_meta.MediaStorageSOPInstanceUID = new_uid()
    same.InstanceNumber = 99
    same.save_as(tmp_path / "s" / "dup_same.dcm")
    other = pydicom.dcmread(paths[4])
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = new_uid()
    other.InstanceNumber = 98
    other.RescaleIntercept = "-1000"  # same position, different HU
    other.save_as(tmp_path / "s" / "dup_other.dcm")
    v = read_series(tmp_path / "s")
    assert np.array_equal(v.hu, vol) and len(v.sop_instance_uids) == 6
    (msg,) = [w for w in v.warnings if "duplicate" in w]
    assert "2 position(s)" in msg and "1 with identical" in msg and "1 with different" in msg


def test_gantry_tilt_is_resampled_or_refused(tmp_path: Path) -> None:
    n, rows, cols, theta = 10, 40, 16, np.radians(15)
    direction = np.array([[1, 0, 0], [0, 1, 0], [0, np.sin(theta), np.cos(theta)]])
    sy, step = 1.0, 3.0
    vol = np.full((n, rows, cols), -1000, np.float32)
    # a marker fixed in patient space at y = 10 mm: in the tilted slices it drifts by row
    rows_hit = []
    for k in range(n):
        j = int(round((10 - k * step * np.sin(theta)) / sy)) + 15
        rows_hit.append(j)
        vol[k, j, 8] = 1000
    assert len(set(rows_hit)) > 5
    write_ct_series(
        tmp_path / "t",
        vol,
        spacing=(step, sy, 1.0),
        origin=(0, -15, 0),
        direction=direction,
        GantryDetectorTilt="15",
    )
    v = read_series(tmp_path / "t")
    assert any("gantry tilt about 15.0 degrees" in w for w in v.warnings)
    assert v.spacing[0] == pytest.approx(step * np.cos(theta), rel=1e-4)
    assert np.allclose(v.direction, np.eye(3), atol=1e-6)
    peak_rows = v.hu[:, :, 8].argmax(axis=1)
    assert np.all(np.abs(peak_rows - 25) <= 1)  # y = 10 mm -> row 25 in every slice
    with pytest.raises(SeriesError, match="gantry tilt.*refused by configuration"):
        read_series(tmp_path / "t", tilt="refuse")
    with pytest.raises(SeriesError, match="more than 10 degrees"):
        read_series(tmp_path / "t", max_tilt_deg=10)


def test_enhanced_ct_multiframe_with_shuffled_frames_and_per_frame_rescale(tmp_path: Path) -> None:
    vol = _vol(n=6) // 2 * 2
    rescale = [(1, -1024), (2, -2048), (1, -1000), (1, -1024), (1, -1024), (2, -1024)]
    path = write_enhanced_ct(
        tmp_path / "e" / "enh.dcm",
        vol,
        spacing=SPACING,
        origin=(5, 5, 5),
        frame_order=[3, 1, 0, 2, 5, 4],
        rescale=rescale,
    )
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2.1" and int(ds.NumberOfFrames) == 6
    assert "PixelValueTransformationSequence" in ds.PerFrameFunctionalGroupsSequence[0]
    v = read_series(tmp_path / "e")
    assert np.array_equal(v.hu, vol) and np.allclose(v.origin, (5, 5, 5))
    assert v.spacing == SPACING and v.sop_instance_uids == [ds.SOPInstanceUID]
    jls = write_enhanced_ct(
        tmp_path / "j" / "enh.dcm", vol, spacing=SPACING, transfer_syntax=JPEGLSLossless
    )
    assert pydicom.dcmread(jls).file_meta.TransferSyntaxUID == JPEGLSLossless
    assert np.array_equal(read_series(jls).hu, vol)


@pytest.mark.parametrize("syntax", LOSSLESS_SYNTAXES, ids=["rle", "jpegls", "j2k", "jpeg-sv1"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_compressed_syntaxes_decode_to_the_same_hu(tmp_path: Path, syntax, signed: bool) -> None:
    if syntax == JPEGLosslessSV1 and shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk dcmcjpeg not installed (no pydicom JPEG Lossless encoder)")
    vol = _vol(n=3, rows=32, cols=32, seed=3)
    rescale = (1, 0) if signed else (1, -1024)
    plain = write_ct_series(tmp_path / "plain", vol, spacing=SPACING, rescale=rescale)
    for p in plain:
        out = compress_file(p, tmp_path / "comp" / p.name, syntax)
        assert pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    assert pydicom.dcmread(plain[0]).PixelRepresentation == int(signed)
    reference = read_series(tmp_path / "plain").hu
    decoded = read_series(tmp_path / "comp").hu
    assert np.array_equal(reference, vol) and np.array_equal(decoded, reference)


def test_non_image_files_localizers_and_other_classes_are_skipped(tmp_path: Path) -> None:
    vol = _vol(n=4)
    study, series = new_uid(), new_uid()
    paths = write_ct_series(
        tmp_path / "s", vol, spacing=SPACING, study_uid=study, series_uid=series
    )
    (tmp_path / "s" / "README.txt").write_text("not dicom")
    sr = pydicom.dcmread(paths[0], stop_before_pixels=True)
    for tag in ("Rows", "Columns", "PixelRepresentation", "BitsAllocated"):
        del sr[tag]
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = new_uid()
    sr.save_as(tmp_path / "s" / "sr.dcm")
    scout = write_ct_series(
        tmp_path / "s" / "scout",
        _vol(n=1, rows=30),
        spacing=SPACING,
        study_uid=study,
        series_uid=series,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
    )
    sc = pydicom.dcmread(scout[0])
    sc.SOPClassUID = sc.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    sc.SOPInstanceUID = sc.file_meta.MediaStorageSOPInstanceUID = new_uid()
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.save_as(tmp_path / "s" / "dose_screen.dcm")
    v = read_series(tmp_path / "s")
    assert np.array_equal(v.hu, vol)
    text = " | ".join(v.warnings)
    for needle in (
        "not a readable DICOM file",
        "non-image object",
        "localizer",
        "another SOP class (Secondary Capture",
    ):
        assert needle in text


def test_mixed_series_mixed_classes_and_too_few_slices(tmp_path: Path) -> None:
    vol = _vol(n=4)
    a = write_ct_series(tmp_path / "m" / "a", vol, spacing=SPACING)
    write_ct_series(tmp_path / "m" / "b", vol, spacing=SPACING)
    with pytest.raises(SeriesError, match="belong to 2 series.*SeriesInstanceUID"):
        read_series(tmp_path / "m")
    series = pydicom.dcmread(a[0]).SeriesInstanceUID
    study = pydicom.dcmread(a[0]).StudyInstanceUID
    write_enhanced_ct(
        tmp_path / "m" / "a" / "enh.dcm",
        vol,
        spacing=SPACING,
        study_uid=study,
        series_uid=series,
        origin=(0, 0, 100),
    )
    with pytest.raises(SeriesError, match="mixes single-frame CT Image Storage and Enhanced CT"):
        read_series(tmp_path / "m" / "a")
    two = write_ct_series(tmp_path / "two", vol[:2], spacing=SPACING)
    with pytest.raises(SeriesError, match="has 2 CT slice.*at least 3"):
        read_series(tmp_path / "two")
    assert read_series(two, min_slices=2).hu.shape == (2, 16, 20)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.bin").write_bytes(b"\0" * 300)
    with pytest.raises(SeriesError, match="no CT image objects"):
        read_series(tmp_path / "junk")
    with pytest.raises(SeriesError, match="does not exist"):
        read_series(tmp_path / "nowhere")


def test_missing_position_names_the_tag(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "s", _vol(n=4), spacing=SPACING)
    ds = pydicom.dcmread(paths[1])
    del ds.ImagePositionPatient
    ds.save_as(paths[1])
    with pytest.raises(SeriesError, match=r"ImagePositionPatient \(0020,0032\) is missing"):
        read_series(tmp_path / "s")


def test_metatensor_affine_is_ras_of_the_lps_affine(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "s", _vol(n=4), spacing=SPACING, origin=(10, 20, 30))
    v = read_series(tmp_path / "s")
    mt = v.to_metatensor()
    assert tuple(mt.shape) == (1, 4, 16, 20) and mt.meta["space"] == "RAS"
    ras = mt.affine.numpy()
    assert np.allclose(ras, np.diag([-1, -1, 1, 1]) @ v.affine())
    assert np.allclose(ras[:3, 3], (-10, -20, 30))


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools dciodvfy not installed")
def test_written_objects_pass_dciodvfy(tmp_path: Path) -> None:
    import subprocess

    vol = _vol(n=3, rows=32, cols=32)
    single = write_ct_series(tmp_path / "s", vol, spacing=SPACING)[0]
    enhanced = write_enhanced_ct(
        tmp_path / "e.dcm", vol, spacing=SPACING, rescale=[(1, -1024), (2, -2048), (1, -1024)]
    )
    rle = compress_file(single, tmp_path / "rle.dcm", LOSSLESS_SYNTAXES[0])
    for path in (single, enhanced, rle):
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        report = res.stdout + res.stderr
        assert "Error" not in report, f"{path.name}: {report}"


def test_legacy_files_without_preamble_are_read(tmp_path: Path) -> None:
    vol = _vol(n=4)
    paths = write_ct_series(tmp_path / "s", vol, spacing=SPACING)
    for p in paths[:2]:  # rewrite as raw implicit-VR datasets: no preamble, no file meta
        ds = pydicom.dcmread(p)
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(p, ds, implicit_vr=True, little_endian=True)
        assert p.read_bytes()[128:132] != b"DICM"
    v = read_series(tmp_path / "s")
    assert np.array_equal(v.hu, vol)
    assert any("2 file(s) without DICOM preamble" in w for w in v.warnings)


def test_transcoding_chain_and_direct_compressed_writes(tmp_path: Path) -> None:
    from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian, RLELossless

    vol = _vol(n=3, rows=8, cols=8, seed=5)
    plain = write_ct_series(tmp_path / "p", vol, spacing=SPACING)
    chain = [("rle", RLELossless), ("implicit", ImplicitVRLittleEndian), ("jls", JPEGLSLossless)]
    for p in plain:
        src = p
        for name, ts in chain:
            src = compress_file(src, tmp_path / name / p.name, ts)
    for name, ts in chain:
        first = sorted((tmp_path / name).iterdir())[0]
        assert pydicom.dcmread(first).file_meta.TransferSyntaxUID == ts
        assert np.array_equal(read_series(tmp_path / name).hu, vol), name
    write_ct_series(tmp_path / "direct", vol, spacing=SPACING, transfer_syntax=RLELossless)
    assert np.array_equal(read_series(tmp_path / "direct").hu, vol)
    with pytest.raises(ValueError, match="Big Endian is retired"):
        write_ct_series(tmp_path / "be", vol, spacing=SPACING, transfer_syntax=ExplicitVRBigEndian)


def test_broken_pixel_data_is_a_series_error(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "s", _vol(n=4), spacing=SPACING)
    ds = pydicom.dcmread(paths[2])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[2])
    with pytest.raises(SeriesError, match=r"cannot decode pixel data"):
        read_series(tmp_path / "s")


def test_positions_keep_sub_millimetre_precision_far_from_the_origin(tmp_path: Path) -> None:
    # thin slices far from the isocentre: DS values must keep every digit the 16 chars allow
    spacing = (0.625, 0.48828125, 0.48828125)
    write_ct_series(
        tmp_path / "s", _vol(n=6), spacing=spacing, origin=(-125.123456, -3e-7, 1234.56789)
    )
    v = read_series(tmp_path / "s")
    assert v.warnings == [] and v.spacing == pytest.approx(spacing, abs=1e-9)
    assert np.allclose(v.origin, (-125.123456, 0, 1234.56789), atol=1e-6)


# -- real-scanner geometry and input sanity (issue 12) -------------------------------------------
def test_ge_stepped_tilted_head_is_resampled_not_refused(tmp_path: Path) -> None:
    """GE two-part head: 14 x 4 mm then 14 x 7 mm, +18.5 degrees tilt, -1500 padding. The
    series is complete: read onto the finest (4 mm) grid, thickness 4 mm (from SliceThickness),
    both corrections listed."""
    from tests.scanner_series import PADDING_HU, write_ge_stepped_head

    write_ge_stepped_head(tmp_path / "ge")
    v = read_series(tmp_path / "ge")
    cos = np.cos(np.radians(18.5))
    assert v.spacing[0] == pytest.approx(4.0 * cos, rel=1e-4)
    extent = (14 * 4.0 + 13 * 7.0) * cos
    assert v.shape[0] == round(extent / v.spacing[0]) + 1
    assert v.meta["slice_thickness"] == 4.0 and v.meta["slice_thickness_values"] == [4.0, 7.0]
    kinds = [c["kind"] for c in v.meta["corrections"]]
    assert kinds == ["slice_spacing_regularised", "gantry_tilt_resampled"]
    assert not any("missing" in w for w in v.warnings)
    assert "gantry tilt about 18.5 degrees" in v.meta["corrections"][1]["description"]
    assert v.hu.min() == PADDING_HU and 20 < float(np.median(v.hu[v.hu > 0])) < 1200
    assert len(v.sop_instance_uids) == 28


def test_dropped_slices_are_still_gaps_in_stepped_and_uniform_series(tmp_path: Path) -> None:
    from tests.scanner_series import write_ge_stepped_head

    s = write_ge_stepped_head(tmp_path / "ge")
    s.paths[20].unlink()  # one slice of the 7 mm block
    s.paths[5].unlink()  # one slice of the 4 mm block
    v = read_series(tmp_path / "ge")
    (gap,) = [w for w in v.warnings if "missing slice" in w]
    assert gap.startswith("2 missing slice(s)")
    assert "missing_slices_interpolated" in [c["kind"] for c in v.meta["corrections"]]
    # a 5 mm series with every other slice gone in its middle (thickness still 5 mm) is not a
    # 5/10 mm protocol: the slices are missing, and too many to read
    vol = _vol(n=30)
    paths = write_ct_series(tmp_path / "u", vol, spacing=SPACING)
    for p in paths[9:20:2]:
        p.unlink()
    with pytest.raises(SeriesError, match="6 missing slice"):
        read_series(tmp_path / "u")
    # ... while a real 5 mm / 10 mm protocol (10 mm thick slices) is read
    proto = tmp_path / "p"
    study, series = new_uid(), new_uid()
    write_ct_series(proto / "a", _vol(n=8), spacing=SPACING, study_uid=study, series_uid=series)
    write_ct_series(
        proto / "b",
        _vol(n=8, seed=1),
        spacing=(10.0, 0.5, 0.75),
        origin=(0, 0, 45.0),
        study_uid=study,
        series_uid=series,
    )
    v = read_series(proto)
    assert v.spacing[0] == 5.0 and not any("missing" in w for w in v.warnings)
    assert v.meta["slice_thickness_values"] == [5.0, 10.0]


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"RescaleSlope": "0"}, r"RescaleSlope \(0028,1053\) is 0"),
        ({"RescaleSlope": "NaN"}, r"RescaleSlope \(0028,1053\) is nan \(not a finite number\)"),
        ({"RescaleIntercept": "inf"}, r"RescaleIntercept \(0028,1052\) is inf"),
        (
            {"PixelSpacing": ["60", "60"]},
            r"PixelSpacing \(0028,0030\) \[60.0, 60.0\] mm is outside",
        ),
        ({"PixelSpacing": ["150", "150"]}, r"PixelSpacing \(0028,0030\) \[150.0, 150.0\] mm"),
    ],
)
def test_insane_headers_are_refused_naming_the_tag(tmp_path: Path, changes, match) -> None:
    paths = write_ct_series(tmp_path / "s", _vol(n=6), spacing=SPACING)
    for p in paths:
        _edit(p, **changes)
    with pytest.raises(SeriesError, match=match):
        read_series(tmp_path / "s")


def test_absurd_slice_spacing_grid_size_and_constant_volumes_are_refused(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "far", _vol(n=6), spacing=(60.0, 0.5, 0.75))
    with pytest.raises(SeriesError, match=r"slice spacing 60 mm .*ImagePositionPatient"):
        read_series(tmp_path / "far")
    write_ct_series(tmp_path / "s", _vol(n=6), spacing=SPACING)
    with pytest.raises(
        SeriesError,
        match=r"6 x 16 x 20 = 1,920 voxels, more than the limit "
        r"of 1,000",
    ):
        read_series(tmp_path / "s", max_voxels=1000)
    assert read_series(tmp_path / "s", max_voxels=1920).shape == (6, 16, 20)
    write_ct_series(tmp_path / "c", np.full((6, 16, 20), 40.0, np.float32), spacing=SPACING)
    with pytest.raises(SeriesError, match="every voxel is 40 .*constant volume"):
        read_series(tmp_path / "c")
