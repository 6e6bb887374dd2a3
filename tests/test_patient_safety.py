"""Patient safety with the real node (issue 12): a second patient reusing a SeriesInstanceUID is
refused and never ends up in a report; names and hostile header values never reach the logs, the
audit database or the spool's metadata; every stderr line is JSON.

One node (module fixture) serves both tests; they use different UIDs.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pydicom
import pytest

from tests.nodeproc import NodeProcess, StorageSCP, make_ct_series, send_folder, wait_until

NAME = "DOEPATIENT"  # single component: highdicom warns with it when it builds the SR
PATIENT_ID = "DOEID4711"
#: newline, a forged JSON log line, ANSI escapes
HOSTILE = 'x\n{"event": "forged", "level": "critical"}\n\x1b[31mRED\x1b[0m\r'
FINAL = ("reported", "delivered", "failed", "skipped")


def sql(node: NodeProcess, query: str, *args) -> list[tuple]:
    con = sqlite3.connect(f"file:{node.data_dir / 'molre.db'}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(query, args).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("safety")
    with StorageSCP("RESULTS") as scp:
        node = NodeProcess.create(tmp, destinations=[scp.destination()])
        node.start()
        try:
            yield node, scp, tmp
        finally:
            rc = node.stop()
            assert rc == 0, f"SIGTERM exit status {rc}\n{node.log_tail(30)}"


def _evidence(sr: pydicom.Dataset) -> set[str]:
    return {
        sop.ReferencedSOPInstanceUID
        for st in sr.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for sop in se.ReferencedSOPSequence
    }


def _sops(paths) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}


def test_second_patient_reusing_a_series_uid_is_refused_and_no_report_mixes_patients(env) -> None:
    node, scp, tmp = env
    a = make_ct_series(
        tmp / "a", [], n_slices=10, seed=81, PatientID="SAFE-A", PatientName="ALPHA^ANN"
    )
    assert send_folder(a.paths, node.port).statuses == [0] * 10
    node.wait_series_state(a.series_uid, ("delivered",))
    # another patient's study reusing the SeriesInstanceUID with new SOP Instance UIDs
    b = make_ct_series(
        tmp / "b",
        [],
        n_slices=10,
        seed=82,
        PatientID="SAFE-B",
        PatientName="BETA^BOB",
        SeriesInstanceUID=a.series_uid,
    )
    res = send_folder(b.paths, node.port)
    assert all(s is not None and 0xC000 <= s <= 0xCFFF for s in res.statuses), res.statuses
    # the same study and series UIDs under another PatientID (an anonymiser's collision)
    c = make_ct_series(
        tmp / "c",
        [],
        n_slices=10,
        seed=83,
        PatientID="SAFE-C",
        PatientName="GAMMA^GUS",
        StudyInstanceUID=a.study_uid,
        SeriesInstanceUID=a.series_uid,
    )
    res = send_folder(c.paths, node.port)
    assert all(s is not None and 0xC000 <= s <= 0xCFFF for s in res.statuses), res.statuses

    # refused, audited, not merged: the series is still patient A's, version 1
    assert sql(
        node,
        "SELECT study_uid, version, instance_count, state FROM series WHERE series_uid = ?",
        a.series_uid,
    ) == [(a.study_uid, 1, 10, "delivered")]
    assert sql(
        node,
        "SELECT COUNT(*) FROM instances WHERE series_uid = ? AND status = 'stored'",
        a.series_uid,
    ) == [(10,)]
    assert sql(
        node,
        "SELECT COUNT(*) FROM events WHERE kind = 'identity_conflict' AND series_uid = ?",
        a.series_uid,
    ) == [(20,)]
    assert sql(node, "SELECT COUNT(*) FROM events WHERE kind = 'reopened'") == [(0,)]
    # every report the node sent cites one patient's images and carries that patient
    srs = [ds for ds in list(scp.received) if ds.Modality == "SR"]
    assert srs
    a_sops, foreign = _sops(a.paths), _sops(b.paths) | _sops(c.paths)
    for sr in srs:
        cited = _evidence(sr)
        assert not cited & foreign
        if cited & a_sops:
            assert cited <= a_sops and sr.PatientID == "SAFE-A"
            assert sr.StudyInstanceUID == a.study_uid


def _hostile_series(src: list[Path], out: Path) -> list[Path]:
    """The phantom with hostile values in text elements and the character set."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in src:
        ds = pydicom.dcmread(p)
        ds.PatientName = NAME
        ds.PatientID = PATIENT_ID
        ds.SeriesDescription = HOSTILE
        ds.StudyDescription = HOSTILE
        ds.InstitutionName = HOSTILE
        ds.ProtocolName = HOSTILE
        ds.SpecificCharacterSet = HOSTILE  # pydicom: "Unknown encoding '<value>'" warnings
        dst = out / p.name
        ds.save_as(dst, enforce_file_format=True)
        paths.append(dst)
    return paths


def test_no_name_and_no_raw_bytes_in_anything_the_node_wrote(env) -> None:
    node, scp, tmp = env
    plain = make_ct_series(
        tmp / "n1", [], n_slices=10, seed=91, PatientName=NAME, PatientID=PATIENT_ID
    )
    base = make_ct_series(tmp / "n2src", [], n_slices=10, seed=92)
    hostile = _hostile_series(base.paths, tmp / "n2")
    assert send_folder(plain.paths, node.port).statuses == [0] * 10
    res = send_folder(hostile, node.port)
    assert all(s == 0 for s in res.statuses), res.statuses
    rec = node.wait_series_state(plain.series_uid, ("delivered",))
    assert rec.instance_count == 10
    node.wait_series_state(base.series_uid, FINAL)
    # the SR of the single-component name was built (highdicom warned about it)
    wait_until(
        lambda: (
            sql(
                node,
                "SELECT COUNT(*) FROM exports WHERE series_uid = ? AND state = 'delivered'",
                plain.series_uid,
            )[0][0]
            == 1
        ),
        30,
    )

    log = node.log_path.read_bytes()
    # the node is still running: a last line without its newline is being written right now
    text = log.decode("utf-8", "replace")
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
    lines = [ln for ln in complete.splitlines() if ln.strip()]
    assert lines
    bad = []
    for ln in lines:
        try:
            rec_ = json.loads(ln)
            assert isinstance(rec_, dict)
        except (ValueError, AssertionError):
            bad.append(ln)
    assert bad == [], bad[:5]
    records = [json.loads(ln) for ln in lines]
    assert not any(r.get("event") == "forged" for r in records)
    assert any(r.get("logger") == "banner" or "serving AE" in str(r.get("event")) for r in records)
    warned = [r for r in records if r.get("event") == "python warning"]
    assert any("unlikely to represent" in r.get("message", "") for r in warned), (
        "highdicom's single-component name warning was not captured (the test proves nothing)"
    )
    assert any(r.get("logger") == "pydicom" for r in records)  # pydicom's own log lines too

    # every byte the node wrote: its log, the database (+ WAL), everything in the data dir but
    # the DICOM objects themselves (received instances and the SRs carry the name by design)
    written: dict[str, bytes] = {"stderr": log}
    for f in node.data_dir.rglob("*"):
        if f.is_file() and not f.name.endswith(".dcm"):
            written[str(f.relative_to(node.data_dir))] = f.read_bytes()
    assert any(k.startswith("molre.db") for k in written)
    for where, data in written.items():
        for needle in (NAME.encode(), PATIENT_ID.encode()):
            assert needle not in data, f"{needle!r} found in {where}"
        if where != "stderr":
            assert b"\x1b[31m" not in data, f"raw ANSI escape in {where}"
    assert b"\x1b" not in log and b'\n{"event": "forged"' not in log
    # the audit text of the hostile series: no control characters
    for (reason,) in sql(node, "SELECT reason FROM series WHERE reason IS NOT NULL") + sql(
        node, "SELECT error FROM jobs WHERE error IS NOT NULL"
    ):
        assert not any(ord(ch) < 32 for ch in reason), reason
