"""Finding catalog: content of the packaged default, code policy, site override, validation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from common.errors import MolreError
from molre.catalog import CATEGORIES, Catalog, Finding, load_catalog

# Copied from /work/shared/REFERENCE.md ("Codes checked against public sources"): the only SCT
# codes the catalog may use, with their meanings exactly as listed there.
VERIFIED_SCT = {
    "52101004": "Present",
    "272519000": "Absent",
    "373068000": "Undetermined",
    "303653007": "CT of head",
    "69536005": "Head",
    "12738006": "Brain",
    "89546000": "Skull",
    "41695006": "Scalp",
    "2095001": "Paranasal sinus",
    "1386000": "intracranial hemorrhage",
    "35486000": "subdural hemorrhage",
    "95453001": "subdural hematoma",
    "21454007": "subarachnoid hemorrhage",
    "23276006": "ventricular hemorrhage",
    "274100004": "cerebral hemorrhage",
    "449020009": "intraparenchymal hemorrhage of brain",
    "315048006": "traumatic extradural hematoma",
    "432504007": "cerebral infarction",
    "422504002": "ischemic stroke",
    "230698000": "lacunar infarction",
    "2032001": "cerebral edema",
    "49453006": "cerebral herniation",
    "230745008": "hydrocephalus",
    "71642004": "fracture of skull",
    "126952004": "neoplasm of brain",
    "85974009": "mass of intracranial structure",
    "302820008": "intracranial meningioma",
    "33595009": "arachnoid cyst",
    "253184003": "Chiari malformation",
    "192759008": "cerebral venous sinus thrombosis",
    "128609009": "intracranial aneurysm",
    "36971009": "sinusitis",
    "19227008": "foreign body",
    "50960005": "hemorrhage",
    "35566002": "hematoma",
    "79654002": "edema",
    "13331008": "atrophy",
    "4147007": "mass",
    "18115005": "pathologic calcification",
    "396339007": "thrombus",
}

PHANTOM_KEYS = [
    "intraparenchymal_hemorrhage",
    "subdural_hemorrhage",
    "epidural_hematoma",
    "intraventricular_hemorrhage",
    "subarachnoid_hemorrhage",
    "acute_infarct",
    "skull_fracture",
    "hydrocephalus",
    "midline_shift",
    "intracranial_calcification",
    "intracranial_mass",
    "vasogenic_edema",
]

FIELDS = "key,name,category,scheme,value,meaning"


def test_default_catalog_has_75_findings_in_6_categories() -> None:
    cat = load_catalog()
    assert len(cat) == 75 == len(set(cat.keys))
    assert cat.categories == list(CATEGORIES)
    groups = cat.by_category()
    assert sum(len(v) for v in groups.values()) == 75
    assert all(len(v) >= 5 for v in groups.values())
    assert [cat.index(k) for k in cat.keys] == list(range(75))


def test_phantom_keys_exist() -> None:
    cat = load_catalog()
    missing = [k for k in PHANTOM_KEYS if k not in cat]
    assert not missing


def test_only_verified_sct_codes_and_local_codes_are_well_formed() -> None:
    cat = load_catalog()
    schemes = {f.scheme for f in cat}
    assert schemes <= {"SCT", "99MOLRE"}
    for f in cat:
        if f.scheme == "SCT":
            assert f.value in VERIFIED_SCT, f"{f.key}: SCT {f.value} is not on the verified list"
            assert f.meaning == VERIFIED_SCT[f.value], f"{f.key}: meaning differs from the list"
        else:
            assert re.fullmatch(r"[A-Z0-9]{2,16}", f.value), f.key
    assert len({(f.scheme, f.value) for f in cat}) == 75
    # the documented pitfalls must not appear
    assert not {"95455008"} & {f.value for f in cat}
    assert cat["epidural_hematoma"].scheme == "99MOLRE"


def test_round_trip_digest_and_docs_in_sync() -> None:
    cat = load_catalog()
    again = Catalog.from_dict(json.loads(json.dumps(cat.to_dict())))
    assert again == cat and again.digest() == cat.digest()
    assert re.fullmatch(r"[0-9a-f]{64}", cat.digest())
    swapped = list(cat.findings)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert Catalog(swapped).digest() != cat.digest()  # order matters: it is the logit order
    doc = (Path(__file__).resolve().parents[1] / "docs" / "catalog.md").read_text()
    table = doc.split("<!-- catalog-table:start -->\n")[1].split("<!-- catalog-table:end -->")[0]
    assert table == cat.to_markdown()


def test_site_csv_and_json_replace_packaged(tmp_path: Path) -> None:
    csv_path = tmp_path / "site.csv"
    csv_path.write_text(
        f"{FIELDS}\n"
        "ich,Any bleed,hemorrhage,SCT,1386000,intracranial hemorrhage\n"
        "\n"
        "fx,Fracture,trauma,99MOLRE,FX,Fracture\n"
    )
    cat = load_catalog(csv_path)
    assert cat.keys == ["ich", "fx"] and cat.categories == ["hemorrhage", "trauma"]
    assert cat.get("fx") == Finding("fx", "Fracture", "trauma", "99MOLRE", "FX", "Fracture")
    json_path = tmp_path / "site.json"
    json_path.write_text(json.dumps(cat.to_dict()))
    assert load_catalog(json_path) == cat
    assert load_catalog(json_path).digest() == cat.digest() != load_catalog().digest()


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("a,A,hemorrhage,SCT,1386000,x\na,B,trauma,99MOLRE,B,y\n", "duplicate finding key 'a'"),
        ("a,A,bleeds,99MOLRE,A,x\n", "line 2 (key 'a'): unknown category 'bleeds'"),
        ("a,A,trauma,99MOLRE,,x\n", "line 2: missing field(s) value"),
        ("a,A,trauma,99MOLRE,A,x\nBad Key,B,trauma,99MOLRE,B,y\n", "line 3: key 'Bad Key'"),
        ("a,A,trauma,99MOLRE,A,x\nb,B,trauma,99MOLRE,A,y\n", "code 99MOLRE A used by both"),
    ],
)
def test_site_csv_validation_errors_name_line_and_key(
    tmp_path: Path, body: str, needle: str
) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(f"{FIELDS}\n{body}")
    with pytest.raises(MolreError) as err:
        load_catalog(p)
    assert needle in str(err.value) and str(p) in str(err.value)


def test_site_file_format_errors(tmp_path: Path) -> None:
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("key,name,category\na,A,trauma\n")
    with pytest.raises(MolreError, match="line 1: header"):
        load_catalog(bad_header)
    bad_json = tmp_path / "b.json"
    bad_json.write_text('{"findings": [\n{"key": "a",}]}')
    with pytest.raises(MolreError, match="line 2: invalid JSON"):
        load_catalog(bad_json)
    extra = tmp_path / "e.json"
    extra.write_text(
        json.dumps(
            {
                "findings": [
                    {
                        "key": "a",
                        "name": "A",
                        "category": "trauma",
                        "scheme": "99MOLRE",
                        "value": "A",
                        "meaning": "A",
                        "colour": "red",
                    }
                ]
            }
        )
    )
    with pytest.raises(MolreError, match=r"findings\[0\] \('a'\): unknown field\(s\) colour"):
        load_catalog(extra)
    with pytest.raises(MolreError, match="does not exist"):
        load_catalog(tmp_path / "missing.json")
    with pytest.raises(MolreError, match="unknown finding key 'nope'"):
        load_catalog().index("nope")
