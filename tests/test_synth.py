"""Synthetic head-CT phantoms: DICOM validity, planted-finding evidence, manifest, determinism, CLI.

Evidence tests render the same seed with and without one finding: the phantom splits its
generator into fixed sub-streams, so the head, pose and noise are identical and any difference
is the planted finding. Each test then checks the *image* evidence a radiologist would look for
(density, place, shape), not the phantom's own bookkeeping.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from common.errors import MolreError
from molre.data import synth
from molre.data.synth import PHANTOM_FINDINGS, render_phantom, write_phantom_series

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SIZE = 96  # coarse enough to be fast, fine enough (2.3 mm pixels) to resolve the findings


def _pair(key: str | tuple[str, ...], seed: int, **kw):
    """(normal volume, volume with finding(s), geometry, details) for the same seed, no noise."""
    keys = (key,) if isinstance(key, str) else key
    kw.setdefault("size", SIZE)
    kw.setdefault("slice_thickness", 5.0)
    base, geom, _, _ = render_phantom(np.random.default_rng(seed), (), noise=False, **kw)
    vol, geom2, _, det = render_phantom(np.random.default_rng(seed), keys, noise=False, **kw)
    assert geom2 == geom
    return base, vol, geom, det


def _soft_tissue_away_from_bone(vol: np.ndarray) -> np.ndarray:
    """Intracranial-looking voxels not touched by the blur of bone (no partial volume)."""
    near_bone = ndimage.maximum_filter(vol, size=(1, 5, 5)) > 250.0
    return (vol > -50.0) & (vol < 250.0) & ~near_bone


def _index(geom, uvw) -> np.ndarray:
    return geom.world_to_index(geom.to_world(np.asarray(uvw, dtype=float)))


def _ventricle_like(vol: np.ndarray, geom) -> np.ndarray:
    """CSF-density voxels deep in the head (ventricles / third ventricle), from the image only."""
    inside = ndimage.binary_erosion(vol > -200, structure=np.ones((1, 3, 3)), iterations=1)
    far = ndimage.distance_transform_edt(inside, sampling=geom.spacing) > 35.0
    csf = far & (vol < 15.0) & (vol > -50.0)
    # Central: within 32 mm of the head's mid-sagittal plane (excludes Sylvian fissures).
    idx = np.argwhere(csf)
    u = geom.to_anatomical(geom.index_to_world(idx))[:, 0]
    out = np.zeros_like(csf)
    out[tuple(idx[np.abs(u) < 32.0].T)] = True
    return out


# ------------------------------------------------------------------------------------------
# Planted-finding evidence
# ------------------------------------------------------------------------------------------

SEEDS = (1, 7)


@pytest.mark.parametrize("seed", SEEDS)
def test_hemorrhage_hyperdense_only_when_planted(seed: int) -> None:
    base, vol, geom, det = _pair("intraparenchymal_hemorrhage", seed)
    bright_base = (base > 50) & _soft_tissue_away_from_bone(base)
    bright = (vol > 50) & _soft_tissue_away_from_bone(vol)
    assert not bright_base.any(), "a normal head has no blood-density parenchyma"
    assert bright.any()
    # The hyperdense voxels sit where the haematoma was planted.
    c = _index(geom, det["intraparenchymal_hemorrhage"]["center_uvw"])
    pts = np.argwhere(bright) - c
    mm = np.sqrt(((pts * np.asarray(geom.spacing)) ** 2).sum(axis=1))
    assert mm.min() < det["intraparenchymal_hemorrhage"]["radius"]
    assert mm.max() < 2.0 * det["intraparenchymal_hemorrhage"]["radius"] + 2 * geom.spacing[0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("key", ["subdural_hemorrhage", "epidural_hematoma"])
def test_extra_axial_collection_hugs_the_skull(key: str, seed: int) -> None:
    base, vol, geom, det = _pair(key, seed)
    new_blood = (vol - base > 20) & (vol > 45) & (vol < 120)
    assert new_blood.sum() > 5
    bone = base > 600
    dist = ndimage.distance_transform_edt(~bone, sampling=geom.spacing)
    t = det[key]["thickness"]
    # Every new blood voxel lies between the inner table and `thickness` below it (extra-axial).
    assert dist[new_blood].max() <= t + 2.0 * geom.spacing[1] + 0.5 * geom.spacing[0]
    assert dist[new_blood].min() <= 2.0 * geom.spacing[1]
    # Same side as planted: patient left is +x; yaw is small, so the centroid's x sign holds.
    cx = (
        np.argwhere(new_blood)[:, 2].mean() * geom.spacing[2] + geom.origin[0] - geom.head_center[0]
    )
    assert np.sign(cx) == det[key]["side"]


def _arc_deg(base: np.ndarray, vol: np.ndarray, geom) -> float:
    """Angular extent (seen from the head centre) of the new blood along the skull."""
    blood = (vol - base > 20) & (vol > 45)
    p = geom.to_anatomical(geom.index_to_world(np.argwhere(blood)))
    d = p / np.linalg.norm(p, axis=1, keepdims=True)
    m = d.mean(axis=0)
    m /= np.linalg.norm(m)
    return float(2 * np.percentile(np.degrees(np.arccos(np.clip(d @ m, -1, 1))), 95))


@pytest.mark.parametrize("seed", (*SEEDS, 11))
def test_subdural_crescent_spans_a_longer_arc_than_epidural_lens(seed: int) -> None:
    """Subdural: thin crescent crossing sutures (long arc); epidural: short thick lens."""
    b1, v1, geom, det_s = _pair("subdural_hemorrhage", seed)
    b2, v2, _, det_e = _pair("epidural_hematoma", seed)
    arc_s, arc_e = _arc_deg(b1, v1, geom), _arc_deg(b2, v2, geom)
    assert arc_s > 75.0 and arc_e < 70.0
    assert (
        det_e["epidural_hematoma"]["thickness"] / arc_e
        > det_s["subdural_hemorrhage"]["thickness"] / arc_s
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_intraventricular_blood_layers_in_ventricles(seed: int) -> None:
    base, vol, geom, det = _pair("intraventricular_hemorrhage", seed)
    changed = np.abs(vol - base) > 20
    assert changed.sum() > 3
    # Blood replaced CSF (ventricle density before), and it layers posteriorly (dependent).
    assert np.median(base[changed]) < 15
    assert np.median(vol[changed]) > 45
    vent = _ventricle_like(base, geom)
    assert vent.any()
    assert np.argwhere(changed)[:, 1].mean() > np.argwhere(vent)[:, 1].mean()


@pytest.mark.parametrize("seed", SEEDS)
def test_subarachnoid_blood_fills_csf_spaces(seed: int) -> None:
    base, vol, geom, det = _pair("subarachnoid_hemorrhage", seed)
    changed = vol - base > 20
    assert changed.sum() > 5
    # Where blood appeared there was CSF-like (hypodense) tissue before: sulci, cisterns.
    assert np.percentile(base[changed], 25) < 25
    assert np.median(vol[changed]) > 40


@pytest.mark.parametrize("seed", SEEDS)
def test_infarct_is_hypodense_territory(seed: int) -> None:
    base, vol, geom, det = _pair("acute_infarct", seed)
    diff = vol - base
    drop = diff < -1.0
    assert drop.sum() > 20
    # Density only rises where sulcal CSF was effaced by the swollen gyri.
    rise = diff > 1.0
    assert rise.sum() == 0 or np.median(base[rise]) < 20
    # Mild hypodensity (a few HU) relative to grey matter, not CSF-dark.
    assert np.median(vol[drop]) > 10
    assert np.median(diff[drop]) < -2
    # One hemisphere only (anatomical left-right, whatever the head's rotation).
    u = geom.to_anatomical(geom.index_to_world(np.argwhere(drop)))[:, 0]
    assert np.mean(np.sign(u) == det["acute_infarct"]["side"]) > 0.9


@pytest.mark.parametrize("seed", SEEDS)
def test_fracture_is_a_gap_in_the_skull_ring(seed: int) -> None:
    base, vol, geom, det = _pair("skull_fracture", seed)
    d = det["skull_fracture"]
    k, j, i = np.round(d["site_index"]).astype(int)
    assert base[k, j, i] > 250  # the site was bone (cortical table or diploe)
    assert vol[k, j, i] < 0.5 * base[k, j, i]  # and is now a lucent line
    # Walk across the skull along the fracture's trace on that slice (from scalp to brain):
    # before, the walk crosses bone; after, the ring is interrupted along the whole crossing.
    n = np.asarray(d["normal"])
    trace = np.cross(n, [0.0, 0.0, 1.0])
    trace /= np.linalg.norm(trace)
    s = np.arange(-15.0, 15.0, 0.2)[:, None]
    pts = geom.world_to_index(np.asarray(d["site_xyz"]) + s * trace)
    rr, cc = np.round(pts[:, 1]).astype(int), np.round(pts[:, 2]).astype(int)
    ok = (rr >= 0) & (rr < geom.shape[1]) & (cc >= 0) & (cc < geom.shape[2])
    assert base[k, rr[ok], cc[ok]].max() > 800
    assert vol[k, rr[ok], cc[ok]].max() < 0.5 * base[k, rr[ok], cc[ok]].max()


@pytest.mark.parametrize("seed", SEEDS)
def test_hydrocephalus_enlarges_ventricles(seed: int) -> None:
    base, vol, geom, det = _pair("hydrocephalus", seed)
    n0 = _ventricle_like(base, geom).sum()
    n1 = _ventricle_like(vol, geom).sum()
    assert n0 > 0
    assert n1 > 1.25 * n0


@pytest.mark.parametrize("seed", SEEDS)
def test_midline_shift_moves_the_ventricles(seed: int) -> None:
    base, vol, geom, det = _pair("midline_shift", seed)
    v0, v1 = _ventricle_like(base, geom), _ventricle_like(vol, geom)
    assert v0.any() and v1.any()
    dx = (np.argwhere(v1)[:, 2].mean() - np.argwhere(v0)[:, 2].mean()) * geom.spacing[2]
    d = det["midline_shift"]
    assert np.sign(dx) == d["toward"]
    assert abs(dx) > 1.0


@pytest.mark.parametrize("seed", SEEDS)
def test_calcification_is_a_small_very_dense_focus(seed: int) -> None:
    base, vol, geom, det = _pair("intracranial_calcification", seed)

    def dense_foci(a: np.ndarray) -> np.ndarray:
        """Small bone-density blobs surrounded by soft tissue (not skull, not skull base)."""
        labels, n = ndimage.label(a > 150)
        out = np.zeros(a.shape, dtype=bool)
        for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
            comp = labels == lab
            if comp[sl].sum() > 30:
                continue
            ring = ndimage.binary_dilation(comp, structure=np.ones((1, 5, 5))) & ~comp
            if a[ring].min() > -100 and a[ring].max() < 150:
                out |= comp
        return out

    assert not dense_foci(base).any()
    foci = dense_foci(vol)
    assert foci.any()
    _, n = ndimage.label(foci)
    assert 1 <= n <= len(det["intracranial_calcification"]["foci"])
    assert foci.sum() < 40  # small
    assert vol[foci].max() > 200  # very dense


@pytest.mark.parametrize("seed", SEEDS)
def test_mass_with_vasogenic_edema_halo(seed: int) -> None:
    base, vol, geom, det = _pair(("intracranial_mass", "vasogenic_edema"), seed)
    diff = vol - base
    c = np.round(_index(geom, det["intracranial_mass"]["center_uvw"])).astype(int)
    r = det["intracranial_mass"]["radius"]
    # A space-occupying lesion: different density at the centre, a hypodense halo around it.
    assert det["intracranial_mass"]["voxels"] > 0 and det["vasogenic_edema"]["voxels"] > 0
    halo = diff < -5
    pts = np.argwhere(halo)
    assert len(pts) > 10
    mm = np.sqrt((((pts - c) * np.asarray(geom.spacing)) ** 2).sum(axis=1))
    assert np.median(mm) > 0.7 * r  # around, not inside
    assert mm.max() < r + det["vasogenic_edema"]["extent"] + 3 * geom.spacing[0]
    assert np.median(vol[halo]) < np.median(base[halo]) - 5
    mass_vox = (np.abs(diff) > 3) & ~halo
    assert mass_vox.sum() > 0


def test_mass_without_edema_and_edema_without_mass_differ() -> None:
    base, vol_m, geom, det_m = _pair("intracranial_mass", 5)
    _, vol_e, _, det_e = _pair("vasogenic_edema", 5)
    assert "vasogenic_edema" not in det_m and det_e["vasogenic_edema"]["occult_lesion"]
    # Edema alone only lowers density; the mass alone has no halo in white matter.
    assert (vol_e - base > 3).sum() == 0
    assert (vol_e - base < -5).sum() > 10
    assert (vol_m - base > 3).sum() > 10


def test_every_kind_changes_the_image_and_reports_only_itself() -> None:
    base, _, _, _ = _pair((), 3)
    for key in PHANTOM_FINDINGS:
        _, vol, _, det = _pair(key, 3)
        assert set(det) == {key}
        assert np.abs(vol - base).max() > 2.5, key


# ------------------------------------------------------------------------------------------
# DICOM output
# ------------------------------------------------------------------------------------------


def test_series_is_valid_ct_with_consistent_geometry(tmp_path: Path) -> None:
    keys = ("subdural_hemorrhage", "skull_fracture")
    info = write_phantom_series(
        tmp_path / "s", np.random.default_rng(4), keys, size=64, n_slices=20, slice_thickness=5.0
    )
    assert info.findings == keys
    assert len(info.paths) == 20
    dss = [pydicom.dcmread(p) for p in info.paths]
    positions = []
    for ds in dss:
        assert ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
        assert ds.SOPClassUID == CT_IMAGE_STORAGE
        assert ds.Modality == "CT"
        assert ds.StudyInstanceUID == info.study_uid
        assert ds.SeriesInstanceUID == info.series_uid
        assert ds.PatientID == info.patient_id
        assert str(ds.PatientName).startswith("SYNTH^")
        assert ds.BodyPartExamined == "HEAD"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.SeriesDescription == "Axial 5mm Brain"
        assert ds.StudyDescription == "CT HEAD WO CONTRAST"
        assert ds.ConvolutionKernel and ds.ProtocolName and ds.AccessionNumber
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert (ds.Rows, ds.Columns) == (64, 64)
        assert float(ds.SliceThickness) == 5.0
        spacing = [float(v) for v in ds.PixelSpacing]
        assert spacing == pytest.approx(info.geometry.spacing[1:], abs=1e-4)
        positions.append([float(v) for v in ds.ImagePositionPatient])
    pos = np.array(positions)
    assert np.allclose(np.diff(pos[:, 2]), 5.0, atol=1e-3)
    assert np.allclose(pos[:, :2], pos[0, :2])
    assert len({ds.SOPInstanceUID for ds in dss}) == 20

    # Pixels read back (through the rescale) equal the rendered phantom rounded to 1 HU.
    vol, geom, _, _ = render_phantom(
        np.random.default_rng(4), keys, size=64, n_slices=20, slice_thickness=5.0
    )
    assert geom == info.geometry
    hu = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in dss]
    )
    assert np.abs(hu - vol).max() <= 0.5 + 1e-3
    # The head is realistic: air outside, bone ring, brain densities inside.
    assert hu[:, 0, 0].max() < -900
    assert (hu > 1000).any()
    brain = hu[(hu > 20) & (hu < 45)]
    assert brain.size > 0.1 * hu.size


def test_series_reads_back_through_volume_reader(tmp_path: Path) -> None:
    volume = pytest.importorskip("molre.data.volume")
    info = write_phantom_series(
        tmp_path / "s",
        np.random.default_rng(9),
        ("intraparenchymal_hemorrhage",),
        size=64,
        slice_thickness=3.0,
    )
    sv = volume.read_series(tmp_path / "s")
    vol, geom, _, _ = render_phantom(
        np.random.default_rng(9), ("intraparenchymal_hemorrhage",), size=64, slice_thickness=3.0
    )
    assert sv.series_uid == info.series_uid and sv.study_uid == info.study_uid
    assert sv.hu.shape == vol.shape
    assert np.allclose(sv.spacing, geom.spacing, atol=1e-4)
    assert np.allclose(sv.origin, geom.origin, atol=1e-3)
    assert np.abs(sv.hu - vol).max() <= 0.5 + 1e-3
    assert not sv.warnings


def test_tags_can_be_overridden(tmp_path: Path) -> None:
    info = write_phantom_series(
        tmp_path / "s",
        np.random.default_rng(2),
        (),
        size=32,
        n_slices=4,
        slice_thickness=5.0,
        PatientID="SITE-42",
        SeriesDescription="Custom",
        StationName="CT7",
    )
    ds = pydicom.dcmread(info.paths[0])
    assert (ds.PatientID, ds.SeriesDescription, ds.StationName) == ("SITE-42", "Custom", "CT7")
    assert info.patient_id == "SITE-42"


def test_bad_requests_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(MolreError, match="glioblastoma"):
        render_phantom(np.random.default_rng(0), ("glioblastoma",))
    with pytest.raises(MolreError, match="size=8"):
        render_phantom(np.random.default_rng(0), (), size=8)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(MolreError, match="not empty"):
        synth.generate_dataset(tmp_path / "busy", 1, 0, 32)
    with pytest.raises(MolreError, match="prevalence"):
        synth.generate_dataset(tmp_path / "p", 1, 0, 32, prevalence=1.5)


def test_realistic_acquisition_ranges() -> None:
    for seed in range(4):
        vol, geom, anat, _ = render_phantom(np.random.default_rng(seed), (), size=128)
        dz, dy, dx = geom.spacing
        assert dz in synth.SLICE_THICKNESSES
        assert 0.45 <= dy <= 1.8 and dy == dx
        assert 3.0 <= geom.noise_sigma <= 8.0
        # Coverage from skull base to vertex: first and last slices hold little brain, the
        # head spans most of the field of view in the middle.
        head = vol > -500
        mid = head[vol.shape[0] // 2]
        assert 0.35 < mid.mean() < 0.85
        assert head[-1].mean() < mid.mean()
    _, geom512, _, _ = render_phantom(np.random.default_rng(0), (), size=512, n_slices=2)
    assert 0.45 <= geom512.spacing[1] <= 0.5


# ------------------------------------------------------------------------------------------
# Dataset, manifest, determinism, CLI
# ------------------------------------------------------------------------------------------


def _read_rows(manifest: Path) -> list[dict[str, str]]:
    with open(manifest, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_prevalence_and_normal_fraction_hold() -> None:
    rng = np.random.default_rng(0)
    prev = synth._prevalences(0.2, PHANTOM_FINDINGS)
    draws = [synth.sample_findings(rng, prev, normal_fraction=0.3) for _ in range(6000)]
    normal = np.mean([not d for d in draws])
    assert 0.27 < normal < 0.36
    for k in PHANTOM_FINDINGS:
        rate = np.mean([k in d for d in draws])
        assert abs(rate - 0.2) < 0.03, (k, rate)
    with_mass = [d for d in draws if "intracranial_mass" in d]
    assert np.mean(["vasogenic_edema" in d for d in with_mass]) > 0.7


def test_dataset_manifest_matches_planted_findings(tmp_path: Path) -> None:
    from molre.catalog import load_catalog
    from molre.data.manifest import read_manifest

    cat = load_catalog()
    out = tmp_path / "ds"
    manifest = synth.generate_dataset(
        out,
        6,
        seed=3,
        size=48,
        slice_thickness=5.0,
        n_slices=14,
        prevalence=0.4,
        unlabelled_fraction=0.2,
        progress=False,
    )
    truth = [json.loads(line) for line in (out / "phantoms.jsonl").read_text().splitlines()]
    rows = read_manifest(manifest, cat)
    assert len(rows) == len(truth) == 6
    for row, t in zip(rows, truth):
        folder = Path(row.path)  # read_manifest resolves it against the manifest's folder
        files = sorted(folder.glob("*.dcm"))
        assert len(files) == t["n_files"] > 0
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.SeriesInstanceUID == t["series_uid"]
        assert ds.PatientID == row.patient_id
        assert row.split == t["split"]
        # The ground truth file describes exactly the planted findings...
        assert set(t["details"]) == set(t["findings"])
        # ...and the pixels show them where it says (independent of the bookkeeping).
        g = synth.PhantomGeometry.from_dict(t["geometry"])
        assert g.shape == (len(files), 48, 48)
        hu = np.stack([pydicom.dcmread(f).pixel_array.astype(np.float32) - 1024.0 for f in files])
        for key, min_hu in (
            ("intraparenchymal_hemorrhage", 45.0),
            ("epidural_hematoma", 45.0),
            ("intracranial_calcification", 150.0),
        ):
            if key in t["findings"]:
                c = np.round(_index(g, t["details"][key]["center_uvw"])).astype(int)
                patch = hu[c[0], max(c[1] - 1, 0) : c[1] + 2, max(c[2] - 1, 0) : c[2] + 2]
                assert patch.max() > min_hu, key
        labels = np.asarray(row.labels)
        for key in cat.keys:
            val = labels[cat.index(key)]
            if key in PHANTOM_FINDINGS and t["labelled"]:
                assert val == float(key in t["findings"]), key
            else:
                assert math.isnan(val), key
    # Split by patient: a patient never appears in two splits.
    by_patient: dict[str, set[str]] = {}
    for row in rows:
        by_patient.setdefault(row.patient_id, set()).add(row.split)
    assert all(len(s) == 1 for s in by_patient.values())


def _pixels(folder: Path) -> list[np.ndarray]:
    return [pydicom.dcmread(p).pixel_array for p in sorted(folder.glob("*.dcm"))]


def test_same_seed_same_data_any_workers_and_other_seed_differs(tmp_path: Path) -> None:
    kw = dict(size=40, slice_thickness=5.0, n_slices=12, prevalence=0.5, progress=False)
    m1 = synth.generate_dataset(tmp_path / "a", 3, seed=11, workers=1, **kw)
    m2 = synth.generate_dataset(tmp_path / "b", 3, seed=11, workers=2, **kw)
    synth.generate_dataset(tmp_path / "c", 3, seed=12, **kw)
    assert Path(m1).read_text() == Path(m2).read_text()
    same, other = [], []
    for name in ("series_0001", "series_0002", "series_0003"):
        a, b = _pixels(tmp_path / "a" / name), _pixels(tmp_path / "b" / name)
        c = _pixels(tmp_path / "c" / name)
        assert len(a) == len(b)
        same.append(all(np.array_equal(x, y) for x, y in zip(a, b)))
        other.append(len(a) == len(c) and all(np.array_equal(x, y) for x, y in zip(a, c)))
    assert all(same)
    assert not any(other)
    ta = (tmp_path / "a" / "phantoms.jsonl").read_text()
    assert ta == (tmp_path / "b" / "phantoms.jsonl").read_text()
    assert ta != (tmp_path / "c" / "phantoms.jsonl").read_text()


def test_same_seed_other_findings_or_site_is_another_series(tmp_path: Path) -> None:
    """`synth --seed 2 --findings X` and `synth --seed 2 --normal` draw the same head; sent
    together (the README's first example) they must not share a Study or Series Instance UID,
    or the receiver merges two different volumes into one series. The same options still
    reproduce the same UIDs."""
    import pydicom

    kw = dict(size=40, slice_thickness=5.0, n_slices=10, progress=False, masks=False)
    runs = {
        "ich": dict(findings=["intraparenchymal_hemorrhage"]),
        "ich_again": dict(findings=["intraparenchymal_hemorrhage"]),
        "normal": dict(findings=[]),
        "normal_valley": dict(findings=[], sites=["valley"]),
        "normal_metro": dict(findings=[], sites=["metro"]),
    }
    uids = {}
    for name, extra in runs.items():
        synth.generate_dataset(tmp_path / name, 1, seed=2, **kw, **extra)
        ds = pydicom.dcmread(sorted((tmp_path / name / "series_0001").glob("*.dcm"))[0])
        uids[name] = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID)
    assert uids["ich"] == uids["ich_again"]
    for a, b in (("ich", "normal"), ("normal_valley", "normal_metro")):
        assert uids[a][0] != uids[b][0] and uids[a][1] != uids[b][1], (a, b)
    assert uids["ich"][2] == uids["normal"][2]  # the same synthetic patient, two studies


def test_cli_synth_writes_manifest_and_folders(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    out = tmp_path / "cli"
    runner = CliRunner()
    args = [
        "synth",
        "--out",
        str(out),
        "--count",
        "2",
        "--seed",
        "5",
        "--size",
        "32",
        "--thickness",
        "5",
        "--slices",
        "12",
        "--no-progress",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "manifest.csv").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "masks",
        "series_0001",
        "series_0002",
    ]
    assert all(any((out / n).glob("*.dcm")) for n in ("series_0001", "series_0002"))
    assert str(out) in res.output and "manifest" in res.output
    assert "intraparenchymal_hemorrhage" in res.output
    rows = _read_rows(out / "manifest.csv")
    assert len(rows) == 2
    # A second run refuses the non-empty folder, unless --overwrite.
    res2 = runner.invoke(app, args)
    assert res2.exit_code != 0
    assert isinstance(res2.exception, MolreError) and "--overwrite" in str(res2.exception)
    res3 = runner.invoke(
        app,
        [
            "synth",
            "--out",
            str(out),
            "--count",
            "1",
            "--seed",
            "5",
            "--size",
            "32",
            "--thickness",
            "5",
            "--slices",
            "12",
            "--overwrite",
            "--no-progress",
        ],
    )
    assert res3.exit_code == 0, res3.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["masks", "series_0001"]


# ------------------------------------------------------------------------------------------
# Sites (scanners that differ in the pixels) and ground-truth masks
# ------------------------------------------------------------------------------------------


def test_sites_differ_in_pixels_and_tags() -> None:
    """Same head and findings, two sites: noise, calibration and kernel show in the image."""

    def brain_stats(site: str):
        clean = synth.render(np.random.default_rng(4), (), size=None, site=site, noise=False)
        r = synth.render(np.random.default_rng(4), (), size=None, site=site)
        region = (clean.hu > 10) & (clean.hu < 60)  # brain (any calibration), from the clean image
        brain = ndimage.binary_erosion(region, structure=np.ones((1, 5, 5)), iterations=2)
        # high-pass residual: noise (and edge enhancement) after removing the local mean
        resid = (r.hu - ndimage.uniform_filter(r.hu, size=(1, 5, 5)))[brain]
        return float(np.median(clean.hu[brain])), float(resid.std()), r

    med_m, noise_m, rm = brain_stats("metro")
    med_c, noise_c, rc = brain_stats("coastal")
    med_v, _, rv = brain_stats("valley")
    assert noise_c > 1.8 * noise_m  # low dose + edge-enhancing kernel vs smooth, normal dose
    assert med_c > med_m + 3.0 > med_v + 3.0  # +HU offset at coastal, -offset and gain at valley
    assert rc.geometry.tilt_deg >= 12.0 and rm.geometry.tilt_deg == 0.0
    assert rc.geometry.spacing[0] == 2.5 and rm.geometry.spacing[0] == 5.0
    assert rc.hu.shape[1] == 160 and rm.hu.shape[1] == 128


def test_site_tags_and_tilted_series_read_back(tmp_path: Path) -> None:
    volume = pytest.importorskip("molre.data.volume")
    info = write_phantom_series(
        tmp_path / "c", np.random.default_rng(2), ("subdural_hemorrhage",), size=64, site="coastal"
    )
    ds = pydicom.dcmread(info.paths[0], stop_before_pixels=True)
    assert ds.Manufacturer == synth.SITES["coastal"].manufacturer
    assert ds.ConvolutionKernel == "DETAIL"
    assert float(ds.GantryDetectorTilt) == pytest.approx(info.geometry.tilt_deg, abs=0.1)
    assert float(ds.SliceThickness) == 2.5
    iop = [float(v) for v in ds.ImageOrientationPatient]
    assert iop[5] == pytest.approx(math.sin(math.radians(info.geometry.tilt_deg)), abs=1e-4)
    vol = volume.read_series(tmp_path / "c")
    assert any("gantry tilt" in w for w in vol.warnings)  # deskewed onto an orthogonal grid


@pytest.mark.parametrize(
    "key",
    [
        "intraparenchymal_hemorrhage",
        "subdural_hemorrhage",
        "skull_fracture",
        "intracranial_calcification",
        "hydrocephalus",
        "midline_shift",
        "acute_infarct",
    ],
)
def test_masks_cover_exactly_what_the_finding_changed(key: str) -> None:
    """Without noise, the image with and without the finding differs only inside its mask
    (dilated by the kernel's reach), and the mask is not empty."""
    kw = dict(size=SIZE, slice_thickness=5.0, noise=False)
    base = synth.render(np.random.default_rng(3), (), **kw)
    r = synth.render(np.random.default_rng(3), (key,), **kw)
    m = r.masks[key]
    assert m.any() and m.shape == r.hu.shape
    near = ndimage.binary_dilation(m, structure=np.ones((1, 5, 5), bool))
    diff = np.abs(r.hu - base.hu)
    assert float(diff[~near].max(initial=0.0)) < 0.5
    assert float(diff[m].mean()) > 1.0


def test_dataset_sites_masks_and_fixed_findings(tmp_path: Path) -> None:
    kw = dict(size=48, slice_thickness=5.0, n_slices=14, progress=False)
    m1 = synth.generate_dataset(tmp_path / "a", 4, seed=9, sites=["metro"], **kw)
    m2 = synth.generate_dataset(tmp_path / "b", 4, seed=9, sites=["valley"], **kw)
    r1, r2 = _read_rows(m1), _read_rows(m2)
    assert {r["site"] for r in r1} == {"metro"} and {r["site"] for r in r2} == {"valley"}
    # the site is drawn from its own stream: the same seed plants the same findings anywhere
    assert [{k: v for k, v in r.items() if k not in ("site",)} for r in r1] == [
        {k: v for k, v in r.items() if k not in ("site",)} for r in r2
    ]
    recs = [json.loads(x) for x in (tmp_path / "a" / "phantoms.jsonl").read_text().splitlines()]
    for rec in recs:
        mpath = tmp_path / "a" / synth.MASKS_DIR / f"{rec['name']}.npz"
        if rec["findings"]:
            masks = synth.load_masks(mpath)
            assert sorted(masks) == sorted(rec["findings"])
            assert all(
                v.shape == tuple(rec["geometry"]["shape"]) and v.any() for v in masks.values()
            )
    # --findings / --normal
    synth.generate_dataset(tmp_path / "f", 2, seed=1, findings=["epidural_hematoma"], **kw)
    recs = [json.loads(x) for x in (tmp_path / "f" / "phantoms.jsonl").read_text().splitlines()]
    assert [r["findings"] for r in recs] == [["epidural_hematoma"]] * 2
    synth.generate_dataset(tmp_path / "n", 2, seed=1, findings=[], **kw)
    recs = [json.loads(x) for x in (tmp_path / "n" / "phantoms.jsonl").read_text().splitlines()]
    assert [r["findings"] for r in recs] == [[], []]
    with pytest.raises(MolreError, match="unknown synthetic site"):
        synth.generate_dataset(tmp_path / "x", 1, seed=1, sites=["mars"], **kw)
