"""Node building blocks without a network: access control, header meta, backoff, TOML writer."""

from __future__ import annotations

import tomllib

import pydicom
import pytest

from node.config import AllowedCaller, config_from_dict
from node.dispatcher import backoff_s
from node.header import read_header
from node.receiver import REJECT_CALLED_AE, REJECT_CALLING_AE, check_access
from tests.nodeproc import node_config, to_toml

ALLOWED = [
    AllowedCaller("PACS", "10.1.2.0/24"),
    AllowedCaller("SCANNER", ""),
    AllowedCaller("*", "192.168.7.7"),
]


def access(
    calling: str, host: str, called: str = "MOLRE", allowed=ALLOWED, require_called: bool = True
):
    return check_access(
        calling, called, host, own_ae="MOLRE", require_called_ae=require_called, allowed=allowed
    )


def test_allow_list() -> None:
    assert access("PACS", "10.1.2.44").allowed
    assert access("SCANNER", "172.16.0.1").allowed  # no host restriction
    assert access("ANYONE", "192.168.7.7").allowed  # host-only rule
    d = access("PACS", "10.9.9.9")
    assert not d.allowed and d.diagnostic == REJECT_CALLING_AE and "10.9.9.9" in d.reason
    d = access("INTRUDER", "10.1.2.44")
    assert not d.allowed and d.diagnostic == REJECT_CALLING_AE and "INTRUDER" in d.reason


def test_empty_allow_list_allows_all_but_called_ae_is_checked() -> None:
    assert access("WHOEVER", "8.8.8.8", allowed=[]).allowed
    d = access("PACS", "10.1.2.44", called="OTHER")
    assert not d.allowed and d.diagnostic == REJECT_CALLED_AE
    assert access("PACS", "10.1.2.44", called="OTHER", require_called=False).allowed


def test_header_meta_plain_and_enhanced() -> None:
    ds = pydicom.Dataset()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.NumberOfFrames = 40
    fg = pydicom.Dataset()
    pm = pydicom.Dataset()
    pm.SliceThickness = "1.25"
    pm.PixelSpacing = ["0.5", "0.5"]
    po = pydicom.Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    fg.PixelMeasuresSequence = [pm]
    fg.PlaneOrientationSequence = [po]
    ds.SharedFunctionalGroupsSequence = [fg]
    ds.PatientName = "Secret^Person"
    meta = read_header(ds, None, with_phi=False).meta
    assert meta["SliceThickness"] == 1.25 and meta["NumberOfFrames"] == 40
    assert meta["ImageOrientationPatient"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert meta["ImageType"] == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    assert "PatientName" not in meta  # no PHI in meta


def test_export_backoff_is_exponential_and_capped() -> None:
    delays = [backoff_s(n, 5.0, 60.0) for n in range(1, 7)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]


def test_test_config_writer_roundtrips(tmp_path) -> None:
    data = node_config(
        tmp_path,
        12345,
        destinations=[{"name": "p", "ae_title": "P", "host": "127.0.0.1", "port": 1}],
        network={"allowed_callers": [{"ae_title": "A", "host": ""}]},
    )
    parsed = tomllib.loads(to_toml(data))
    cfg = config_from_dict(parsed)
    assert cfg.network.port == 12345 and cfg.destinations[0].ae_title == "P"
    assert cfg.network.allowed_callers[0].ae_title == "A"
    assert cfg.assembler.quiet_time_s == pytest.approx(1.0)
