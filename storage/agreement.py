"""Primary vs shadow model agreement (shadow mode, `molre-node audit agreement`).

Pairs each shadow finding (``shadow_results``) with the primary model's finding for the same
series version (``results``) and summarises per shadow model and finding -- optionally per site
(Manufacturer + ManufacturerModelName of the series) or per manufacturer: how often the
decisions agree, Cohen's kappa (agreement corrected for what two raters with those positive
rates would agree by chance), how many positives each side has, and the cases where they differ.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.models import Result, Series, ShadowResult

GROUPINGS = ("finding", "site", "manufacturer")


def cohen_kappa(both_pos: int, primary_only: int, shadow_only: int, both_neg: int) -> float | None:
    """Cohen's kappa of two binary raters from their 2x2 table; None when undefined (both
    raters constant and identical -- chance agreement is 1)."""
    n = both_pos + primary_only + shadow_only + both_neg
    if n == 0:
        return None
    po = (both_pos + both_neg) / n
    p1 = (both_pos + primary_only) / n
    p2 = (both_pos + shadow_only) / n
    pe = p1 * p2 + (1 - p1) * (1 - p2)
    if pe >= 1.0:
        return None
    return (po - pe) / (1 - pe)


def _group(meta: dict[str, Any] | None, by: str) -> str:
    meta = meta or {}
    man = str(meta.get("Manufacturer") or "").strip()
    if by == "manufacturer":
        return man or "unknown"
    model = str(meta.get("ManufacturerModelName") or "").strip()
    return " ".join(p for p in (man, model) if p) or "unknown"


def pairs(
    s: Session, *, shadow: str | None = None, since: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """One row per (shadow model, series version, finding) with both models' answers."""
    primary: dict[tuple[str, int, str], Result] = {}
    q = select(Result).order_by(Result.id)
    if since is not None:
        q = q.where(Result.created_at >= since)
    for r in s.execute(q).scalars():
        primary[(r.series_uid, r.series_version, r.finding_key)] = r  # latest job wins
    sq = (
        select(ShadowResult, Series.meta, Series.study_uid)
        .join(Series, Series.series_uid == ShadowResult.series_uid)
        .order_by(ShadowResult.id)
    )
    if shadow is not None:
        sq = sq.where(ShadowResult.model_name == shadow)
    if since is not None:
        sq = sq.where(ShadowResult.created_at >= since)
    latest: dict[tuple[str, str, int, str], dict[str, Any]] = {}
    for sh, meta, study_uid in s.execute(sq).all():
        p = primary.get((sh.series_uid, sh.series_version, sh.finding_key))
        if p is None:
            continue
        latest[(sh.model_name, sh.series_uid, sh.series_version, sh.finding_key)] = {
            "model": sh.model_name,
            "model_version": sh.model_version,
            "series_uid": sh.series_uid,
            "study_uid": study_uid,
            "version": sh.series_version,
            "finding": sh.finding_key,
            "primary_model": p.model_name,
            "primary_probability": round(p.probability, 6),
            "primary_decision": p.decision,
            "shadow_probability": round(sh.probability, 6),
            "shadow_decision": sh.decision,
            "site": _group(meta, "site"),
            "manufacturer": _group(meta, "manufacturer"),
        }
    return list(latest.values())


def agreement(
    s: Session, *, shadow: str | None = None, by: str = "finding", since: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """Per shadow model and finding (and site / manufacturer with ``by``): n, agreement,
    kappa, positives of each side, the 2x2 table and the mean |probability difference|."""
    if by not in GROUPINGS:
        raise ValueError(f"by={by!r}: use one of {', '.join(GROUPINGS)}")
    cells: dict[tuple[str, ...], list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0.0])
    for pair in pairs(s, shadow=shadow, since=since):
        key = (pair["model"],) + (() if by == "finding" else (pair[by],)) + (pair["finding"],)
        c = cells[key]
        pp, sp = pair["primary_decision"], pair["shadow_decision"]
        c[0 if pp and sp else 1 if pp else 2 if sp else 3] += 1
        c[4] += abs(pair["primary_probability"] - pair["shadow_probability"])
    out = []
    for key, (a, b, c_, d, diff) in sorted(cells.items()):
        n = int(a + b + c_ + d)
        kappa = cohen_kappa(int(a), int(b), int(c_), int(d))
        row: dict[str, Any] = {"model": key[0]}
        if by != "finding":
            row[by] = key[1]
        row.update(
            {
                "finding": key[-1],
                "n": n,
                "agreement": round((a + d) / n, 4),
                "kappa": None if kappa is None else round(kappa, 4),
                "primary_positive": int(a + b),
                "shadow_positive": int(a + c_),
                "both_positive": int(a),
                "primary_only": int(b),
                "shadow_only": int(c_),
                "both_negative": int(d),
                "mean_abs_prob_diff": round(diff / n, 4),
            }
        )
        out.append(row)
    return out


def disagreements(
    s: Session, *, shadow: str | None = None, since: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """The cases where the decisions differ (newest series last)."""
    return [
        r
        for r in pairs(s, shadow=shadow, since=since)
        if r["primary_decision"] != r["shadow_decision"]
    ]


__all__ = ["GROUPINGS", "agreement", "cohen_kappa", "disagreements", "pairs"]
