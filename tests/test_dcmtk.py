"""dcmtk as an independent DICOM implementation against the node: echoscu, storescu, JPEG.

dcmtk negotiates, encodes and times out differently from pynetdicom (the node's own stack), so it
catches assumptions that a pynetdicom-only test would share with the node. The JPEG case sends a
series compressed by dcmtk's own encoder (`dcmcjpeg +e1`, JPEG Lossless SV1): the node must
accept it in that transfer syntax, keep it as received, and still read it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.nodeproc import NodeProcess, StorageSCP, make_ct_series, wait_until
from tests.orthanc import (
    audit_results,
    dcmtk_tool,
    have_dcmtk,
    model_section,
    sql,
    sr_findings,
    sr_source_series,
)

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


pytestmark = pytest.mark.skipif(
    not have_dcmtk("echoscu", "storescu", "dcmcjpeg"),
    reason="dcmtk not installed (apt-get install dcmtk)",
)

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)


@pytest.fixture(scope="module")
def node_and_scp(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("dcmtk")
    with StorageSCP("DCMTKPACS", store_dir=tmp / "received") as scp:
        node = NodeProcess.create(tmp, destinations=[scp.destination()], model=model_section())
        with node:
            yield node, scp


def _sr_for(scp: StorageSCP, series_uid: str, timeout: float = 180) -> pydicom.Dataset:
    def find():
        for ds in list(scp.received):
            if ds.Modality == "SR" and series_uid in sr_source_series(ds):
                return ds
        return None

    return wait_until(find, timeout=timeout, interval=0.5, what=f"SR for {series_uid}")


def _check_sr(node: NodeProcess, scp: StorageSCP, series_uid: str) -> None:
    try:
        ds = _sr_for(scp, series_uid)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{node.log_tail(40)}") from None
    path = scp.store_dir / f"{ds.SOPInstanceUID}.dcm"  # type: ignore[operator]
    found = sr_findings(path)
    stored = audit_results(node.data_dir / "molre.db", series_uid)
    assert stored and set(found) == set(stored)
    for key, (p, present) in stored.items():
        assert found[key] == (pytest.approx(p, abs=1e-5), present), key


def test_echoscu(node_and_scp) -> None:
    node, _ = node_and_scp
    res = _run(
        [
            dcmtk_tool("echoscu"),
            "-aet",
            "DCMTKSCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
        ]
    )
    assert res.returncode == 0, res.stderr
    # a wrong called AE title is rejected (require_called_ae defaults to true)
    res = _run(
        [dcmtk_tool("echoscu"), "-aet", "DCMTKSCU", "-aec", "NOTMOLRE", "127.0.0.1", str(node.port)]
    )
    assert res.returncode != 0
    assert "Called AE Title Not Recognized" in (res.stderr + res.stdout)
    rows = sql(
        node.data_dir / "molre.db",
        "select outcome, reject_reason from associations where called_ae = 'NOTMOLRE'",
    )
    assert len(rows) == 1 and rows[0][1], rows


def test_storescu_uncompressed(node_and_scp, tmp_path: Path) -> None:
    node, scp = node_and_scp
    info = make_ct_series(
        tmp_path / "ct", ["intraparenchymal_hemorrhage"], n_slices=16, size=64, seed=11
    )
    res = _run(
        [
            dcmtk_tool("storescu"),
            "-aet",
            "DCMTKSCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            *map(str, info.paths),
        ]
    )
    assert res.returncode == 0, res.stderr
    _check_sr(node, scp, info.series_uid)


def test_storescu_jpeg_lossless(node_and_scp, tmp_path: Path) -> None:
    node, scp = node_and_scp
    info = make_ct_series(tmp_path / "ct", ["subdural_hemorrhage"], n_slices=16, size=64, seed=12)
    jpeg_dir = tmp_path / "jpeg"
    jpeg_dir.mkdir()
    jpegs = []
    for p in info.paths:
        out = jpeg_dir / p.name
        res = _run([dcmtk_tool("dcmcjpeg"), "+e1", str(p), str(out)])
        assert res.returncode == 0, res.stderr
        jpegs.append(out)
    assert pydicom.dcmread(jpegs[0]).file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    # -xs: propose JPEG Lossless SV1 first (then uncompressed), as a PACS holding compressed
    # objects does; the node must pick JPEG and keep the objects as they are
    res = _run(
        [
            dcmtk_tool("storescu"),
            "-xs",
            "-R",
            "-aet",
            "DCMTKSCU",
            "-aec",
            node.ae_title,
            "127.0.0.1",
            str(node.port),
            *map(str, jpegs),
        ]
    )
    assert res.returncode == 0, res.stderr + res.stdout
    rows = sql(
        node.data_dir / "molre.db",
        "select transfer_syntax, spool_path from instances where series_uid = ? "
        "and status = 'stored'",
        info.series_uid,
    )
    assert len(rows) == len(jpegs)
    assert {ts for ts, _ in rows} == {JPEG_LOSSLESS_SV1}
    # stored as received: the spooled object is still JPEG-compressed
    spooled = pydicom.dcmread(rows[0][1])
    assert spooled.file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    _check_sr(node, scp, info.series_uid)
