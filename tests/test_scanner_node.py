"""What real scanners send, against the real node (issue 12, items 2, 5 and 6).

One node serves every case (a node start + checkpoint load is the expensive part):

- a GE two-part head (14 x 4 mm, 14 x 7 mm, +18.5 degrees tilt, -1500 padding), sent with dcmtk
  storescu: read and reported, not refused as incomplete; the corrections are audit events and
  are stated in the SR; thickness recorded as 4 mm;
- RescaleSlope 0, RescaleSlope NaN, PixelSpacing 60 mm: skipped before inference with a reason
  naming the tag, no job, no SR;
- a Legacy Converted Enhanced CT object: stored (not 'ignored') and read;
- a `molre-node synth` folder sent as the README says (`storescu +sd +r +sp '*.dcm'`);
- Ctrl-C (SIGINT to the process group, as a terminal sends it) stops the node without a
  KeyboardInterrupt traceback from the inference child.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from molre.data import dicomio
from tests.badinput import head_volume, write_base_series
from tests.nodeproc import (
    DCMTK_ENV,
    REPO_ROOT,
    NodeProcess,
    dcmtk_tool,
    dicom_files,
    storescu,
    wait_until,
)
from tests.orthanc import have_dcmtk, model_section
from tests.scanner_series import write_ge_stepped_head

pytestmark = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed (storescu)")

LEGACY_CT = "1.2.840.10008.5.1.4.1.1.2.2"
DONE = ("reported", "delivered", "skipped", "failed")


def _mutated(out: Path, rng: np.random.Generator, **changes: Any) -> tuple[str, list[Path]]:
    paths = write_base_series(out, rng)
    for p in paths:
        ds = pydicom.dcmread(p)
        for k, v in changes.items():
            setattr(ds, k, v)
        ds.save_as(p)
    return str(pydicom.dcmread(paths[0]).SeriesInstanceUID), paths


def _legacy_enhanced(out: Path, rng: np.random.Generator) -> str:
    path = dicomio.write_enhanced_ct(
        out / "legacy.dcm", head_volume(rng), spacing=(5.0, 4.5, 4.5), origin=(-108.0, -108.0, 0.0)
    )
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = LEGACY_CT
    ds.file_meta.MediaStorageSOPClassUID = LEGACY_CT
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SeriesInstanceUID)


def _rows(db: Path, sql: str, *args: Any) -> list[sqlite3.Row]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def _storescu_folder(folder: Path, node: NodeProcess) -> subprocess.CompletedProcess:
    """The README's sending example: scan the folder recursively, send only *.dcm."""
    return subprocess.run(
        [
            dcmtk_tool("storescu"),
            "-aet",
            "DCMTKSCU",
            "-aec",
            node.ae_title,
            "+sd",
            "+r",
            "+sp",
            "*.dcm",
            "127.0.0.1",
            str(node.port),
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=DCMTK_ENV,
    )


def test_real_scanner_series_and_insane_headers(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    ge = write_ge_stepped_head(tmp_path / "ge")
    slope0, slope0_paths = _mutated(tmp_path / "slope0", rng, RescaleSlope="0")
    nan, nan_paths = _mutated(tmp_path / "nan", rng, RescaleSlope="NaN")
    wide, wide_paths = _mutated(tmp_path / "wide", rng, PixelSpacing=["60", "60"])
    legacy = _legacy_enhanced(tmp_path / "legacy", rng)
    synth = tmp_path / "synth"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "synth",
            "--out",
            str(synth),
            "--count",
            "1",
            "--size",
            "32",
            "--slices",
            "12",
            "--normal",
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    synth_dcm = sorted(synth.rglob("*.dcm"))
    assert synth_dcm and any(p.suffix != ".dcm" for p in synth.rglob("*") if p.is_file())

    node = NodeProcess.create(tmp_path, model=model_section(), selection={"min_slices": 8})
    with node:
        db = node.data_dir / "molre.db"
        res = storescu(ge.paths, node.port, called_ae=node.ae_title)
        assert res.returncode == 0, res.stderr[-2000:]
        for paths in (slope0_paths, nan_paths, wide_paths):
            assert all(s == 0 for s in node.send(paths).statuses)
        assert node.send(dicom_files(tmp_path / "legacy")).statuses == [0]
        res = _storescu_folder(synth, node)
        assert res.returncode == 0, (res.stdout + res.stderr)[-2000:]

        # -- the GE stepped, tilted head is read ---------------------------------------------
        rec = node.wait_series_state(ge.series_uid, DONE, timeout=240)
        assert str(rec.state.value if hasattr(rec.state, "value") else rec.state) in (
            "reported",
            "delivered",
        ), rec.reason
        events = _rows(
            db,
            "select kind, to_state, details from events where series_uid = ? order by id",
            ge.series_uid,
        )
        selected = [json.loads(e["details"]) for e in events if e["to_state"] == "selected"]
        assert selected[0]["slice_thickness"] == 4.0
        assert selected[0]["slice_thickness_values"] == [4.0, 7.0]
        (corr,) = [json.loads(e["details"]) for e in events if e["kind"] == "geometry_corrected"]
        kinds = [c["kind"] for c in corr["corrections"]]
        assert kinds == ["slice_spacing_regularised", "gantry_tilt_resampled"]
        # no destination configured: the SRs stay in the spool
        srs = [
            hd.sr.srread(p)
            for p in (node.data_dir / "spool" / "reports").rglob("*.dcm")
            if not p.name.endswith(".sc.dcm")
        ]
        (sr,) = [
            s
            for s in srs
            if s.CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0]
            .SeriesInstanceUID
            == ge.series_uid
        ]
        texts = [
            i.TextValue
            for c in sr.ContentSequence
            if c.ConceptNameCodeSequence[0].CodeValue == "C0034375"
            for i in c.ContentSequence
        ]
        assert any("NOT FOR DIAGNOSTIC USE" in t for t in texts)
        assert any(
            "gantry tilt about 18.5 degrees" in t and "stepped slice spacing" in t for t in texts
        )

        # -- insane headers: skipped before inference, reason names the tag ------------------
        for uid, needle in (
            (slope0, "RescaleSlope (0028,1053) is 0"),
            (nan, "RescaleSlope (0028,1053) is nan"),
            (wide, "PixelSpacing (0028,0030) 60.0\\60.0 mm is outside"),
        ):
            rec = node.wait_series_state(uid, DONE, timeout=120)
            assert str(getattr(rec.state, "value", rec.state)) == "skipped", rec.reason
            assert needle in (rec.reason or ""), rec.reason
            assert _rows(db, "select id from jobs where series_uid = ?", uid) == []
            assert _rows(db, "select id from results where series_uid = ?", uid) == []

        # -- Legacy Converted Enhanced CT is stored and read -----------------------------------
        (inst,) = _rows(db, "select status, reason from instances where series_uid = ?", legacy)
        assert inst["status"] == "stored", inst["reason"]
        rec = node.wait_series_state(legacy, DONE, timeout=120)
        assert str(getattr(rec.state, "value", rec.state)) in ("reported", "delivered"), rec.reason

        # -- the synth folder arrived whole through the README's storescu line ----------------
        stored = _rows(
            db,
            "select count(*) n from instances where status = 'stored' and "
            "association_id in (select id from associations where "
            "calling_ae = 'DCMTKSCU')",
        )
        assert stored[0]["n"] == len(synth_dcm) + len(ge.paths)

        # -- Ctrl-C: the inference child does not print a KeyboardInterrupt traceback ---------
        wait_until(
            lambda: any(r.get("event") == "inference process ready" for r in node.log_records()),
            60,
            what="inference child up",
        )
        os.killpg(node.proc.pid, signal.SIGINT)
        node.proc.wait(60)
        log = node.log_text()
        assert node.proc.returncode == 0, node.log_tail()
        assert "KeyboardInterrupt" not in log and "Traceback" not in log, node.log_tail()


class _FakeRecipe:
    def __init__(self, **params: Any) -> None:
        self.params = params


class _FakePredictor:
    """Stands in for molre.checkpoint.Predictor: records whether the model was reached."""

    def __init__(self, **recipe: Any) -> None:
        self.recipe = _FakeRecipe(**recipe)
        self.called = False

    def predict_volume(self, volume: Any) -> Any:
        self.called = True
        pred = {"probabilities": {"a": 0.5}, "decisions": {"a": False}}
        return type("P", (), {"to_dict": lambda _self: dict(pred)})()


def test_predict_files_bounds_what_the_recipe_resamples(tmp_path: Path) -> None:
    """The limit is checked before the recipe allocates: a 3-D recipe at 0.5 mm over a
    216 x 216 x 100 mm head is ~37 M voxels, refused under a 1 M limit; 5 x 2 x 2 mm is not."""
    from common.errors import SeriesError
    from node.worker import predict_files

    paths = [str(p) for p in write_base_series(tmp_path / "s", np.random.default_rng(0))]
    fine = _FakePredictor(spacing=[0.5, 0.5, 0.5])
    with pytest.raises(SeriesError, match=r"more than model.max_resampled_voxels \(1,000,000\)"):
        predict_files(fine, paths, {"max_resampled_voxels": 1_000_000})
    assert not fine.called
    coarse = _FakePredictor(spacing=[5.0, 2.0, 2.0])
    out = predict_files(coarse, paths, {"max_resampled_voxels": 1_000_000})
    assert coarse.called and out["corrections"] == [] and out["slice_thickness"] == 5.0
    two_d = _FakePredictor(n_slices=16, size=224)
    with pytest.raises(SeriesError, match="max_resampled_voxels"):
        predict_files(two_d, paths, {"max_resampled_voxels": 10_000})
