"""What the node needs from an instance's header (no pixel data), read two ways.

:func:`read_header` reads a parsed :class:`pydicom.Dataset` (any transfer syntax, Enhanced CT
functional groups, any character set). :func:`scan_header`, the receiver's fast path, walks the
encoded top-level elements itself and converts only the ones it needs with pydicom's own value
converters, because parsing every element into Python objects dominates the receive path
(BENCHMARKS.md). Whenever it is not sure (big endian or deflated, an unknown or mismatched VR,
malformed lengths or order, non-ASCII or ISO 2022 text in a value it needs, functional groups)
it returns None and the caller parses with pydicom. tests/test_header_scan.py fuzzes the two
readers for equality, errors included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from struct import Struct, unpack_from
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.tag import Tag
from pydicom.uid import UID, PrivateTransferSyntaxes
from pydicom.valuerep import IS, DSclass, PersonName
from pydicom.values import convert_numbers, multi_string

from common.dicom import first_item, functional_group_value
from common.jsonsafe import jsonable
from storage import InstanceHeader

META_KEYWORDS = (
    "Modality",
    "SOPClassUID",
    "StudyInstanceUID",
    "ImageType",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "SliceThickness",
    "ContrastBolusAgent",
    "ConvolutionKernel",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "ImageOrientationPatient",
    "SeriesNumber",
    "StudyDate",
    "Manufacturer",
    "ManufacturerModelName",
    "PixelSpacing",
    "KVP",
    "RescaleSlope",
    "RescaleIntercept",
)
PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate")

# (keyword, tag) pairs: looking elements up by tag skips a keyword->tag translation per access,
# which adds up on the per-instance path
_META_TAGS = tuple((kw, int(Tag(kw))) for kw in META_KEYWORDS)
_PHI_TAGS = tuple((kw, int(Tag(kw))) for kw in PHI_KEYWORDS)

#: Enhanced CT: the functional-group macro that holds a meta attribute when it is not top-level
_FALLBACKS = {
    "SliceThickness": "PixelMeasuresSequence",
    "PixelSpacing": "PixelMeasuresSequence",
    "ImageOrientationPatient": "PlaneOrientationSequence",
    "ConvolutionKernel": "CTReconstructionSequence",
    "RescaleSlope": "PixelValueTransformationSequence",
    "RescaleIntercept": "PixelValueTransformationSequence",
}
_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES, _MODALITY, _ACCESSION, _INSTANCE_NUMBER = (
    int(Tag(kw))
    for kw in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "AccessionNumber",
        "InstanceNumber",
    )
)

_MISSING = object()


# ---------------------------------------------------------------------------------------------
# turning element values into the header (shared by both readers)
# ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """DICOM element value -> header meta value (:func:`common.jsonsafe.jsonable`), except that
    bytes are dropped and a non-finite number is kept as text ("nan"): the selection rules
    refuse a NaN RescaleSlope by name instead of seeing the attribute as absent."""
    if value is None or isinstance(value, bytes):
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(float(value))
    return jsonable(value)


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v) if v not in (None, "", _MISSING) else None
    except (TypeError, ValueError):
        return None


def _first(ds: Any, path: tuple[str, ...]) -> Any:
    """Value of a nested attribute, following the first item of each sequence."""
    cur = ds
    for kw in path:
        if cur is None or kw not in cur:
            return None
        cur = cur[kw].value
        if isinstance(cur, pydicom.sequence.Sequence):
            cur = cur[0] if len(cur) else None
    return cur


def _build(
    value: Callable[[int], Any], transfer_syntax: str | None, with_phi: bool, ds: Any = None
) -> Any:
    """The header from `value(tag)` (an element's value, or _MISSING). `ds` (a Dataset) adds
    the Enhanced CT functional-group fallbacks."""

    def text(tag: int) -> str | None:
        v = value(tag)
        return str(v) if v not in (None, "", _MISSING) else None

    return InstanceHeader(
        sop_class_uid=text(_SOP_CLASS),
        sop_instance_uid=text(_SOP_INSTANCE),
        study_uid=text(_STUDY),
        series_uid=text(_SERIES),
        modality=text(_MODALITY),
        transfer_syntax=transfer_syntax,
        accession_number=text(_ACCESSION),
        instance_number=_int_or_none(value(_INSTANCE_NUMBER)),
        meta=_meta(value, ds),
        phi=(
            {kw: "" if (v := value(tag)) is _MISSING else str(v) for kw, tag in _PHI_TAGS}
            if with_phi
            else {}
        ),
    )


def _meta(value: Callable[[int], Any], ds: Any = None) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for kw, tag in _META_TAGS:
        v = value(tag)
        if v is not _MISSING:
            v = _plain(v)
            if v not in (None, "", []):
                meta[kw] = v
    if ds is None:
        return meta
    frame = first_item(ds, "PerFrameFunctionalGroupsSequence")
    for kw, sequence in _FALLBACKS.items():
        if kw not in meta:
            v = functional_group_value(ds, frame, sequence, kw)
            if v not in (None, "", []):
                meta[kw] = _plain(v)
    if "ContrastBolusAgent" not in meta:
        agent = _first(ds, ("ContrastBolusAgentSequence", "CodeMeaning"))
        if agent:
            meta["ContrastBolusAgent"] = str(agent)
    return meta


def _dataset_value(ds: pydicom.Dataset) -> Callable[[int], Any]:
    def value(tag: int) -> Any:
        elem = ds.get(tag)
        return elem.value if elem is not None else _MISSING

    return value


def read_header(ds: pydicom.Dataset, transfer_syntax: str | None, *, with_phi: bool = True) -> Any:
    """`storage.InstanceHeader` of a parsed header (start-up reconciliation, and the receiver
    when :func:`scan_header` declines). Raises on malformed values (-> Cannot Understand).

    ``with_phi=False`` leaves ``phi`` empty: decoding PatientName for a store that does not
    keep it (``audit.store_phi = false``) is wasted work on every instance."""
    return _build(_dataset_value(ds), transfer_syntax, with_phi, ds)


# ---------------------------------------------------------------------------------------------
# the fast path: scan the encoded data set
# ---------------------------------------------------------------------------------------------

_UNDEFINED = 0xFFFFFFFF
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD
_CHARSET = 0x00080005
#: Specific Character Set values under which an ASCII value decodes (and a name encodes) as
#: ASCII; any other (ISO 2022 code extensions, unknown terms, odd VRs) is left to pydicom
_PLAIN_CHARSETS = frozenset({b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192"})
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # pydicom's stop_before_pixels
#: Enhanced CT functional groups / coded contrast agent: values may come from inside them
_SEQUENCES_READ = frozenset(
    int(Tag(kw))
    for kw in (
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
        "ContrastBolusAgentSequence",
    )
)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE",
        b"AS",
        b"AT",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"FD",
        b"FL",
        b"IS",
        b"LO",
        b"LT",
        b"PN",
        b"SH",
        b"SL",
        b"SS",
        b"ST",
        b"TM",
        b"UI",
        b"UL",
        b"US",
    }
)


def _cs(raw: bytes) -> Any:  # CS, DA (pydicom.values.convert_string)
    return multi_string(raw.decode("ascii"))


def _text(raw: bytes) -> Any:  # SH, LO (pydicom.values.convert_text, ASCII)
    values = [v.rstrip("\0 ") for v in raw.decode("ascii").split("\\")]
    return values[0] if len(values) == 1 else pydicom.multival.MultiValue(str, values)


def _ds(raw: bytes) -> Any:  # pydicom.values.convert_DS_string
    return multi_string(raw.decode("ascii").strip(), valtype=DSclass)


def _is(raw: bytes) -> Any:  # pydicom.values.convert_IS_string
    return multi_string(raw.decode("ascii"), valtype=IS)


def _ui(raw: bytes) -> Any:  # pydicom.values.convert_UI; the header keeps str(UID(v)), v.strip()
    return multi_string(raw.decode("ascii").rstrip("\0 "), str.strip)


def _us(raw: bytes) -> Any:
    return convert_numbers(raw, True, "H")


def _pn(raw: bytes) -> Any:  # pydicom.values.convert_PN, one ASCII name
    return PersonName(raw.rstrip(b"\x00 ").decode("ascii"))


_CONVERT = {
    "CS": _cs,
    "DA": _cs,
    "SH": _text,
    "LO": _text,
    "DS": _ds,
    "IS": _is,
    "UI": _ui,
    "US": _us,
    "PN": _pn,
}
#: values that must be single (a backslash would make pydicom build a MultiValue whose str() or
#: int() the pydicom path turns into something the scan does not imitate)
_SINGLE = frozenset(
    {_SOP_CLASS, _SOP_INSTANCE, _STUDY, _SERIES, _MODALITY, _ACCESSION, _INSTANCE_NUMBER}
    | {tag for _, tag in _PHI_TAGS}
)


def _wanted() -> dict[int, tuple[bytes, Callable[[bytes], Any]]]:
    tags = {tag for _, tag in _META_TAGS} | {tag for _, tag in _PHI_TAGS} | set(_SINGLE)
    out: dict[int, tuple[bytes, Callable[[bytes], Any]]] = {}
    for tag in tags:
        vr = dictionary_VR(tag)
        out[tag] = (vr.encode(), _CONVERT[vr])
    return out


_WANTED = _wanted()


@lru_cache(maxsize=64)
def _fast_encoding(transfer_syntax: str) -> bool | None:
    """True = implicit VR LE, False = explicit VR LE, None = not for the scan."""
    uid = UID(transfer_syntax)
    if uid in PrivateTransferSyntaxes or not uid.is_transfer_syntax:
        return None
    if uid.is_deflated or not uid.is_little_endian:
        return None
    return bool(uid.is_implicit_VR)


def _is_sequence(tag: int, vr: bytes, implicit: bool) -> bool:
    """An undefined-length element the scan can step over: a sequence (by its explicit VR, or
    by the dictionary in implicit VR; private and unknown tags are left to pydicom)."""
    if not implicit:
        return vr == b"SQ"
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _looks_explicit(buf: bytes, pos: int) -> bool:
    b0, b1 = buf[pos + 4], buf[pos + 5]
    return 0x40 < b0 < 0x5B and 0x40 < b1 < 0x5B


_IMPLICIT_HEAD, _EXPLICIT_HEAD, _U32 = Struct("<HHI"), Struct("<HH2sH"), Struct("<I")


def _element(buf: bytes, pos: int, end: int, implicit: bool) -> tuple[int, bytes, int, int] | None:
    """(tag, vr, value start, length) of the element at `pos`, or None if malformed."""
    if pos + 8 > end:
        return None
    if implicit:
        group, elem, length = _IMPLICIT_HEAD.unpack_from(buf, pos)
        return group << 16 | elem, b"", pos + 8, length
    group, elem, vr, length = _EXPLICIT_HEAD.unpack_from(buf, pos)
    if vr in _SHORT_VRS:
        return group << 16 | elem, vr, pos + 8, length
    if vr in _LONG_VRS and pos + 12 <= end:
        return group << 16 | elem, vr, pos + 12, _U32.unpack_from(buf, pos + 8)[0]
    return None


def _skip_sequence(buf: bytes, pos: int, end: int, implicit: bool, depth: int = 0) -> int | None:
    """Position after an undefined-length sequence whose first item starts at `pos`, or None.

    pydicom reads such a sequence while it reads the data set (it must find its end), items
    included, so the scan walks every item's elements the way it does: an item of defined
    length must end exactly where it says, and an item's own Specific Character Set (which
    pydicom decodes right away) is left to pydicom."""
    if depth > 16:
        return None
    while pos + 8 <= end:
        group, elem, length = unpack_from("<HHI", buf, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            return None
        if length == _UNDEFINED:
            after = _skip_item(buf, pos, end, implicit, depth, delimited=True)
        elif pos + length > end:
            return None
        else:
            item_end = pos + length
            after = _skip_item(buf, pos, item_end, implicit, depth, delimited=False)
            if after != item_end:
                return None
        if after is None:
            return None
        pos = after
    return None


def _skip_item(
    buf: bytes, pos: int, end: int, implicit: bool, depth: int, *, delimited: bool
) -> int | None:
    """Walk an item's elements from `pos`: up to its item delimiter (`delimited`, returns the
    position after it) or up to `end` (returns `end`); None if anything looks wrong."""
    while True:
        if not delimited and pos == end:
            return pos
        if pos + 8 > end:
            return None
        if delimited and unpack_from("<I", buf, pos)[0] == 0xE00DFFFE:  # (FFFE,E00D)
            return pos + 8
        if not implicit and not _looks_explicit(buf, pos):
            return None  # an implicit item inside explicit data: leave it to pydicom
        el = _element(buf, pos, end, implicit)
        if el is None:
            return None
        tag, vr, start, length = el
        if tag == _CHARSET or tag >> 16 == 0xFFFE:
            return None
        if length == _UNDEFINED:
            if not _is_sequence(tag, vr, implicit):
                return None
            after = _skip_sequence(buf, start, end, implicit, depth + 1)
            if after is None:
                return None
            pos = after
        else:
            pos = start + length
            if pos > end:
                return None


def scan_header(stream: bytes, transfer_syntax: str, *, with_phi: bool = True) -> Any:
    """`storage.InstanceHeader` read straight from the encoded data set `stream` (the bytes a
    C-STORE carried, no file meta), equal to what :func:`read_header` gives for it after
    ``dcmread(stop_before_pixels=True)``; or None when the scan cannot be sure (see the module
    docstring) -- the caller then parses with pydicom."""
    implicit = _fast_encoding(transfer_syntax)
    if implicit is None:
        return None
    end = len(stream)
    if end >= 6 and _looks_explicit(stream, 0) == implicit:
        return None  # pydicom would switch VR encoding (with a warning): its business
    raw: dict[int, bytes] = {}
    pos, last = 0, -1
    try:
        while pos < end:
            el = _element(stream, pos, end, implicit)
            if el is None:
                return None
            tag, vr, start, length = el
            if tag in _PIXEL_TAGS:
                break
            if tag <= last or tag >> 16 in (0x0002, 0xFFFE) or tag in _SEQUENCES_READ:
                return None
            last = tag
            if length == _UNDEFINED:
                if tag in _WANTED or not _is_sequence(tag, vr, implicit):
                    return None
                after = _skip_sequence(stream, start, end, implicit)
                if after is None:
                    return None
                pos = after
                continue
            pos = start + length
            if pos > end:
                return None
            if tag == _CHARSET and (
                not (implicit or vr == b"CS")
                or stream[start:pos].rstrip(b" ") not in _PLAIN_CHARSETS
            ):
                return None
            spec = _WANTED.get(tag)
            if spec is not None:
                if not implicit and vr != spec[0]:
                    return None
                raw[tag] = stream[start:pos]
        values: dict[int, Any] = {}
        for tag, data in raw.items():
            if not data.isascii() or b"\x1b" in data:
                return None
            if tag in _SINGLE and b"\\" in data:
                return None
            vr_bytes, convert = _WANTED[tag]
            values[tag] = convert(data) if data else _empty(vr_bytes)
        return _build(lambda tag: values.get(tag, _MISSING), transfer_syntax, with_phi)
    except Exception:  # noqa: BLE001 - any doubt: pydicom decides (it may raise, or warn)
        return None


def _empty(vr: bytes) -> Any:
    """pydicom's value for an empty element (``dataelem.empty_value_for_VR``)."""
    if vr == b"PN":
        return PersonName("")
    if vr in (b"US", b"DS", b"IS"):
        return None
    return ""


__all__ = ["META_KEYWORDS", "PHI_KEYWORDS", "read_header", "scan_header"]
