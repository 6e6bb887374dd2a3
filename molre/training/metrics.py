"""Metrics for multi-label detection: AUC (exact, tie-aware), bootstrap CIs by case, thresholds.

Why a bootstrap *by case*: the unit a site samples is the scan, and all findings of one scan are
correlated, so every resample draws whole cases and recomputes every finding's AUC on the same
draw. Resampling is done with multinomial case *weights* (a case drawn twice counts twice), which
lets one sort per finding serve all resamples: AUC for B resamples costs O(B·n), no re-sorting.

Unlabelled entries (NaN) are left out per finding. A finding without positives or without
negatives has no AUC: it is reported as None ("n/a"), never as 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "auc",
    "weighted_auc",
    "auc_matrix",
    "roc_curve",
    "bootstrap_weights",
    "bootstrap_aucs",
    "percentile_ci",
    "youden_threshold",
    "sens_spec",
    "macro",
    "PairedResult",
    "paired_bootstrap",
]


def weighted_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC (probability a positive outranks a negative, ties count 1/2) under case weights.

    y (n,) in {0,1}, s (n,), w (B, n) non-negative weights (one row per resample).
    Returns (B,) with NaN where a row has no positive or no negative weight.
    """
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    w = np.atleast_2d(np.asarray(w, dtype=np.float64))
    if y.size == 0:
        return np.full(w.shape[0], np.nan)
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    w_sorted = w[:, order]
    _, start = np.unique(s_sorted, return_index=True)
    wpos = w_sorted * y_sorted
    wneg = w_sorted * (1.0 - y_sorted)
    gp = np.add.reduceat(wpos, start, axis=1)
    gn = np.add.reduceat(wneg, start, axis=1)
    below = np.cumsum(gn, axis=1) - gn
    num = (gp * (below + 0.5 * gn)).sum(axis=1)
    den = gp.sum(axis=1) * gn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def auc(y: Sequence[float], s: Sequence[float]) -> float | None:
    """AUC of scores `s` for binary labels `y` (NaN labels ignored); None if undefined."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    m = ~np.isnan(y)
    y, s = y[m], s[m]
    if y.size == 0 or y.min() == y.max():
        return None
    return float(weighted_auc(y, s, np.ones((1, y.size)))[0])


def auc_matrix(labels: np.ndarray, scores: np.ndarray) -> list[float | None]:
    """Per-finding AUC for (n, F) labels (NaN = unlabelled) and (n, F) scores."""
    return [auc(labels[:, f], scores[:, f]) for f in range(labels.shape[1])]


def roc_curve(y: Sequence[float], s: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; the first point is (0, 0) at +inf."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    m = ~np.isnan(y)
    y, s = y[m], s[m]
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.where(np.diff(s))[0]
    idx = np.r_[distinct, y.size - 1] if y.size else np.array([], dtype=int)
    tps = np.cumsum(y)[idx] if y.size else np.array([])
    fps = (idx + 1) - tps
    P, N = y.sum(), y.size - y.sum()
    tpr = np.r_[0.0, tps / P] if P > 0 else np.r_[0.0, np.zeros_like(tps)]
    fpr = np.r_[0.0, fps / N] if N > 0 else np.r_[0.0, np.zeros_like(fps)]
    thr = np.r_[np.inf, s[idx]] if y.size else np.array([np.inf])
    return fpr, tpr, thr


def youden_threshold(y: Sequence[float], s: Sequence[float]) -> float | None:
    """Threshold maximising sensitivity + specificity − 1 (Youden's J); None if undefined.

    Among equal J the highest threshold wins (fewer false alarms). The returned value is the
    score at the operating point, so `score >= threshold` reproduces that point.
    """
    y = np.asarray(y, dtype=np.float64)
    m = ~np.isnan(y)
    if m.sum() == 0 or np.nanmin(y) == np.nanmax(y):
        return None
    fpr, tpr, thr = roc_curve(y, s)
    j = tpr - fpr
    j[0] = -np.inf  # +inf threshold: calls nothing positive
    best = int(np.argmax(j))
    return float(thr[best])


def specificity_threshold(y: Sequence[float], s: Sequence[float], target: float) -> float | None:
    """The lowest threshold whose specificity (`score < threshold` on the negatives) is at least
    `target`: the operating point for "few false alarms". None without negatives."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    neg = np.sort(s[y == 0])
    if len(neg) == 0:
        return None
    k = int(np.ceil(target * len(neg) - 1e-9))  # negatives that must fall below the threshold
    if k <= 0:
        return float(neg[0])
    return float(np.nextafter(neg[k - 1], np.inf))


def sens_spec(
    y: Sequence[float], s: Sequence[float], threshold: float
) -> tuple[float | None, float | None]:
    """Sensitivity and specificity of `score >= threshold` (None where undefined)."""
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    m = ~np.isnan(y)
    y, s = y[m], s[m]
    pred = s >= threshold
    P = (y == 1).sum()
    N = (y == 0).sum()
    sens = float((pred & (y == 1)).sum() / P) if P else None
    spec = float((~pred & (y == 0)).sum() / N) if N else None
    return sens, spec


def macro(values: Sequence[float | None]) -> float | None:
    """Mean over defined values (None/NaN skipped); None if nothing is defined."""
    v = [float(x) for x in values if x is not None and not np.isnan(x)]
    return float(np.mean(v)) if v else None


def bootstrap_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) multinomial case counts: each row is one resample of n cases with replacement."""
    rng = np.random.default_rng(seed)
    return (
        rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
        if n
        else np.zeros((n_boot, 0))
    )


def bootstrap_aucs(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B, F) AUC per resample and finding (NaN where undefined in that resample).

    Unlabelled entries get zero weight for their finding only; the case still counts for the
    other findings.
    """
    B = weights.shape[0]
    F_ = labels.shape[1]
    out = np.full((B, F_), np.nan)
    for f in range(F_):
        m = ~np.isnan(labels[:, f])
        if m.sum() == 0:
            continue
        y = labels[m, f]
        if y.min() == y.max():
            continue
        out[:, f] = weighted_auc(y, scores[m, f], weights[:, m])
    return out


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of the finite samples; (None, None) if there are none."""
    x = np.asarray(samples, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None, None
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(x, [a, 1.0 - a])
    return float(lo), float(hi)


def _nanmean_rows(a: np.ndarray, cols: np.ndarray) -> np.ndarray:
    if cols.size == 0:
        return np.full(a.shape[0], np.nan)
    sub = a[:, cols]
    with np.errstate(invalid="ignore"):
        cnt = np.isfinite(sub).sum(axis=1)
        tot = np.where(np.isfinite(sub), sub, 0.0).sum(axis=1)
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def macro_bootstrap(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray, findings: np.ndarray | None = None
) -> np.ndarray:
    """(B,) macro AUC per resample over `findings` (default: those defined on the full data)."""
    per = bootstrap_aucs(labels, scores, weights)
    if findings is None:
        full = auc_matrix(labels, scores)
        findings = np.array([i for i, v in enumerate(full) if v is not None], dtype=int)
    return _nanmean_rows(per, findings)


@dataclass
class PairedResult:
    """Δ macro AUC (other − reference) on the same cases, with a bootstrap CI and p-value."""

    delta: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    n_cases: int
    n_findings: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def paired_bootstrap(
    labels: np.ndarray,
    ref_scores: np.ndarray,
    other_scores: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedResult:
    """Paired bootstrap of Δ macro AUC: both models scored on the *same* resampled cases.

    Findings: those with an AUC defined on the full data. Two-sided p-value =
    2·min(P*(Δ ≤ 0), P*(Δ ≥ 0)) over resamples (with +1 smoothing so it is never exactly 0).
    """
    full = auc_matrix(labels, ref_scores)
    findings = np.array([i for i, v in enumerate(full) if v is not None], dtype=int)
    if findings.size == 0:
        return PairedResult(None, None, None, None, int(labels.shape[0]), 0)
    ref_full = macro([full[i] for i in findings])
    oth = auc_matrix(labels, other_scores)
    oth_full = macro([oth[i] for i in findings])
    delta = None if ref_full is None or oth_full is None else oth_full - ref_full
    w = bootstrap_weights(labels.shape[0], n_boot, seed)
    a = _nanmean_rows(bootstrap_aucs(labels, ref_scores, w), findings)
    b = _nanmean_rows(bootstrap_aucs(labels, other_scores, w), findings)
    d = b - a
    d = d[np.isfinite(d)]
    lo, hi = percentile_ci(d, level)
    if d.size:
        p = 2.0 * min((np.sum(d <= 0) + 1) / (d.size + 1), (np.sum(d >= 0) + 1) / (d.size + 1))
        p = float(min(1.0, p))
    else:
        p = None
    return PairedResult(delta, lo, hi, p, int(labels.shape[0]), int(findings.size))
