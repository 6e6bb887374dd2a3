"""Labels from radiology reports: medspaCy mention finding + ConText + sections.

`molre-node labels REPORTS.csv --out LABELS.csv` (cli/labels_cmd.py) runs
:func:`label_reports`; the lexicon is data (`molre.labels.lexicon`), the labeling rules are in
`molre.labels.labeler`, the corpus score in `molre.labels.score`. docs/report-labels.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from molre.catalog import Catalog
from molre.labels.io import (
    evidence_path,
    info_path,
    read_labels,
    read_reports,
    write_evidence,
    write_info,
    write_labels,
)
from molre.labels.labeler import UNCERTAIN_POLICIES, ReportLabeler, ReportLabels, apply_policy
from molre.labels.lexicon import Lexicon, load_lexicon


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("medspacy", "spacy"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:  # noqa: BLE001
            out[name] = "unknown"
    return out


def label_reports(
    reports: Sequence[tuple[str, str]],
    out: Path | str,
    catalog: Catalog,
    lexicon: Lexicon,
    *,
    uncertain: str = "keep",
    progress: Callable[[int], Any] | None = None,
) -> dict[str, Any]:
    """Label reports and write LABELS.csv, its evidence JSONL and its run info JSON.

    Returns the run info (counts per label value, per finding positives) -- no report text or
    accession numbers, so the caller may log it."""
    if uncertain not in UNCERTAIN_POLICIES:
        apply_policy(-1, uncertain)  # raises the MolreError naming the choices
    labeler = ReportLabeler(lexicon, catalog)
    rows: list[tuple[str, dict[str, int | None]]] = []
    evidence: list[dict[str, Any]] = []
    counts = {"1": 0, "0": 0, "-1": 0, "not_mentioned": 0}
    positives: dict[str, int] = {}
    for i, (acc, text) in enumerate(reports):
        res: ReportLabels = labeler.label(text)
        labels = {k: apply_policy(v, uncertain) for k, v in res.labels.items()}
        rows.append((acc, labels))
        for k, v in labels.items():
            counts["not_mentioned" if v is None else str(v)] += 1
            if v == 1:
                positives[k] = positives.get(k, 0) + 1
        for m in res.mentions:
            evidence.append({"accession_number": acc, **m.to_dict()})
        if progress is not None:
            progress(i + 1)
    out = Path(out)
    write_labels(out, rows, catalog)
    write_evidence(evidence_path(out), evidence)
    info = {
        "format": "molre-report-labels",
        "format_version": 1,
        "reports": len(rows),
        "uncertain_policy": uncertain,
        "labels": counts,
        "positives": dict(sorted(positives.items())),
        "lexicon": {
            "name": lexicon.name,
            "version": lexicon.version,
            "digest": lexicon.digest(),
            "source": lexicon.source,
        },
        "catalog": {"name": catalog.name, "version": catalog.version, "digest": catalog.digest()},
        "libraries": library_versions(),
        "evidence": evidence_path(out).name,
    }
    write_info(info_path(out), info)
    return info


__all__ = [
    "Lexicon",
    "ReportLabeler",
    "UNCERTAIN_POLICIES",
    "apply_policy",
    "evidence_path",
    "info_path",
    "label_reports",
    "load_lexicon",
    "read_labels",
    "read_reports",
]
