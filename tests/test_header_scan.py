"""Differential test of the fast header scanner against the pydicom path.

`node.header.scan_header(stream, ts, with_phi=...)` reads the top-level elements of a received
data set itself; it may give up (None) on anything it is not sure about, but when it answers it
must give exactly (types included: int / float / str, list / scalar) what the receiver's
reference path gives:

    read_header(pydicom.dcmread(BytesIO(file_header(cls, inst, ts) + stream),
                                stop_before_pixels=True), ts, with_phi=with_phi)

and None whenever that path raises (in dcmread or in read_header). Inputs:

* plain CT instances (implicit / explicit / encapsulated, with an undefined-length sequence):
  the scan must answer these, not only be right;
* one odd thing in an otherwise plain instance: every value of the tricky pools for every
  attribute read_header uses, and every VR of VR_SWAPS (explicit); character sets x names;
* targeted structures where a scan and pydicom could part (nested character sets, item lengths
  that lie, command / file-meta groups, delimiters at the top level, elements after the pixels,
  look-alike bytes inside OB values, truncated streams, other transfer syntaxes);
* a seeded random generator (raw encoder below; pydicom's writer would refuse or fix most of
  the odd cases): tricky values, odd lengths, VRs that do not match the dictionary, character
  sets, nested / undefined-length sequences, encapsulated pixel data, Enhanced CT functional
  groups, elements out of order or duplicated, truncated or corrupted streams, explicit-VR
  streams sent with the implicit syntax and vice versa, big endian and deflated syntaxes
  (always None); at least half of the cases and 70 % of the ordinary ones must be answered;
* the project's own generators: phantom series (molre.data.synth via tests/nodeproc.py), the
  bad-input corpus (tests/badinput.py), Enhanced CT and other transfer syntaxes written by
  molre.data.dicomio, and dcmtk-converted files (JPEG baseline / lossless, implicit, big endian,
  deflated) when dcmtk is installed.

Failure messages group the mismatches by kind, with the input (seed, generator notes, a listing
of the top-level elements, the bytes when short); generated cases are minimised first.
"""

from __future__ import annotations

import logging
import math
import random
import re
import shutil
import struct
import subprocess
import time
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field, fields
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest

from node.dicomnet import file_header
from node.header import read_header, scan_header


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    """pydicom logs a warning for every odd value; thousands of them only slow the test."""
    logger = logging.getLogger("pydicom")
    before = logger.disabled
    logger.disabled = True
    yield
    logger.disabled = before


# ---------------------------------------------------------------------------------------------
# transfer syntaxes, SOP classes
# ---------------------------------------------------------------------------------------------

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
RLE = "1.2.840.10008.1.2.5"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
#: syntaxes the scanner never reads itself (it must answer None)
NEVER_SCANNED = {BIG_ENDIAN, DEFLATED}

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
MR = "1.2.840.10008.5.1.4.1.1.4"
#: what the C-STORE request claims (file meta); the data set may say otherwise
RQ_INSTANCE = "1.2.826.0.1.3680043.8.498.4242"

UID_ROOT = "1.2.826.0.1.3680043.8.498."

# ---------------------------------------------------------------------------------------------
# raw encoder (explicit / implicit VR little endian)
# ---------------------------------------------------------------------------------------------

LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"SV",
    b"UV",
}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def T(group: int, elem: int) -> int:
    return (group << 16) | elem


def tag_bytes(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def element(
    tag: int, vr: bytes, value: bytes, explicit: bool, *, length: int | None = None
) -> bytes:
    """One element; `length` overrides the value length written (undefined, lies)."""
    n = len(value) if length is None else length
    if not explicit:
        return tag_bytes(tag) + struct.pack("<I", n) + value
    if vr in LONG_VRS or length == UNDEFINED:
        return tag_bytes(tag) + vr + b"\0\0" + struct.pack("<I", n) + value
    return tag_bytes(tag) + vr + struct.pack("<H", n & 0xFFFF) + value


def delimiter(tag: int) -> bytes:
    return tag_bytes(tag) + b"\0\0\0\0"


def item(body: bytes, undefined: bool = False) -> bytes:
    if undefined:
        return tag_bytes(ITEM) + struct.pack("<I", UNDEFINED) + body + delimiter(ITEM_END)
    return tag_bytes(ITEM) + struct.pack("<I", len(body)) + body


def sequence(
    tag: int,
    bodies: list[bytes],
    explicit: bool,
    *,
    undefined: bool = False,
    item_undefined: list[bool] | bool = False,
    vr: bytes = b"SQ",
) -> bytes:
    """A sequence of items whose bodies are already encoded."""
    if isinstance(item_undefined, bool):
        item_undefined = [item_undefined] * len(bodies)
    content = b"".join(item(b, u) for b, u in zip(bodies, item_undefined))
    if undefined:
        return element(tag, vr, content + delimiter(SEQ_END), explicit, length=UNDEFINED)
    return element(tag, vr, content, explicit)


def encapsulated_pixels(frags: list[bytes], explicit: bool = True) -> bytes:
    """(7FE0,0010) OB, undefined length: empty offset table, fragments, sequence delimiter."""
    content = item(b"") + b"".join(item(f) for f in frags) + delimiter(SEQ_END)
    return element(T(0x7FE0, 0x0010), b"OB", content, explicit, length=UNDEFINED)


def pad(raw: bytes, vr: bytes) -> bytes:
    if len(raw) % 2 == 0:
        return raw
    return raw + (b"\0" if vr in (b"UI", b"OB", b"UN") else b" ")


def text(value: str | bytes, vr: bytes, *, odd: bool = False) -> bytes:
    raw = value if isinstance(value, bytes) else value.encode("latin-1")
    return raw if odd else pad(raw, vr)


# ---------------------------------------------------------------------------------------------
# value pools
# ---------------------------------------------------------------------------------------------

# the DICOM standard's example (PS3.5 H.3.1): Japanese PN with ISO 2022 escape sequences
JIS_NAME = b"Yamada^Tarou=\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B"
TEXT_TRICKY: list[str | bytes] = [
    "",
    " ",
    "A ",
    " A",
    "A\\B",
    "ORIGINAL\\PRIMARY\\AXIAL",
    "ODD",
    "X\x00",
    "\x00",
    "A\\",
    "\\",
    "  HEAD  ",
    "tab\there",
    "M\xfcller",
    "M\xfcller".encode(),
    "Ren\xe9e\\Jos\xe9",
    "\u5c71\u7530".encode("utf-8"),
    JIS_NAME,
    b"\x1b$B;3ED\x1b(B",
    b"\xff\xfe\xfd",
    "x" * 70,
    "h\xe9\\\xe9t\xe9",
    "=B",
    "^^^^",
    "A==B",
    "A^B=",
]
DS_TRICKY = [
    "1.5",
    " 2.50 ",
    "1e3",
    "-0",
    ".5",
    "5.",
    "nan",
    "inf",
    "-inf",
    "1e400",
    "abc",
    "1,5",
    "1_0",
    "",
    " ",
    "0.625",
    "5",
    "1.5\\2.5",
    "-1.0E-2",
    "+1",
    "1.5\x00",
    "0.5\\",
    "\\0.5",
    "0.5\\abc",
    "12345678901234567",
    "0x10",
    "NaN\\1",
]
IS_TRICKY = [
    "12",
    " 7 ",
    "+3",
    "-0",
    "1.0",
    "x",
    "",
    "1\\2",
    "007",
    "2147483648",
    "1.5",
    " ",
    "-2147483649",
    "1e2",
    "1_0",
    "3\x00",
]
UI_TRICKY = [
    "",
    " ",
    "\x00",
    "1.2.840.10008.5.1.4.1.1.2\x00",
    "1.2.3 ",
    " 1.2.3",
    "1.2\\3.4",
    "1.2.abc..07",
    "1.2.3\x00\x00",
    "1.2.840.10008.5.1.4.1.1.2.1",
    "9" * 70,
]
DA_TRICKY = ["19800101", "", "1980", "garbage", "19800101\\19810101", "1980-01-01", " "]
CHARSETS: list[str | bytes] = [
    "ISO_IR 100",
    "ISO_IR 192",
    "ISO 2022 IR 87",
    "\\ISO 2022 IR 87",
    "ISO_IR 6",
    "",
    "GB18030",
    "bogus",
    "ISO_IR 100\\ISO_IR 192",
    "ISO_IR 13",
    "\\",
    "ISO_IR 192\x00",
    b"ISO_IR 100\x00x",
    b"\x00ISO_IR 100",
    b"ISO_IR\xe9100",
    b"\x1b$B",
]

#: (group, element), dictionary VR and realistic values, for the attributes read_header uses
ATTRS: dict[str, tuple[int, bytes, list[Any]]] = {
    "SpecificCharacterSet": (T(0x0008, 0x0005), b"CS", ["ISO_IR 100", "ISO_IR 192"]),
    "ImageType": (
        T(0x0008, 0x0008),
        b"CS",
        [
            "ORIGINAL\\PRIMARY\\AXIAL",
            "DERIVED\\SECONDARY",
            "ORIGINAL\\PRIMARY\\LOCALIZER",
            "ORIGINAL",
        ],
    ),
    "SOPClassUID": (T(0x0008, 0x0016), b"UI", [CT]),
    "SOPInstanceUID": (T(0x0008, 0x0018), b"UI", [None]),
    "StudyDate": (T(0x0008, 0x0020), b"DA", ["20240131", "19991231"]),
    "AccessionNumber": (T(0x0008, 0x0050), b"SH", ["ACC0001", "A123456789", "7"]),
    "Modality": (T(0x0008, 0x0060), b"CS", ["CT", "MR", "OT"]),
    "Manufacturer": (T(0x0008, 0x0070), b"LO", ["SIEMENS", "GE MEDICAL SYSTEMS", "Philips"]),
    "StudyDescription": (T(0x0008, 0x1030), b"LO", ["CT HEAD WO CONTRAST", "Kopf nativ"]),
    "SeriesDescription": (T(0x0008, 0x103E), b"LO", ["Axial 5mm Brain", "H30s 1.0"]),
    "ManufacturerModelName": (T(0x0008, 0x1090), b"LO", ["SOMATOM Force", "Revolution"]),
    "PatientName": (T(0x0010, 0x0010), b"PN", ["DOE^JOHN", "SYNTH^0001", "Smith^Anna^^Dr"]),
    "PatientID": (T(0x0010, 0x0020), b"LO", ["PID123", "0001"]),
    "PatientBirthDate": (T(0x0010, 0x0030), b"DA", ["19700101", "20011231"]),
    "ContrastBolusAgent": (T(0x0018, 0x0010), b"LO", ["IOHEXOL 350", "NONE"]),
    "BodyPartExamined": (T(0x0018, 0x0015), b"CS", ["HEAD", "BRAIN", "CHEST"]),
    "SliceThickness": (T(0x0018, 0x0050), b"DS", ["5", "0.625", "2.5", "1.25 "]),
    "KVP": (T(0x0018, 0x0060), b"DS", ["120", "100", "80.0"]),
    "ProtocolName": (T(0x0018, 0x1030), b"LO", ["ROUTINE HEAD", "Head^01"]),
    "ConvolutionKernel": (T(0x0018, 0x1210), b"SH", ["H30s", "STANDARD", "Hr40\\3"]),
    "StudyInstanceUID": (T(0x0020, 0x000D), b"UI", [None]),
    "SeriesInstanceUID": (T(0x0020, 0x000E), b"UI", [None]),
    "SeriesNumber": (T(0x0020, 0x0011), b"IS", ["3", "201", "1"]),
    "InstanceNumber": (T(0x0020, 0x0013), b"IS", ["1", "17", "240"]),
    "ImageOrientationPatient": (
        T(0x0020, 0x0037),
        b"DS",
        ["1\\0\\0\\0\\1\\0", "1.0\\0.0\\0.0\\0.0\\0.996\\-0.087"],
    ),
    "NumberOfFrames": (T(0x0028, 0x0008), b"IS", ["1", "40"]),
    "Rows": (T(0x0028, 0x0010), b"US", [512, 256, 48]),
    "Columns": (T(0x0028, 0x0011), b"US", [512, 256, 48]),
    "PixelSpacing": (T(0x0028, 0x0030), b"DS", ["0.488281\\0.488281", "0.5\\0.5", "1\\1"]),
}
UID_KEYS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

SHARED_FG, PER_FRAME_FG = T(0x5200, 0x9229), T(0x5200, 0x9230)
PIXEL_MEASURES, PLANE_ORIENTATION = T(0x0028, 0x9110), T(0x0020, 0x9116)
CT_RECON, PLANE_POSITION = T(0x0018, 0x9314), T(0x0020, 0x9113)
CONTRAST_SEQ, CODE_MEANING = T(0x0018, 0x0012), T(0x0008, 0x0104)
REF_IMAGE_SEQ, ICON_SEQ = T(0x0008, 0x1140), T(0x0088, 0x0200)
PIXEL_DATA = T(0x7FE0, 0x0010)

#: explicit VRs a generated element may carry instead of its dictionary VR
VR_SWAPS = [
    b"UN",
    b"OB",
    b"LO",
    b"SH",
    b"DS",
    b"IS",
    b"US",
    b"SS",
    b"UL",
    b"FD",
    b"FL",
    b"CS",
    b"UT",
    b"PN",
    b"xx",
    b"\0\0",
    b"ox",
    b"SQ",
]


# ---------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One generated data set: top-level element chunks, then an optional corruption."""

    seed: int
    ts: str
    explicit: bool  # how `chunks` are encoded (may disagree with `ts`)
    chunks: list[tuple[int, bytes]]  # (sort key, encoded element)
    notes: list[str] = field(default_factory=list)
    kind: str = "clean"
    cut: int | None = None  # truncate the stream here
    flips: list[tuple[int, int]] = field(default_factory=list)  # (position, new byte)
    deflate: bool = False

    def stream(self, chunks: list[tuple[int, bytes]] | None = None) -> bytes:
        data = b"".join(c for _, c in (self.chunks if chunks is None else chunks))
        if self.flips:
            buf = bytearray(data)
            for pos, val in self.flips:
                if pos < len(buf):
                    buf[pos] = val
            data = bytes(buf)
        if self.cut is not None:
            data = data[: self.cut]
        if self.deflate:
            co = zlib.compressobj(9, zlib.DEFLATED, -15)
            data = co.compress(data) + co.flush()
        return data


class Gen:
    """Random data sets for one seed. `kind` decides how odd they get:

    clean      realistic values, ASCII, well-formed structure
    tricky     values from the tricky pools, character sets, VR swaps
    structural elements out of order / duplicated / UN-encoded sequences / group 0002 ...
    broken     truncated, corrupted bytes, wrong syntax for the encoding
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.r = random.Random(seed)
        self.notes: list[str] = []

    # -- small helpers ------------------------------------------------------------------------
    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def note(self, s: str) -> None:
        self.notes.append(s)

    def uid(self) -> str:
        return UID_ROOT + ".".join(str(self.r.randint(1, 10**8)) for _ in range(3))

    def el(self, tag: int, vr: bytes, value: bytes) -> bytes:
        return element(tag, vr, value, self.explicit)

    # -- values ------------------------------------------------------------------------------
    def value(self, kw: str, vr: bytes, tricky: bool) -> bytes:
        """Encoded value for an attribute (its dictionary VR)."""
        r = self.r
        clean = ATTRS[kw][2] if kw in ATTRS else ["X"]
        if vr == b"UI":
            if kw in UID_KEYS or clean == [None]:
                v = r.choice(UI_TRICKY) if tricky and self.chance(0.5) else self.uid()
            else:
                v = r.choice(UI_TRICKY + [MR, ENHANCED_CT, CT]) if tricky else r.choice(clean)
            return text(v, b"UI", odd=tricky and self.chance(0.2))
        if vr == b"US":
            if tricky and self.chance(0.5):
                n = r.choice([0, 4, 3, 6, 1])
                self.note(f"{kw}: US with {n} bytes")
                return bytes(r.randrange(256) for _ in range(n))
            return struct.pack("<H", r.choice(clean) if not tricky else r.randrange(65536))
        if vr == b"DS":
            v = r.choice(DS_TRICKY) if tricky else r.choice(clean)
            if tricky and kw in ("PixelSpacing", "ImageOrientationPatient") and self.chance(0.5):
                v = "\\".join(r.choice(DS_TRICKY[:20]) for _ in range(r.choice([2, 3, 6])))
            return text(v, vr, odd=tricky and self.chance(0.2))
        if vr == b"IS":
            v = r.choice(IS_TRICKY) if tricky else r.choice(clean)
            return text(v, vr, odd=tricky and self.chance(0.2))
        if vr == b"DA":
            v = r.choice(DA_TRICKY) if tricky else r.choice(clean)
            return text(v, vr, odd=tricky and self.chance(0.2))
        # CS / LO / SH / PN
        if tricky:
            v = r.choice(TEXT_TRICKY + clean)
            if kw == "PatientName" and self.chance(0.3):
                v = "DOE^JOHN\\ROE^JANE"
        else:
            v = r.choice(clean)
        return text(v, vr, odd=tricky and self.chance(0.2))

    def swap_vr(self, vr: bytes, value: bytes) -> tuple[bytes, bytes]:
        """Another explicit VR for the element, with a value that fits it (or not)."""
        r = self.r
        new = r.choice(VR_SWAPS)
        if new in (b"US", b"SS"):
            value = struct.pack("<H", r.randrange(65536)) * r.choice([0, 1, 2])
        elif new == b"UL":
            value = struct.pack("<I", r.randrange(2**32))
        elif new == b"FD":
            value = struct.pack(
                "<d", r.choice([1.5, 0.0, float("nan"), float("inf"), 1e300, -2.0, 512.0])
            )
        elif new == b"FL":
            value = struct.pack("<f", r.choice([1.5, float("nan"), 5.0, -0.0]))
        elif new == b"SQ":
            value = b""  # an empty sequence where a value was expected
        return new, value

    def t(self) -> bool:
        """Whether the next value is drawn from the tricky pools."""
        return self.chance(self.p_tricky)

    def attr(self, kw: str) -> bytes | None:
        """The element for `kw`, or None when absent."""
        tag, vr, _ = ATTRS[kw]
        odd_case = self.kind != "clean"
        tricky = self.t()
        if kw in UID_KEYS + ("SOPClassUID",):
            p_absent = 0.03 if odd_case else 0.0
        else:
            p_absent = 0.25 if odd_case else 0.15
        if self.chance(p_absent):
            self.note(f"{kw} absent")
            return None
        if tricky and self.chance(0.15):
            self.note(f"{kw} empty")
            return self.el(tag, vr, b"")
        if kw == "SOPClassUID":
            value = text(self.sop_class, b"UI") if not tricky else self.value(kw, vr, True)
        elif kw == "SpecificCharacterSet":
            value = text(self.charset, b"CS")
        else:
            value = self.value(kw, vr, tricky)
        if tricky:
            self.note(f"{kw} = {value!r}")
        p_swap = 0.1 if kw == "SpecificCharacterSet" else 0.015
        if self.explicit and odd_case and self.chance(p_swap):
            vr, value = self.swap_vr(vr, value)
            self.note(f"{kw} encoded with VR {vr!r}: {value!r}")
        if vr == b"SQ":
            return sequence(tag, [], self.explicit, undefined=self.chance(0.5))
        return self.el(tag, vr, value)

    # -- nested structures --------------------------------------------------------------------
    def dataset(self, elements: list[tuple[int, bytes]], shuffle: bool = False) -> bytes:
        if shuffle:
            self.r.shuffle(elements)
        else:
            elements.sort(key=lambda kv: kv[0])
        return b"".join(b for _, b in elements)

    def seq(self, tag: int, make_bodies: Any, *, allow_un: bool = True) -> bytes:
        """A sequence whose item bodies `make_bodies()` encodes; in explicit structural / broken
        cases sometimes as UN, whose content is then implicit VR LE (PS3.5 6.2.2)."""
        r = self.r
        un = (
            self.explicit
            and allow_un
            and self.kind in ("structural", "broken")
            and self.chance(0.1)
        )
        if un:
            self.explicit = False
            try:
                bodies = make_bodies()
            finally:
                self.explicit = True
        else:
            bodies = make_bodies()
        undefined = r.random() < 0.5
        item_undef = [r.random() < 0.4 for _ in bodies]
        if un:
            self.note(f"sequence {tag:08X} as UN (undefined={undefined})")
            return sequence(
                tag, bodies, True, undefined=undefined, item_undefined=item_undef, vr=b"UN"
            )
        return sequence(tag, bodies, self.explicit, undefined=undefined, item_undefined=item_undef)

    def item_with(self, *elements: tuple[int, bytes]) -> bytes:
        return self.dataset(list(elements))

    def code_item(self, meaning: str | bytes) -> bytes:
        return self.item_with(
            (T(0x0008, 0x0100), self.el(T(0x0008, 0x0100), b"SH", text("C-B0322", b"SH"))),
            (T(0x0008, 0x0102), self.el(T(0x0008, 0x0102), b"SH", text("SRT", b"SH"))),
            (CODE_MEANING, self.el(CODE_MEANING, b"LO", text(meaning, b"LO"))),
        )

    def one_item(self, tag: int, vr: bytes, value: Any) -> Any:
        """Bodies maker: one item holding one element (encoded when the sequence is)."""
        return lambda: [
            self.item_with((tag, self.el(tag, vr, value() if callable(value) else value)))
        ]

    def functional_group_item(self, tricky: bool, per_frame: bool) -> bytes:
        r = self.r
        parts: list[tuple[int, bytes]] = []
        if self.chance(0.7):

            def measures() -> list[bytes]:
                inner = []
                if self.chance(0.8):
                    inner.append(
                        (
                            T(0x0018, 0x0050),
                            self.el(
                                T(0x0018, 0x0050),
                                b"DS",
                                self.value("SliceThickness", b"DS", self.t()),
                            ),
                        )
                    )
                if self.chance(0.8):
                    inner.append(
                        (
                            T(0x0028, 0x0030),
                            self.el(
                                T(0x0028, 0x0030),
                                b"DS",
                                self.value("PixelSpacing", b"DS", self.t()),
                            ),
                        )
                    )
                return [self.dataset(list(inner))] * r.choice([1, 1, 1, 0, 2])

            parts.append((PIXEL_MEASURES, self.seq(PIXEL_MEASURES, measures)))
        if self.chance(0.7):
            iop = self.value("ImageOrientationPatient", b"DS", self.t())
            make = self.one_item(T(0x0020, 0x0037), b"DS", iop)
            parts.append(
                (PLANE_ORIENTATION, self.seq(PLANE_ORIENTATION, make if self.chance(0.8) else list))
            )
        if self.chance(0.6):
            k = self.value("ConvolutionKernel", b"SH", self.t())
            parts.append((CT_RECON, self.seq(CT_RECON, self.one_item(T(0x0018, 0x1210), b"SH", k))))
        if per_frame and self.chance(0.7):
            ipp = text(f"-120\\-120\\{r.randint(0, 200)}", b"DS")
            parts.append(
                (
                    PLANE_POSITION,
                    self.seq(PLANE_POSITION, self.one_item(T(0x0020, 0x0032), b"DS", ipp)),
                )
            )
        if self.chance(0.4):  # unrelated: frame type
            ft = text("ORIGINAL\\PRIMARY\\AXIAL\\NONE", b"CS")
            parts.append(
                (
                    T(0x0018, 0x9329),
                    self.seq(T(0x0018, 0x9329), self.one_item(T(0x0008, 0x9007), b"CS", ft)),
                )
            )
        return self.dataset(parts)

    def enhanced(self, tricky: bool) -> list[tuple[int, bytes]]:
        r = self.r
        out = []
        if self.chance(0.85):
            n = r.choice([1, 1, 1, 0, 2])
            out.append(
                (
                    SHARED_FG,
                    self.seq(
                        SHARED_FG,
                        lambda: [self.functional_group_item(tricky, False) for _ in range(n)],
                    ),
                )
            )
            self.note(f"SharedFunctionalGroupsSequence with {n} items")
        if self.chance(0.85):
            n = r.choice([1, 2, 3, 0])
            out.append(
                (
                    PER_FRAME_FG,
                    self.seq(
                        PER_FRAME_FG,
                        lambda: [self.functional_group_item(tricky, True) for _ in range(n)],
                    ),
                )
            )
            self.note(f"PerFrameFunctionalGroupsSequence with {n} items")
        return out

    def contrast_sequence(self, tricky: bool) -> tuple[int, bytes]:
        r = self.r
        meanings = [
            r.choice(["Iohexol", "IOPAMIDOL 370", ""] + (TEXT_TRICKY if tricky else []))
            for _ in range(r.choice([1, 1, 2, 0]))
        ]
        empty_first = bool(meanings) and tricky and self.chance(0.2)

        def bodies() -> list[bytes]:
            out = [self.code_item(m) for m in meanings]
            if empty_first:
                out[0] = b""
            return out

        self.note(
            f"ContrastBolusAgentSequence {meanings!r}"
            + (" (empty first item)" if empty_first else "")
        )
        return CONTRAST_SEQ, self.seq(CONTRAST_SEQ, bodies)

    def referenced_images(self) -> tuple[int, bytes]:
        """(0008,1140) with nested code sequences: something to skip."""
        r = self.r
        n = r.choice([0, 1, 2, 3])

        def bodies() -> list[bytes]:
            out = []
            for _ in range(n):
                parts = [
                    (T(0x0008, 0x1150), self.el(T(0x0008, 0x1150), b"UI", text(CT, b"UI"))),
                    (T(0x0008, 0x1155), self.el(T(0x0008, 0x1155), b"UI", text(self.uid(), b"UI"))),
                ]
                if self.chance(0.5):
                    purpose = T(0x0040, 0xA170)
                    parts.append(
                        (purpose, self.seq(purpose, lambda: [self.code_item("Localizer")]))
                    )
                if self.kind != "clean" and self.chance(0.15):  # an item's own charset
                    cs, vr = r.choice(CHARSETS), b"CS"
                    if self.explicit and self.chance(0.3):
                        vr = r.choice([b"US", b"OB", b"LO", b"UN"])
                    raw = cs if isinstance(cs, bytes) else cs.encode()
                    parts.append(
                        (T(0x0008, 0x0005), self.el(T(0x0008, 0x0005), vr, pad(raw, b"CS")))
                    )
                    self.note(f"charset {raw!r} as {vr!r} in a ReferencedImageSequence item")
                if self.chance(0.3):  # attributes read_header uses, nested: must not leak out
                    parts.append(
                        (T(0x0028, 0x0010), self.el(T(0x0028, 0x0010), b"US", struct.pack("<H", 7)))
                    )
                    parts.append(
                        (
                            T(0x0020, 0x000D),
                            self.el(T(0x0020, 0x000D), b"UI", text("1.2.3.4", b"UI")),
                        )
                    )
                out.append(self.dataset(parts))
            return out

        self.note(f"ReferencedImageSequence with {n} items")
        return REF_IMAGE_SEQ, self.seq(REF_IMAGE_SEQ, bodies)

    def icon(self) -> tuple[int, bytes]:
        """IconImageSequence: an item with its own Rows/Columns and Pixel Data."""

        def bodies() -> list[bytes]:
            return [
                self.dataset(
                    [
                        (
                            T(0x0028, 0x0010),
                            self.el(T(0x0028, 0x0010), b"US", struct.pack("<H", 4)),
                        ),
                        (
                            T(0x0028, 0x0011),
                            self.el(T(0x0028, 0x0011), b"US", struct.pack("<H", 4)),
                        ),
                        (PIXEL_DATA, self.el(PIXEL_DATA, b"OB", bytes(16))),
                    ]
                )
            ]

        self.note("IconImageSequence (nested Pixel Data)")
        return ICON_SEQ, self.seq(ICON_SEQ, bodies, allow_un=False)

    def private(self) -> list[tuple[int, bytes]]:
        """A private block: creator, a LO, an OB holding bytes that look like elements, and
        sometimes an undefined-length private sequence."""
        r = self.r
        g = r.choice([0x0009, 0x0029, 0x0043])
        out = [
            (T(g, 0x0010), self.el(T(g, 0x0010), b"LO", text("ACME 1.0", b"LO"))),
            (T(g, 0x1001), self.el(T(g, 0x1001), b"LO", text("vendor", b"LO"))),
        ]
        # a trap for scanners that search instead of walk: a Rows / SOPInstanceUID lookalike
        fake = element(T(0x0028, 0x0010), b"US", struct.pack("<H", 999), self.explicit) + element(
            T(0x0008, 0x0018), b"UI", text("1.2.3.999", b"UI"), self.explicit
        )
        out.append((T(g, 0x1002), self.el(T(g, 0x1002), b"OB", fake)))
        if self.chance(0.2 if self.kind == "clean" else 0.5):
            inner = self.item_with(
                (T(g, 0x0010), element(T(g, 0x0010), b"LO", text("ACME 1.0", b"LO"), False)),
                (T(g, 0x1001), element(T(g, 0x1001), b"LO", text("nested", b"LO"), False)),
            )
            if self.explicit:
                vr = r.choice([b"SQ", b"UN"])
                # UN + undefined length: content is implicit VR (PS3.5 6.2.2)
                body = (
                    inner
                    if vr == b"UN"
                    else self.item_with(
                        (T(g, 0x0010), self.el(T(g, 0x0010), b"LO", text("ACME 1.0", b"LO")))
                    )
                )
                chunk = sequence(
                    T(g, 0x1010),
                    [body],
                    True,
                    undefined=True,
                    item_undefined=r.random() < 0.5,
                    vr=vr,
                )
                self.note(f"private undefined-length sequence as {vr.decode()}")
            else:
                chunk = sequence(
                    T(g, 0x1010), [inner], False, undefined=True, item_undefined=r.random() < 0.5
                )
                self.note("private undefined-length sequence (implicit)")
            out.append((T(g, 0x1010), chunk))
        return out

    def pixels(self) -> tuple[int, bytes] | None:
        r = self.r
        choice = r.random()
        if choice < 0.15:
            self.note("no Pixel Data")
            return None
        if self.ts in (JPEG_BASELINE, RLE) and choice < 0.85:
            frags = [
                bytes(r.randrange(256) for _ in range(r.choice([2, 10, 64])))
                for _ in range(r.choice([1, 2]))
            ]
            return PIXEL_DATA, encapsulated_pixels(frags, self.explicit)
        if choice < 0.95:
            return PIXEL_DATA, self.el(
                PIXEL_DATA, b"OW", bytes(r.randrange(256) for _ in range(32))
            )
        tag = r.choice([T(0x7FE0, 0x0008), T(0x7FE0, 0x0009)])
        self.note(f"float pixel data {tag:08X}")
        return tag, self.el(tag, b"OF" if tag == T(0x7FE0, 0x0008) else b"OD", bytes(32))

    # -- the case ----------------------------------------------------------------------------
    def make(self) -> Case:
        r = self.r
        u = r.random()
        self.kind = (
            "clean"
            if u < 0.62
            else "tricky"
            if u < 0.84
            else "structural"
            if u < 0.94
            else "broken"
        )
        tricky = self.kind != "clean"
        self.p_tricky = {"clean": 0.0, "tricky": 0.05, "structural": 0.02, "broken": 0.02}[
            self.kind
        ]
        self.ts = r.choices(
            [IMPLICIT, EXPLICIT, JPEG_BASELINE, RLE, BIG_ENDIAN, DEFLATED], [30, 42, 14, 8, 3, 3]
        )[0]
        self.explicit = self.ts != IMPLICIT
        mismatch = False
        if self.kind == "broken" and self.chance(0.35):
            self.explicit = not self.explicit
            mismatch = True
            self.note(
                f"encoded {'explicit' if self.explicit else 'implicit'} VR, sent as {self.ts}"
            )
        self.sop_class = r.choices(
            [CT, MR, ENHANCED_CT], [79, 15, 6] if not tricky else [65, 15, 20]
        )[0]
        enhanced = self.sop_class == ENHANCED_CT
        self.charset = "ISO_IR 100"
        if tricky and self.chance(0.35):
            self.charset = r.choice(CHARSETS)
        self.note(
            f"kind={self.kind} ts={self.ts} sop_class={self.sop_class} charset={self.charset!r}"
        )

        chunks: list[tuple[int, bytes]] = []
        for kw, (tag, _, _) in ATTRS.items():
            if kw == "SpecificCharacterSet" and not tricky and self.chance(0.5):
                continue
            if (
                enhanced
                and kw
                in (
                    "SliceThickness",
                    "PixelSpacing",
                    "ImageOrientationPatient",
                    "ConvolutionKernel",
                )
                and self.chance(0.7)
            ):
                continue  # Enhanced CT: normally only in the functional groups
            chunk = self.attr(kw)
            if chunk is not None:
                chunks.append((tag, chunk))
        if enhanced or (tricky and self.chance(0.1)):
            chunks += self.enhanced(tricky)
        if self.chance(0.05 if not tricky else 0.25):
            chunks.append(self.contrast_sequence(tricky))
        if self.chance(0.5):
            chunks.append(self.referenced_images())
        if self.chance(0.15):
            chunks.append(self.icon())
        if self.chance(0.35):
            chunks += self.private()
        if self.chance(0.3):  # an OB / UN blob and a UT text
            chunks.append(
                (
                    T(0x0042, 0x0011),
                    self.el(T(0x0042, 0x0011), b"OB", bytes(r.randrange(256) for _ in range(20))),
                )
            )
            chunks.append(
                (
                    T(0x0020, 0x4000),
                    self.el(T(0x0020, 0x4000), b"UT", text("comment \\ with backslash", b"UT")),
                )
            )
        pix = self.pixels()
        chunks.sort(key=lambda kv: kv[0])
        if pix is not None:
            chunks.append(pix)
            if self.chance(0.1):  # trailing padding after the pixels
                chunks.append((T(0xFFFC, 0xFFFC), self.el(T(0xFFFC, 0xFFFC), b"OB", bytes(8))))
        case = Case(self.seed, self.ts, self.explicit, chunks, self.notes, self.kind)
        if self.kind == "structural":
            self.structural(case)
        elif self.kind == "broken" and not mismatch:
            self.broken(case)
        case.deflate = self.ts == DEFLATED and self.chance(0.7)
        return case

    def structural(self, case: Case) -> None:
        r = self.r
        ch = case.chunks
        for _ in range(r.choice([1, 1, 2, 3])):
            what = r.choice(
                [
                    "swap",
                    "dup",
                    "dup_other",
                    "after_pixels",
                    "group2",
                    "grouplen",
                    "odd",
                    "zero_len_sq",
                    "stray_delim",
                    "before_charset",
                    "command",
                    "charset_sq",
                    "item_overrun",
                    "hidden",
                ]
            )
            n = len(ch)
            if what == "swap" and n > 2:
                i = r.randrange(n - 1)
                ch[i], ch[i + 1] = ch[i + 1], ch[i]
                self.note(f"swapped elements {ch[i][0]:08X} and {ch[i + 1][0]:08X}")
            elif what == "dup" and n:
                i = r.randrange(n)
                ch.insert(r.randrange(n + 1), ch[i])
                self.note(f"duplicated {ch[i][0]:08X}")
            elif what == "dup_other":
                kw = r.choice(list(ATTRS))
                tag, vr, _ = ATTRS[kw]
                chunk = self.el(tag, vr, self.value(kw, vr, True))
                pos = r.randrange(n + 1)
                ch.insert(pos, (tag, chunk))
                self.note(f"extra {kw} at position {pos}")
            elif what == "after_pixels":
                kw = r.choice(list(ATTRS))
                tag, vr, _ = ATTRS[kw]
                ch.append((tag, self.el(tag, vr, self.value(kw, vr, False))))
                self.note(f"{kw} after the end (after Pixel Data if any)")
            elif what == "group2":
                tsv = r.choice([IMPLICIT, EXPLICIT, "1.2.3"])
                ch.insert(
                    0,
                    (
                        T(0x0002, 0x0010),
                        element(T(0x0002, 0x0010), b"UI", text(tsv, b"UI"), self.explicit),
                    ),
                )
                self.note(f"(0002,0010) {tsv} at the start of the data set")
            elif what == "grouplen":
                ch.insert(
                    0,
                    (
                        T(0x0008, 0x0000),
                        element(
                            T(0x0008, 0x0000),
                            b"UL",
                            struct.pack("<I", r.randrange(999)),
                            self.explicit,
                        ),
                    ),
                )
                self.note("(0008,0000) group length")
            elif what == "odd":
                kw = r.choice(["PatientName", "Modality", "StudyDescription", "SOPInstanceUID"])
                tag, vr, _ = ATTRS[kw]
                ch.append((tag, self.el(tag, vr, b"ABC")))
                ch.sort(key=lambda kv: kv[0])
                self.note(f"{kw} = b'ABC' (odd length)")
            elif what == "zero_len_sq":
                tag = r.choice([SHARED_FG, CONTRAST_SEQ, REF_IMAGE_SEQ])
                ch.append((tag, element(tag, b"SQ", b"", self.explicit)))
                ch.sort(key=lambda kv: kv[0])
                self.note(f"empty sequence {tag:08X}")
            elif what == "stray_delim" and n:
                pos = r.randrange(n)
                ch.insert(pos, (0, delimiter(r.choice([SEQ_END, ITEM_END]))))
                self.note(f"stray delimiter at position {pos}")
            elif what == "command":
                # command set elements (group 0000) before the data set: pydicom reads them
                # with their own VR detection (PS3.7 says implicit VR)
                explicit = self.explicit if self.chance(0.6) else not self.explicit
                cmd = element(T(0x0000, 0x0000), b"UL", struct.pack("<I", 18), explicit)
                if self.chance(0.5):
                    cmd += element(T(0x0000, 0x0002), b"UI", text(CT, b"UI"), explicit)
                ch.insert(0, (0, cmd))
                self.note(f"command group at the start ({'explicit' if explicit else 'implicit'})")
            elif what == "charset_sq":
                tag = ATTRS["SpecificCharacterSet"][0]
                ch[:] = [c for c in ch if c[0] != tag]
                body = self.item_with(
                    (T(0x0008, 0x0100), self.el(T(0x0008, 0x0100), b"SH", text("X", b"SH")))
                )
                sq = sequence(
                    tag,
                    [body],
                    self.explicit,
                    undefined=self.chance(0.7),
                    vr=b"SQ" if self.chance(0.5) else b"UN",
                )
                ch.insert(0, (tag, sq))
                self.note("SpecificCharacterSet as a sequence")
            elif what == "item_overrun":
                # an undefined-length sequence whose defined-length item claims more (or less)
                # than it holds: pydicom reads the item's elements from the stream as it goes
                body = self.item_with(
                    (T(0x0008, 0x1150), self.el(T(0x0008, 0x1150), b"UI", text(CT, b"UI")))
                )
                claim = max(0, len(body) + r.choice([-6, -2, 2, 8, 40]))
                content = tag_bytes(ITEM) + struct.pack("<I", claim) + body + delimiter(SEQ_END)
                ch.append(
                    (
                        REF_IMAGE_SEQ,
                        element(REF_IMAGE_SEQ, b"SQ", content, self.explicit, length=UNDEFINED),
                    )
                )
                ch.sort(key=lambda kv: kv[0])
                self.note(f"item claims {claim} of {len(body)} bytes in an undefined-length SQ")
            elif what == "hidden":
                # see _item_shorter_than_content: an element only a scan that trusts item
                # lengths sees at the top level
                w = r.choice([T(0x0010, 0x0010), T(0x0010, 0x0020), T(0x0010, 0x0030)])
                w_vr = {T(0x0010, 0x0010): b"PN", T(0x0010, 0x0020): b"LO"}.get(w, b"DA")
                f = w + 1
                hidden = self.el(w, w_vr, text(r.choice(["EVIL", "19990101", "X^Y"]), w_vr))
                tail = (
                    tag_bytes(f)
                    + (b"LO" + struct.pack("<H", 10) if self.explicit else struct.pack("<I", 10))
                    + b"xx"
                )
                inner = self.el(T(0x0008, 0x1150), b"UI", delimiter(SEQ_END) + hidden + tail)
                content = tag_bytes(ITEM) + struct.pack("<I", 8) + inner + delimiter(SEQ_END)
                ch[:] = [c for c in ch if not (REF_IMAGE_SEQ <= c[0] <= f)]
                ch.append(
                    (
                        REF_IMAGE_SEQ,
                        element(REF_IMAGE_SEQ, b"SQ", content, self.explicit, length=UNDEFINED),
                    )
                )
                ch.sort(key=lambda kv: kv[0])
                self.note(
                    f"({w >> 16:04X},{w & 0xFFFF:04X}) hidden in an element value behind "
                    f"an item that claims 8 bytes"
                )
            elif what == "before_charset":
                # a non-ASCII name before the character set that says how to decode it
                pn = self.el(T(0x0010, 0x0010), b"PN", text("M\xfcller".encode(), b"PN"))
                ch.insert(0, (T(0x0010, 0x0010), pn))
                self.note("PatientName (UTF-8) before SpecificCharacterSet")

    def broken(self, case: Case) -> None:
        r = self.r
        data = case.stream()
        what = r.choice(["cut", "cut", "flip", "flip", "length", "undefined_text", "empty"])
        if what == "cut":
            # mostly in the header, sometimes anywhere
            pix = next((i for i, (t, _) in enumerate(case.chunks) if t >> 16 == 0x7FE0), None)
            end = sum(len(c) for _, c in case.chunks[:pix]) if pix is not None else len(data)
            case.cut = r.randrange(0, (end if self.chance(0.8) else len(data)) + 1)
            self.note(f"truncated at {case.cut} of {len(data)} bytes")
        elif what == "flip":
            for _ in range(r.choice([1, 1, 2, 4])):
                pos = r.randrange(max(1, len(data)))
                case.flips.append((pos, r.choice([0x00, 0xFF, r.randrange(256)])))
            self.note(f"bytes changed: {case.flips}")
        elif what == "length":
            # one element claims more bytes than there are
            i = r.randrange(len(case.chunks))
            tag, chunk = case.chunks[i]
            if self.explicit and chunk[4:6] not in LONG_VRS:
                bad = chunk[:6] + struct.pack("<H", 0xFFF0) + chunk[8:]
            else:
                off = 8 if self.explicit else 4
                bad = chunk[:off] + struct.pack("<I", 0x7FFFFFF0) + chunk[off + 4 :]
            case.chunks[i] = (tag, bad)
            self.note(f"element {tag:08X} claims a huge length")
        elif what == "undefined_text":
            tag = T(0x0008, 0x1030)
            v = text("CT HEAD", b"LO") + delimiter(SEQ_END)
            case.chunks.append((tag, element(tag, b"LO", v, self.explicit, length=UNDEFINED)))
            case.chunks.sort(key=lambda kv: kv[0])
            self.note("StudyDescription with undefined length")
        else:
            case.cut = r.choice([0, 1, 4, 7, 8])
            self.note(f"stream of {case.cut} bytes")


def generate(seed: int) -> Case:
    return Gen(seed).make()


# ---------------------------------------------------------------------------------------------
# the two paths and the comparison
# ---------------------------------------------------------------------------------------------

RAISES = "raises"


def reference(stream: bytes, ts: str, with_phi: bool) -> Any:
    """What the receiver's pydicom path gives, or (RAISES, why)."""
    head = file_header(CT, RQ_INSTANCE, ts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(BytesIO(head + stream), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any failure is "cannot understand"
            return (RAISES, f"dcmread: {type(exc).__name__}: {str(exc)[:120]}")
        try:
            return read_header(ds, ts, with_phi=with_phi)
        except Exception as exc:  # noqa: BLE001
            return (RAISES, f"read_header: {type(exc).__name__}: {str(exc)[:120]}")


def fast(stream: bytes, ts: str, with_phi: bool) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return scan_header(stream, ts, with_phi=with_phi)
        except Exception as exc:  # noqa: BLE001 - reported as a mismatch
            return (RAISES, f"scan_header raised {type(exc).__name__}: {exc}")


def strict_diff(
    a: Any,
    b: Any,
    path: str = "",
    names: tuple[str, str] = ("reference", "fast"),
) -> list[str]:
    """Differences between two plain values, types included (1 != 1.0 != True, [x] != x)."""
    na, nb = names
    if type(a) is not type(b):
        return [
            (
                f"{path or 'value'}: {na} {a!r} ({type(a).__name__}) != "
                f"{nb} {b!r} ({type(b).__name__})"
            )
        ]
    if isinstance(a, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in b:
                out.append(f"{path}[{k!r}]: {na} {a[k]!r}, missing in {nb}")
            elif k not in a:
                out.append(f"{path}[{k!r}]: missing in {na}, {nb} {b[k]!r}")
            else:
                out += strict_diff(a[k], b[k], f"{path}[{k!r}]", names)
        return out
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: {na} {a!r} != {nb} {b!r} (length)"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b))
            for d in strict_diff(x, y, f"{path}[{i}]", names)
        ]
    both_nan = isinstance(a, float) and math.isnan(a) and math.isnan(b)
    if a != b and not both_nan:
        return [f"{path or 'value'}: {na} {a!r} != {nb} {b!r}"]
    return []


def header_diff(ref: Any, got: Any, names: tuple[str, str] = ("reference", "fast")) -> list[str]:
    if isinstance(ref, tuple) or isinstance(got, tuple):
        if isinstance(ref, tuple) and isinstance(got, tuple):
            return []
        return [
            (
                f"only {names[0] if isinstance(ref, tuple) else names[1]} raises: "
                f"{(ref if isinstance(ref, tuple) else got)[1]}"
            )
        ]
    diffs = []
    for f in fields(ref):
        diffs += strict_diff(getattr(ref, f.name), getattr(got, f.name), f.name, names)
    if type(got) is not type(ref):
        diffs.append(f"{names[1]} returned {type(got).__name__}, not {type(ref).__name__}")
    return diffs


def compare(stream: bytes, ts: str, with_phi: bool) -> tuple[str, list[str], Any, Any]:
    """('none' | 'equal' | 'mismatch', differences, reference, fast)."""
    ref = reference(stream, ts, with_phi)
    got = fast(stream, ts, with_phi)
    if isinstance(got, tuple):
        return "mismatch", [got[1]], ref, got
    if ts in NEVER_SCANNED and got is not None:
        return "mismatch", [f"transfer syntax {ts} must give None"], ref, got
    if got is None:
        return "none", [], ref, got
    if isinstance(ref, tuple):
        return "mismatch", [f"reference raises ({ref[1]}) but fast gave a header"], ref, got
    diffs = header_diff(ref, got)
    return ("mismatch" if diffs else "equal"), diffs, ref, got


def _skip_undefined(stream: bytes, pos: int) -> int | None:
    """End of an undefined-length value starting at `pos` (best effort, for listings):
    items are walked by their lengths, undefined-length ones by searching their delimiter."""
    depth_end = stream.find(tag_bytes(SEQ_END) + b"\0\0\0\0", pos)
    return None if depth_end < 0 else depth_end + 8


def listing(stream: bytes, explicit: bool, limit: int = 60) -> str:
    """Top-level elements of a stream (best effort), for failure messages."""
    out, pos = [], 0
    while pos + 8 <= len(stream) and len(out) < limit:
        g, e = struct.unpack_from("<HH", stream, pos)
        vr = stream[pos + 4 : pos + 6]
        if g == 0xFFFE or not explicit or not (vr.isalpha() and vr.isupper()):
            vr, n, hdr = b"--", struct.unpack_from("<I", stream, pos + 4)[0], 8
        elif vr in LONG_VRS:
            if pos + 12 > len(stream):
                break
            n, hdr = struct.unpack_from("<I", stream, pos + 8)[0], 12
        else:
            n, hdr = struct.unpack_from("<H", stream, pos + 6)[0], 8
        if n == UNDEFINED:
            end = _skip_undefined(stream, pos + hdr)
            shown = stream[pos + hdr : (end or len(stream))]
            out.append(
                f"  ({g:04X},{e:04X}) {vr.decode('latin-1')} undefined length: "
                f"{shown[:160]!r}{'...' if len(shown) > 160 else ''}"
            )
            if end is None:
                break
            pos = end
            continue
        value = stream[pos + hdr : pos + hdr + n]
        out.append(
            f"  ({g:04X},{e:04X}) {vr.decode('latin-1')} {n:5d} {value[:64]!r}"
            f"{'...' if len(value) > 64 else ''}"
        )
        pos += hdr + n
    if pos < len(stream):
        out.append(f"  ... {len(stream) - pos} more bytes from {pos}: {stream[pos : pos + 32]!r}")
    return "\n".join(out)


def diff_key(d: str) -> str:
    """What makes two differences 'the same' (for grouping and minimising)."""
    if d.startswith("reference raises"):
        return re.sub(r"0x[0-9A-Fa-f]+|\d+", "#", d.split(" but fast")[0])[:90]
    return d.split(":")[0]


def minimise(case: Case, with_phi: bool, key: str) -> Case:
    """Drop top-level chunks while the same kind of mismatch remains (no corruption cases)."""
    if case.cut is not None or case.flips or case.deflate:
        return case
    cur = list(case.chunks)
    changed = True
    while changed:
        changed = False
        for i in range(len(cur)):
            trial = cur[:i] + cur[i + 1 :]
            status, diffs, _, _ = compare(case.stream(trial), case.ts, with_phi)
            if status == "mismatch" and any(diff_key(d) == key for d in diffs):
                cur, changed = trial, True
                break
    return Case(case.seed, case.ts, case.explicit, cur, case.notes, case.kind)


def report(
    label: str,
    stream: bytes,
    ts: str,
    explicit: bool,
    with_phi: bool,
    diffs: list[str],
    notes: list[str] = (),
) -> str:
    lines = [f"--- {label} ts={ts} with_phi={with_phi} ({len(stream)} bytes)"]
    lines += [f"  note: {n}" for n in notes]
    lines += [f"  DIFF {d}" for d in diffs]
    lines.append(listing(stream, explicit))
    if len(stream) <= 600:
        lines.append(f"  stream hex: {stream.hex()}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# tests: fixed cases
# ---------------------------------------------------------------------------------------------


Chunks = list[tuple[int, bytes]]


def plain_chunks(
    explicit: bool, *, undefined_sequence: bool = False, pixels: str = "native"
) -> Chunks:
    """An ordinary CT slice header, as a modality sends it: (tag, encoded element) in order."""

    def el(kw: str, v: Any) -> tuple[int, bytes]:
        tag, vr, _ = ATTRS[kw]
        raw = struct.pack("<H", v) if vr == b"US" else text(v, vr)
        return tag, element(tag, vr, raw, explicit)

    uid = UID_ROOT + "77."
    chunks = [
        el("SpecificCharacterSet", "ISO_IR 100"),
        el("ImageType", "ORIGINAL\\PRIMARY\\AXIAL"),
        el("SOPClassUID", CT),
        el("SOPInstanceUID", uid + "3"),
        el("StudyDate", "20240131"),
        el("AccessionNumber", "ACC42"),
        el("Modality", "CT"),
        el("Manufacturer", "ACME"),
        el("StudyDescription", "CT HEAD"),
        el("SeriesDescription", "Axial 5mm"),
        el("PatientName", "DOE^JOHN"),
        el("PatientID", "PID1"),
        el("PatientBirthDate", "19700101"),
        el("BodyPartExamined", "HEAD"),
        el("SliceThickness", "5"),
        el("KVP", "120"),
        el("ProtocolName", "ROUTINE HEAD"),
        el("ConvolutionKernel", "H30s"),
        el("StudyInstanceUID", uid + "1"),
        el("SeriesInstanceUID", uid + "2"),
        el("SeriesNumber", "3"),
        el("InstanceNumber", "17"),
        el("ImageOrientationPatient", "1\\0\\0\\0\\1\\0"),
        el("Rows", 64),
        el("Columns", 64),
        el("PixelSpacing", "0.5\\0.5"),
    ]
    if undefined_sequence:
        ref = item(
            element(T(0x0008, 0x1150), b"UI", text(CT, b"UI"), explicit)
            + element(T(0x0008, 0x1155), b"UI", text(uid + "9", b"UI"), explicit),
            undefined=True,
        )
        chunks.append(
            (
                REF_IMAGE_SEQ,
                element(REF_IMAGE_SEQ, b"SQ", ref + delimiter(SEQ_END), explicit, length=UNDEFINED),
            )
        )
    chunks.sort(key=lambda kv: kv[0])
    if pixels == "native":
        chunks.append((PIXEL_DATA, element(PIXEL_DATA, b"OW", bytes(64 * 64 * 2), explicit)))
    elif pixels == "encapsulated":
        chunks.append(
            (PIXEL_DATA, encapsulated_pixels([b"\xff\xd8" + bytes(30) + b"\xff\xd9"], explicit))
        )
    return chunks


def plain_ct(explicit: bool, **kw: Any) -> bytes:
    return b"".join(c for _, c in plain_chunks(explicit, **kw))


def edit(chunks: Chunks, *, drop: tuple[int, ...] = (), add: Chunks = ()) -> bytes:
    """`chunks` without the elements `drop`, plus `add`, in tag order (pixels stay last)."""
    out = [c for c in chunks if c[0] not in drop] + list(add)
    out.sort(key=lambda kv: kv[0])
    return b"".join(c for _, c in out)


def fail_grouped(failures: list[tuple[str, str]], per_key: int = 3) -> None:
    """Fail with the failures grouped by kind of difference (a few examples of each)."""
    if not failures:
        return
    groups: dict[str, list[str]] = {}
    for key, line in failures:
        groups.setdefault(key, []).append(line)
    lines = [f"{len(failures)} mismatches, {len(groups)} kinds:"]
    for key, items in groups.items():
        lines.append(f"* {key} ({len(items)}x), e.g.:")
        lines += [f"    {x}" for x in items[:per_key]]
    pytest.fail("\n".join(lines), pytrace=False)


def assert_equivalent(
    label: str, stream: bytes, ts: str, explicit: bool, phis: tuple[bool, ...] = (True, False)
) -> list[str]:
    """The equivalence assertion for one stream; returns the statuses."""
    statuses = []
    for with_phi in phis:
        status, diffs, _, _ = compare(stream, ts, with_phi)
        if status == "mismatch":
            pytest.fail(report(label, stream, ts, explicit, with_phi, diffs), pytrace=False)
        statuses.append(status)
    return statuses


PLAIN_CASES = [
    ("implicit", IMPLICIT, False, False, "native"),
    ("explicit", EXPLICIT, True, False, "native"),
    ("implicit+undefined-length sequence", IMPLICIT, False, True, "native"),
    ("explicit+undefined-length sequence", EXPLICIT, True, True, "native"),
    ("jpeg baseline, encapsulated", JPEG_BASELINE, True, True, "encapsulated"),
    ("rle, encapsulated", RLE, True, False, "encapsulated"),
    ("explicit, no pixel data", EXPLICIT, True, False, "none"),
]


@pytest.mark.parametrize(
    "name,ts,explicit,undef,pixels", PLAIN_CASES, ids=[c[0] for c in PLAIN_CASES]
)
@pytest.mark.parametrize("with_phi", [True, False])
def test_plain_ct_uses_the_fast_path(
    name: str, ts: str, explicit: bool, undef: bool, pixels: str, with_phi: bool
) -> None:
    stream = plain_ct(explicit, undefined_sequence=undef, pixels=pixels)
    status, diffs, ref, _ = compare(stream, ts, with_phi)
    assert not isinstance(ref, tuple), f"the reference path cannot read the plain case: {ref}"
    assert ref.meta["Rows"] == 64 and ref.sop_instance_uid.endswith(".3")  # the case is sane
    assert status == "equal", report(
        name,
        stream,
        ts,
        explicit,
        with_phi,
        diffs or ["scan_header gave None for an ordinary CT instance"],
    )


@pytest.mark.parametrize("ts", [BIG_ENDIAN, DEFLATED])
def test_big_endian_and_deflated_are_never_scanned(ts: str) -> None:
    stream = plain_ct(True)
    if ts == DEFLATED:
        co = zlib.compressobj(9, zlib.DEFLATED, -15)
        stream = co.compress(stream) + co.flush()
    for with_phi in (True, False):
        assert fast(stream, ts, with_phi) is None


# ---------------------------------------------------------------------------------------------
# tests: one odd thing in an otherwise plain instance (each value of the pools, each VR)
# ---------------------------------------------------------------------------------------------

US_VARIANTS = [b"", b"\x00\x02", b"\x00\x02\x00\x01", b"\x01\x02\x03", b"\xff\xff", b"\x00"]
POOLS: dict[bytes, list[str | bytes]] = {
    b"DS": DS_TRICKY,
    b"IS": IS_TRICKY,
    b"UI": UI_TRICKY,
    b"DA": DA_TRICKY,
    b"US": US_VARIANTS,
    b"CS": TEXT_TRICKY,
    b"LO": TEXT_TRICKY,
    b"SH": TEXT_TRICKY,
    b"PN": TEXT_TRICKY,
}


def single_value_cases() -> list[tuple[str, int, bytes, bytes]]:
    """(label, tag, vr, value): every pool value for every attribute read_header uses, padded
    to even length and, for odd ones, also unpadded; then every VR of VR_SWAPS."""
    out = []
    for kw, (tag, vr, _) in ATTRS.items():
        pool = CHARSETS if kw == "SpecificCharacterSet" else POOLS[vr]
        for v in pool:
            raw = v if isinstance(v, bytes) else v.encode("latin-1")
            if vr == b"US":
                out.append((f"{kw}={raw!r}", tag, vr, raw))
                continue
            out.append((f"{kw}={raw!r}", tag, vr, pad(raw, vr)))
            if len(raw) % 2:
                out.append((f"{kw}={raw!r} (odd length)", tag, vr, raw))
    return out


def vr_swap_cases() -> list[tuple[str, int, bytes, bytes]]:
    out = []
    for kw, (tag, vr, clean) in ATTRS.items():
        plain = (
            struct.pack("<H", clean[0])
            if vr == b"US"
            else text(clean[0] if clean[0] is not None else UID_ROOT + "5", vr)
        )
        for new in VR_SWAPS:
            value = {
                b"US": struct.pack("<H", 7),
                b"SS": struct.pack("<h", -7),
                b"UL": struct.pack("<I", 7),
                b"FD": struct.pack("<d", 2.5),
                b"FL": struct.pack("<f", 2.5),
                b"SQ": b"",
            }.get(new, plain)
            out.append((f"{kw} as {new!r}", tag, new, value))
    return out


def test_single_odd_value_in_a_plain_instance() -> None:
    """Each tricky value alone (so the scan does not give up because of something else),
    implicit and explicit; with and without PHI for the PHI attributes and the character set."""
    counts: Counter[str] = Counter()
    failures = []
    phi_tags = {
        ATTRS[k][0]
        for k in ("PatientName", "PatientID", "PatientBirthDate", "SpecificCharacterSet")
    }
    for explicit, ts in ((False, IMPLICIT), (True, EXPLICIT)):
        base = plain_chunks(explicit)
        cases = single_value_cases() + (vr_swap_cases() if explicit else [])
        for label, tag, vr, value in cases:
            stream = edit(base, drop=(tag,), add=[(tag, element(tag, vr, value, explicit))])
            for with_phi in (True, False) if tag in phi_tags else (True,):
                status, diffs, _, _ = compare(stream, ts, with_phi)
                counts[status] += 1
                if status == "mismatch":  # the base is plain_chunks(): the label says the rest
                    where = "explicit" if explicit else "implicit"
                    failures.append(
                        (
                            diff_key(diffs[0]),
                            (
                                f"{label} in a plain {where} CT (with_phi={with_phi}): "
                                f"{'; '.join(diffs)}"
                            ),
                        )
                    )
    print(dict(counts))
    fail_grouped(failures)
    assert counts["equal"] > 0.4 * sum(counts.values()), dict(counts)  # the scan still answers


def test_character_sets_with_ascii_names() -> None:
    """Every character set of the pool with ASCII person names / texts (the scan does not read
    (0008,0005); pydicom decodes with it)."""
    names = [b"DOE^JOHN", b"Yamada^Tarou=Y^T=y^t", b"A=", b"=B", b"^^^^", b"A^B ", b"=", b"A==B"]
    failures = []
    for explicit, ts in ((False, IMPLICIT), (True, EXPLICIT)):
        base = plain_chunks(explicit)
        for cs in CHARSETS:
            raw_cs = cs if isinstance(cs, bytes) else cs.encode("latin-1")
            for name in names:
                stream = edit(
                    base,
                    drop=(T(0x0008, 0x0005), T(0x0010, 0x0010)),
                    add=[
                        (
                            T(0x0008, 0x0005),
                            element(T(0x0008, 0x0005), b"CS", pad(raw_cs, b"CS"), explicit),
                        ),
                        (
                            T(0x0010, 0x0010),
                            element(T(0x0010, 0x0010), b"PN", pad(name, b"PN"), explicit),
                        ),
                    ],
                )
                for with_phi in (True, False):
                    status, diffs, _, _ = compare(stream, ts, with_phi)
                    if status == "mismatch":
                        where = "explicit" if explicit else "implicit"
                        failures.append(
                            (
                                diff_key(diffs[0]),
                                (
                                    f"charset {raw_cs!r}, PatientName {name!r} in a plain "
                                    f"{where} CT (with_phi={with_phi}): "
                                    f"{'; '.join(diffs)}"
                                ),
                            )
                        )
    fail_grouped(failures)


OTHER_SYNTAXES = [
    "1.2.840.10008.1.20",
    "1.2.840.10008.1.2.4.95",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.100",
    "1.2.840.10008.1.2.1.98",
    "1.2.840.10008.1.2.8.1",
    "1.2.840.10008.1.2.4.70",
    "1.2.3.4",
    "1.2.826.0.1.3680043.10.9999.1.2.99",
]


@pytest.mark.parametrize("ts", OTHER_SYNTAXES)
def test_other_transfer_syntaxes(ts: str) -> None:
    """Syntaxes the receiver might be offered: whatever pydicom makes of the stream (explicit VR
    for all of these), the scan gives the same or None."""
    for explicit in (True, False):
        assert_equivalent(
            f"plain {'explicit' if explicit else 'implicit'} CT as {ts}",
            plain_ct(explicit),
            ts,
            explicit,
        )


# ---------------------------------------------------------------------------------------------
# tests: targeted structures (each one a way the scan and pydicom could part)
# ---------------------------------------------------------------------------------------------


def _nested_charset(explicit: bool, value: bytes, vr: bytes) -> bytes:
    """A bad Specific Character Set inside an item of an undefined-length sequence: pydicom
    parses such sequences while reading and converts the item's character set there."""
    body = element(T(0x0008, 0x0005), vr, value, explicit) + element(
        T(0x0008, 0x1150), b"UI", text(CT, b"UI"), explicit
    )
    sq = sequence(REF_IMAGE_SEQ, [body], explicit, undefined=True)
    return edit(plain_chunks(explicit), add=[(REF_IMAGE_SEQ, sq)])


def _item_shorter_than_content(explicit: bool) -> bytes:
    """An undefined-length sequence whose (defined-length) item claims only the 8-byte header
    of its one element. pydicom reads the whole element (its value holds what looks like a
    sequence delimiter and a PatientID) and finds the real delimiter after it; a scan that
    trusts the item length ends the sequence inside that value and reads the PatientID."""
    hidden = element(T(0x0010, 0x0020), b"LO", b"EVIL", explicit)
    # an unwanted element whose value swallows the real sequence delimiter (for the scan)
    tail = (
        tag_bytes(T(0x0010, 0x0021))
        + (b"LO" + struct.pack("<H", 10) if explicit else struct.pack("<I", 10))
        + b"xx"
    )
    inner = element(T(0x0008, 0x1150), b"UI", delimiter(SEQ_END) + hidden + tail, explicit)
    content = tag_bytes(ITEM) + struct.pack("<I", 8) + inner + delimiter(SEQ_END)
    sq = element(REF_IMAGE_SEQ, b"SQ", content, explicit, length=UNDEFINED)
    return edit(
        plain_chunks(explicit),
        drop=(T(0x0010, 0x0010), T(0x0010, 0x0020)),
        add=[(REF_IMAGE_SEQ, sq)],
    )


def _command_group(explicit: bool, encode_explicit: bool) -> bytes:
    cmd = element(T(0x0000, 0x0000), b"UL", struct.pack("<I", 30), encode_explicit) + element(
        T(0x0000, 0x0002), b"UI", text(CT, b"UI"), encode_explicit
    )
    return cmd + plain_ct(explicit)


def _meta_group_first(explicit: bool, ts_value: str) -> bytes:
    """(0002,0010) at the start of the data set: pydicom takes it as part of the file meta."""
    return element(T(0x0002, 0x0010), b"UI", text(ts_value, b"UI"), True) + plain_ct(explicit)


def _after_pixels(explicit: bool) -> bytes:
    """Elements after Pixel Data (pydicom stops before it): a second SOP Instance UID."""
    late = element(T(0x0008, 0x0018), b"UI", text(UID_ROOT + "999", b"UI"), explicit)
    return plain_ct(explicit) + late


def _top_level_delimiter(explicit: bool, tag: int) -> bytes:
    """An item / sequence delimiter between top-level elements (pydicom ends the data set at
    an item delimiter)."""
    chunks = plain_chunks(explicit)
    i = next(k for k, (t, _) in enumerate(chunks) if t == T(0x0010, 0x0010))
    return b"".join(c for _, c in chunks[:i]) + delimiter(tag) + b"".join(c for _, c in chunks[i:])


def _icon_with_rows(explicit: bool) -> bytes:
    """Rows/Columns/Pixel Data inside IconImageSequence (undefined lengths): must not leak."""
    body = (
        element(T(0x0028, 0x0010), b"US", struct.pack("<H", 4), explicit)
        + element(T(0x0028, 0x0011), b"US", struct.pack("<H", 4), explicit)
        + element(PIXEL_DATA, b"OB", bytes(16), explicit)
    )
    sq = sequence(ICON_SEQ, [body], explicit, undefined=True, item_undefined=True)
    return edit(plain_chunks(explicit), add=[(ICON_SEQ, sq)])


def _element_lookalike_in_ob(explicit: bool) -> bytes:
    fake = element(T(0x0028, 0x0010), b"US", struct.pack("<H", 999), explicit)
    blob = element(T(0x0009, 0x1002), b"OB", fake, explicit)
    creator = element(T(0x0009, 0x0010), b"LO", text("ACME 1.0", b"LO"), explicit)
    return edit(
        plain_chunks(explicit), add=[(T(0x0009, 0x0010), creator), (T(0x0009, 0x1002), blob)]
    )


TARGETED: list[tuple[str, Any]] = [
    *[
        (f"nested charset {v!r} as {vr.decode()}", lambda e, v=v, vr=vr: _nested_charset(e, v, vr))
        for v, vr in (
            (b"ISO_IR 100\x00x", b"CS"),
            (b"\x01\x00", b"US"),
            (b"ISO_IR 100", b"OB"),
            (b"bogus ", b"CS"),
            (b"ISO 2022 IR 87", b"CS"),
        )
    ],
    ("item shorter than its content", _item_shorter_than_content),
    ("command group, same encoding", lambda e: _command_group(e, e)),
    ("command group, other encoding", lambda e: _command_group(e, not e)),
    ("file meta element first (implicit TS)", lambda e: _meta_group_first(e, IMPLICIT)),
    ("file meta element first (explicit TS)", lambda e: _meta_group_first(e, EXPLICIT)),
    ("element after pixel data", _after_pixels),
    ("item delimiter at top level", lambda e: _top_level_delimiter(e, ITEM_END)),
    ("sequence delimiter at top level", lambda e: _top_level_delimiter(e, SEQ_END)),
    ("icon image sequence with rows", _icon_with_rows),
    ("element look-alike inside OB", _element_lookalike_in_ob),
    ("empty stream", lambda e: b""),
    *[(f"stream of {n} bytes", lambda e, n=n: plain_ct(e)[:n]) for n in (1, 4, 6, 7, 8, 9)],
]


@pytest.mark.parametrize("name,make", TARGETED, ids=[t[0] for t in TARGETED])
@pytest.mark.parametrize("explicit", [False, True], ids=["implicit", "explicit"])
def test_targeted_structures(name: str, make: Any, explicit: bool) -> None:
    ts = EXPLICIT if explicit else IMPLICIT
    assert_equivalent(name, make(explicit), ts, explicit)


# ---------------------------------------------------------------------------------------------
# tests: the differential fuzz
# ---------------------------------------------------------------------------------------------

N_CASES = 1200
SEED_BASE = 20240601


def test_fuzz_equivalence_with_pydicom_path() -> None:
    t0 = time.perf_counter()
    counts: Counter[tuple[str, str]] = Counter()  # (kind, status)
    ref_raises = Counter()
    failures: dict[str, tuple[Case, bool, list[str]]] = {}  # first case per distinct difference
    n_failed = 0
    for i in range(N_CASES):
        case = generate(SEED_BASE + i)
        stream = case.stream()
        for with_phi in (True, False):
            status, diffs, ref, _ = compare(stream, case.ts, with_phi)
            counts[(case.kind, status)] += 1
            ref_raises[case.kind] += isinstance(ref, tuple)
            if status == "mismatch":
                n_failed += 1
                for d in diffs:
                    failures.setdefault(diff_key(d), (case, with_phi, diffs))
    elapsed = time.perf_counter() - t0
    total = sum(counts.values())
    answered = sum(n for (k, s), n in counts.items() if s != "none")
    summary = (
        f"{N_CASES} cases x 2 in {elapsed:.1f}s; fast path answered {answered}/{total}; "
        + ", ".join(f"{k}/{s}={n}" for (k, s), n in sorted(counts.items()))
        + f"; reference raised: {dict(ref_raises)}"
    )
    print(summary)
    if failures:
        parts = [f"{n_failed} mismatching runs, {len(failures)} distinct differences:"]
        for key, (case, with_phi, diffs) in failures.items():
            small = minimise(case, with_phi, key)
            stream = small.stream()
            _, small_diffs, _, _ = compare(stream, case.ts, with_phi)
            label = f"[{key}] seed={case.seed} kind={case.kind}" + (
                f" (minimised {len(case.chunks)} -> {len(small.chunks)} elements)"
                if small is not case
                else ""
            )
            notes = case.notes if small is case else ["(generator notes omitted: minimised)"]
            parts.append(
                report(label, stream, case.ts, case.explicit, with_phi, small_diffs or diffs, notes)
            )
        pytest.fail(summary + "\n" + "\n".join(parts), pytrace=False)
    # the fast path must actually apply: to most cases, and to most ordinary ones
    assert answered >= 0.5 * total, summary
    clean = sum(n for (k, s), n in counts.items() if k == "clean")
    clean_answered = sum(n for (k, s), n in counts.items() if k == "clean" and s != "none")
    assert clean_answered >= 0.7 * clean, summary


def test_generator_is_deterministic() -> None:
    for seed in (1, 2, 3, 99):
        assert generate(seed).stream() == generate(seed).stream()


def test_generator_covers_reference_outcomes() -> None:
    """The generated cases are mostly readable by pydicom, and some are not (else the fuzz would
    never exercise the 'reference raises' side)."""
    raised = sum(
        isinstance(reference(c.stream(), c.ts, True), tuple)
        for c in map(generate, range(SEED_BASE, SEED_BASE + 300))
    )
    assert 5 <= raised <= 150, raised


# ---------------------------------------------------------------------------------------------
# tests: corpora from the project's own generators
# ---------------------------------------------------------------------------------------------


def split_file(path: Path) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes after the file meta) of a Part-10 file: what a sender
    streams in the C-STORE. The file meta (group 0002, explicit VR LE) is walked element by
    element, so a file without preamble (badinput's missing_preamble) works too."""
    raw = path.read_bytes()
    pos = 132 if raw[128:132] == b"DICM" else 0
    ts = ""
    while raw[pos : pos + 2] == b"\x02\x00":
        tag = struct.unpack_from("<HH", raw, pos)
        vr = raw[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            n, hdr = struct.unpack_from("<I", raw, pos + 8)[0], 12
        else:
            n, hdr = struct.unpack_from("<H", raw, pos + 6)[0], 8
        if tag == (0x0002, 0x0010):
            ts = raw[pos + hdr : pos + hdr + n].rstrip(b"\0 ").decode()
        pos += hdr + n
    if raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00":
        assert pos == 144 + int.from_bytes(raw[140:144], "little"), path  # group length agrees
    return ts, raw[pos:]


def check_files(paths: list[Path], *, must_answer: bool = False) -> tuple[int, int]:
    """Equivalence on every file; (files, answered). `must_answer`: every file needs a header."""
    problems, answered = [], 0
    for p in paths:
        ts, stream = split_file(p)
        for with_phi in (True, False):
            status, diffs, ref, _ = compare(stream, ts, with_phi)
            answered += status == "equal"
            if status == "mismatch" or (
                must_answer and status != "equal" and not isinstance(ref, tuple)
            ):
                problems.append(
                    report(
                        str(p),
                        stream,
                        ts,
                        ts != IMPLICIT,
                        with_phi,
                        diffs or ["scan_header gave None"],
                    )
                )
    assert not problems, "\n".join(problems[:10])
    return len(paths), answered


def test_corpus_phantom_series(tmp_path: Path) -> None:
    from molre.data import dicomio
    from tests.nodeproc import make_ct_series

    info = make_ct_series(
        tmp_path / "ph", ["intraparenchymal_hemorrhage"], n_slices=3, size=32, seed=5
    )
    check_files(info.paths, must_answer=True)  # ordinary CT: the fast path must answer
    implicit = [
        dicomio.compress_file(p, tmp_path / "impl" / p.name, IMPLICIT) for p in info.paths[:2]
    ]
    check_files(implicit, must_answer=True)
    # non-ASCII (ISO_IR 100) name: equal or None
    other = make_ct_series(
        tmp_path / "ph2",
        [],
        n_slices=2,
        size=32,
        seed=6,
        PatientName="M\xfcller^J\xf6rg",
        SeriesDescription="Sch\xe4del",
    )
    check_files(other.paths)


def test_corpus_other_syntaxes_and_enhanced(tmp_path: Path) -> None:
    import numpy as np

    from molre.data import dicomio

    vol = np.random.default_rng(3).normal(0, 50, (4, 32, 32)).astype(np.float32)
    enh = dicomio.write_enhanced_ct(tmp_path / "enh.dcm", vol, spacing=(2.0, 0.7, 0.7))
    check_files([enh])
    paths = dicomio.write_ct_series(tmp_path / "s", vol[:2], spacing=(2.0, 0.7, 0.7))
    for ts in (RLE, "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70"):
        try:
            out = [dicomio.compress_file(p, tmp_path / ts / p.name, ts) for p in paths]
        except Exception:  # noqa: BLE001, S112 - no encoder plugin here: skip that syntax
            continue
        check_files(out)


def test_corpus_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case of tests/badinput.py (series cut to 6 slices: the headers are what matters),
    first two and last object of each."""
    from tests import badinput

    write = badinput.write_base_series
    monkeypatch.setattr(
        badinput,
        "write_base_series",
        lambda out, rng, *, n=badinput.BASE_SLICES, **kw: write(out, rng, n=min(n, 6), **kw),
    )
    built = badinput.build_corpus(tmp_path, seed=0)
    assert len(built) == len(badinput.CASES)
    paths = []
    for b in built:
        items = b.items
        paths += [it.path for it in (items[:2] + items[-1:] if len(items) > 3 else items)]
    n, answered = check_files(paths)
    print(f"bad-input corpus: {n} files, scan answered {answered} of {2 * n} reads")
    assert n > 60 and answered > n  # the scan reads most of them (most are valid CT)


@pytest.mark.skipif(
    shutil.which("dcmcjpeg") is None or shutil.which("dcmconv") is None,
    reason="dcmtk not installed",
)
def test_corpus_dcmtk(tmp_path: Path) -> None:
    from tests.nodeproc import make_ct_series

    info = make_ct_series(tmp_path / "ph", [], n_slices=2, size=32, seed=9)
    src = info.paths[0]
    jobs = {
        "jpeg_baseline.dcm": ["dcmcjpeg", "+eb"],
        "jpeg_sv1.dcm": ["dcmcjpeg", "+e1"],
        "implicit.dcm": ["dcmconv", "+ti"],
        "explicit.dcm": ["dcmconv", "+te"],
        "big_endian.dcm": ["dcmconv", "+tb"],
        "deflated.dcm": ["dcmconv", "+td"],
    }
    done = []
    for name, cmd in jobs.items():
        out = tmp_path / name
        res = subprocess.run(
            [*cmd, str(src), str(out)], capture_output=True, text=True, check=False
        )
        if res.returncode == 0:
            done.append(out)
    assert len(done) >= 4
    check_files(done)
    for p in done:  # ordinary CT files: answered, except the big endian / deflated ones
        ts, stream = split_file(p)
        got = fast(stream, ts, True)
        assert (got is None) == (ts in NEVER_SCANNED), (p.name, ts, got)
