"""Evidence images (issue 17 part 4), unit level: the saliency geometry on cases with a known
answer, plane -> source slice mapping, the key-image SC and its links from the SR (dciodvfy),
and the worker's rule that evidence never costs the report. The real model on a planted bleed
is tests/test_evidence_node.py."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from molre.catalog import load_catalog
from molre.data.preprocess import Recipe
from molre.data.volume import SeriesVolume, read_series
from molre.saliency import explain, key_planes
from node.config import config_from_dict
from node.evidence import EvidenceError, build_evidence, key_slices
from node.report import build_sr, read_sources, to_bytes
from storage.outbox import report_files
from tests.nodeproc import dciodvfy_errors, make_ct_series
from tests.test_node_worker import FakeEngine, _ingest

needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed"
)


class RegionEnergy(nn.Module):
    """Two findings with a known answer: logit 0 = energy (sum of x²) of the inferior half of
    the model input, logit 1 = of the superior half (axis 0 of a 3-D input is inferior ->
    superior, recipe orientation SPL; the slice axis of a 2-D stack likewise)."""

    def __init__(self, slices_2d: bool = False) -> None:
        super().__init__()
        self.slices_2d = slices_2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = (x**2).sum(dim=2 if self.slices_2d else 1)  # (1, D, H, W)
        d = e.shape[1]
        return torch.stack(
            [e[:, : d // 2].sum(dim=(1, 2, 3)), e[:, d // 2 :].sum(dim=(1, 2, 3))], dim=1
        )


#: A coronal acquisition (rows run to the patient's feet, slices step posterior), anisotropic
#: voxels, so the recipe's reorientation, resampling, padding and crop all act.
CORONAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
CUBE_INFERIOR = (5, 30, 12)  # (k, j, i): S = -30 * 1.5 = -45 mm
CUBE_SUPERIOR = (14, 8, 28)  # S = -12 mm


def _coronal_volume() -> SeriesVolume:
    hu = np.full((20, 48, 40), -1000.0, np.float32)
    for k, j, i in (CUBE_INFERIOR, CUBE_SUPERIOR):
        hu[k - 1 : k + 2, j - 2 : j + 3, i - 2 : i + 3] = 60.0
    return SeriesVolume(
        hu=hu,
        spacing=(5.0, 1.5, 1.5),
        origin=np.array([10.0, -20.0, 0.0]),
        direction=CORONAL,
        sop_instance_uids=[],
        series_uid="1.2.3",
        study_uid="1.2",
    )


def _peak(plane: dict, stride: list[int]) -> tuple[int, int]:
    j, i = np.unravel_index(int(np.argmax(plane["map"])), plane["map"].shape)
    return int(j) * stride[0], int(i) * stride[1]


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(
            "ctfm-3d", {"spacing": [3.0, 2.0, 2.5], "roi": [32, 48, 40], "windows": [[40.0, 80.0]]}
        ),
        Recipe("slices-2d", {"n_slices": 0, "size": 48, "normalize": None}),
        Recipe("slices-2d", {"n_slices": 24, "size": 40, "normalize": None}),
    ],
    ids=["3d", "2d-every-slice", "2d-sampled"],
)
def test_saliency_maps_back_to_the_voxels_that_drove_each_finding(recipe: Recipe) -> None:
    vol = _coronal_volume()
    model = RegionEnergy(slices_2d=recipe.name == "slices-2d").eval()
    out = explain(model, recipe, vol, {"inferior": 0, "superior": 1}, key_images=3)
    assert out["grid"]["shape"] == [20, 48, 40]
    for key, (k, j, i) in (("inferior", CUBE_INFERIOR), ("superior", CUBE_SUPERIOR)):
        f = out["findings"][key]
        assert len(f["plane_scores"]) == 20
        zs = [p["z"] for p in f["key_planes"]]
        assert zs and set(zs) <= {k - 1, k, k + 1}, (key, zs, np.round(f["plane_scores"], 2))
        best = max(f["key_planes"], key=lambda p: p["score"])
        assert best["score"] == 1.0 and best["map"].dtype == np.uint8
        pj, pi = _peak(best, f["stride"])
        assert abs(pj - j) <= 2 and abs(pi - i) <= 2, (key, (pj, pi), (j, i))
        # the other cube is not what drove this finding
        other = CUBE_SUPERIOR if key == "inferior" else CUBE_INFERIOR
        assert f["plane_scores"][other[0]] < 0.1


def test_key_planes_keeps_only_planes_near_the_peak() -> None:
    m = np.zeros((6, 4, 4), np.float32)
    m[1, 2, 2], m[2, 1, 1], m[4, 0, 0], m[5, 3, 3] = 0.4, 1.0, 0.8, 0.6
    scores, chosen = key_planes(m, 2)
    assert chosen == [2, 4] and scores[2] == 1.0 and scores[1] == pytest.approx(0.4)
    assert key_planes(m, 5)[1] == [2, 4, 5]  # 0.4 < MIN_RELATIVE_SCORE of the peak
    assert key_planes(np.zeros((3, 2, 2), np.float32), 3)[1] == []


# ---------------------------------------------------------------------------------------------
# node side: planes -> source slices, key images, SR links
# ---------------------------------------------------------------------------------------------


def _fake_saliency(
    volume: SeriesVolume, key: str, planes: list[int], blob: tuple[int, int]
) -> dict:
    """What `molre.saliency.explain` returns, with a known blob in each key plane."""
    z, y, x = volume.shape
    yy, xx = np.mgrid[0:y, 0:x]
    m = np.exp(-((yy - blob[0]) ** 2 + (xx - blob[1]) ** 2) / 20.0)
    return {
        "method": "gradient",
        "grid": {
            "shape": list(volume.shape),
            "spacing": list(volume.spacing),
            "origin": list(map(float, volume.origin)),
            "direction": volume.direction.tolist(),
        },
        "findings": {
            key: {
                "plane_scores": [1.0 if k in planes else 0.0 for k in range(z)],
                "stride": [1, 1],
                "key_planes": [
                    {"z": k, "score": 1.0, "map": (m * 255).astype(np.uint8)} for k in planes
                ],
            }
        },
    }


def test_key_slices_follow_image_position_not_file_order(tmp_path: Path) -> None:
    info = make_ct_series(tmp_path / "ct", ["intraparenchymal_hemorrhage"], n_slices=8, seed=5)
    vol = read_series(info.paths)
    headers = read_sources(info.paths)
    by_pos = sorted(headers, key=lambda d: float(d.ImagePositionPatient[2]))
    shuffled = list(headers)
    random.Random(1).shuffle(shuffled)
    sal = _fake_saliency(vol, "ich", [2, 5], (30, 30))
    sal["findings"]["ich"]["key_planes"].append({"z": 11, "score": 0.9, "map": None})  # beyond
    got = key_slices(shuffled, sal)["ich"]
    assert [str(d.SOPInstanceUID) for d, _ in got] == [
        str(by_pos[2].SOPInstanceUID),
        str(by_pos[5].SOPInstanceUID),
    ]
    multi = pydicom.Dataset()
    multi.NumberOfFrames = 20
    with pytest.raises(EvidenceError, match="multi-frame"):
        key_slices([multi], sal)


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def _prediction(key: str, saliency: dict) -> dict:
    return {
        "probabilities": {key: 0.93},
        "decisions": {key: True},
        "model_name": "toy",
        "model_version": "1",
        "checkpoint_hash": "b" * 64,
        "is_demo": True,
        "saliency": saliency,
    }


@needs_dciodvfy
def test_key_images_are_valid_sc_with_overlay_and_linked_from_the_sr(tmp_path: Path, catalog):
    key = "intraparenchymal_hemorrhage"
    info = make_ct_series(tmp_path / "ct", [key], n_slices=8, seed=6)
    vol = read_series(info.paths)
    headers = read_sources(info.paths)
    files = {str(d.SOPInstanceUID): p for d, p in zip(headers, info.paths)}
    by_pos = sorted(headers, key=lambda d: float(d.ImagePositionPatient[2]))
    pred = _prediction(key, _fake_saliency(vol, key, [3, 4], blob=(20, 40)))
    images = build_evidence(headers, files, pred, catalog, version=2)
    assert [i.source_sop_instance_uid for i in images] == [
        str(by_pos[k].SOPInstanceUID) for k in (3, 4)
    ]
    sr = build_sr(headers, pred, catalog, version=2, evidence_images=images)
    paths = []
    for n, obj in enumerate([sr] + [i.dataset for i in images]):
        paths.append(tmp_path / f"o{n}.dcm")
        paths[-1].write_bytes(to_bytes(obj))
        assert dciodvfy_errors(paths[-1]) == [], paths[-1]
    sc = pydicom.dcmread(paths[1])
    assert sc.SeriesNumber == 9903 and sc.BurnedInAnnotation == "YES"
    assert sc.SeriesDescription.startswith("AI EVIDENCE – NOT FOR DIAGNOSTIC USE")
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == images[0].source_sop_instance_uid
    assert sc.StudyInstanceUID == info.study_uid and sc.PhotometricInterpretation == "RGB"
    # the overlay sits on the blob: red over grey there, plain grey far from it
    px = sc.pixel_array
    factor = sc.Columns // 64
    banner = sc.Rows - 64 * factor
    at = px[banner + 20 * factor + factor // 2, 40 * factor + factor // 2].astype(int)
    far = px[banner + 60 * factor, 2 * factor].astype(int)
    assert at[0] - at[2] > 60, at
    assert far[0] == far[1] == far[2], far
    # SR: the finding's group names the CT slices as sources and the SCs as illustrations
    group = [
        g
        for g in hd.sr.srread(paths[0]).content.get_image_measurement_groups()
        if g.tracking_identifier == key
    ][0]
    assert {s.referenced_sop_instance_uid for s in group.source_images} == {
        i.source_sop_instance_uid for i in images
    }
    illustrated = [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in group[0].ContentSequence
        if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "121200"
    ]
    assert illustrated == [str(i.dataset.SOPInstanceUID) for i in images]
    evidence_uids = {
        str(ref.ReferencedSOPInstanceUID)
        for st in sr.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for ref in se.ReferencedSOPSequence
    }
    assert set(illustrated) <= evidence_uids


# ---------------------------------------------------------------------------------------------
# worker: evidence written beside the SR and audited; a failure never costs the report
# ---------------------------------------------------------------------------------------------


class SaliencyEngine(FakeEngine):
    """FakeEngine whose first finding is Present, with a saliency (or a saliency error)."""

    def __init__(self, saliency: dict | None, error: str | None = None) -> None:
        super().__init__(set(), set())
        self.saliency, self.error = saliency, error

    def predict(self, paths: list[str], timeout: float) -> dict:
        pred = super().predict(paths, timeout)
        if self.saliency is not None:
            pred["saliency"] = self.saliency
        if self.error:
            pred["saliency_error"] = self.error
        return pred


def _worker(tmp_path: Path, info, engine_for):
    from node.worker import Worker
    from storage import Database, Spool, Store

    cfg = config_from_dict(
        {
            "storage": {"data_dir": str(tmp_path / "data")},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "port": 104}],
            "report": {"evidence": True, "evidence_key_images": 2},
            "model": {"isolation": "thread"},
        }
    )
    db = Database(cfg.database_url)
    db.upgrade()
    store, spool = Store(db), Spool(cfg.spool_dir)
    uid = _ingest(store, spool, info.paths)
    worker = Worker(cfg, store, spool)
    worker.engine = engine_for(read_series(info.paths))
    assert worker.run_once()
    return store, uid


def test_worker_writes_evidence_beside_the_sr_and_audits_it(tmp_path: Path, catalog) -> None:
    key = catalog.keys[0]  # FakeEngine: the first finding is Present
    info = make_ct_series(tmp_path / "ct", [], n_slices=6, seed=7)
    store, uid = _worker(
        tmp_path, info, lambda vol: SaliencyEngine(_fake_saliency(vol, key, [1, 2], (10, 10)))
    )
    assert str(store.get_series(uid).state) == "reported"
    export = store.due_exports()[0]
    files = report_files(export.report_path)
    assert len(files) == 3 and all(f.name.endswith((".ev001.dcm", ".ev002.dcm")) for f in files[1:])
    scs = [pydicom.dcmread(f) for f in files[1:]]
    sr = pydicom.dcmread(files[0])
    assert {str(s.SOPInstanceUID) for s in scs} <= {
        str(r.ReferencedSOPInstanceUID)
        for st in sr.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    events = [e for e in store.timeline(uid) if e["kind"] == "evidence_written"]
    assert events and events[0]["details"]["images"] == 2
    assert events[0]["details"]["sop_instance_uids"] == [str(s.SOPInstanceUID) for s in scs]


@pytest.mark.parametrize("case", ["saliency_error", "bad_geometry"])
def test_evidence_failure_still_sends_the_report_and_says_why(
    tmp_path: Path, case: str, catalog
) -> None:
    key = catalog.keys[0]
    info = make_ct_series(tmp_path / "ct", [], n_slices=6, seed=8)

    def engine(vol):
        if case == "saliency_error":
            return SaliencyEngine(None, error="RuntimeError: backward failed")
        sal = _fake_saliency(vol, key, [1], (10, 10))
        sal["grid"]["spacing"][0] = 0.0  # the node refuses to map planes onto slices
        return SaliencyEngine(sal)

    store, uid = _worker(tmp_path, info, engine)
    assert str(store.get_series(uid).state) == "reported"
    export = store.due_exports()[0]
    assert report_files(export.report_path) == [Path(export.report_path)]
    failed = [e for e in store.timeline(uid) if e["kind"] == "evidence_failed"]
    assert len(failed) == 1
    want = "backward failed" if case == "saliency_error" else "slice spacing"
    assert want in failed[0]["details"]["error"]
