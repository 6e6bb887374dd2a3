"""From a PACS and its reports to `train` (issue 19), against a real Orthanc.

Phantom head-CT studies with accession numbers are loaded into Orthanc; reports are written for
them; then the three commands a site runs: `molre-node labels`, `molre-node dataset pull` (C-FIND
study/series/image, the node's selection rules, C-GET) and `molre-node train` for one epoch with
the tiny-3d backbone. Also: a re-run fetches nothing, a lost series is fetched again, a missing
accession and a localizer are skipped with their reasons, no PHI reaches the logs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from molre.catalog import load_catalog
from molre.data.manifest import read_manifest
from molre.data.synth import write_phantom_series
from tests.orthanc import orthanc_binary, start_orthanc

pytestmark = pytest.mark.skipif(
    orthanc_binary() is None, reason="Orthanc not installed (apt-get install orthanc)"
)

ROOT = Path(__file__).resolve().parents[1]
# accession -> (patient, findings, report)
STUDIES = {
    "ACC1001": (
        "PAT-ALPHA",
        ["subdural_hemorrhage"],
        "Clinical history: fall.\nFindings: Acute left subdural hematoma. No midline "
        "shift.\nImpression: Acute left SDH.",
    ),
    "ACC1002": (
        "PAT-ALPHA",
        [],
        "Comparison: prior CT with subdural hematoma.\nImpression: The previously seen "
        "subdural hematoma has resolved. No acute intracranial abnormality.",
    ),
    "ACC1003": (
        "PAT-BRAVO",
        ["intraparenchymal_hemorrhage"],
        "Findings: Right frontal intraparenchymal hemorrhage. Possible small subdural "
        "hematoma cannot be excluded.",
    ),
    "ACC1004": (
        "PAT-CHARLIE",
        ["hydrocephalus"],
        "Indication: rule out bleed.\nImpression: Hydrocephalus. No hemorrhage.",
    ),
    "ACC1005": (
        "PAT-DELTA",
        [],
        "Impression: No acute intracranial abnormality. The ventricles are normal in size.",
    ),
}
MISSING = "ACC9999"  # a report without a study in the PACS


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def _load_pacs(tmp: Path, orthanc) -> dict[str, str]:
    """Write the phantom studies and upload them; returns accession -> chosen series UID."""
    thin: dict[str, str] = {}
    for i, (acc, (patient, findings, _)) in enumerate(STUDIES.items()):
        rng = np.random.default_rng(100 + i)
        info = write_phantom_series(
            tmp / "dicom" / acc,
            rng,
            findings,
            size=48,
            n_slices=18,
            slice_thickness=5.0,
            site="metro",
            AccessionNumber=acc,
            PatientID=patient,
        )
        orthanc.upload_files(info.paths)
        thin[acc] = info.series_uid
        if acc == "ACC1004":  # same study: a thicker series and a localizer, both not chosen
            for name, tags, n, t in (
                ("thick", {}, 18, 8.0),
                ("scout", {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, 18, 5.0),
            ):
                extra = write_phantom_series(
                    tmp / "dicom" / f"{acc}-{name}",
                    np.random.default_rng(7),
                    findings,
                    size=48,
                    n_slices=n,
                    slice_thickness=t,
                    site="metro",
                    AccessionNumber=acc,
                    PatientID=patient,
                    StudyInstanceUID=info.study_uid,
                    SeriesInstanceUID=generate_uid(),
                    **tags,
                )
                orthanc.upload_files(extra.paths)
    return thin


def test_pacs_and_reports_to_train(tmp_path: Path) -> None:
    orthanc = start_orthanc(
        tmp_path / "orthanc", aet="ORTHANC", modalities={"molre": ("MOLRE", "127.0.0.1", 1)}
    )
    try:
        chosen = _load_pacs(tmp_path, orthanc)
        reports = tmp_path / "reports.csv"
        with reports.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["accession_number", "report_text"])
            for acc, (_, _, text) in STUDIES.items():
                w.writerow([acc, text])
            w.writerow([MISSING, "No acute intracranial abnormality."])

        # 1. labels
        labels = tmp_path / "labels.csv"
        r = _cli("labels", str(reports), "--out", str(labels), "--no-progress")
        assert r.returncode == 0, r.stderr[-3000:]

        # 2. dataset pull
        ds = tmp_path / "ds"
        pacs = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        r = _cli(
            "dataset",
            "pull",
            str(labels),
            "--pacs",
            pacs,
            "--out",
            str(ds),
            "--no-progress",
            "--workers",
            "2",
            "--split",
            "60,20,20",
        )
        assert r.returncode == 0, r.stderr[-3000:] + orthanc.log_tail()
        logs = r.stdout + r.stderr
        for phi in ("PAT-ALPHA", "PAT-BRAVO", "ACC1001", "ACC1004", MISSING):
            assert phi not in logs, phi
        assert "fetched 5" in r.stdout and "not found 1" in r.stdout, r.stdout

        cat = load_catalog()
        rows = read_manifest(ds / "manifest.csv", cat)
        assert len(rows) == 5
        series = list(csv.DictReader((ds / "series.csv").open()))
        by_path = {s["path"]: s for s in series}
        assert {s["series_uid"] for s in series} == set(chosen.values())  # thin axial chosen
        assert all(r.site == "SIM-SIEMENS Definition AS sim" for r in rows)
        assert all(not r.patient_id.startswith("PAT-") for r in rows)  # pseudonymised
        assert len({r.patient_id for r in rows}) == 4
        alpha = [
            r
            for r in rows
            if by_path[r.path.relative_to(ds).as_posix()]["series_uid"]
            in (chosen["ACC1001"], chosen["ACC1002"])
        ]
        assert len({r.split for r in alpha}) == 1  # one patient, one split
        lab = {
            by_path[r.path.relative_to(ds).as_posix()]["series_uid"]: r.label_dict(cat)
            for r in rows
        }
        sdh = lab[chosen["ACC1001"]]
        assert sdh["subdural_hemorrhage"] == 1 and sdh["midline_shift"] == 0
        assert lab[chosen["ACC1002"]]["subdural_hemorrhage"] == 0
        assert np.isnan(lab[chosen["ACC1003"]]["subdural_hemorrhage"])  # uncertain -> blank
        assert lab[chosen["ACC1004"]]["hydrocephalus"] == 1
        assert len(list((ds / rows[0].path.relative_to(ds)).glob("*.dcm"))) == 18
        skipped = list(csv.DictReader((ds / "skipped.csv").open()))
        assert [(s["accession_number"], s["reason"].split(":")[0]) for s in skipped] == [
            (MISSING, "not found")
        ]
        info = json.loads((ds / "dataset.json").read_text())
        assert info["uncertain_policy"] == "blank" and info["pseudonymised"] is True
        assert info["series_not_chosen"] == {"image_type": 1, "preference": 1}

        # resumable: nothing fetched again; a lost series is fetched again
        r = _cli(
            "dataset",
            "pull",
            str(labels),
            "--pacs",
            pacs,
            "--out",
            str(ds),
            "--no-progress",
            "--split",
            "60,20,20",
        )
        assert r.returncode == 0 and "fetched 0, already there 5" in r.stdout, r.stdout
        before = (ds / "manifest.csv").read_text()
        lost = next(p for p in (ds / "series").iterdir() if (p / "done.json").exists())
        for child in lost.iterdir():
            if child.is_dir():
                for f in child.iterdir():
                    f.unlink()
                child.rmdir()
        r = _cli(
            "dataset",
            "pull",
            str(labels),
            "--pacs",
            pacs,
            "--out",
            str(ds),
            "--no-progress",
            "--split",
            "60,20,20",
        )
        assert r.returncode == 0 and "fetched 1, already there 4" in r.stdout, r.stdout
        assert (ds / "manifest.csv").read_text() == before  # same rows, same splits
    finally:
        orthanc.stop()

    # 3. train one epoch on what came out of the PACS
    run = tmp_path / "run"
    r = _cli(
        "train",
        "--data",
        str(ds / "manifest.csv"),
        "--out",
        str(run),
        "--backbone",
        "tiny-3d",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
        "--device",
        "cpu",
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "best").is_dir() and (run / "metrics.jsonl").exists()


def test_select_study_split_and_pacs_parsing() -> None:
    from common.errors import MolreError
    from node.config import SelectionConfig
    from node.pull import Pacs, parse_split, split_of
    from node.selection import select_study, summarize

    def meta(**over):
        m = {
            "Modality": "CT",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "BodyPartExamined": "HEAD",
            "SliceThickness": 5.0,
            "ConvolutionKernel": "H31s",
        }
        m.update(over)
        return m

    thin = summarize("1.2.1", [meta(SliceThickness=2.5)] * 20, study_uid="1.2")
    thick = summarize("1.2.2", [meta()] * 20, study_uid="1.2")
    scout = summarize("1.2.3", [meta(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])] * 3)
    chosen, why = select_study([thick, scout, thin], SelectionConfig())
    assert [c.series_uid for c in chosen] == ["1.2.1"]
    assert why["1.2.3"].startswith("image_type") and why["1.2.2"].startswith("preference")

    key = b"k" * 32
    splits = [split_of(f"P{i}", key, (0.6, 0.2, 0.2)) for i in range(300)]
    assert splits == [split_of(f"P{i}", key, (0.6, 0.2, 0.2)) for i in range(300)]
    assert 0.5 < splits.count("train") / 300 < 0.7 and splits.count("test") > 30
    assert parse_split("70,15,15") == pytest.approx((0.7, 0.15, 0.15))
    assert Pacs.parse("PACS@10.0.0.5:104") == Pacs("PACS", "10.0.0.5", 104)
    for bad in ("PACS:104", "PACS@host", "TOO_LONG_AE_TITLE_X@h:1"):
        with pytest.raises(MolreError, match="AET@host:port"):
            Pacs.parse(bad)
    with pytest.raises(MolreError, match="--split"):
        parse_split("1,2")
