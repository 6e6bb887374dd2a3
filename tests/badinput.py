"""A generated corpus of bad (and awkward-but-valid) DICOM input, each case with its outcome.

Why generated: real-world breakage (truncated transfers, missing UIDs, wrong SOP class, scouts
and contrast series mixed into a head-CT study, Enhanced CT, non-ASCII names...) must never crash
the node or vanish silently. Each case is built from valid CT files written by
`molre.data.dicomio` and then deliberately corrupted, so the corpus needs no downloaded data and
stays reproducible (seeded).

A case is: a name, a description, how to make it (a function writing files into a directory)
and what must happen (`Expected`): the DIMSE status class the sender sees for each object, the
audit status of the instance rows, the final state of the series (if one is created) and a
pattern the recorded reason must match. `tests/test_bad_input.py` sends every case to the real
node and checks all of it, plus a C-ECHO after each case (the node stays up).

Objects are sent as raw files (`Item.path`): the sender streams the bytes after the file meta
unchanged (pynetdicom's chunked send), with the presentation context taken from the file meta,
so deliberately broken bodies reach the node exactly as written. Items with
`via="storescu"` are sent with dcmtk's storescu instead (used for a file without preamble).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ImplicitVRLittleEndian

from molre.data import dicomio

MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
CT_IMAGE_STORAGE = dicomio.CT_IMAGE_STORAGE
#: A syntactically valid but unknown transfer syntax: no SCP can accept it.
UNKNOWN_TRANSFER_SYNTAX = UID("1.2.826.0.1.3680043.10.9999.1.2.99")

#: Size of the base series: small enough to be fast, large enough to pass selection rules
#: (`selection.min_slices` defaults to 16).
BASE_SLICES = 20
BASE_SIZE = 48
BASE_SPACING = (5.0, 4.5, 4.5)  # (z, y, x) mm: 48 px * 4.5 mm = 216 mm field of view


# --------------------------------------------------------------------------------------------
# Outcome model
# --------------------------------------------------------------------------------------------

SUCCESS, WARNING, FAILURE, REFUSED = "success", "warning", "failure", "refused"


def status_class(status: int | None) -> str:
    """DIMSE status -> class; None (no presentation context / not sent) -> 'refused'."""
    if status is None:
        return REFUSED
    if status == 0x0000:
        return SUCCESS
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return WARNING
    return FAILURE


@dataclass(frozen=True)
class Outcome:
    """One acceptable outcome of a case.

    dimse: allowed status classes of every object sent; `dimse_last` overrides the last object
        (e.g. the duplicate that follows a valid series).
    instances: allowed audit statuses (`instances.status`) of the case's rows; `instances_last`
        likewise for the last object's row. None = no instance row may exist (refused context).
    series: role ("main", "other") -> allowed final series states; a role absent from the
        mapping must have no series row at all.
    reason: regex (case-insensitive) that the recorded reason must match — the instance reason
        for rejected/ignored/conflict rows, else the series reason.
    status_range: inclusive DIMSE status range the failing objects must fall in.
    """

    dimse: tuple[str, ...] = (SUCCESS,)
    dimse_last: tuple[str, ...] | None = None
    instances: tuple[str, ...] | None = ("stored",)
    instances_last: tuple[str, ...] | None = None
    series: dict[str, tuple[str, ...]] = field(default_factory=dict)
    reason: str | None = None
    status_range: tuple[int, int] | None = None
    label: str = ""

    def reason_matches(self, text: str | None) -> bool:
        return self.reason is None or bool(text and re.search(self.reason, text, re.I))


@dataclass(frozen=True)
class Expected:
    """The acceptable outcomes of a case (any one must match completely).

    Several alternatives exist only where the standard allows the node to catch a defect at two
    points — e.g. a broken Pixel Data can be refused at C-STORE time or stored and then fail the
    volume reader — and each alternative is still strict about status, audit row and reason.
    """

    alternatives: tuple[Outcome, ...]


def expect(*outcomes: Outcome) -> Expected:
    return Expected(tuple(outcomes))


@dataclass
class Item:
    """One object to send. The UIDs are what the *sender* claims (file meta), for audit lookups."""

    path: Path
    sop_instance_uid: str
    role: str = "main"
    via: str = "pynetdicom"  # or "storescu"


@dataclass
class BuiltCase:
    """A case whose files exist on disk."""

    name: str
    description: str
    items: list[Item]
    expected: Expected
    study_uid: str
    series_uids: dict[str, str]  # role -> SeriesInstanceUID the node should key on


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    make: Callable[[Path, np.random.Generator], BuiltCase]
    expected: Expected


# --------------------------------------------------------------------------------------------
# Building blocks: valid files from dicomio, then corruption
# --------------------------------------------------------------------------------------------

DELIVERED = ("delivered",)
PROCESSED = ("delivered", "reported")  # reported = no destination configured
NOT_READ = ("skipped",)
UNUSABLE = ("skipped", "failed")


def head_volume(
    rng: np.random.Generator, n: int = BASE_SLICES, size: int = BASE_SIZE
) -> np.ndarray:
    """A crude head: air, a bone ring, brain with noise. Enough for the model to run on."""
    z, y, x = np.mgrid[0:n, 0:size, 0:size].astype(np.float32)
    cz, c = (n - 1) / 2, (size - 1) / 2
    r = np.sqrt(
        ((x - c) / (0.42 * size)) ** 2
        + ((y - c) / (0.48 * size)) ** 2
        + ((z - cz) / (0.55 * n + 1)) ** 2
    )
    vol = np.full((n, size, size), -1000.0, np.float32)
    vol[r < 1.0] = 1200.0
    vol[r < 0.9] = 35.0
    vol += rng.normal(0, 4, vol.shape).astype(np.float32)
    return vol


def write_base_series(
    out: Path,
    rng: np.random.Generator,
    *,
    n: int = BASE_SLICES,
    size: int = BASE_SIZE,
    study_uid: str | None = None,
    spacing: Sequence[float] = BASE_SPACING,
    **tags,
) -> list[Path]:
    """A valid axial head-CT series (one file per slice) via `dicomio.write_ct_series`."""
    return dicomio.write_ct_series(
        out,
        head_volume(rng, n, size),
        spacing=spacing,
        origin=(-size * spacing[2] / 2, -size * spacing[1] / 2, 0.0),
        study_uid=study_uid,
        **tags,
    )


def load(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def save(ds: Dataset, path: Path, *, preamble: bool = True) -> Path:
    """Write as-is: no validation, no fixing, so corruption survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        if getattr(ds, "preamble", None) is None:
            ds.preamble = b"\x00" * 128
        ds.save_as(path, enforce_file_format=False)
    else:
        ds.preamble = None
        pydicom.dcmwrite(path, ds, enforce_file_format=False)
        raw = path.read_bytes()
        if raw[128:132] == b"DICM":  # some pydicom versions still add it; strip it
            path.write_bytes(raw[132:])
    return path


def raw_file(
    path: Path, *, sop_class: str, sop_instance: str, transfer_syntax: str, body: bytes
) -> Path:
    """Part-10 file with a correct file meta and an arbitrary (possibly broken) dataset body."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    from io import BytesIO

    from pydicom.filewriter import write_file_meta_info

    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue() + body)
    return path


def body_bytes(path: Path) -> tuple[FileMetaDataset, bytes]:
    """File meta and the raw dataset bytes that follow it."""
    from pynetdicom.dsutils import split_dataset

    meta, offset = split_dataset(path)
    return meta, path.read_bytes()[offset:]


def items_of(paths: Sequence[Path], role: str = "main") -> list[Item]:
    out = []
    for p in paths:
        meta = pydicom.filereader.read_file_meta_info(p)
        out.append(Item(Path(p), str(meta.MediaStorageSOPInstanceUID), role))
    return out


def _built(
    name: str, desc: str, items: list[Item], exp: Expected, study: str, series: dict[str, str]
) -> BuiltCase:
    return BuiltCase(name, desc, items, exp, study, series)


def _base(out: Path, rng: np.random.Generator, **kw) -> tuple[list[Path], Dataset]:
    paths = write_base_series(out / "base", rng, **kw)
    return paths, load(paths[0])


def _mutate_all(paths: Sequence[Path], out: Path, fn: Callable[[int, Dataset], None]) -> list[Path]:
    """Load every slice, apply fn(index, ds), write to `out`; returns the new paths."""
    res = []
    for i, p in enumerate(paths):
        ds = load(p)
        fn(i, ds)
        res.append(save(ds, out / p.name))
    return res


# --------------------------------------------------------------------------------------------
# The cases. Each maker returns a BuiltCase; expectations are attached in CASES below.
# --------------------------------------------------------------------------------------------


def _series_case(
    name: str,
    desc: str,
    exp: Expected,
    fn: Callable[[int, Dataset], None] | None = None,
    n: int = BASE_SLICES,
    via: str = "pynetdicom",
    **tags,
) -> Case:
    """Case = one base series with `fn` applied to every slice."""

    def make(out: Path, rng: np.random.Generator) -> BuiltCase:
        paths, first = _base(out, rng, n=n, **tags)
        if fn is not None:
            paths = _mutate_all(paths, out / "case", fn)
        ds0 = load(paths[0])
        items = items_of(paths)
        for it in items:
            it.via = via
        return _built(
            name,
            desc,
            items,
            exp,
            str(first.StudyInstanceUID),
            {"main": str(ds0.SeriesInstanceUID)},
        )

    return Case(name, desc, make, exp)


def _single_object_case(
    name: str, desc: str, exp: Expected, corrupt: Callable[[Path, Path, np.random.Generator], Path]
) -> Case:
    """Case = one object made by `corrupt(valid_file, out_dir, rng)`; no valid siblings."""

    def make(out: Path, rng: np.random.Generator) -> BuiltCase:
        paths, first = _base(out, rng, n=3)
        bad = corrupt(paths[1], out / "case", rng)
        meta = pydicom.filereader.read_file_meta_info(bad)
        return _built(
            name,
            desc,
            [Item(bad, str(meta.MediaStorageSOPInstanceUID))],
            exp,
            str(first.StudyInstanceUID),
            {"main": str(first.SeriesInstanceUID)},
        )

    return Case(name, desc, make, exp)


def _corrupt_slices_case(
    name: str,
    desc: str,
    exp: Expected,
    corrupt: Callable[[Path, Path, np.random.Generator], Path],
    which: str = "all",
) -> Case:
    """Case = a base series whose slices (all, or only the last one) go through `corrupt`."""

    def make(out: Path, rng: np.random.Generator) -> BuiltCase:
        paths, first = _base(out, rng)
        chosen = range(len(paths)) if which == "all" else [len(paths) - 1]
        res = list(paths)
        for i in chosen:
            res[i] = corrupt(paths[i], out / "case" / f"{i:03d}", rng)
        return _built(
            name,
            desc,
            items_of(res),
            exp,
            str(first.StudyInstanceUID),
            {"main": str(first.SeriesInstanceUID)},
        )

    return Case(name, desc, make, exp)


# ---- single broken objects --------------------------------------------------------------------


def _truncate_in_pixels(src: Path, out: Path, rng: np.random.Generator) -> Path:
    meta, body = body_bytes(src)
    cut = len(body) - (BASE_SIZE * BASE_SIZE)  # lose half of the 16-bit pixel data
    return raw_file(
        out / "truncated_pixels.dcm",
        sop_class=meta.MediaStorageSOPClassUID,
        sop_instance=meta.MediaStorageSOPInstanceUID,
        transfer_syntax=meta.TransferSyntaxUID,
        body=body[:cut],
    )


def _truncate_in_header(src: Path, out: Path, rng: np.random.Generator) -> Path:
    meta, body = body_bytes(src)
    ds = load(src)
    # cut in the middle of the element holding PatientPosition-ish data: ~40 % into the header
    header_len = len(body) - len(ds.PixelData) - 12
    return raw_file(
        out / "truncated_header.dcm",
        sop_class=meta.MediaStorageSOPClassUID,
        sop_instance=meta.MediaStorageSOPInstanceUID,
        transfer_syntax=meta.TransferSyntaxUID,
        body=body[: int(header_len * 0.4) + 3],
    )


def _without(keyword: str, fname: str) -> Callable[[Path, Path, np.random.Generator], Path]:
    def corrupt(src: Path, out: Path, rng: np.random.Generator) -> Path:
        ds = load(src)
        del ds[keyword]
        return save(ds, out / fname)

    return corrupt


def _invalid_uid(src: Path, out: Path, rng: np.random.Generator) -> Path:
    ds = load(src)
    # letters, a leading-zero component and a double dot: three violations of PS3.5 9.1
    with warnings.catch_warnings():  # pydicom warns about exactly what we want here
        warnings.simplefilter("ignore")
        ds.SeriesInstanceUID = "1.2.840.abc..07.99"
    return save(ds, out / "invalid_uid.dcm")


def _pixel_length_mismatch(src: Path, out: Path, rng: np.random.Generator) -> Path:
    ds = load(src)
    ds.PixelData = ds.PixelData[: -2 * BASE_SIZE * 5]  # five rows short, consistently encoded
    return save(ds, out / "pixel_mismatch.dcm")


def _absurd_matrix(src: Path, out: Path, rng: np.random.Generator) -> Path:
    ds = load(src)
    ds.Rows = 65535
    ds.Columns = 65535  # header claims 8 GiB of pixels; the data is 4.5 KiB
    return save(ds, out / "absurd_matrix.dcm")


def _empty_pixels(src: Path, out: Path, rng: np.random.Generator) -> Path:
    ds = load(src)
    ds.PixelData = b""
    return save(ds, out / "empty_pixels.dcm")


def _no_pixels(src: Path, out: Path, rng: np.random.Generator) -> Path:
    ds = load(src)
    del ds.PixelData
    return save(ds, out / "no_pixels.dcm")


def _wrong_sop_class(src: Path, out: Path, rng: np.random.Generator) -> Path:
    # Context (file meta) says CT Image Storage, the dataset says MR Image Storage.
    meta, body = body_bytes(src)
    ds = load(src)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    tmp = save(ds, out / "wrong_sop_class.tmp")
    _, new_body = body_bytes(tmp)
    tmp.unlink()
    return raw_file(
        out / "wrong_sop_class.dcm",
        sop_class=CT_IMAGE_STORAGE,
        sop_instance=meta.MediaStorageSOPInstanceUID,
        transfer_syntax=meta.TransferSyntaxUID,
        body=new_body,
    )


def _private_only(src: Path, out: Path, rng: np.random.Generator) -> Path:
    ds = load(src)
    keep = Dataset()
    keep.SOPClassUID = ds.SOPClassUID
    keep.SOPInstanceUID = ds.SOPInstanceUID
    block = keep.private_block(0x0029, "MOLRE TEST", create=True)
    block.add_new(0x10, "LO", "vendor blob")
    block.add_new(0x11, "OB", bytes(rng.integers(0, 255, 64, dtype=np.uint8)))
    block2 = keep.private_block(0x0043, "GEMS_PARM_01", create=True)
    block2.add_new(0x01, "SS", 7)
    keep.file_meta = copy.deepcopy(ds.file_meta)
    return save(keep, out / "private_only.dcm")


def _unknown_ts(src: Path, out: Path, rng: np.random.Generator) -> Path:
    meta, body = body_bytes(src)
    return raw_file(
        out / "unknown_ts.dcm",
        sop_class=meta.MediaStorageSOPClassUID,
        sop_instance=meta.MediaStorageSOPInstanceUID,
        transfer_syntax=UNKNOWN_TRANSFER_SYNTAX,
        body=body,
    )


# ---- series-level problems ------------------------------------------------------------------


def _missing_preamble(out: Path, rng: np.random.Generator) -> BuiltCase:
    paths, first = _base(out, rng)
    res = []
    for p in paths:
        res.append(save(load(p), out / "case" / p.name, preamble=False))
    assert res[0].read_bytes()[128:132] != b"DICM"
    items = [Item(p, str(load(paths[i]).SOPInstanceUID), via="storescu") for i, p in enumerate(res)]
    return _built(
        "missing_preamble",
        "",
        items,
        CASE_EXPECT["missing_preamble"],
        str(first.StudyInstanceUID),
        {"main": str(first.SeriesInstanceUID)},
    )


def _non_ct(out: Path, rng: np.random.Generator) -> BuiltCase:
    paths, first = _base(out, rng)

    def fn(i: int, ds: Dataset) -> None:
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        ds.Modality = "MR"
        for kw in (
            "KVP",
            "XRayTubeCurrent",
            "ExposureTime",
            "ConvolutionKernel",
            "RescaleType",
            "GantryDetectorTilt",
        ):
            if kw in ds:
                del ds[kw]
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType = "2D"

    mr = _mutate_all(paths, out / "case", fn)
    return _built(
        "non_ct_modality",
        "",
        items_of(mr),
        CASE_EXPECT["non_ct_modality"],
        str(first.StudyInstanceUID),
        {"main": str(first.SeriesInstanceUID)},
    )


def _mr_in_ct_study(out: Path, rng: np.random.Generator) -> BuiltCase:
    ct, first = _base(out, rng)
    mr_src = write_base_series(
        out / "mrsrc",
        rng,
        n=6,
        study_uid=str(first.StudyInstanceUID),
        SeriesNumber=7,
        SeriesDescription="T2 AX",
    )

    def fn(i: int, ds: Dataset) -> None:
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        ds.Modality = "MR"

    mr = _mutate_all(mr_src, out / "mr", fn)
    return _built(
        "mr_inside_ct_study",
        "",
        items_of(ct) + items_of(mr, "other"),
        CASE_EXPECT["mr_inside_ct_study"],
        str(first.StudyInstanceUID),
        {"main": str(first.SeriesInstanceUID), "other": str(load(mr[0]).SeriesInstanceUID)},
    )


def _dup_different(out: Path, rng: np.random.Generator) -> BuiltCase:
    paths, first = _base(out, rng)
    ds = load(paths[3])
    arr = np.frombuffer(ds.PixelData, dtype=np.uint16).copy()
    ds.PixelData = (arr[::-1]).tobytes()  # same SOP Instance UID, different pixels
    dup = save(ds, out / "case" / "dup_diff.dcm")
    return _built(
        "duplicate_sop_different_content",
        "",
        items_of(paths) + items_of([dup]),
        CASE_EXPECT["duplicate_sop_different_content"],
        str(first.StudyInstanceUID),
        {"main": str(first.SeriesInstanceUID)},
    )


def _dup_identical(out: Path, rng: np.random.Generator) -> BuiltCase:
    paths, first = _base(out, rng)
    return _built(
        "duplicate_byte_identical",
        "",
        items_of(paths) + items_of([paths[5]]),
        CASE_EXPECT["duplicate_byte_identical"],
        str(first.StudyInstanceUID),
        {"main": str(first.SeriesInstanceUID)},
    )


def _enhanced(out: Path, rng: np.random.Generator) -> BuiltCase:
    path = dicomio.write_enhanced_ct(out / "enhanced.dcm", head_volume(rng), spacing=BASE_SPACING)
    ds = load(path)
    return _built(
        "enhanced_ct_multiframe",
        "",
        items_of([path]),
        CASE_EXPECT["enhanced_ct_multiframe"],
        str(ds.StudyInstanceUID),
        {"main": str(ds.SeriesInstanceUID)},
    )


def _mixed_orientation(i: int, ds: Dataset) -> None:
    if i % 2:
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal among axial slices


def _mixed_matrix(i: int, ds: Dataset) -> None:
    if i >= BASE_SLICES // 2:
        arr = ds.pixel_array
        big = np.zeros((BASE_SIZE + 16, BASE_SIZE + 16), arr.dtype)
        big[8:-8, 8:-8] = arr
        ds.Rows, ds.Columns = big.shape
        ds.PixelData = big.tobytes()


def _zero_spacing(i: int, ds: Dataset) -> None:
    ds.PixelSpacing = [0, 0]


def _negative_spacing(i: int, ds: Dataset) -> None:
    ds.PixelSpacing = [-4.5, -4.5]


def _gantry_tilt(i: int, ds: Dataset) -> None:
    t = np.deg2rad(20.0)
    ds.GantryDetectorTilt = "20"
    # rows still along x; columns tilted in the y-z plane; positions still step along z only
    ds.ImageOrientationPatient = [
        1,
        0,
        0,
        0,
        round(float(np.cos(t)), 6),
        round(float(-np.sin(t)), 6),
    ]


def _huge_gap(i: int, ds: Dataset) -> None:
    if i >= BASE_SLICES // 2:
        pos = [float(v) for v in ds.ImagePositionPatient]
        pos[2] += 150.0  # one 155 mm hole in a 5 mm series
        ds.ImagePositionPatient = pos
        ds.SliceLocation = pos[2]


def _non_ascii(i: int, ds: Dataset) -> None:
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Müller^Zoë=山田^太郎"
    ds.InstitutionName = "Hôpital Universitaire Genève"
    ds.StudyDescription = "CT Schädel nativ"


def _private_added(i: int, ds: Dataset) -> None:
    block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    block.add_new(0x23, "DS", "0.5")
    block.add_new(0x24, "DS", "-10")
    blob = ds.private_block(0x7FE1, "SIEMENS CSA NON-IMAGE", create=True)
    blob.add_new(0x10, "OB", bytes(range(256)) * 8)


def _with_tags(**tags) -> Callable[[int, Dataset], None]:
    def fn(i: int, ds: Dataset) -> None:
        for k, v in tags.items():
            setattr(ds, k, v)

    return fn


def _localizer(out: Path, rng: np.random.Generator) -> BuiltCase:
    paths, first = _base(
        out,
        rng,
        n=3,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        SeriesDescription="Topogram 0.6 T20s",
        SeriesNumber=1,
    )
    return _built(
        "localizer",
        "",
        items_of(paths),
        CASE_EXPECT["localizer"],
        str(first.StudyInstanceUID),
        {"main": str(first.SeriesInstanceUID)},
    )


def _single_slice(out: Path, rng: np.random.Generator) -> BuiltCase:
    paths, first = _base(out, rng, n=1)
    return _built(
        "single_slice_series",
        "",
        items_of(paths),
        CASE_EXPECT["single_slice_series"],
        str(first.StudyInstanceUID),
        {"main": str(first.SeriesInstanceUID)},
    )


def _implicit_le(i: int, ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


# --------------------------------------------------------------------------------------------
# Expectations. Kept next to the case list so reviewing one shows the other.
# --------------------------------------------------------------------------------------------


def _reject(reason: str, status_range: tuple[int, int] | None = None) -> Expected:
    """Refused at C-STORE time: failure status, a 'rejected' row, no series."""
    return expect(
        Outcome(
            dimse=(FAILURE,),
            instances=("rejected",),
            series={},
            reason=reason,
            status_range=status_range,
            label="rejected at C-STORE",
        )
    )


def _broken_pixels(reason: str) -> Expected:
    """Every slice has the defect: refused at C-STORE, or stored and the series fails reading."""
    return expect(
        Outcome(
            dimse=(FAILURE,),
            instances=("rejected",),
            series={},
            reason=reason,
            label="rejected at C-STORE",
        ),
        Outcome(
            dimse=(SUCCESS,),
            instances=("stored",),
            series={"main": ("failed",)},
            reason=reason,
            label="stored, series failed when read",
        ),
    )


def _not_read(reason: str) -> Expected:
    return expect(Outcome(series={"main": NOT_READ}, reason=reason, label="skipped"))


def _works() -> Expected:
    return expect(Outcome(series={"main": PROCESSED}, label="read and reported"))


PIXEL = r"pixel|length|bytes|truncat|Rows|Columns|empty|short"

CASE_EXPECT: dict[str, Expected] = {
    # -- file / header breakage: refused at C-STORE with a failure status and a reason ---------
    "truncated_in_header": _reject(r"header|decod|truncat|pars|read|missing"),
    "missing_sop_instance_uid": _reject(r"SOPInstanceUID", (0xA900, 0xA9FF)),
    "missing_series_uid": _reject(r"SeriesInstanceUID", (0xA900, 0xA9FF)),
    "missing_study_uid": _reject(r"StudyInstanceUID", (0xA900, 0xA9FF)),
    "invalid_uid_syntax": _reject(r"SeriesInstanceUID.*(valid|UID)", (0xA900, 0xA9FF)),
    "wrong_sop_class_vs_context": _reject(r"SOPClassUID", (0xA900, 0xA9FF)),
    "private_tags_only": _reject(r"UID", (0xA900, 0xA9FF)),
    # an unknown transfer syntax is refused during association negotiation: nothing stored
    "unsupported_transfer_syntax": expect(
        Outcome(dimse=(REFUSED,), instances=None, series={}, label="presentation context rejected")
    ),
    # -- pixel data problems -------------------------------------------------------------------
    # last slice cut during transfer: refused (rest read) or stored (series fails reading)
    "truncated_in_pixel_data": expect(
        Outcome(
            dimse=(SUCCESS,),
            dimse_last=(FAILURE,),
            instances=("stored",),
            instances_last=("rejected",),
            series={"main": PROCESSED},
            reason=PIXEL,
            label="last slice rejected, rest read",
        ),
        Outcome(
            dimse=(SUCCESS,),
            instances=("stored",),
            series={"main": ("failed",)},
            reason=PIXEL,
            label="stored, series failed when read",
        ),
    ),
    "pixel_length_mismatch": _broken_pixels(PIXEL),
    # 65535 x 65535 pixels of 4.5 mm: the header sanity rule (field of view) skips it before
    # any read, or it is refused / fails like the other broken pixel data
    "absurd_rows_columns": expect(
        *_broken_pixels(PIXEL).alternatives,
        Outcome(
            dimse=(SUCCESS,),
            instances=("stored",),
            series={"main": NOT_READ},
            reason=r"Rows/Columns x PixelSpacing",
            label="skipped: field of view",
        ),
    ),
    "empty_pixel_data": _broken_pixels(PIXEL),
    "missing_pixel_data": _broken_pixels(PIXEL + r"|PixelData"),
    # -- objects that are not for this node ----------------------------------------------------
    # non-CT storage classes are accepted (a PACS forwarding a study must not see failures)
    # and recorded as ignored; no series is created for them
    "non_ct_modality": expect(
        Outcome(
            dimse=(SUCCESS,),
            instances=("ignored",),
            series={},
            reason=r"not CT|MR",
            label="ignored",
        )
    ),
    "mr_inside_ct_study": expect(
        Outcome(
            dimse=(SUCCESS,),
            instances=("stored", "ignored"),
            instances_last=("ignored",),
            series={"main": PROCESSED},
            label="CT read, MR ignored",
        )
    ),
    # -- selection rules: stored, then skipped with a named reason -------------------------------
    "localizer": _not_read(r"LOCALIZER"),
    "contrast_series": _not_read(r"contrast"),
    "derived_secondary": _not_read(r"DERIVED|SECONDARY|MPR|image_type"),
    "single_slice_series": _not_read(r"slices?"),
    "non_head_body_part": _not_read(r"head|body ?part"),
    # Enhanced CT is a CT class: read, or skipped by a rule that names why
    "enhanced_ct_multiframe": expect(
        Outcome(series={"main": PROCESSED}, label="read"),
        Outcome(
            series={"main": NOT_READ},
            reason=r"image_type|frame|enhanced",
            label="skipped with reason",
        ),
    ),
    # -- geometry the volume reader must refuse with a named reason ------------------------------
    "mixed_orientation": expect(
        Outcome(
            series={"main": UNUSABLE},
            reason=r"orient|axial|ImageOrientationPatient",
            label="refused with reason",
        )
    ),
    "mixed_matrix_sizes": expect(
        Outcome(
            series={"main": UNUSABLE},
            reason=r"Rows|Columns|matrix|size|shape",
            label="refused with reason",
        )
    ),
    "zero_pixel_spacing": expect(
        Outcome(series={"main": UNUSABLE}, reason=r"spacing", label="refused with reason")
    ),
    "negative_pixel_spacing": expect(
        Outcome(series={"main": UNUSABLE}, reason=r"spacing", label="refused with reason")
    ),
    # a hole in the stack: refused with a reason, or read (the reader may resample)
    "huge_slice_gap": expect(
        Outcome(series={"main": UNUSABLE}, reason=r"gap|spacing|slice|missing", label="refused"),
        Outcome(series={"main": PROCESSED}, label="read"),
    ),
    # a tilted gantry is a known CT reality: read (the reader resamples/corrects) or refused
    "gantry_tilt": expect(
        Outcome(series={"main": PROCESSED}, label="read"),
        Outcome(series={"main": UNUSABLE}, reason=r"tilt|orient|shear|axial", label="refused"),
    ),
    # -- duplicates ------------------------------------------------------------------------------
    "duplicate_byte_identical": expect(
        Outcome(
            dimse=(SUCCESS,),
            instances=("stored",),
            instances_last=("duplicate",),
            series={"main": PROCESSED},
            label="duplicate recorded, series read once",
        )
    ),
    "duplicate_sop_different_content": expect(
        Outcome(
            dimse=(SUCCESS,),
            dimse_last=(WARNING,),
            instances=("stored",),
            instances_last=("conflict",),
            series={"main": PROCESSED},
            reason=r"different|conflict|known",
            label="warning, conflict kept aside",
        )
    ),
    # -- awkward but valid: must simply work ------------------------------------------------------
    "missing_preamble": _works(),
    "non_ascii_patient_name": _works(),
    "private_tags_added": _works(),
    "implicit_vr_little_endian": _works(),
}


CASES: list[Case] = [
    _corrupt_slices_case(
        "truncated_in_pixel_data",
        "file cut in the middle of Pixel Data",
        CASE_EXPECT["truncated_in_pixel_data"],
        _truncate_in_pixels,
        "last",
    ),
    _single_object_case(
        "truncated_in_header",
        "file cut inside the header (before Pixel Data)",
        CASE_EXPECT["truncated_in_header"],
        _truncate_in_header,
    ),
    Case(
        "missing_preamble",
        "Part-10 file without the 128-byte preamble + DICM (storescu)",
        _missing_preamble,
        CASE_EXPECT["missing_preamble"],
    ),
    _single_object_case(
        "missing_sop_instance_uid",
        "dataset lacks (0008,0018)",
        CASE_EXPECT["missing_sop_instance_uid"],
        _without("SOPInstanceUID", "no_sop_uid.dcm"),
    ),
    _single_object_case(
        "missing_series_uid",
        "dataset lacks (0020,000E)",
        CASE_EXPECT["missing_series_uid"],
        _without("SeriesInstanceUID", "no_series_uid.dcm"),
    ),
    _single_object_case(
        "missing_study_uid",
        "dataset lacks (0020,000D)",
        CASE_EXPECT["missing_study_uid"],
        _without("StudyInstanceUID", "no_study_uid.dcm"),
    ),
    _single_object_case(
        "invalid_uid_syntax",
        "SeriesInstanceUID with letters / empty component",
        CASE_EXPECT["invalid_uid_syntax"],
        _invalid_uid,
    ),
    _corrupt_slices_case(
        "pixel_length_mismatch",
        "Pixel Data shorter than Rows*Columns*2",
        CASE_EXPECT["pixel_length_mismatch"],
        _pixel_length_mismatch,
        "all",
    ),
    _corrupt_slices_case(
        "absurd_rows_columns",
        "Rows = Columns = 65535 (claims 8 GiB)",
        CASE_EXPECT["absurd_rows_columns"],
        _absurd_matrix,
        "all",
    ),
    _corrupt_slices_case(
        "empty_pixel_data",
        "Pixel Data present with length 0",
        CASE_EXPECT["empty_pixel_data"],
        _empty_pixels,
        "all",
    ),
    _corrupt_slices_case(
        "missing_pixel_data",
        "CT image without Pixel Data",
        CASE_EXPECT["missing_pixel_data"],
        _no_pixels,
        "all",
    ),
    _single_object_case(
        "unsupported_transfer_syntax",
        "unknown transfer syntax UID offered",
        CASE_EXPECT["unsupported_transfer_syntax"],
        _unknown_ts,
    ),
    _single_object_case(
        "wrong_sop_class_vs_context",
        "sent in a CT Image Storage context; dataset says MR Image Storage",
        CASE_EXPECT["wrong_sop_class_vs_context"],
        _wrong_sop_class,
    ),
    _single_object_case(
        "private_tags_only",
        "only SOP UIDs and private tags",
        CASE_EXPECT["private_tags_only"],
        _private_only,
    ),
    Case(
        "non_ct_modality",
        "an MR series (MR Image Storage, Modality MR)",
        _non_ct,
        CASE_EXPECT["non_ct_modality"],
    ),
    Case(
        "mr_inside_ct_study",
        "a valid head CT series and an MR series in the same study",
        _mr_in_ct_study,
        CASE_EXPECT["mr_inside_ct_study"],
    ),
    Case("localizer", "3 scout images (ImageType LOCALIZER)", _localizer, CASE_EXPECT["localizer"]),
    _series_case(
        "contrast_series",
        "contrast-enhanced head CT (ContrastBolusAgent set)",
        CASE_EXPECT["contrast_series"],
        _with_tags(ContrastBolusAgent="IOHEXOL 350", SeriesDescription="CTA HEAD"),
    ),
    _series_case(
        "derived_secondary",
        "ImageType DERIVED\\SECONDARY\\MPR",
        CASE_EXPECT["derived_secondary"],
        _with_tags(ImageType=["DERIVED", "SECONDARY", "MPR"]),
    ),
    Case(
        "single_slice_series",
        "a series of one slice",
        _single_slice,
        CASE_EXPECT["single_slice_series"],
    ),
    _series_case(
        "non_head_body_part",
        "chest CT (BodyPartExamined CHEST, no head words)",
        CASE_EXPECT["non_head_body_part"],
        _with_tags(
            BodyPartExamined="CHEST",
            StudyDescription="CT THORAX",
            SeriesDescription="Thorax 5mm",
            ProtocolName="CHEST ROUTINE",
        ),
    ),
    Case(
        "enhanced_ct_multiframe",
        "one Enhanced CT Image Storage multi-frame object",
        _enhanced,
        CASE_EXPECT["enhanced_ct_multiframe"],
    ),
    _series_case(
        "mixed_orientation",
        "every other slice sagittal",
        CASE_EXPECT["mixed_orientation"],
        _mixed_orientation,
    ),
    _series_case(
        "mixed_matrix_sizes",
        "half the slices 48x48, half 64x64",
        CASE_EXPECT["mixed_matrix_sizes"],
        _mixed_matrix,
    ),
    _series_case(
        "zero_pixel_spacing", "PixelSpacing 0\\0", CASE_EXPECT["zero_pixel_spacing"], _zero_spacing
    ),
    _series_case(
        "negative_pixel_spacing",
        "PixelSpacing -4.5\\-4.5",
        CASE_EXPECT["negative_pixel_spacing"],
        _negative_spacing,
    ),
    _series_case(
        "huge_slice_gap",
        "150 mm hole in the middle of a 5 mm series",
        CASE_EXPECT["huge_slice_gap"],
        _huge_gap,
    ),
    _series_case(
        "gantry_tilt",
        "20 degree gantry tilt (sheared slice stack)",
        CASE_EXPECT["gantry_tilt"],
        _gantry_tilt,
    ),
    Case(
        "duplicate_byte_identical",
        "valid series plus one slice sent again unchanged",
        _dup_identical,
        CASE_EXPECT["duplicate_byte_identical"],
    ),
    Case(
        "duplicate_sop_different_content",
        "valid series plus a different object reusing one SOP Instance UID",
        _dup_different,
        CASE_EXPECT["duplicate_sop_different_content"],
    ),
    _series_case(
        "non_ascii_patient_name",
        "UTF-8 (ISO_IR 192) names with umlauts and kanji",
        CASE_EXPECT["non_ascii_patient_name"],
        _non_ascii,
    ),
    _series_case(
        "private_tags_added",
        "valid series with vendor private blocks",
        CASE_EXPECT["private_tags_added"],
        _private_added,
    ),
    # sent with dcmtk: node.dicomnet.send_files cannot send Implicit VR files (it offers both
    # uncompressed syntaxes in one context, the SCP picks Explicit, the chunked send needs the
    # file's own syntax); the case is about the node *receiving* Implicit VR
    _series_case(
        "implicit_vr_little_endian",
        "valid series in Implicit VR Little Endian",
        CASE_EXPECT["implicit_vr_little_endian"],
        _implicit_le,
        via="storescu",
    ),
]

assert set(CASE_EXPECT) == {c.name for c in CASES}, "every case needs exactly one expectation"


def build_corpus(out: Path, seed: int = 0, names: Sequence[str] | None = None) -> list[BuiltCase]:
    """Write every case (or the named ones) under `out/<name>/`.

    Pixels and corruptions are reproducible for a seed; UIDs are fresh on every call (so two
    corpora never collide in one node).
    """
    built = []
    for i, case in enumerate(CASES):
        if names is not None and case.name not in names:
            continue
        rng = np.random.default_rng([seed, i])
        b = case.make(Path(out) / case.name, rng)
        b.name, b.description, b.expected = case.name, case.description, case.expected
        built.append(b)
    return built
