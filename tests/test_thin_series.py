"""Thin-slice series (issue 16 part 3): the separable preprocessing path gives the MONAI
reference's volume, deferred pixels give the eager volume, the SR's evidence from the receiver's
rows is the one read from the files, and the node says "not ready" until its inference process
has loaded the checkpoint, then "ready"."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest

from molre.data.preprocess import Recipe, make_recipe
from molre.data.volume import DeferredSeriesVolume, SeriesVolume, read_series
from tests.nodeproc import NodeProcess, free_port, make_ct_series, wait_until

PHANTOM = make_recipe(
    "ctfm-3d",
    spacing=[5.0, 3.0, 3.0],
    roi=[32, 72, 72],
    windows=[[40.0, 80.0], [60.0, 200.0], [500.0, 2000.0]],
    antialias=True,
)


def _volume(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], direction: Any, seed: int = 0
) -> SeriesVolume:
    rng = np.random.default_rng(seed)
    hu = rng.normal(0, 300, shape).astype(np.float32)
    hu[:, : shape[1] // 3] += 900  # structure, so a wrong axis or flip changes the output
    return SeriesVolume(
        hu=hu,
        spacing=spacing,
        origin=np.array([10.0, -20.0, 30.0]),
        direction=np.array(direction, float),
        sop_instance_uids=[],
        series_uid="1.2.3",
        study_uid="1.2.4",
    )


def _reference(recipe: Recipe, volume: SeriesVolume) -> Any:
    return recipe._window_pad_crop(recipe._resampled_monai(volume))


AXIAL = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
C, S = np.cos(0.3), np.sin(0.3)


@pytest.mark.parametrize(
    "shape,spacing,direction",
    [
        ((60, 64, 70), (0.625, 0.45, 0.5), AXIAL),  # thin slices, anisotropic pixels
        ((30, 40, 50), (2.0, 0.9, 0.8), [[-1, 0, 0], [0, -1, 0], [0, 0, 1]]),  # flipped rows/cols
        ((30, 40, 50), (1.0, 1.0, 0.7), [[1, 0, 0], [0, 0, -1], [0, 1, 0]]),  # coronal
        ((30, 40, 50), (1.0, 1.0, 0.7), [[C, S, 0], [-S, C, 0], [0, 0, 1]]),  # oblique
        ((20, 64, 64), (5.0, 3.5, 3.5), AXIAL),  # upsampled in-plane, no antialias needed
        ((4, 30, 34), (0.5, 0.3, 0.3), AXIAL),  # Gaussian tail longer than the axis
    ],
    ids=["thin", "flipped", "coronal", "oblique", "upsampled", "short"],
)
@pytest.mark.parametrize("antialias", [True, False])
def test_separable_path_equals_monai_reference(
    shape: Any, spacing: Any, direction: Any, antialias: bool
) -> None:
    recipe = make_recipe("ctfm-3d", **{**PHANTOM.params, "antialias": antialias})
    vol = _volume(shape, spacing, direction)
    assert recipe._separable(vol) is not None  # the fast path is what is compared
    ref, fast = _reference(recipe, vol), recipe.transform_meta(vol)
    assert tuple(fast.shape) == tuple(ref.shape) == (3, 32, 72, 72)
    assert np.allclose(np.asarray(fast.affine), np.asarray(ref.affine), atol=1e-6)
    diff = np.abs(fast.as_tensor().numpy() - ref.as_tensor().numpy())
    assert diff.max() < 1e-3, diff.max()  # 0..1 window units: float32 rounding only
    r = ref.as_tensor().numpy()
    assert r.max() - r.min() > 0.5 and (r > 0.01).sum() > 20  # not a trivially flat comparison


def test_nearest_mode_uses_the_monai_path() -> None:
    recipe = make_recipe("ctfm-3d", **{**PHANTOM.params, "mode": "nearest"})
    vol = _volume((20, 32, 32), (2.0, 1.0, 1.0), AXIAL)
    assert recipe._separable(vol) is None
    out = recipe.transform_meta(vol)
    assert np.array_equal(out.as_tensor().numpy(), _reference(recipe, vol).as_tensor().numpy())


def test_deferred_volume_reads_like_the_eager_one(tmp_path: Path) -> None:
    info = make_ct_series(
        tmp_path / "s", ["subdural_hemorrhage"], n_slices=40, size=96, seed=3, slice_thickness=1.25
    )
    eager = read_series(info.paths)
    lazy = read_series(info.paths, defer_pixels=True)
    assert isinstance(lazy, DeferredSeriesVolume) and not lazy.loaded
    assert lazy.shape == eager.shape and lazy.spacing == eager.spacing  # headers only
    assert lazy.sop_instance_uids == eager.sop_instance_uids and not lazy.loaded
    # the recipe reduces slice by slice as they are decoded: same model input as MONAI's
    x = PHANTOM(lazy)
    assert not lazy.loaded
    ref = _reference(PHANTOM, eager).as_tensor().numpy()
    assert np.abs(x.numpy() - ref).max() < 1e-3
    # anything that needs the full volume still gets it, decoded once
    assert np.array_equal(lazy.hu, eager.hu) and lazy.loaded


def test_fast_decode_matches_pydicom_and_rescale(tmp_path: Path) -> None:
    """Raw 16-bit little-endian Pixel Data is viewed directly; signed and unsigned values and
    per-slice rescale give what pydicom's pixel_array + rescale give."""
    info = make_ct_series(tmp_path / "s", [], n_slices=12, size=64, seed=5)
    for k, p in enumerate(info.paths):  # unsigned storage with its own intercept per slice
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array.astype(np.int32) - int(ds.RescaleIntercept) - 1024
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -2048 + k
        ds.PixelData = (arr + 2048 - k).astype(np.uint16).tobytes()
        ds.save_as(p)
    v = read_series(info.paths)
    expected = []
    for p in sorted(info.paths, key=lambda q: float(pydicom.dcmread(q).ImagePositionPatient[2])):
        ds = pydicom.dcmread(p)
        expected.append(
            ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope)
            + np.float32(ds.RescaleIntercept)
        )
    assert np.array_equal(v.hu, np.stack(expected))


def test_tilted_deferred_series_falls_back_to_the_full_volume(tmp_path: Path) -> None:
    from tests.scanner_series import write_ge_stepped_head

    write_ge_stepped_head(tmp_path / "ge")
    eager = read_series(tmp_path / "ge")
    lazy = read_series(tmp_path / "ge", defer_pixels=True)
    assert lazy.reduce_slices(lambda hu: hu[:2, :2], (2, 2)) is None  # tilt: shift first
    assert np.array_equal(lazy.hu, eager.hu)
    assert [c["kind"] for c in lazy.meta["corrections"]] == [
        c["kind"] for c in eager.meta["corrections"]
    ]


def test_sr_evidence_from_rows_equals_evidence_from_files(tmp_path: Path) -> None:
    from molre.catalog import load_catalog
    from node.report import build_sr, read_sources, recorded_sources

    info = make_ct_series(tmp_path / "s", [], n_slices=10, size=32, seed=1)
    paths = [str(p) for p in info.paths]
    full = read_sources(paths)
    rows = {
        p: SimpleNamespace(
            sop_class_uid=d.SOPClassUID,
            sop_instance_uid=d.SOPInstanceUID,
            study_uid=d.StudyInstanceUID,
            series_uid=d.SeriesInstanceUID,
        )
        for p, d in zip(paths, full)
    }
    rows[paths[3]] = SimpleNamespace(sop_class_uid=None)  # incomplete row: read from the file
    light = recorded_sources(paths, rows)
    assert "PixelSpacing" not in light[1] and "PixelSpacing" in light[3]
    cat = load_catalog()
    pred = {
        "probabilities": {k: 0.2 for k in cat.keys},
        "decisions": {k: False for k in cat.keys},
        "model_name": "m",
        "checkpoint_hash": "0" * 64,
    }
    a = build_sr(light, pred, cat, sop_instance_uid="1.2.826.0.1.3680043.8.498.1")
    b = build_sr(full, pred, cat, sop_instance_uid="1.2.826.0.1.3680043.8.498.1")
    for kw in (
        "CurrentRequestedProcedureEvidenceSequence",
        "PatientID",
        "StudyInstanceUID",
        "ContentSequence",
    ):
        assert str(a.get(kw)) == str(b.get(kw)), kw
    refs = a.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert len(refs.ReferencedSOPSequence) == 10


# -- readiness --------------------------------------------------------------------------------


def gated_child(conn: Any, checkpoint: Any, device: str, log_json: bool, threads: int) -> None:
    """A fake inference process that 'loads' until the file named by `checkpoint` exists."""
    while not os.path.exists(checkpoint):
        time.sleep(0.05)
    conn.send(
        (
            "ready",
            {"catalog": {}, "model_name": "fake", "checkpoint_hash": "0" * 64, "is_demo": True},
        )
    )
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_status_says_not_ready_until_the_checkpoint_is_loaded(tmp_path: Path) -> None:
    """Worker pool with a fake inference process held in 'loading': the dashboard status, the
    /readyz probe and the metric say not ready; once it loads, ready."""
    from node.config import config_from_dict
    from node.dashboard import Dashboard, collect
    from node.metrics import Metrics
    from node.worker import ProcessEngine, WorkerPool
    from storage import Database, Spool, Store

    gate = tmp_path / "loaded"
    cfg = config_from_dict(
        {"storage": {"data_dir": str(tmp_path / "d")}, "dashboard": {"port": free_port()}}
    )
    db = Database(cfg.database_url)
    db.upgrade()
    store = Store(db)
    metrics = Metrics()
    pool = WorkerPool(cfg, store, Spool(cfg.spool_dir), metrics=metrics)
    for w in pool.workers:
        w.engine.close()  # the real inference process the pool started loading
        w.engine = ProcessEngine(str(gate), "cpu", target=gated_child, load_timeout=120)
    service = SimpleNamespace(workers=pool)
    dash = Dashboard(cfg, store, service)
    port = dash.start()
    pool.start()
    try:
        base = f"http://127.0.0.1:{port}"
        status = collect(store, cfg, service)["node"]["inference"]
        assert status["ready"] is False and status["state"] == "loading"
        assert _get(base + "/readyz") == (503, "not ready: inference loading\n")
        assert metrics.inference_ready._value.get() == 0
        html = _get(base + f"/?token={cfg.dashboard.token}" if cfg.dashboard.token else base)[1]
        assert "NOT READY: loading the checkpoint" in html
        gate.touch()
        wait_until(lambda: pool.inference_ready, timeout=60, what="engine ready")
        status = collect(store, cfg, service)["node"]["inference"]
        assert status["ready"] is True and status["state"] == "ready"
        assert status["load_s"][0] is not None
        assert _get(base + "/readyz") == (200, "ready\n")
        assert metrics.inference_ready._value.get() == 1
        assert (
            json.loads(_get(base + "/api/status")[1])["queue"]["workers"][0]["inference"] == "ready"
        )
    finally:
        pool.stop(5)
        dash.stop()


def test_node_logs_and_reports_not_ready_then_ready(tmp_path: Path) -> None:
    """The real node: its log says the inference process is loading before it says ready, and
    its readiness probe, status and metric end at ready (each state seen is never followed by
    an earlier one)."""
    dash_port, metrics_port = free_port(), free_port()
    node = NodeProcess.create(
        tmp_path / "n", dashboard={"port": dash_port}, metrics={"port": metrics_port}
    )
    seen: list[int] = []
    with node:

        def ready() -> bool:
            code, _ = _get(f"http://127.0.0.1:{dash_port}/readyz")
            if not seen or seen[-1] != code:
                seen.append(code)
            return code == 200

        wait_until(ready, timeout=180, interval=0.1, what="readyz 200")
        events = [r.get("event") for r in node.log_records()]
        metrics = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
    assert "inference not ready: loading the checkpoint" in events
    assert "inference ready" in events
    assert events.index("inference not ready: loading the checkpoint") < events.index(
        "inference ready"
    )
    assert seen in ([200], [503, 200])  # never ready -> not ready
    assert "molre_inference_ready 1.0" in metrics
    assert "molre_inference_load_seconds" in metrics


def test_inference_path_does_not_import_monai(tmp_path: Path) -> None:
    """The packaged demo checkpoint loads and predicts a series without importing MONAI (whose
    import pulls in torchvision, transformers, scipy.signal: ~340 MB resident and seconds in
    every inference process); the prediction equals the MONAI preprocessing's."""
    import subprocess
    import sys

    info = make_ct_series(
        tmp_path / "s", ["subdural_hemorrhage"], n_slices=24, size=96, seed=8, slice_thickness=2.5
    )
    code = f"""
import json, sys
from molre.checkpoint import Predictor
from node.worker import predict_files
p = Predictor.from_checkpoint(None)
pred = predict_files(p, {[str(x) for x in info.paths]!r}, {{"max_resampled_voxels": 10**9}})
print(json.dumps({{"monai": "monai" in sys.modules, "timm": "timm" in sys.modules,
                  "probabilities": pred["probabilities"]}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["monai"] is False and res["timm"] is False
    from molre.checkpoint import Predictor

    p = Predictor.from_checkpoint(None)
    vol = read_series(info.paths)
    x = p.recipe._window_pad_crop(p.recipe._resampled_monai(vol)).as_tensor()
    ref = dict(zip(p.catalog.keys, p.predict_tensor(x)[0]))
    for k, v in res["probabilities"].items():
        assert abs(v - float(ref[k])) < 1e-4, k
