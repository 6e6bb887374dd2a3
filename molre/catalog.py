"""The finding catalog: which findings a model predicts, in which order, and how each is coded.

Why a catalog object rather than a list of strings: the order of findings *is* the order of the
model's output logits, the codes are what the DICOM SR carries to the PACS, and a checkpoint must
refuse to run with a catalog it was not trained on. So the catalog is versioned data with a
digest (`Catalog.digest`) that checkpoints record.

The packaged default (``molre/resources/catalog.json``) holds 75 non-contrast head-CT findings in
6 categories. Codes use SNOMED CT (scheme ``SCT``) only where the code was verified against public
sources (see docs/catalog.md); everything else uses the local scheme ``99MOLRE``, because a wrong
standard code in a report is worse than an honest local one. A site can replace the catalog with
its own JSON (same format) or CSV (``key,name,category,scheme,value,meaning``) file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from common.errors import MolreError

#: Category keys in their canonical order, with display names.
CATEGORIES: dict[str, str] = {
    "hemorrhage": "Hemorrhage",
    "infarction_ischemia": "Infarction / ischemia",
    "trauma": "Trauma",
    "mass_lesions": "Mass lesions",
    "structural": "Structural abnormalities",
    "chronic_degenerative": "Chronic / degenerative changes",
}

#: The local coding scheme designator for concepts without a verified standard code.
LOCAL_SCHEME = "99MOLRE"

FIELDS = ("key", "name", "category", "scheme", "value", "meaning")
_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_FORMAT = "molre-catalog"


@dataclass(frozen=True)
class Finding:
    """One predicted finding. ``(scheme, value, meaning)`` is the DICOM code triple for the SR."""

    key: str
    name: str
    category: str
    scheme: str
    value: str
    meaning: str

    def code(self) -> tuple[str, str, str]:
        """(value, scheme designator, meaning): the argument order of highdicom's CodedConcept."""
        return (self.value, self.scheme, self.meaning)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _validate_finding(raw: Mapping[str, Any], where: str) -> Finding:
    missing = [f for f in FIELDS if not str(raw.get(f) or "").strip()]
    if missing:
        raise MolreError(
            f"{where}: missing field(s) {', '.join(missing)}; every finding needs "
            f"{', '.join(FIELDS)}"
        )
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise MolreError(
            f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}"
        )
    vals = {f: str(raw[f]).strip() for f in FIELDS}
    if not _KEY_RE.match(vals["key"]):
        raise MolreError(
            f"{where}: key {vals['key']!r} must be lower-case letters, digits and "
            "underscores, starting with a letter (at most 64 characters)"
        )
    if vals["category"] not in CATEGORIES:
        raise MolreError(
            f"{where} (key {vals['key']!r}): unknown category {vals['category']!r}; "
            f"use one of {', '.join(CATEGORIES)}"
        )
    # DICOM limits: CodingSchemeDesignator and CodeValue are SH (16), CodeMeaning is LO (64).
    if len(vals["scheme"]) > 16 or len(vals["value"]) > 16 or " " in vals["value"]:
        raise MolreError(
            f"{where} (key {vals['key']!r}): scheme/value must be at most 16 "
            "characters without spaces (DICOM SH)"
        )
    if len(vals["meaning"]) > 64:
        raise MolreError(
            f"{where} (key {vals['key']!r}): meaning longer than 64 characters "
            "(DICOM LO); shorten it"
        )
    return Finding(**vals)


class Catalog:
    """An ordered, validated set of findings; position = index of the model's output logit."""

    def __init__(
        self,
        findings: Sequence[Finding],
        name: str = "custom",
        version: str = "0",
        source: str = "<memory>",
    ) -> None:
        seen: dict[str, int] = {}
        codes: dict[tuple[str, str], str] = {}
        for i, f in enumerate(findings):
            if f.key in seen:
                raise MolreError(
                    f"{source}: duplicate finding key {f.key!r} (entries "
                    f"{seen[f.key] + 1} and {i + 1}); keys must be unique"
                )
            seen[f.key] = i
            code = (f.scheme, f.value)
            if code in codes:
                raise MolreError(
                    f"{source}: code {f.scheme} {f.value} used by both "
                    f"{codes[code]!r} and {f.key!r}; each finding needs its own code"
                )
            codes[code] = f.key
        if not findings:
            raise MolreError(f"{source}: the catalog has no findings")
        self.findings: tuple[Finding, ...] = tuple(findings)
        self.name = name
        self.version = version
        self.source = source
        self._index = seen

    # -- access -------------------------------------------------------------------------------
    @property
    def keys(self) -> list[str]:
        return [f.key for f in self.findings]

    @property
    def categories(self) -> list[str]:
        """Category keys present in this catalog, in canonical order."""
        present = {f.category for f in self.findings}
        return [c for c in CATEGORIES if c in present]

    def index(self, key: str) -> int:
        """Output position of ``key``; MolreError for a key this catalog does not have."""
        try:
            return self._index[key]
        except KeyError:
            raise MolreError(
                f"unknown finding key {key!r} in catalog {self.name!r} "
                f"({len(self)} findings); the keys are listed in docs/catalog.md"
            ) from None

    def get(self, key: str) -> Finding:
        return self.findings[self.index(key)]

    def by_category(self) -> dict[str, list[Finding]]:
        out: dict[str, list[Finding]] = {c: [] for c in self.categories}
        for f in self.findings:
            out[f.category].append(f)
        return out

    def __len__(self) -> int:
        return len(self.findings)

    def __iter__(self) -> Iterator[Finding]:
        return iter(self.findings)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __getitem__(self, key: str) -> Finding:
        return self.get(key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Catalog) and self.findings == other.findings

    def __repr__(self) -> str:
        return f"Catalog(name={self.name!r}, version={self.version!r}, findings={len(self)})"

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "format_version": 1,
            "name": self.name,
            "version": self.version,
            "findings": [f.to_dict() for f in self.findings],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> Catalog:
        if not isinstance(data, Mapping) or not isinstance(data.get("findings"), list):
            raise MolreError(
                f"{source}: a catalog needs a 'findings' list (see docs/catalog.md for the format)"
            )
        fmt = data.get("format", _FORMAT)
        if fmt != _FORMAT:
            raise MolreError(f"{source}: format {fmt!r} is not {_FORMAT!r}")
        findings = []
        for i, raw in enumerate(data["findings"]):
            if not isinstance(raw, Mapping):
                raise MolreError(
                    f"{source}: findings[{i}] must be an object with {', '.join(FIELDS)}"
                )
            key = raw.get("key")
            where = f"{source}: findings[{i}]" + (f" ({key!r})" if key else "")
            findings.append(_validate_finding(raw, where))
        return cls(
            findings,
            name=str(data.get("name", "custom")),
            version=str(data.get("version", "0")),
            source=source,
        )

    def digest(self) -> str:
        """sha256 of the canonical JSON of the findings (order, keys, codes).

        Only the findings are hashed — not name/version — because they are what a trained head
        depends on; a renamed but identical catalog stays compatible with its checkpoints.
        """
        canon = json.dumps(
            [f.to_dict() for f in self.findings],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
        )
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def to_markdown(self) -> str:
        """A Markdown table of the catalog (used to generate docs/catalog.md)."""
        lines = [
            "| # | key | finding | category | scheme | code | meaning |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, f in enumerate(self.findings):
            lines.append(
                f"| {i} | `{f.key}` | {f.name} | {CATEGORIES[f.category]} | {f.scheme} "
                f"| {f.value} | {f.meaning} |"
            )
        return "\n".join(lines) + "\n"


def default_catalog_path() -> Path:
    """Path of the packaged catalog (inside the installed package)."""
    return Path(str(resources.files("molre") / "resources" / "catalog.json"))


def _read_csv(path: Path) -> Catalog:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise MolreError(f"cannot read catalog {path}: {exc}") from exc
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    if sorted(header) != sorted(FIELDS):
        raise MolreError(
            f"{path}: line 1: header must be {','.join(FIELDS)} "
            f"(got {','.join(header) or 'nothing'})"
        )
    findings = []
    for row in reader:
        line_no = reader.line_num
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # blank line
        if None in row:
            raise MolreError(f"{path}: line {line_no}: more columns than the header")
        clean = {k.strip(): v for k, v in row.items()}
        findings.append(_validate_finding(clean, f"{path}: line {line_no}"))
    return Catalog(findings, name=path.stem, version="site", source=str(path))


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Load the packaged catalog (``path=None``) or a site catalog (.json or .csv) replacing it."""
    if path is None:
        p = default_catalog_path()
    else:
        p = Path(path)
        if not p.is_file():
            raise MolreError(
                f"catalog file {p} does not exist; give a .json or .csv catalog "
                "(format in docs/catalog.md) or omit it to use the packaged one"
            )
    if p.suffix.lower() == ".csv":
        return _read_csv(p)
    if p.suffix.lower() != ".json":
        raise MolreError(f"catalog file {p}: use a .json or .csv file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MolreError(f"{p}: line {exc.lineno}: invalid JSON ({exc.msg})") from exc
    except OSError as exc:
        raise MolreError(f"cannot read catalog {p}: {exc}") from exc
    return Catalog.from_dict(data, source=str(p))


__all__ = [
    "CATEGORIES",
    "Catalog",
    "FIELDS",
    "Finding",
    "LOCAL_SCHEME",
    "default_catalog_path",
    "load_catalog",
]
