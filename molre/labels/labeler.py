"""Rule-based labelling of head-CT reports on medspaCy (mention -> assertion -> aggregation).

The approach of the CheXpert labeler and NegBio, on a maintained clinical NLP library:

1. **Mentions**: medspaCy's TargetMatcher finds the lexicon's phrases (`molre.labels.lexicon`);
   overlapping matches keep the longest ("chronic subdural hematoma" beats "subdural hematoma").
2. **Sections**: medspaCy's Sectionizer assigns each mention its section; mentions in the
   indication / clinical history / comparison / technique sections never count ("Clinical
   history: rule out bleed").
3. **Assertion**: medspaCy's ConText with radiology rules marks mentions negated, uncertain,
   historical ("history of SAH"), hypothetical ("to rule out", "if") or family; pseudo-triggers
   ("no interval change") stop "no" from negating what follows.
4. **Classification** of each counted mention: uncertain -> -1 (uncertainty wins over negation:
   "cannot be excluded"), negated -> 0, otherwise 1; historical, hypothetical and family
   mentions are recorded as evidence but do not count.
5. **Propagation**: a positive/uncertain finding makes its parents positive/uncertain
   (`implies`), a negative one makes its children negative (`covers`, also for groups such as
   "no acute intracranial abnormality"); qualifiers before an infarct ("acute", "chronic") add the
   age finding.
6. **Aggregation** per report and finding, as CheXpert does: 1 if any mention is positive, else
   -1 if any is uncertain, else 0 if any is negative, else not mentioned (None).

Everything runs offline: the pipeline is medspaCy on a blank English spaCy model (no statistical
model, nothing downloaded). PyRuSH's debug logging (which would print report text, i.e. PHI) is
switched off.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from common.errors import MolreError
from molre.catalog import Catalog
from molre.labels.lexicon import MAX_MODIFIERS, MOD, Lexicon

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1
#: what to do with uncertain (-1) labels
UNCERTAIN_POLICIES = ("keep", "positive", "negative", "blank")


@dataclass
class Mention:
    """One piece of evidence: a matched phrase (or a label derived from one) and its decision."""

    finding: str
    label: int | None  # 1 / 0 / -1; None = recorded but not counted
    text: str
    start: int
    end: int
    section: str | None
    reason: str
    modifiers: list[str] = field(default_factory=list)
    derived_from: str | None = None
    #: character offset of the sentence the mention is in
    sentence: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReportLabels:
    """Labels of one report: finding key -> 1 / 0 / -1 / None, and the evidence behind them."""

    labels: dict[str, int | None]
    mentions: list[Mention]


def apply_policy(value: int | None, policy: str) -> int | None:
    """Map an uncertain label by the policy (keep -> -1, positive -> 1, negative -> 0,
    blank -> None); other values pass through."""
    if policy not in UNCERTAIN_POLICIES:
        raise MolreError(f"uncertain policy {policy!r}: use one of {', '.join(UNCERTAIN_POLICIES)}")
    if value != UNCERTAIN or policy == "keep":
        return value
    return {"positive": POSITIVE, "negative": NEGATIVE, "blank": None}[policy]


def _quiet_pyrush() -> None:
    """PyRuSH logs every sentence boundary with the tokens at DEBUG level through loguru, on
    stderr: report text (PHI) in the logs. Off, always."""
    try:
        from loguru import logger

        logger.disable("PyRuSH")
    except ImportError:  # pragma: no cover - loguru comes with PyRuSH
        pass


def _import_medspacy() -> Any:
    try:
        import medspacy
        import medspacy.context  # noqa: F401 - ConText, imported by the labeler
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise MolreError(
            "report labelling needs medspaCy: pip install 'medspacy>=1.3.1,<1.4' "
            f"(see docs/report-labels.md) ({exc})"
        ) from exc
    return medspacy


class ReportLabeler:
    """A built medspaCy pipeline for one lexicon + catalog; reuse it for many reports."""

    def __init__(self, lexicon: Lexicon, catalog: Catalog) -> None:
        self.lexicon = lexicon
        self.catalog = catalog
        missing = [k for k in lexicon.findings if k not in catalog]
        if missing:  # pragma: no cover - checked when the lexicon is loaded
            raise MolreError(f"lexicon findings not in the catalog: {', '.join(missing)}")
        _quiet_pyrush()
        medspacy = _import_medspacy()
        from medspacy.context import ConTextRule
        from medspacy.section_detection import SectionRule
        from medspacy.target_matcher import TargetRule

        # blank English model + medspaCy's clinical tokenizer and PyRuSH sentence splitter:
        # no statistical model, nothing to download
        self.nlp = medspacy.load(
            medspacy_enable=[
                "medspacy_pyrush",
                "medspacy_target_matcher",
                "medspacy_context",
                "medspacy_sectionizer",
            ],
            load_rules=False,
        )
        terms = lexicon.terms()
        # "normal", "clear", "preserved" ... only say something about normal anatomy anchors and
        # negation-only groups ("the ventricles and sulci are normal"), never about a finding
        anchor_labels = {t.label for t in terms if t.label.startswith(("anchor:", "group:"))}
        self._mods = sorted(set(lexicon.modifier_words))
        rules = [
            TargetRule(t.phrase, t.label, pattern=self._pattern(t.phrase))
            if MOD in t.phrase
            else TargetRule(t.phrase, t.label)
            for t in terms
        ]
        self.nlp.get_pipe("medspacy_target_matcher").add(rules)
        ctx_rules = []
        for r in lexicon.context_rules:
            kwargs: dict[str, Any] = {"direction": r["direction"]}
            if r.get("anchors_only"):
                kwargs["allowed_types"] = anchor_labels
            if r.get("max_scope"):
                kwargs["max_scope"] = int(r["max_scope"])
            ctx_rules.append(ConTextRule(r["literal"], r["category"], **kwargs))
        self.nlp.get_pipe("medspacy_context").add(ctx_rules)
        self.nlp.get_pipe("medspacy_sectionizer").add(
            [SectionRule(h, c) for h, c in lexicon.section_rules]
        )
        self._excluded = set(lexicon.excluded_sections)
        q = lexicon.qualifiers or {}
        self._qual_window = int(q.get("window", 0) or 0)
        self._qual_applies = set(q.get("applies_to", []))
        self._qual_words = {str(k).lower(): str(v) for k, v in (q.get("words") or {}).items()}

    def _pattern(self, phrase: str) -> list[dict[str, Any]]:
        """A token pattern for a phrase with ``{mod}`` slots (tokenised like the text)."""
        pattern: list[dict[str, Any]] = []
        parts = phrase.split(MOD)
        for i, part in enumerate(parts):
            for tok in self.nlp.tokenizer(part.strip()) if part.strip() else []:
                pattern.append({"LOWER": tok.lower_})
            if i < len(parts) - 1:
                pattern.append({"LOWER": {"IN": self._mods}, "OP": f"{{0,{MAX_MODIFIERS}}}"})
        return pattern

    # -- one report ---------------------------------------------------------------------------
    def label(self, text: str) -> ReportLabels:
        with warnings.catch_warnings():
            # W036: medspaCy's internal token matchers are empty when every rule is a phrase
            warnings.filterwarnings("ignore", message=r"\[W036\]")
            doc = self.nlp(_normalise(text))
        mentions: list[Mention] = []
        for ent in doc.ents:
            mentions.extend(self._classify(ent))
        return ReportLabels(self._aggregate(mentions), mentions)

    def label_many(self, texts: Iterable[str]) -> list[ReportLabels]:
        return [self.label(t) for t in texts]

    def _classify(self, ent: Any) -> list[Mention]:
        label = ent.label_
        if label == "ignore":
            return []
        section = ent._.section_category
        mods = sorted({m.category for m in ent._.modifiers})
        base = dict(
            text=ent.text,
            start=ent.start_char,
            end=ent.end_char,
            section=section,
            modifiers=mods,
            sentence=ent.sent.start_char,
        )
        anchor = label.startswith("anchor:")
        group = label.startswith("group:")
        key = label[7:] if anchor else label
        if section in self._excluded:
            return [Mention(key, None, reason=f"section '{section}' does not count", **base)]
        for cat, why in (
            ("HYPOTHETICAL", "hypothetical"),
            ("HISTORICAL", "historical"),
            ("FAMILY", "family history"),
        ):
            if cat in mods:
                return [Mention(key, None, reason=f"{why}: does not count", **base)]
        if "POSSIBLE_EXISTENCE" in mods:
            status, reason = UNCERTAIN, "uncertain"
        elif "NEGATED_EXISTENCE" in mods:
            status, reason = NEGATIVE, "negated"
        else:
            status, reason = POSITIVE, "affirmed"
        out: list[Mention] = []
        if anchor or group:
            if status != NEGATIVE:
                return [
                    Mention(
                        key,
                        None,
                        reason=(
                            "normal anatomy named without being called normal"
                            if anchor
                            else "group phrase: counts only when negated"
                        ),
                        **base,
                    )
                ]
            if anchor:
                out.append(Mention(key, NEGATIVE, reason="described as normal", **base))
        else:
            out.append(Mention(key, status, reason=reason, **base))
        # propagation
        if status in (POSITIVE, UNCERTAIN) and not anchor and not group:
            for parent in self.lexicon.implies(key):
                out.append(
                    Mention(parent, status, reason=f"implied by {key}", derived_from=key, **base)
                )
            q = self._qualifier(ent) if key in self._qual_applies else None
            if q is not None:
                out.append(
                    Mention(q, status, reason=f"qualifier before {key}", derived_from=key, **base)
                )
                for parent in self.lexicon.implies(q):
                    out.append(
                        Mention(parent, status, reason=f"implied by {q}", derived_from=key, **base)
                    )
        if status == NEGATIVE:
            for child in self.lexicon.covers(label if group else key):
                out.append(
                    Mention(
                        child,
                        NEGATIVE,
                        reason=f"covered by negated {label}",
                        derived_from=label,
                        **base,
                    )
                )
        return out

    def _qualifier(self, ent: Any) -> str | None:
        """An age word ("acute", "chronic", ...) a few tokens before an infarct mention."""
        if not self._qual_window:
            return None
        doc, sent_start = ent.doc, ent.sent.start
        i = ent.start - 1
        steps = 0
        while i >= sent_start and steps < self._qual_window:
            tok = doc[i]
            if tok.ent_type_:  # another mention in between: its own qualifiers
                return None
            hit = self._qual_words.get(tok.lower_)
            if hit is not None:
                return hit
            i -= 1
            steps += 1
        return None

    def _aggregate(self, mentions: Sequence[Mention]) -> dict[str, int | None]:
        # an affirmed description wins over a hedged interpretation of it, as in CheXpert:
        # "hyperdense right transverse sinus, concerning for venous sinus thrombosis" is
        # positive for the dense-sinus finding (labels are about what the images show)
        per: dict[str, set[int]] = {}
        for m in mentions:
            if m.label is None or m.finding not in self.catalog:
                continue
            per.setdefault(m.finding, set()).add(m.label)
        out: dict[str, int | None] = {}
        for key in self.catalog.keys:
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


_WS = re.compile(r"[ \t\f\v]+")


def _normalise(text: str) -> str:
    """Collapse runs of spaces/tabs (keep newlines: they delimit sections and list items)."""
    return _WS.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))


__all__ = [
    "Mention",
    "NEGATIVE",
    "POSITIVE",
    "ReportLabeler",
    "ReportLabels",
    "UNCERTAIN",
    "UNCERTAIN_POLICIES",
    "apply_policy",
]
