"""The report lexicon: how head-CT reports name each catalog finding, kept as data.

Why data and not code: the phrases a site's radiologists use (their abbreviations, their
misspellings, "hypodense subdural collection" for a chronic SDH) are what a site adds most often,
and they have to be reviewable by a radiologist who does not read Python. The packaged lexicon
(``molre/resources/report_lexicon.json``, beside the catalog) holds, per catalog finding key:

* ``terms`` -- phrases that name the finding (synonyms, abbreviations, misspellings). ``{mod}``
  stands for up to four ``modifier_words`` (laterality, location, size: "chronic {mod} subdural
  hematoma" matches "chronic small left frontal subdural hematoma").
* ``normal_anchors`` -- normal anatomy that only counts when it is described as normal
  ("the paranasal sinuses are clear" -> sinusitis 0); a bare mention is ignored.
* ``implies`` -- parents that a positive (or uncertain) mention makes positive (or uncertain):
  an SDH is an intracranial hemorrhage.
* ``covers`` -- children that a negative mention makes negative: "no intracranial hemorrhage"
  is also "no SDH". Explicit mentions always take precedence over implied/covered ones.

plus ``groups`` (phrases with no finding of their own whose negation covers findings: "no acute
intracranial abnormality"), ``ignore`` (phrases that must not match a shorter term: "physiologic
calcification"), the ConText rules (negation, uncertainty, historical, hypothetical, family,
pseudo-triggers such as "no interval change", terminators) and the section headers with the
sections that never count (indication, history, comparison, technique).

Plurals and the ``spelling_variants`` (British spellings, hyphen/space) are generated at load.
A site replaces the lexicon with its own JSON in the same format (``--lexicon``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from common.errors import MolreError
from molre.catalog import Catalog

_FORMAT = "molre-report-lexicon"
MOD = "{mod}"
#: how many modifier words ``{mod}`` may stand for
MAX_MODIFIERS = 4
CONTEXT_CATEGORIES = (
    "NEGATED_EXISTENCE",
    "POSSIBLE_EXISTENCE",
    "HISTORICAL",
    "HYPOTHETICAL",
    "FAMILY",
    "PSEUDO",
    "TERMINATE",
)
DIRECTIONS = ("FORWARD", "BACKWARD", "BIDIRECTIONAL", "PSEUDO", "TERMINATE")


@dataclass(frozen=True)
class Term:
    """One phrase to match: ``label`` is a finding key, ``anchor:<key>``, ``group:<name>`` or
    ``ignore``."""

    label: str
    phrase: str


@dataclass
class Lexicon:
    name: str
    version: str
    source: str
    findings: dict[str, dict[str, Any]]
    groups: dict[str, dict[str, Any]]
    ignore: list[str]
    modifier_words: list[str]
    spelling_variants: list[tuple[str, str]]
    qualifiers: dict[str, Any]
    context_rules: list[dict[str, Any]]
    section_rules: list[tuple[str, str]]
    excluded_sections: list[str]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    # -- derived ----------------------------------------------------------------------------
    def digest(self) -> str:
        """sha256 of the canonical JSON: recorded with every label file (which rules made it)."""
        canon = json.dumps(self.raw, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def implies(self, key: str) -> list[str]:
        """Transitive parents of ``key`` (positive/uncertain propagate up)."""
        return _closure(key, lambda k: self.findings.get(k, {}).get("implies", []))

    def covers(self, label: str) -> list[str]:
        """Transitive children that a negative mention of ``label`` (finding or group:name)
        makes negative."""

        def step(k: str) -> list[str]:
            if k.startswith("group:"):
                return list(self.groups.get(k[6:], {}).get("covers", []))
            return list(self.findings.get(k, {}).get("covers", []))

        return _closure(label, step)

    def variants(self, phrase: str) -> list[str]:
        """The phrase, its spelling variants and its plural (last word + s)."""
        out = {phrase}
        for a, b in self.spelling_variants:
            for p in list(out):
                if a in p:
                    out.add(p.replace(a, b))
        for p in list(out):
            last = p.split()[-1] if p.split() else ""
            if len(last) > 3 and last.isalpha() and last[-1] not in "sxy" and last != MOD:
                out.add(p + "s")
        return sorted(out)

    def terms(self) -> list[Term]:
        """Every phrase to match with its label, variants included, de-duplicated."""
        seen: dict[str, str] = {}
        out: list[Term] = []

        def add(label: str, phrases: Iterable[str]) -> None:
            for base in phrases:
                for p in self.variants(" ".join(base.lower().split())):
                    other = seen.get(p)
                    if other is not None:
                        if other != label and not _generated_clash(p, base):
                            raise MolreError(
                                f"{self.source}: phrase {p!r} is listed for both "
                                f"{other!r} and {label!r}; a phrase must name one "
                                "finding"
                            )
                        continue
                    seen[p] = label
                    out.append(Term(label, p))

        for phrase in self.ignore:
            add("ignore", [phrase])
        for key, entry in self.findings.items():
            add(key, entry.get("terms", []))
        for key, entry in self.findings.items():
            add(f"anchor:{key}", entry.get("normal_anchors", []))
        for name, entry in self.groups.items():
            add(f"group:{name}", entry.get("terms", []))
        return out


def _generated_clash(phrase: str, base: str) -> bool:
    """A generated variant (plural, spelling) may coincide with another entry's own phrase;
    only phrases written twice are an error."""
    return " ".join(base.lower().split()) != phrase


def _closure(start: str, step: Any) -> list[str]:
    out: list[str] = []
    todo = list(step(start))
    while todo:
        k = todo.pop(0)
        if k in out or k == start:
            continue
        out.append(k)
        todo.extend(step(k))
    return out


def default_lexicon_path() -> Path:
    return Path(str(resources.files("molre") / "resources" / "report_lexicon.json"))


def _as_str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise MolreError(f"{where}: must be a list of non-empty strings")
    return [v.strip() for v in value]


def lexicon_from_dict(data: Mapping[str, Any], catalog: Catalog, source: str = "<dict>") -> Lexicon:
    """Validate a lexicon against ``catalog``: every key, implication and coverage must be a
    catalog finding, so a renamed catalog key fails here instead of silently labelling nothing."""
    if not isinstance(data, Mapping) or data.get("format") != _FORMAT:
        raise MolreError(
            f'{source}: not a report lexicon (expected "format": "{_FORMAT}"; '
            "see docs/report-labels.md)"
        )
    findings = data.get("findings")
    if not isinstance(findings, Mapping):
        raise MolreError(f"{source}: 'findings' must be an object keyed by catalog finding key")
    clean: dict[str, dict[str, Any]] = {}
    for key, entry in findings.items():
        where = f"{source}: findings.{key}"
        if key not in catalog:
            raise MolreError(f"{where}: {key!r} is not a finding of catalog {catalog.name!r}")
        if not isinstance(entry, Mapping):
            raise MolreError(f"{where}: must be an object with 'terms'")
        unknown = sorted(set(entry) - {"terms", "implies", "covers", "normal_anchors"})
        if unknown:
            raise MolreError(f"{where}: unknown field(s) {', '.join(unknown)}")
        e = {
            k: _as_str_list(entry.get(k), f"{where}.{k}")
            for k in ("terms", "implies", "covers", "normal_anchors")
        }
        for k in e["implies"] + e["covers"]:
            if k not in catalog:
                raise MolreError(f"{where}: {k!r} (in implies/covers) is not a catalog finding")
        clean[key] = e
    groups: dict[str, dict[str, Any]] = {}
    for name, entry in (data.get("groups") or {}).items():
        where = f"{source}: groups.{name}"
        terms = _as_str_list(entry.get("terms"), f"{where}.terms")
        covers = _as_str_list(entry.get("covers"), f"{where}.covers")
        bad = [k for k in covers if k not in catalog]
        if bad:
            raise MolreError(f"{where}: {', '.join(bad)} not catalog findings")
        groups[str(name)] = {"terms": terms, "covers": covers}
    rules = []
    for i, r in enumerate(data.get("context_rules") or []):
        where = f"{source}: context_rules[{i}]"
        if (
            not isinstance(r, Mapping)
            or not str(r.get("literal") or "").strip()
            or r.get("category") not in CONTEXT_CATEGORIES
            or r.get("direction") not in DIRECTIONS
        ):
            raise MolreError(
                f"{where}: needs literal, category (one of "
                f"{', '.join(CONTEXT_CATEGORIES)}) and direction (one of "
                f"{', '.join(DIRECTIONS)})"
            )
        rules.append(dict(r))
    sections = data.get("sections") or {}
    section_rules = [(str(h).lower(), str(c)) for h, c in sections.get("rules", [])]
    mods = _as_str_list(data.get("modifier_words"), f"{source}: modifier_words")
    variants = [(str(a), str(b)) for a, b in data.get("spelling_variants") or []]
    quals = dict(data.get("qualifiers") or {})
    for k in list(quals.get("applies_to", [])) + list((quals.get("words") or {}).values()):
        if k not in catalog:
            raise MolreError(f"{source}: qualifiers: {k!r} is not a catalog finding")
    return Lexicon(
        name=str(data.get("name", "custom")),
        version=str(data.get("version", "0")),
        source=source,
        findings=clean,
        groups=groups,
        ignore=_as_str_list(data.get("ignore"), f"{source}: ignore"),
        modifier_words=[m.lower() for m in mods],
        spelling_variants=variants,
        qualifiers=quals,
        context_rules=rules,
        section_rules=section_rules,
        excluded_sections=_as_str_list(sections.get("excluded"), f"{source}: sections.excluded"),
        raw=dict(data),
    )


def load_lexicon(catalog: Catalog, path: Path | str | None = None) -> Lexicon:
    """The packaged lexicon (``path=None``) or a site's own JSON file, checked against ``catalog``."""
    p = default_lexicon_path() if path is None else Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MolreError(f"lexicon file {p} does not exist") from None
    except json.JSONDecodeError as exc:
        raise MolreError(f"{p}: line {exc.lineno}: invalid JSON ({exc.msg})") from exc
    except OSError as exc:
        raise MolreError(f"cannot read lexicon {p}: {exc}") from exc
    return lexicon_from_dict(data, catalog, source=str(p))


__all__ = ["Lexicon", "Term", "default_lexicon_path", "lexicon_from_dict", "load_lexicon"]
