"""Reading reports and writing label files (LABELS.csv + evidence JSONL + run info).

Formats (the CheXpert labeler's interface):

* reports: a CSV with the columns ``accession_number,report_text`` (other columns ignored;
  several rows with one accession number -- an addendum -- are joined in file order), or a folder
  of ``<accession>.txt`` files;
* ``LABELS.csv``: ``accession_number`` + one column per catalog finding key: ``1`` positive,
  ``0`` negative, ``-1`` uncertain, empty = not mentioned;
* ``LABELS.evidence.jsonl`` beside it: one JSON object per mention (finding, label or null when
  it did not count, the matched text and its character offsets in the report, section, ConText
  modifiers, the reason); it quotes report text, so it is as confidential as the reports;
* ``LABELS.json``: what produced the file (lexicon name/version/digest, catalog digest, medspaCy
  and spaCy versions, uncertain policy, counts).

Nothing here logs report text or accession numbers.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from common.errors import MolreError
from common.fs import atomic_write
from molre.catalog import Catalog

REPORT_COLUMNS = ("accession_number", "report_text")
LABEL_VALUES = {"1": 1, "0": 0, "-1": -1, "": None}


def _csv_field_limit() -> None:
    # a report can exceed csv's default 128 KiB field limit
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def read_reports(path: Path | str) -> list[tuple[str, str]]:
    """[(accession_number, report_text)] in input order (see module docstring)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".txt")
        if not files:
            raise MolreError(f"{p}: no .txt report files (one <accession>.txt per report)")
        out = []
        for f in files:
            try:
                out.append((f.stem, f.read_text(encoding="utf-8-sig", errors="replace")))
            except OSError as exc:
                raise MolreError(f"cannot read report {f}: {exc}") from exc
        return out
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MolreError(f"reports file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MolreError(f"cannot read reports {p}: {exc} (UTF-8 CSV expected)") from exc
    _csv_field_limit()
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in REPORT_COLUMNS if c not in header]
    if missing:
        raise MolreError(
            f"{p}: line 1: missing column(s) {', '.join(missing)}; the header must "
            f"contain {','.join(REPORT_COLUMNS)}"
        )
    reader.fieldnames = header
    order: list[str] = []
    texts: dict[str, list[str]] = {}
    for row in reader:
        acc = (row.get("accession_number") or "").strip()
        if not acc:
            if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                raise MolreError(f"{p}: line {reader.line_num}: empty accession_number")
            continue
        if acc not in texts:
            order.append(acc)
            texts[acc] = []
        texts[acc].append(row.get("report_text") or "")
    if not order:
        raise MolreError(f"{p}: no reports after the header")
    return [(a, "\n".join(texts[a])) for a in order]


def evidence_path(labels_csv: Path | str) -> Path:
    p = Path(labels_csv)
    return p.with_name(p.stem + ".evidence.jsonl")


def info_path(labels_csv: Path | str) -> Path:
    p = Path(labels_csv)
    return p.with_name(p.stem + ".json")


def _fmt(v: int | None) -> str:
    return "" if v is None else str(int(v))


def write_labels(
    path: Path | str, rows: Sequence[tuple[str, dict[str, int | None]]], catalog: Catalog
) -> Path:
    """LABELS.csv: accession_number + one column per catalog key (1/0/-1/empty)."""
    p = Path(path)

    def write(fh: Any) -> None:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["accession_number", *catalog.keys])
        for acc, labels in rows:
            w.writerow([acc, *(_fmt(labels.get(k)) for k in catalog.keys)])

    atomic_write(p, write)
    return p


def write_evidence(path: Path | str, records: Iterable[dict[str, Any]]) -> Path:
    p = Path(path)

    def write(fh: Any) -> None:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")

    atomic_write(p, write)
    return p


def write_info(path: Path | str, info: dict[str, Any]) -> Path:
    p = Path(path)
    atomic_write(p, lambda fh: fh.write(json.dumps(info, indent=1, sort_keys=True) + "\n"))
    return p


def read_labels(path: Path | str, catalog: Catalog) -> dict[str, dict[str, int | None]]:
    """LABELS.csv -> {accession_number: {key: 1/0/-1/None}}; strict like the manifest reader
    (unknown columns, bad values and duplicate accessions are errors naming the line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MolreError(f"labels file {p} does not exist") from None
    except OSError as exc:
        raise MolreError(f"cannot read labels {p}: {exc}") from exc
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise MolreError(f"{p}: empty labels file") from None
    if not header or header[0] != "accession_number":
        raise MolreError(
            f"{p}: line 1: the first column must be accession_number (the output "
            "of `molre-node labels`)"
        )
    keys = header[1:]
    unknown = [k for k in keys if k not in catalog]
    if unknown:
        raise MolreError(
            f"{p}: line 1: column(s) {', '.join(map(repr, unknown))} are not "
            f"findings of catalog {catalog.name!r}"
        )
    out: dict[str, dict[str, int | None]] = {}
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        line = reader.line_num
        if len(values) != len(header):
            raise MolreError(f"{p}: line {line}: {len(values)} values for {len(header)} columns")
        acc = values[0].strip()
        if not acc:
            raise MolreError(f"{p}: line {line}: empty accession_number")
        if acc in out:
            raise MolreError(f"{p}: line {line}: accession number appears twice")
        row: dict[str, int | None] = {}
        for k, v in zip(keys, values[1:], strict=True):
            v = v.strip()
            if v not in LABEL_VALUES:
                raise MolreError(f"{p}: line {line}, column {k}: {v!r} is not 1, 0, -1 or empty")
            row[k] = LABEL_VALUES[v]
        out[acc] = row
    return out


def iter_evidence(path: Path | str) -> Iterator[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


__all__ = [
    "REPORT_COLUMNS",
    "evidence_path",
    "info_path",
    "iter_evidence",
    "read_labels",
    "read_reports",
    "write_evidence",
    "write_info",
    "write_labels",
]
