"""The node as a real subprocess: DICOM in, SR out, audit in between (issue 6).

One node (module fixture) serves the protocol tests; the crash and destination-down tests start
their own. Quiet times are short (1 s) so a series completes quickly.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from node.dicomnet import AssociationError
from tests.nodeproc import (
    NodeProcess,
    StorageSCP,
    dciodvfy_errors,
    echo,
    echoscu,
    free_port,
    make_ct_series,
    send_folder,
    sql,
    sr_for,
    storescu,
    wait_until,
)

CALLERS = [{"ae_title": "TESTSCU", "host": "127.0.0.1"}, {"ae_title": "DCMTKSCU", "host": ""}]
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MODEL: dict = {}  # default: the packaged demo checkpoint


def check_sr_matches_audit(
    node: NodeProcess, ds: pydicom.Dataset, series_uid: str, tmp: Path
) -> None:
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    import highdicom as hd

    groups = hd.sr.srread(path).content.get_image_measurement_groups()
    in_sr = {
        g.tracking_identifier: (
            g.get_measurements()[0].value,
            g.get_qualitative_evaluations()[0].value.value == "52101004",
        )
        for g in groups
    }
    version = sql(node, "SELECT version FROM series WHERE series_uid = ?", series_uid)[0][0]
    rows = sql(
        node,
        "SELECT finding_key, probability, decision FROM results "
        "WHERE series_uid = ? AND series_version = ?",
        series_uid,
        version,
    )
    in_db = {k: (p, bool(d)) for k, p, d in rows}
    assert in_db and set(in_sr) == set(in_db)
    for key, (p, decision) in in_db.items():
        assert in_sr[key][0] == pytest.approx(p, abs=1e-5), key
        assert in_sr[key][1] == decision, key


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("node")
    with StorageSCP("RESULTS") as scp:
        node = NodeProcess.create(
            tmp,
            destinations=[scp.destination()],
            network={"allowed_callers": CALLERS},
            metrics={"port": free_port()},
            model=MODEL,
        )
        node.start()
        try:
            yield node, scp, tmp
        finally:
            rc = node.stop()
            assert rc == 0, f"SIGTERM exit status {rc}\n{node.log_tail(30)}"


def test_series_via_pynetdicom_and_dcmtk_get_valid_srs(env) -> None:
    node, scp, tmp = env
    a = make_ct_series(tmp / "a", ["subdural_hemorrhage"], n_slices=12, seed=1)
    b = make_ct_series(tmp / "b", ["intraparenchymal_hemorrhage"], n_slices=12, seed=2)
    res = send_folder(a.paths, node.port, calling_ae="TESTSCU")
    assert res.statuses == [0] * len(a.paths)
    proc = storescu(b.paths, node.port, calling_ae="DCMTKSCU")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for info in (a, b):
        ds = sr_for(scp, info.series_uid, node)
        assert ds.StudyInstanceUID == info.study_uid
        assert ds.SeriesDescription.startswith("AI RESULTS – NOT FOR DIAGNOSTIC USE")
        if not MODEL.get("checkpoint"):
            assert ds.SeriesDescription.endswith("DEMO MODEL")
        check_sr_matches_audit(node, ds, info.series_uid, tmp)
    stored = sql(
        node,
        "SELECT COUNT(*) FROM instances WHERE series_uid = ? AND status = 'stored'",
        b.series_uid,
    )[0][0]
    assert stored == len(b.paths)
    wait_until(
        lambda: (
            sql(node, "SELECT state FROM series WHERE series_uid = ?", a.series_uid)[0][0]
            == "delivered"
        ),
        30,
        what="series delivered",
    )
    metrics = _metrics(node)
    assert metrics['molre_instances_received_total{outcome="stored"}'] >= 24
    assert metrics['molre_jobs_total{outcome="reported"}'] >= 2
    assert metrics['molre_exports_total{outcome="delivered"}'] >= 2
    assert metrics["molre_inference_seconds_count"] >= 2


def _metrics(node: NodeProcess) -> dict[str, float]:
    import tomllib
    import urllib.request

    port = tomllib.loads(node.config_path.read_text())["metrics"]["port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_echo_and_access_control(env) -> None:
    node, _scp, tmp = env
    assert echo(node.port, node.ae_title, calling_ae="TESTSCU") == 0
    proc = echoscu(node.port, called_ae=node.ae_title, calling_ae="DCMTKSCU")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = make_ct_series(tmp / "one", [], n_slices=1, seed=9).paths
    with pytest.raises(AssociationError, match=r"rejected \(result 1, source 1, reason 3\)"):
        send_folder(one, node.port, calling_ae="INTRUDER")
    with pytest.raises(AssociationError, match=r"rejected \(result 1, source 1, reason 7\)"):
        send_folder(one, node.port, called_ae="NOTMOLRE", calling_ae="TESTSCU")
    assert echo(node.port, node.ae_title, calling_ae="INTRUDER") is None
    rows = sql(
        node, "SELECT calling_ae, reject_reason FROM associations WHERE outcome = 'rejected'"
    )
    assert any(c == "INTRUDER" and "INTRUDER" in r for c, r in rows)
    assert any(c == "TESTSCU" and "NOTMOLRE" in r for c, r in rows)
    assert not sql(
        node,
        "SELECT 1 FROM instances WHERE sop_instance_uid = ?",
        str(pydicom.dcmread(one[0]).SOPInstanceUID),
    )


def test_mr_ignored_localizer_skipped_two_series_two_reports(env) -> None:
    node, scp, tmp = env
    head = make_ct_series(tmp / "h1", [], n_slices=12, seed=3)
    head2 = make_ct_series(tmp / "h2", ["hydrocephalus"], n_slices=12, seed=4)
    loc = make_ct_series(
        tmp / "loc",
        [],
        n_slices=3,
        seed=5,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        SeriesDescription="Topogram",
    )
    # an MR image: a CT object relabelled (the receiver only looks at class + header)
    mr_path = tmp / "mr.dcm"
    mr = pydicom.dcmread(head.paths[0])
    mr.SOPClassUID = MR_IMAGE_STORAGE
    mr.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    mr.SOPInstanceUID = mr.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    mr.SeriesInstanceUID = pydicom.uid.generate_uid()
    mr.Modality = "MR"
    mr.save_as(mr_path, enforce_file_format=True)
    files = [*head.paths, *head2.paths, *loc.paths, mr_path]
    res = send_folder(files, node.port, calling_ae="TESTSCU")  # ONE association
    assert res.statuses == [0] * len(files)
    sr1 = sr_for(scp, head.series_uid, node)
    sr2 = sr_for(scp, head2.series_uid, node)
    assert sr1.SOPInstanceUID != sr2.SOPInstanceUID
    rec = node.wait_series_state(loc.series_uid, ["skipped"], timeout=30)
    assert rec.reason == "image_type: LOCALIZER"
    events = sql(
        node,
        "SELECT details FROM events WHERE series_uid = ? AND to_state = 'skipped'",
        loc.series_uid,
    )
    assert events and "image_type: LOCALIZER" in events[0][0]
    ignored = sql(
        node,
        "SELECT status, reason FROM instances WHERE sop_instance_uid = ?",
        str(mr.SOPInstanceUID),
    )
    assert ignored and ignored[0][0] == "ignored" and "MR Image Storage" in ignored[0][1]


def test_late_instance_reopens_series_as_new_report_version(env) -> None:
    node, scp, tmp = env
    info = make_ct_series(tmp / "late", ["acute_infarct"], n_slices=13, seed=8)
    first, late = info.paths[:12], info.paths[12:]
    assert send_folder(first, node.port, calling_ae="TESTSCU").statuses == [0] * 12
    sr1 = sr_for(scp, info.series_uid, node)
    node.wait_series_state(info.series_uid, ["delivered"], timeout=30)
    assert send_folder(late, node.port, calling_ae="TESTSCU").statuses == [0]

    def second():
        srs = [
            d
            for d in scp.received
            if d.Modality == "SR" and d.SeriesInstanceUID == sr1.SeriesInstanceUID
        ]
        return len(srs) >= 2 and srs

    srs = wait_until(second, 150, what="second report version")
    v2 = max(srs, key=lambda d: d.InstanceNumber)
    assert (sr1.InstanceNumber, v2.InstanceNumber) == (1, 2)
    assert v2.SOPInstanceUID != sr1.SOPInstanceUID
    evidence = {
        r.ReferencedSOPInstanceUID
        for st in v2.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    assert str(pydicom.dcmread(late[0]).SOPInstanceUID) in evidence
    rec = node.wait_series_state(info.series_uid, ["delivered"], timeout=30)
    assert rec.version == 2


def test_destination_down_then_up_and_kill_9_then_restart(tmp_path: Path) -> None:
    """Two robustness promises with one node (each model load costs a lot on a small CPU).

    1. The destination is down while the report is ready: the export keeps failing and being
       retried; once the destination is up the SR is delivered (no restart needed).
    2. kill -9 right after the sender got Success for every instance: after a restart the
       series is still assembled, read and reported.
    """
    port = free_port()
    dest = {"name": "late", "ae_title": "LATEPACS", "host": "127.0.0.1", "port": port}
    node = NodeProcess.create(
        tmp_path, destinations=[dest], model=MODEL, quiet_time_s=2.0, release_grace_s=1.0
    )
    scp = StorageSCP("LATEPACS", port=port)
    with node:
        a = make_ct_series(tmp_path / "a", ["skull_fracture"], n_slices=12, seed=7)
        assert node.send(a.paths).statuses == [0] * len(a.paths)

        def failed_attempts():
            rows = sql(
                node,
                "SELECT attempts, state, last_error FROM exports WHERE series_uid = ?",
                a.series_uid,
            )
            return rows and rows[0][0] >= 2 and rows[0][1] == "pending" and rows[0][2]

        try:
            wait_until(failed_attempts, 180, what="failed export attempts")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{node.log_tail(30)}") from None
        assert (
            sql(node, "SELECT state FROM series WHERE series_uid = ?", a.series_uid)[0][0]
            == "reported"
        )
        with scp:
            ds = sr_for(scp, a.series_uid, node, timeout=60)
            assert ds.StudyInstanceUID == a.study_uid
            node.wait_series_state(a.series_uid, ["delivered"], timeout=30)

            b = make_ct_series(tmp_path / "b", ["epidural_hematoma"], n_slices=12, seed=6)
            assert node.send(b.paths).statuses == [0] * len(b.paths)
            node.kill()
            state = sql(node, "SELECT state FROM series WHERE series_uid = ?", b.series_uid)
            assert state and state[0][0] in ("receiving", "complete", "selected", "queued")
            node.start()
            ds = sr_for(scp, b.series_uid, node)
            assert ds.StudyInstanceUID == b.study_uid
            node.wait_series_state(b.series_uid, ["delivered"], timeout=30)
            assert node.stop() == 0
        srs = [d for d in scp.received if d.Modality == "SR"]
        assert len(srs) == 2  # each report delivered once


def test_sigterm_during_a_transfer_finishes_it_and_exits_0(tmp_path: Path) -> None:
    import threading

    info = make_ct_series(tmp_path / "ct", [], n_slices=40, size=96, seed=10)
    node = NodeProcess.create(tmp_path, model=MODEL)
    node.start()
    out: dict = {}
    sender = threading.Thread(target=lambda: out.update(r=storescu(info.paths, node.port)))
    sender.start()
    wait_until(
        lambda: sql(node, "SELECT COUNT(*) FROM instances")[0][0] >= 1,
        60,
        what="first instance stored",
    )
    rc = node.stop()
    sender.join(120)
    assert rc == 0, node.log_tail(20)
    assert out["r"].returncode == 0, out["r"].stdout + out["r"].stderr
    # every instance the sender was told about is durable and recorded
    assert sql(node, "SELECT COUNT(*) FROM instances WHERE status = 'stored'")[0][0] == 40
    assert len(list((node.data_dir / "spool" / "instances").rglob("*.dcm"))) == 40
