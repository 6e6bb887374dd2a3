"""common/: functional-group lookup (one precedence for the node and the volume reader), JSON
values, atomic writes."""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import IS, DSfloat, PersonName

from common.dicom import CT_STORAGE_CLASSES, functional_group_value
from common.fs import atomic_write
from common.jsonsafe import json_default, jsonable
from node.header import read_header


def _item(**macros: dict) -> Dataset:
    item = Dataset()
    for seq, attrs in macros.items():
        inner = Dataset()
        for k, v in attrs.items():
            setattr(inner, k, v)
        setattr(item, seq, Sequence([inner]))
    return item


def _enhanced(shared: dict, per_frame: list[dict]) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    ds.Modality = "CT"
    ds.NumberOfFrames = len(per_frame)
    ds.SharedFunctionalGroupsSequence = Sequence([_item(**shared)])
    ds.PerFrameFunctionalGroupsSequence = Sequence([_item(**f) for f in per_frame])
    return ds


def test_ct_storage_classes_come_from_pydicom() -> None:
    assert [str(u) for u in CT_STORAGE_CLASSES] == [
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.5.1.4.1.1.2.1",
        "1.2.840.10008.5.1.4.1.1.2.2",
    ]


def test_per_frame_functional_group_overrides_shared() -> None:
    ds = _enhanced(
        {
            "PixelMeasuresSequence": {"PixelSpacing": [0.5, 0.5], "SliceThickness": 5},
            "CTReconstructionSequence": {"ConvolutionKernel": "STANDARD"},
        },
        [{"PixelMeasuresSequence": {"PixelSpacing": [0.7, 0.7]}}] * 2,
    )
    frame = ds.PerFrameFunctionalGroupsSequence[0]
    assert [
        float(v) for v in functional_group_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    ] == [0.7, 0.7]
    # the frame's macro lacks the attribute: the shared one answers
    assert functional_group_value(ds, frame, "PixelMeasuresSequence", "SliceThickness") == 5
    assert (
        functional_group_value(ds, frame, "CTReconstructionSequence", "ConvolutionKernel")
        == "STANDARD"
    )
    # neither: the top-level attribute, else None
    assert functional_group_value(ds, frame, "CTReconstructionSequence", "Modality") == "CT"
    assert (
        functional_group_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        is None
    )
    # the header the node stores follows the same precedence (was shared-first)
    meta = read_header(ds, ExplicitVRLittleEndian).meta
    assert meta["PixelSpacing"] == [0.7, 0.7]
    assert meta["SliceThickness"] == 5.0 and meta["ConvolutionKernel"] == "STANDARD"


def test_volume_reader_uses_the_same_lookup() -> None:
    import molre.data.volume as volume

    assert volume.functional_group_value is functional_group_value


class _Colour(enum.Enum):
    RED = "red"


class _Card:
    def to_dict(self) -> dict:
        return {"n": np.int64(3)}


def test_jsonable_converts_what_the_callers_store() -> None:
    value = {
        1: _Colour.RED,
        "when": dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone.utc),
        "path": Path("/a/b"),
        "raw": b"\x01\xff",
        "nan": float("nan"),
        "inf": np.float32("inf"),
        "np": np.arange(3, dtype=np.int16),
        "scalar": np.float64(0.123456),
        "flag": np.bool_(True),
        "ds": DSfloat("1.5"),
        "is": IS("7"),
        "pn": PersonName("Doe^John"),
        "multi": MultiValue(float, ["1", "2"]),
        "text": "a\x1b[31mb\x00c",
        "set": {2},
        "card": _Card(),
        "none": None,
        "nested": ({"x": (1, 2)},),
    }
    out = jsonable(value)
    assert out == {
        "1": "red",
        "when": "2024-05-01T12:00:00+00:00",
        "path": "/a/b",
        "raw": "01ff",
        "nan": None,
        "inf": None,
        "np": [0, 1, 2],
        "scalar": 0.123456,
        "flag": True,
        "ds": 1.5,
        "is": 7,
        "pn": "Doe^John",
        "multi": [1.0, 2.0],
        "text": "a [31mb c",
        "set": [2],
        "card": {"n": 3},
        "none": None,
        "nested": [{"x": [1, 2]}],
    }
    json.dumps(out, allow_nan=False)  # plain JSON
    assert type(out["is"]) is int and type(out["ds"]) is float
    assert jsonable({"f": np.float64(0.123456)}, float_digits=4) == {"f": 0.1235}


def test_json_default_keeps_nan_and_refuses_unknown_types() -> None:
    """The json.dumps fallback (model cards, metrics lines) leaves native values alone."""
    text = json.dumps(
        {"auc": float("nan"), "v": np.float32(0.5), "p": Path("x")}, default=json_default
    )
    back = json.loads(text)
    assert math.isnan(back["auc"]) and back["v"] == 0.5 and back["p"] == "x"
    with pytest.raises(TypeError, match="object"):
        json.dumps({"o": object()}, default=json_default)


def test_atomic_write_replaces_whole_files_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "f.json"
    atomic_write(target, "one")
    assert target.read_text() == "one"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    atomic_write(target, b"\x00two")
    assert target.read_bytes() == b"\x00two"
    atomic_write(target, lambda fh: fh.write(b"three"), binary=True)
    assert target.read_bytes() == b"three"

    def fail(fh) -> None:
        fh.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_bytes() == b"three"  # the old content, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.json"]  # no temp file left


def test_header_reader_still_reads_a_written_enhanced_ct(tmp_path: Path) -> None:
    """End to end through pydicom: the per-frame value wins after a write/read round trip."""
    ds = _enhanced(
        {"PixelMeasuresSequence": {"PixelSpacing": [0.5, 0.5]}},
        [{"PixelMeasuresSequence": {"PixelSpacing": [0.6, 0.6]}}],
    )
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = tmp_path / "e.dcm"
    ds.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert read_header(back, ExplicitVRLittleEndian).meta["PixelSpacing"] == [0.6, 0.6]


_LOG_RACE = """
import logging, threading
import structlog
from common.log import configure_logging
configure_logging(json_output=True)
slog = structlog.get_logger("a")
plain = logging.getLogger("b")
def s():
    for i in range(3000):
        slog.warning("structlog record", i=i, pad="x" * 200)
def p():
    for i in range(3000):
        plain.warning("stdlib record %d %s", i, "y" * 200)
ts = [threading.Thread(target=f) for f in (s, p, s, p)]
for t in ts: t.start()
for t in ts: t.join()
"""


def test_json_log_lines_stay_whole_when_threads_log_at_once(tmp_path) -> None:
    # structlog's PrintLogger wrote the message and its newline separately; a stdlib-logging
    # record from another thread could land in between: two JSON records on one line.
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "log.txt"
    with open(out, "wb") as f:
        subprocess.run(
            [sys.executable, "-c", _LOG_RACE],
            stdout=f,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=120,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
    lines = [ln for ln in out.read_text().splitlines() if ln.strip()]
    assert len(lines) == 12000
    bad = []
    for ln in lines:
        try:
            json.loads(ln)
        except ValueError:
            bad.append(ln)
    assert bad == [], bad[:2]
