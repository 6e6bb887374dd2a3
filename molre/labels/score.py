"""Measuring the labeler on a corpus of report sentences with expected labels.

The corpus (``molre/resources/report_corpus.csv``) has the columns
``accession_number,report_text,expected``; ``expected`` lists the labels an annotator states for
the text as ``key=1;key=0;key=-1`` (``@group=0`` for a negated group phrase such as "no acute
intracranial abnormality"). Keys not stated are expected "not mentioned", after the lexicon's own
hierarchy is applied to the stated labels (an SDH is an intracranial hemorrhage; "no intracranial
hemorrhage" is also "no SDH") -- explicitly stated labels are never overridden. So the score
measures mention finding, sections and assertion, not the hierarchy (which is a definition).

Per finding: precision = correct decisions / decisions the labeler made (any of 1/0/-1), recall =
correct decisions / decisions the corpus expects; and per class (positive / negative / uncertain)
over all findings.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import MolreError
from molre.catalog import Catalog
from molre.labels.labeler import NEGATIVE, POSITIVE, UNCERTAIN, ReportLabeler
from molre.labels.lexicon import Lexicon

CLASS_NAMES = {POSITIVE: "positive", NEGATIVE: "negative", UNCERTAIN: "uncertain"}


def default_corpus_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("molre") / "resources" / "report_corpus.csv"))


@dataclass
class CorpusItem:
    accession: str
    text: str
    stated: dict[str, int]  # key or "@group" -> label


def read_corpus(path: Path | str, catalog: Catalog, lexicon: Lexicon) -> list[CorpusItem]:
    p = Path(path)
    reader = csv.DictReader(io.StringIO(p.read_text(encoding="utf-8-sig")))
    need = {"accession_number", "report_text", "expected"}
    if not need <= set(reader.fieldnames or []):
        raise MolreError(f"{p}: line 1: needs the columns {', '.join(sorted(need))}")
    items = []
    for row in reader:
        stated: dict[str, int] = {}
        for part in (row["expected"] or "").split(";"):
            part = part.strip()
            if not part:
                continue
            key, _, val = part.partition("=")
            key = key.strip()
            where = f"{p}: line {reader.line_num}: {part!r}"
            if key.startswith("@"):
                if key[1:] not in lexicon.groups:
                    raise MolreError(f"{where}: unknown group")
            elif key not in catalog:
                raise MolreError(f"{where}: unknown finding key")
            if val.strip() not in ("1", "0", "-1"):
                raise MolreError(f"{where}: label must be 1, 0 or -1")
            stated[key] = int(val)
        items.append(CorpusItem(row["accession_number"], row["report_text"], stated))
    return items


def expected_labels(item: CorpusItem, catalog: Catalog, lexicon: Lexicon) -> dict[str, int | None]:
    """Stated labels + the lexicon hierarchy (stated labels win), aggregated like the labeler."""
    per: dict[str, set[int]] = {}
    for key, val in item.stated.items():
        label = f"group:{key[1:]}" if key.startswith("@") else key
        if val in (POSITIVE, UNCERTAIN) and not key.startswith("@"):
            for parent in lexicon.implies(key):
                per.setdefault(parent, set()).add(val)
        if val == NEGATIVE:
            for child in lexicon.covers(label):
                per.setdefault(child, set()).add(val)
    out: dict[str, int | None] = {}
    for key in catalog.keys:
        if key in item.stated:
            out[key] = item.stated[key]
            continue
        vals = per.get(key, set())
        out[key] = (
            POSITIVE
            if POSITIVE in vals
            else UNCERTAIN
            if UNCERTAIN in vals
            else NEGATIVE
            if NEGATIVE in vals
            else None
        )
    return out


@dataclass
class Score:
    items: int
    per_finding: dict[str, dict[str, float | int]]
    per_class: dict[str, dict[str, float | int]]
    overall: dict[str, float | int]
    errors: list[dict[str, Any]] = field(default_factory=list)


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def score_corpus(items: Sequence[CorpusItem], labeler: ReportLabeler) -> Score:
    catalog, lexicon = labeler.catalog, labeler.lexicon
    made: Counter[str] = Counter()
    wanted: Counter[str] = Counter()
    right: Counter[str] = Counter()
    cls_made: Counter[int] = Counter()
    cls_wanted: Counter[int] = Counter()
    cls_right: Counter[int] = Counter()
    errors = []
    for item in items:
        exp = expected_labels(item, catalog, lexicon)
        got = labeler.label(item.text).labels
        for key in catalog.keys:
            e, g = exp[key], got[key]
            if g is not None:
                made[key] += 1
                cls_made[g] += 1
            if e is not None:
                wanted[key] += 1
                cls_wanted[e] += 1
            if e is not None and e == g:
                right[key] += 1
                cls_right[e] += 1
            if e != g:
                errors.append(
                    {
                        "accession_number": item.accession,
                        "finding": key,
                        "expected": e,
                        "got": g,
                        "text": item.text,
                    }
                )
    per_finding = {}
    for key in catalog.keys:
        if made[key] or wanted[key]:
            per_finding[key] = {
                "expected": wanted[key],
                "made": made[key],
                "correct": right[key],
                "precision": _ratio(right[key], made[key]),
                "recall": _ratio(right[key], wanted[key]),
            }
    per_class = {
        CLASS_NAMES[c]: {
            "expected": cls_wanted[c],
            "made": cls_made[c],
            "correct": cls_right[c],
            "precision": _ratio(cls_right[c], cls_made[c]),
            "recall": _ratio(cls_right[c], cls_wanted[c]),
        }
        for c in (POSITIVE, NEGATIVE, UNCERTAIN)
    }
    tm, tw, tr = sum(made.values()), sum(wanted.values()), sum(right.values())
    overall = {
        "expected": tw,
        "made": tm,
        "correct": tr,
        "precision": _ratio(tr, tm),
        "recall": _ratio(tr, tw),
    }
    return Score(len(items), per_finding, per_class, overall, errors)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def to_markdown(score: Score, catalog: Catalog) -> str:
    lines = [
        f"Corpus: {score.items} report texts; {score.overall['expected']} expected "
        f"decisions, {score.overall['made']} made, {score.overall['correct']} correct: "
        f"precision {_pct(score.overall['precision'])} %, recall "
        f"{_pct(score.overall['recall'])} %.",
        "",
        "| class | expected | made | correct | precision % | recall % |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in score.per_class.items():
        lines.append(
            f"| {name} | {s['expected']} | {s['made']} | {s['correct']} | "
            f"{_pct(s['precision'])} | {_pct(s['recall'])} |"
        )
    lines += [
        "",
        "| finding | expected | made | correct | precision % | recall % |",
        "|---|---|---|---|---|---|",
    ]
    for key in catalog.keys:
        s = score.per_finding.get(key)
        if s is None:
            lines.append(f"| `{key}` | 0 | 0 | 0 | – | – |")
            continue
        lines.append(
            f"| `{key}` | {s['expected']} | {s['made']} | {s['correct']} | "
            f"{_pct(s['precision'])} | {_pct(s['recall'])} |"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "CorpusItem",
    "Score",
    "default_corpus_path",
    "expected_labels",
    "read_corpus",
    "score_corpus",
    "to_markdown",
]
