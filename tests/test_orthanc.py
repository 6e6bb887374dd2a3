"""Round trip through a real PACS: Orthanc -> molre-node -> Orthanc.

A synthetic head-CT study is uploaded to Orthanc over REST, Orthanc C-STOREs it to the node (as a
PACS routing rule would), and the node must deliver its SR back into the *same study* in
Orthanc. The SR fetched from Orthanc is parsed with highdicom and must carry exactly the results
the node recorded in its audit database.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.nodeproc import NodeProcess, free_port, make_ct_series, wait_until
from tests.orthanc import (
    audit_results,
    model_section,
    orthanc_binary,
    sql,
    sr_findings,
    sr_source_series,
    start_orthanc,
)

pytestmark = pytest.mark.skipif(
    orthanc_binary() is None, reason="Orthanc not installed (apt-get install orthanc)"
)


def test_orthanc_sends_study_and_receives_sr(tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = start_orthanc(
        tmp_path / "orthanc", aet="ORTHANC", modalities={"molre": ("MOLRE", "127.0.0.1", node_port)}
    )
    try:
        node = NodeProcess.create(
            tmp_path,
            port=node_port,
            destinations=[
                {
                    "name": "orthanc",
                    "ae_title": "ORTHANC",
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                }
            ],
            # Orthanc, plus the test harness's own C-ECHO (NodeProcess.wait_ready, TESTSCU)
            network={
                "allowed_callers": [
                    {"ae_title": "ORTHANC", "host": "127.0.0.1/32"},
                    {"ae_title": "TESTSCU", "host": "127.0.0.1"},
                ]
            },
            model=model_section(),
        )
        with node:
            assert orthanc.echo("molre"), "Orthanc cannot C-ECHO the node"
            info = make_ct_series(
                tmp_path / "ct", ["subdural_hemorrhage"], n_slices=16, size=64, seed=3
            )
            answers = orthanc.upload_files(info.paths)
            study_id = answers[0]["ParentStudy"]
            assert orthanc.study_id(info.study_uid) == study_id
            assert len(orthanc.study_series(study_id)) == 1

            orthanc.store_to("molre", [study_id])

            def sr_series() -> dict | None:
                for s in orthanc.study_series(study_id):
                    if s["MainDicomTags"].get("Modality") == "SR" and s["Instances"]:
                        return s
                return None

            try:
                series = wait_until(
                    sr_series, timeout=180, interval=0.5, what="SR series in the Orthanc study"
                )
            except TimeoutError as exc:
                raise AssertionError(
                    f"{exc}\n--- node ---\n{node.log_tail(40)}\n"
                    f"--- orthanc ---\n{orthanc.log_tail(20)}"
                ) from None
            assert len(series["Instances"]) == 1, "one SR per series version"
            raw = orthanc.instance_file(series["Instances"][0])

            ds = pydicom.dcmread(__import__("io").BytesIO(raw))
            assert ds.StudyInstanceUID == info.study_uid
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
            assert sr_source_series(ds) == {info.series_uid}
            assert "NOT FOR DIAGNOSTIC USE" in ds.SeriesDescription

            found = sr_findings(raw)
            stored = audit_results(node.data_dir / "molre.db", info.series_uid)
            assert stored, "no results in the audit database"
            assert set(found) == set(stored)
            for key, (p, present) in stored.items():
                assert found[key][0] == pytest.approx(p, abs=1e-5), key
                assert found[key][1] == present, key

            # the audit trail: one delivered export to Orthanc, series delivered
            exports = sql(
                node.data_dir / "molre.db",
                "select destination, state, attempts from exports where series_uid = ?",
                info.series_uid,
            )
            assert exports == [("orthanc", "delivered", 1)]
            wait_until(
                lambda: (
                    sql(
                        node.data_dir / "molre.db",
                        "select state from series where series_uid = ?",
                        info.series_uid,
                    )
                    == [("delivered",)]
                ),
                timeout=30,
                what="series delivered",
            )
            # Orthanc got the instances from the node's calling AE? (it is the SR sender)
            assert (
                orthanc.get_json(f"/instances/{series['Instances'][0]}/metadata?expand").get(
                    "RemoteAET"
                )
                == "MOLRE"
            )
    finally:
        orthanc.stop()
