"""`molre-node dataset pull`: a site's training set from its PACS.

Given the accession numbers of a labels file (`molre-node labels`), for each accession:

1. C-FIND (Study Root) at STUDY level by AccessionNumber, then SERIES level for each study, then
   IMAGE level for the series of a wanted modality, asking for the attributes the selection rules
   read (`node.header.META_KEYWORDS`);
2. choose the series with the node's own selection rules (`node.selection.select_study`: the
   same `[selection]` config, the same reasons) -- one definition for what the node reads and
   what it trains on;
3. C-GET the chosen series into ``OUT/series/<accession key>/<SeriesInstanceUID>/`` (written to a
   ``.partial`` folder and renamed when complete), re-check the rules on the received headers;
4. record ``done.json`` (series, pseudonymised patient, scanner) so a re-run fetches only what is
   missing;

then write ``OUT/manifest.csv`` for `molre-node train` (labels joined, uncertain labels mapped by
the chosen policy, ``site`` from the scanner headers or ``--site``, split by patient with a
keyed hash so that a patient never moves between splits when more data is added), plus
``OUT/series.csv`` (per series: scanner manufacturer/model, instances), ``OUT/skipped.csv`` (what
was skipped and why) and ``OUT/dataset.json`` (options, counts, skip summary).

No PHI in logs: accession numbers are logged as keyed hashes (`acc_key`), series by UID, patients
never. ``--pseudonymise`` (default) writes keyed-hash patient IDs into the manifest; the key is
``OUT/.pseudonym-key`` (0600), so the mapping is stable across re-runs and can be kept secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from common.errors import MolreError
from common.log import get_logger
from node.config import SelectionConfig
from node.dicomnet import CT_STORAGE_CLASSES, TRANSFER_SYNTAXES, file_header, make_ae
from node.header import META_KEYWORDS, read_header
from node.selection import select_study, summarize

log = get_logger("pull")

_PACS_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Pacs:
    """Where to query and retrieve: ``AET@host:port``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Pacs:
        m = _PACS_RE.match(text.strip())
        if not m or not 0 < int(m["port"]) < 65536:
            raise MolreError(
                f"--pacs {text!r}: write it as AET@host:port (e.g. ORTHANC@10.0.0.5:4242)"
            )
        return cls(m["aet"], m["host"], int(m["port"]))


@dataclass
class PullOptions:
    out: Path
    calling_ae: str = "MOLRE"
    workers: int = 2
    uncertain: str = "blank"
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    pseudonymise: bool = True
    site: str | None = None
    timeout_s: float = 60.0
    limit: int | None = None


@dataclass
class SeriesRecord:
    """What one fetched accession contributes (done.json); no raw identifiers when
    pseudonymising."""

    acc_key: str
    series_uid: str
    path: str  # relative to OUT
    patient_id: str
    instances: int
    manufacturer: str = ""
    model: str = ""


@dataclass
class PullSummary:
    accessions: int
    fetched: int = 0
    reused: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    manifest: str = ""


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise MolreError(f"--split {text!r}: give train,val,test fractions, e.g. 70,15,15")
    total = sum(parts)
    return (parts[0] / total, parts[1] / total, parts[2] / total)


# ---------------------------------------------------------------------------------------------
# identifiers
# ---------------------------------------------------------------------------------------------


def _load_key(out: Path) -> bytes:
    """The secret of the keyed hashes (accession keys, pseudonyms), created once per data set."""
    path = out / ".pseudonym-key"
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    out.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


def _keyed(key: bytes, kind: str, value: str, n: int = 16) -> str:
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:n]


def split_of(patient: str, key: bytes, fractions: Sequence[float]) -> str:
    """Split of a patient: a keyed hash, so it never changes when other patients are added."""
    u = int(_keyed(key, "split", patient, 12), 16) / float(16**12)
    acc = 0.0
    for name, frac in zip(SPLIT_NAMES, fractions, strict=True):
        acc += frac
        if u < acc:
            return name
    return "train"


# ---------------------------------------------------------------------------------------------
# DICOM query / retrieve (Study Root)
# ---------------------------------------------------------------------------------------------


class _Skip(Exception):
    """This accession is skipped; the message is the reason (no PHI)."""


# pynetdicom.sop_class creates its SOP classes with globals(), so its type hints lack them: the
# imports below carry a targeted ignore.
def _ae(calling_ae: str, timeout: float) -> Any:
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made by globals()
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    )

    ae = make_ae(calling_ae, acse_timeout=timeout, dimse_timeout=timeout, network_timeout=timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for uid in CT_STORAGE_CLASSES:  # C-GET: the PACS sends the instances back on this association
        ae.add_requested_context(uid, list(TRANSFER_SYNTAXES))
    return ae


def _roles() -> list[Any]:
    """SCP/SCU role selection: we are the storage SCP for what C-GET sends back."""
    from pynetdicom import build_role

    return [build_role(uid, scp_role=True) for uid in CT_STORAGE_CLASSES]


def _find(assoc: Any, level: str, query: Mapping[str, Any]) -> list[Dataset]:
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made by globals()
        StudyRootQueryRetrieveInformationModelFind,
    )

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in query.items():
        setattr(ds, k, v)
    out = []
    for status, ident in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
        code = getattr(status, "Status", None)
        if code is None:
            raise _Skip(f"pacs: no answer to the {level} C-FIND (association lost or timed out)")
        if code in (0xFF00, 0xFF01) and ident is not None:
            out.append(ident)
        elif code not in (0x0000, 0xFF00, 0xFF01):
            raise _Skip(f"pacs: {level} C-FIND failed with status 0x{code:04X}")
    return out


def _meta_of(ds: Dataset) -> dict[str, Any]:
    return read_header(ds, None, with_phi=False).meta


def _get_series(assoc: Any, study_uid: str, series_uid: str, dest: Path) -> int:
    """C-GET one series into `dest` (already created); returns instances written."""
    from pynetdicom import evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made by globals()
        StudyRootQueryRetrieveInformationModelGet,
    )

    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    written = 0
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        nonlocal written
        req = event.request
        sop_uid = str(req.AffectedSOPInstanceUID)
        if not re.fullmatch(r"[0-9.]{1,64}", sop_uid):
            return 0xA900  # not a UID: refuse instead of writing a strange file name
        raw = req.DataSet.getvalue()
        header = file_header(
            str(req.AffectedSOPClassUID), sop_uid, str(event.context.transfer_syntax)
        )
        with (dest / f"{sop_uid}.dcm").open("wb") as fh:
            fh.write(header)
            fh.write(raw)
        with lock:
            written += 1
        return 0x0000

    handler = (evt.EVT_C_STORE, on_store)
    assoc.bind(*handler)
    try:
        final = None
        for status, _ident in assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet):
            code = getattr(status, "Status", None)
            if code is None:
                raise _Skip("pacs: C-GET got no answer (association lost or timed out)")
            final = code
        if final not in (0x0000, None):
            raise _Skip(f"pacs: C-GET ended with status 0x{final:04X} (some instances not sent)")
    finally:
        assoc.unbind(*handler)
    return written


# ---------------------------------------------------------------------------------------------
# one accession
# ---------------------------------------------------------------------------------------------


def _fetch_one(
    acc: str, acc_key: str, pacs: Pacs, opts: PullOptions, rules: SelectionConfig, key: bytes
) -> tuple[SeriesRecord, list[str]]:
    """Query, select, retrieve one accession. Returns the record and the series skip reasons."""
    ae = _ae(opts.calling_ae, opts.timeout_s)
    assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.ae_title, ext_neg=_roles())
    if not assoc.is_established:
        raise _Skip(
            f"pacs: association with {pacs.ae_title}@{pacs.host}:{pacs.port} "
            "refused or not reachable"
        )
    try:
        studies = _find(
            assoc, "STUDY", {"AccessionNumber": acc, "StudyInstanceUID": "", "PatientID": ""}
        )
        if not studies:
            raise _Skip("not found: no study with this accession number")
        wanted = {m.upper() for m in rules.modalities}
        summaries = []
        series_study: dict[str, str] = {}
        counts: dict[str, int] = {}
        for st in studies:
            study_uid = str(st.get("StudyInstanceUID", ""))
            if not study_uid:
                continue
            for se in _find(
                assoc,
                "SERIES",
                {
                    "StudyInstanceUID": study_uid,
                    "SeriesInstanceUID": "",
                    "Modality": "",
                    "NumberOfSeriesRelatedInstances": "",
                },
            ):
                uid = str(se.get("SeriesInstanceUID", ""))
                if not uid or str(se.get("Modality", "")).upper() not in wanted:
                    continue
                query = {kw: "" for kw in META_KEYWORDS if kw != "StudyInstanceUID"}
                query.update(
                    {"StudyInstanceUID": study_uid, "SeriesInstanceUID": uid, "SOPInstanceUID": ""}
                )
                metas = [_meta_of(i) for i in _find(assoc, "IMAGE", query)]
                if not metas:
                    continue
                summaries.append(summarize(uid, metas, study_uid=study_uid))
                series_study[uid] = study_uid
                counts[uid] = len(metas)
        if not summaries:
            raise _Skip("no series of a wanted modality (selection.modalities) in the study")
        chosen, reasons = select_study(summaries, rules)
        if not chosen:
            first = sorted(reasons.values())[0] if reasons else "no series qualifies"
            raise _Skip(f"selection: no series qualifies ({first})")
        best = chosen[0]  # one series per accession: the preferred one
        skipped = [reasons[u] for u in sorted(reasons)]
        rel = Path("series") / acc_key / best.series_uid
        final = opts.out / rel
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        n = _get_series(assoc, series_study[best.series_uid], best.series_uid, partial)
        if n < counts[best.series_uid]:
            shutil.rmtree(partial, ignore_errors=True)
            raise _Skip(f"retrieve: {n} of {counts[best.series_uid]} instances received")
    finally:
        assoc.release()
    # the rules again, on the received headers (a PACS may answer C-FIND incompletely)
    files = sorted(partial.glob("*.dcm"))
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    check, why = select_study(
        [
            summarize(
                best.series_uid,
                [_meta_of(h) for h in headers],
                study_uid=series_study[best.series_uid],
            )
        ],
        rules,
    )
    if not check:
        shutil.rmtree(partial, ignore_errors=True)
        raise _Skip(f"selection on the received headers: {next(iter(why.values()), 'rules')}")
    h0 = headers[0]
    patient = str(h0.get("PatientID", "") or "").strip()
    if not patient:
        shutil.rmtree(partial, ignore_errors=True)
        raise _Skip("no PatientID in the headers: cannot keep the patient in one split")
    pid = ("P" + _keyed(key, "patient", patient)) if opts.pseudonymise else patient
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    rec = SeriesRecord(
        acc_key=acc_key,
        series_uid=best.series_uid,
        path=rel.as_posix(),
        patient_id=pid,
        instances=len(files),
        manufacturer=str(h0.get("Manufacturer", "") or "").strip(),
        model=str(h0.get("ManufacturerModelName", "") or "").strip(),
    )
    (opts.out / "series" / acc_key / "done.json").write_text(json.dumps(asdict(rec), indent=1))
    return rec, skipped


def _load_done(out: Path, acc_key: str) -> SeriesRecord | None:
    p = out / "series" / acc_key / "done.json"
    try:
        rec = SeriesRecord(**json.loads(p.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return rec if (out / rec.path).is_dir() else None


# ---------------------------------------------------------------------------------------------
# the whole data set
# ---------------------------------------------------------------------------------------------


def _site_of(rec: SeriesRecord, opts: PullOptions) -> str:
    if opts.site:
        return opts.site
    return " ".join(x for x in (rec.manufacturer, rec.model) if x) or "unknown"


def pull_dataset(
    labels_csv: Path | str,
    pacs: Pacs,
    opts: PullOptions,
    catalog: Any,
    rules: SelectionConfig,
    progress: Callable[[int, int], Any] | None = None,
) -> PullSummary:
    """Fetch and select every accession of ``labels_csv``; write the manifest (module docstring)."""
    import csv

    from molre.data.manifest import write_manifest
    from molre.labels import apply_policy, read_labels

    if opts.workers < 1:
        raise MolreError("--workers must be >= 1")
    apply_policy(-1, opts.uncertain)  # validates the policy name
    labels = read_labels(labels_csv, catalog)
    accessions = list(labels)[: opts.limit] if opts.limit else list(labels)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    key = _load_key(out)
    keys = {acc: "A" + _keyed(key, "accession", acc) for acc in accessions}
    summary = PullSummary(accessions=len(accessions))
    records: dict[str, SeriesRecord] = {}
    skipped: dict[str, str] = {}
    series_skips: Counter[str] = Counter()
    todo = []
    for acc in accessions:
        rec = _load_done(out, keys[acc])
        if rec is not None:
            records[acc] = rec
            summary.reused += 1
        else:
            todo.append(acc)
    log.info(
        "pull start",
        accessions=len(accessions),
        cached=summary.reused,
        to_fetch=len(todo),
        pacs=f"{pacs.ae_title}@{pacs.host}:{pacs.port}",
        workers=opts.workers,
    )
    done = summary.reused
    if progress is not None:
        progress(done, len(accessions))
    with ThreadPoolExecutor(max_workers=opts.workers) as pool:
        futures = {
            pool.submit(_fetch_one, acc, keys[acc], pacs, opts, rules, key): acc for acc in todo
        }
        for fut in as_completed(futures):
            acc = futures[fut]
            try:
                rec, series_reasons = fut.result()
                records[acc] = rec
                summary.fetched += 1
                for r in series_reasons:
                    series_skips[r.split(":", 1)[0]] += 1
                log.info(
                    "accession fetched",
                    acc_key=keys[acc],
                    series_uid=rec.series_uid,
                    instances=rec.instances,
                )
            except _Skip as exc:
                skipped[acc] = str(exc)
                log.info("accession skipped", acc_key=keys[acc], reason=str(exc))
            except OSError as exc:
                skipped[acc] = f"error: {exc.__class__.__name__}: {exc.strerror or exc}"
                log.warning("accession failed", acc_key=keys[acc], reason=skipped[acc])
            done += 1
            if progress is not None:
                progress(done, len(accessions))
    # the manifest: every accession that has a series, in label-file order
    rows: list[dict[str, Any]] = []
    series_rows: list[list[Any]] = []
    for acc in accessions:
        rec = records.get(acc)
        if rec is None:
            continue
        split = split_of(rec.patient_id, key, opts.split)
        lab = {k: apply_policy(labels[acc].get(k), opts.uncertain) for k in labels[acc]}
        rows.append(
            {
                "path": rec.path,
                "patient_id": rec.patient_id,
                "split": split,
                "site": _site_of(rec, opts),
                "labels": lab,
            }
        )
        series_rows.append(
            [
                rec.acc_key,
                rec.series_uid,
                rec.path,
                rec.patient_id,
                split,
                rec.manufacturer,
                rec.model,
                rec.instances,
            ]
        )
    manifest = out / "manifest.csv"
    if rows:
        write_manifest(manifest, rows, catalog)
    with (out / "series.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(
            [
                "acc_key",
                "series_uid",
                "path",
                "patient_id",
                "split",
                "manufacturer",
                "model",
                "instances",
            ]
        )
        w.writerows(series_rows)
    with (out / "skipped.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["accession_number", "acc_key", "reason"])
        for acc in accessions:
            if acc in skipped:
                w.writerow([acc, keys[acc], skipped[acc]])
    reasons = Counter(r.split(":", 1)[0] for r in skipped.values())
    summary.skipped = dict(sorted(reasons.items()))
    summary.rows = len(rows)
    summary.splits = dict(Counter(r["split"] for r in rows))
    summary.manifest = str(manifest) if rows else ""
    info = {
        "format": "molre-pulled-dataset",
        "format_version": 1,
        "pacs": f"{pacs.ae_title}@{pacs.host}:{pacs.port}",
        "calling_ae": opts.calling_ae,
        "uncertain_policy": opts.uncertain,
        "split": list(opts.split),
        "pseudonymised": opts.pseudonymise,
        "site": opts.site or "from headers",
        "labels_file": str(Path(labels_csv).resolve()),
        "summary": asdict(summary),
        "series_not_chosen": dict(series_skips),
        "selection": rules.model_dump(),
    }
    (out / "dataset.json").write_text(json.dumps(info, indent=1) + "\n")
    log.info(
        "pull done",
        rows=summary.rows,
        fetched=summary.fetched,
        reused=summary.reused,
        skipped=sum(reasons.values()),
        **{f"skipped_{k}": v for k, v in reasons.items()},
    )
    if not rows:
        raise MolreError(
            f"no accession could be fetched ({len(skipped)} skipped; reasons in "
            f"{out / 'skipped.csv'}); no manifest written"
        )
    return summary


__all__ = [
    "Pacs",
    "PullOptions",
    "PullSummary",
    "SeriesRecord",
    "parse_split",
    "pull_dataset",
    "split_of",
]
