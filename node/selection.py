"""Selection rules: which complete series the model reads. Pure functions over header meta.

Why pure functions: the rules decide what a hospital's patients get read by an AI; they have to
be testable without a network, a database or a model, and every "no" must come with a reason that
ends up in the audit log (`image_type: LOCALIZER`, `slices: 3 < 16`, ...).

Input is the `meta` dict the receiver stores per instance (DICOM keywords: Modality,
SOPClassUID, ImageType, BodyPartExamined, StudyDescription, SeriesDescription, ProtocolName,
SliceThickness, ContrastBolusAgent, ConvolutionKernel, NumberOfFrames, ImageOrientationPatient).

Preference when several series of one study qualify (`selection.prefer`):
- "thinnest-soft-tissue": among qualifying series whose ConvolutionKernel matches
  `selection.soft_tissue_kernel` (if none match: among all qualifying series), the one with the
  thinnest slices wins; ties go to the series with more slices, then the lower series UID (so the
  choice is deterministic). The others are skipped with reason `preference: ...` naming the rule
  that decided (kernel, thicker slices, fewer slices, or the UID tie-breaker).
- "all": every qualifying series is read.

Input sanity (not configurable, checked on the header meta before anything is read): a
RescaleSlope of 0 (every voxel the same value), a non-finite RescaleSlope / RescaleIntercept, a
PixelSpacing outside what a CT scanner produces or a field of view above 1 m are skipped with
a reason naming the tag (`rescale: RescaleSlope (0028,1053) is 0 ...`).

Slice thickness of a series = the SliceThickness of most of its instances (ties: the thinner),
never a mean or median that no slice has (a stepped 4 mm / 7 mm head protocol is 4 mm, not 5.5).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.dicom import MAX_FIELD_OF_VIEW_MM, PIXEL_SPACING_MM
from node.config import SelectionConfig

HEAD_FIELDS = ("BodyPartExamined", "StudyDescription", "SeriesDescription", "ProtocolName")


@dataclass
class SeriesSummary:
    """What the rules look at, summarised over the instances of one series."""

    series_uid: str
    study_uid: str | None = None
    instances: int = 0
    slices: int = 0
    modalities: set[str] = field(default_factory=set)
    image_type: list[str] = field(default_factory=list)
    image_type_values: set[str] = field(default_factory=set)
    slice_thickness: float | None = None
    kernel: str = ""
    contrast: str = ""
    texts: dict[str, str] = field(default_factory=dict)
    axial: bool | None = None
    slice_thickness_values: list[float] = field(default_factory=list)
    #: header values that make the series unreadable: "rescale: ..." / "pixel_spacing: ..."
    insane: list[str] = field(default_factory=list)


@dataclass
class Decision:
    """The verdict for one series: selected, or skipped with a reason."""

    selected: bool
    reason: str | None = None


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [p for p in v.split("\\") if p != ""] if "\\" in v else ([v] if v else [])
    if isinstance(v, Iterable):
        return [str(x) for x in v]
    return [str(v)]


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _number(v: Any) -> float | None:
    """float of a header value, NaN/inf included (the sanity rules must see them)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _is_axial(iop: Any) -> bool | None:
    items = _as_list(iop)
    vals = [v for v in (_as_float(x) for x in items) if v is not None]
    if len(items) != 6 or len(vals) != 6:  # six numbers, none missing
        return None
    r, c = vals[:3], vals[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(x * x for x in n)) or 1.0
    return abs(n[2] / norm) >= 0.8  # within ~37 degrees of axial (gantry tilt allowed)


def summarize(
    series_uid: str, metas: Sequence[Mapping[str, Any]], study_uid: str | None = None
) -> SeriesSummary:
    """Summarise the stored instances' meta of one series."""
    s = SeriesSummary(series_uid=series_uid, study_uid=study_uid, instances=len(metas))
    thick: list[float] = []
    image_types: list[tuple[str, ...]] = []
    axial_votes: list[bool] = []
    bad_rescale: Counter[str] = Counter()
    spacings: set[tuple[str, ...]] = set()
    fovs: list[float] = []
    for m in metas:
        for kw, tag in (("RescaleSlope", "(0028,1053)"), ("RescaleIntercept", "(0028,1052)")):
            if kw in m and m[kw] not in (None, ""):
                v = _number(m[kw])
                if v is None or not math.isfinite(v):
                    bad_rescale[f"{kw} {tag} is {m[kw]} (not a finite number)"] += 1
                elif kw == "RescaleSlope" and v == 0:
                    bad_rescale[f"{kw} {tag} is 0 (every voxel would have the same value)"] += 1
        ps = _as_list(m.get("PixelSpacing"))
        if ps:
            spacings.add(tuple(str(x) for x in ps))
            vals = [_number(x) for x in ps]
            rows, cols = _number(m.get("Rows")), _number(m.get("Columns"))
            if len(vals) == 2 and rows and cols:
                px, py = vals
                if px is not None and py is not None:
                    fovs.append(max(rows * px, cols * py))
        if m.get("Modality"):
            s.modalities.add(str(m["Modality"]).upper())
        frames = m.get("NumberOfFrames")
        try:
            s.slices += max(1, int(frames)) if frames not in (None, "") else 1
        except (TypeError, ValueError):
            s.slices += 1
        it = tuple(x.upper().strip() for x in _as_list(m.get("ImageType")))
        image_types.append(it)
        s.image_type_values.update(it)
        t = _as_float(m.get("SliceThickness"))
        if t is not None and t > 0:
            thick.append(t)
        if not s.kernel and m.get("ConvolutionKernel"):
            s.kernel = "\\".join(_as_list(m.get("ConvolutionKernel")))
        agent = str(m.get("ContrastBolusAgent") or "").strip()
        if agent and not s.contrast:
            s.contrast = agent
        for key in HEAD_FIELDS:
            val = str(m.get(key) or "").strip()
            if val and key not in s.texts:
                s.texts[key] = val
        ax = _is_axial(m.get("ImageOrientationPatient"))
        if ax is not None:
            axial_votes.append(ax)
        if study_uid is None and m.get("StudyInstanceUID"):
            s.study_uid = str(m["StudyInstanceUID"])
    if image_types:
        most: tuple[str, ...] = max(set(image_types), key=image_types.count)
        s.image_type = list(most)
    counts = Counter(thick)
    s.slice_thickness = min(counts, key=lambda t: (-counts[t], t)) if counts else None
    s.slice_thickness_values = sorted(counts)
    for reason, n in sorted(bad_rescale.items()):
        s.insane.append(f"rescale: {reason} in {n} of {len(metas)} instance(s)")
    lo, hi = PIXEL_SPACING_MM
    for spacing in sorted(spacings):
        vals = [_number(x) for x in spacing]
        if len(vals) != 2 or any(
            v is None or not math.isfinite(v) or not lo <= v <= hi for v in vals
        ):
            shown = "\\".join(spacing)
            s.insane.append(
                f"pixel_spacing: PixelSpacing (0028,0030) {shown} mm is "
                f"outside {lo:g}..{hi:g} mm (not a CT pixel size)"
            )
            break
    else:
        if fovs and max(fovs) > MAX_FIELD_OF_VIEW_MM:
            s.insane.append(
                f"pixel_spacing: Rows/Columns x PixelSpacing (0028,0030) give a "
                f"{max(fovs):.0f} mm field of view, more than "
                f"{MAX_FIELD_OF_VIEW_MM:g} mm"
            )
    if axial_votes:
        s.axial = sum(axial_votes) * 2 >= len(axial_votes)
    return s


def evaluate(s: SeriesSummary, rules: SelectionConfig) -> Decision:
    """Apply the per-series rules in a fixed order; the first failing rule gives the reason."""
    wanted = {m.upper() for m in rules.modalities}
    if not s.modalities:
        return Decision(False, "modality: missing")
    if not s.modalities & wanted:
        return Decision(False, f"modality: {','.join(sorted(s.modalities))}")
    excluded = [
        v for v in (x.upper() for x in rules.image_type_excluded) if v in s.image_type_values
    ]
    if excluded:
        return Decision(False, f"image_type: {excluded[0]}")
    missing = [v for v in (x.upper() for x in rules.image_type_required) if v not in s.image_type]
    if missing:
        shown = "\\".join(s.image_type) or "missing"
        return Decision(False, f"image_type: {shown} lacks {missing[0]}")
    if rules.require_axial:
        third = s.image_type[2] if len(s.image_type) > 2 else ""
        axial = third == "AXIAL" or s.axial is True  # ImageType value 3, else orientation
        if not axial:
            return Decision(False, f"image_type: {third or 'no AXIAL value'} (not axial)")
    if s.slices < rules.min_slices:
        return Decision(False, f"slices: {s.slices} < {rules.min_slices}")
    if s.insane:
        return Decision(False, s.insane[0] + "; not read")
    if s.slice_thickness is None:
        return Decision(False, "slice_thickness: missing")
    if s.slice_thickness > rules.slice_thickness_max_mm:
        return Decision(
            False,
            f"slice_thickness: {s.slice_thickness:g} mm slices, thicker than "
            f"the {rules.slice_thickness_max_mm:g} mm limit "
            "(selection.slice_thickness_max_mm)",
        )
    if s.slice_thickness < rules.slice_thickness_min_mm:
        return Decision(
            False,
            f"slice_thickness: {s.slice_thickness:g} mm slices, thinner than "
            f"the {rules.slice_thickness_min_mm:g} mm minimum "
            "(selection.slice_thickness_min_mm)",
        )
    if rules.require_head and not is_head(s, rules.head_patterns):
        return Decision(False, "body_part: no head pattern in " + "/".join(HEAD_FIELDS))
    if rules.exclude_contrast and s.contrast:
        return Decision(False, f"contrast: ContrastBolusAgent {s.contrast!r}")
    return Decision(True, None)


def is_head(s: SeriesSummary, patterns: Sequence[str]) -> bool:
    """True when any of body part / descriptions / protocol matches a head pattern."""
    regs = [re.compile(p, re.IGNORECASE) for p in patterns]
    return any(r.search(text) for text in s.texts.values() for r in regs)


def _rank(s: SeriesSummary) -> tuple:
    thick = s.slice_thickness if s.slice_thickness is not None else float("inf")
    return (thick, -s.slices, s.series_uid)


def choose_preferred(
    candidates: Sequence[SeriesSummary], rules: SelectionConfig
) -> tuple[list[SeriesSummary], dict[str, str]]:
    """Among qualifying series of one study, pick the ones to read (see module docstring).

    Returns (chosen, {series_uid: skip reason}).
    """
    if rules.prefer == "all" or len(candidates) <= 1:
        return list(candidates), {}
    kern = re.compile(rules.soft_tissue_kernel, re.IGNORECASE)
    soft = [s for s in candidates if s.kernel and kern.search(s.kernel)]
    pool = soft or list(candidates)
    best = min(pool, key=_rank)
    skipped: dict[str, str] = {}
    for s in candidates:
        if s is best:
            continue
        if soft and s not in soft:
            why = (
                f"kernel {s.kernel or 'missing'} is not soft tissue "
                "(selection.soft_tissue_kernel) and a soft-tissue series exists"
            )
        else:
            why = _why_ranked_lower(s, best)
        skipped[s.series_uid] = f"preference: series {best.series_uid} preferred ({why})"
    return [best], skipped


def _why_ranked_lower(s: SeriesSummary, best: SeriesSummary) -> str:
    """The rule of `_rank` that decided between `s` and `best`, in words."""
    mine, theirs = s.slice_thickness, best.slice_thickness
    if mine is None:
        return "SliceThickness missing; a series with a known thickness is preferred"
    if theirs is not None and mine != theirs:
        return f"{mine:g} mm slices, thicker than its {theirs:g} mm"
    if s.slices != best.slices:
        return f"same {mine:g} mm slices, fewer slices ({s.slices} < {best.slices})"
    return (
        f"same {mine:g} mm slices and {s.slices} slices; tie broken by the lower Series "
        "Instance UID"
    )


def select_study(
    summaries: Sequence[SeriesSummary], rules: SelectionConfig
) -> tuple[list[SeriesSummary], dict[str, str]]:
    """The rules for a whole study at once: each series through `evaluate`, the qualifying ones
    through `choose_preferred`. Returns (chosen, {series_uid: skip reason}) -- what the node
    decides for a complete study, for callers outside the node (`molre-node dataset pull`)."""
    candidates: list[SeriesSummary] = []
    reasons: dict[str, str] = {}
    for s in summaries:
        d = evaluate(s, rules)
        if d.selected:
            candidates.append(s)
        else:
            reasons[s.series_uid] = d.reason or "rules"
    chosen, pref = choose_preferred(candidates, rules)
    reasons.update(pref)
    return chosen, reasons


__all__ = [
    "Decision",
    "HEAD_FIELDS",
    "SeriesSummary",
    "choose_preferred",
    "evaluate",
    "is_head",
    "select_study",
    "summarize",
]
