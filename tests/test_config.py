"""Node configuration: defaults, the example file, and messages that name the bad key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from common.errors import ConfigError
from node.config import (
    DEMO_CHECKPOINT,
    config_from_dict,
    iter_keys,
    json_schema,
    key_table,
    load_config,
    with_overrides,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"
DOCS = REPO / "docs" / "configuration.md"


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg.network.ae_title == "MOLRE"
    assert (cfg.network.host, cfg.network.port) == ("127.0.0.1", 11112)
    assert cfg.model.checkpoint == "" and cfg.model.device == "cpu"
    assert cfg.data_dir.name == "molre-data" and cfg.data_dir.is_absolute()
    assert cfg.database_url == f"sqlite:///{cfg.data_dir / 'molre.db'}"
    assert cfg.spool_dir == cfg.data_dir / "spool"
    assert cfg.network.allowed_callers == [] and cfg.destinations == []


def test_example_file_loads_and_equals_defaults() -> None:
    cfg = load_config(EXAMPLE)
    default = load_config(None)
    a, b = cfg.to_dict(), default.to_dict()
    # relative data_dir resolves against the file's directory vs the working directory
    assert Path(a["storage"].pop("data_dir")) == (EXAMPLE.parent / "molre-data").resolve()
    b["storage"].pop("data_dir")
    assert a == b


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    lines = text.splitlines()
    for key in iter_keys():
        name = key.split(".")[-1]
        pattern = re.compile(rf"^#?\s*{re.escape(name)}\s*=")
        idx = [i for i, ln in enumerate(lines) if pattern.match(ln)]
        assert idx, f"{key} is not in config.example.toml"
        # the line before (or the key line itself, for the commented tables) carries a comment
        assert any(lines[i - 1].lstrip().startswith("#") or "#" in lines[i] for i in idx), key


def _example_keys() -> set[str]:
    """The keys config.example.toml names, its commented-out tables included."""
    lines = []
    for ln in EXAMPLE.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#\s*(\[\[[a-z_.]+\]\]|[a-z_]+\s*=.*)$", ln)
        lines.append(m.group(1) if m else ln)

    def flat(d: dict, prefix: str) -> set[str]:
        out: set[str] = set()
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                out |= flat(v, key)
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                for item in v:
                    out |= flat(item, key + "[]")
            else:
                out.add(key)
        return out

    return flat(tomllib.loads("\n".join(lines)), "")


def test_example_names_exactly_the_schemas_keys() -> None:
    assert _example_keys() == set(iter_keys())


def test_docs_key_table_is_generated_from_the_schema() -> None:
    text = DOCS.read_text(encoding="utf-8")
    table = text.split("<!-- config-keys:begin -->\n")[1].split("<!-- config-keys:end -->")[0]
    assert table == key_table(), (
        "docs/configuration.md: the key table differs from the "
        "schema; paste `molre-node config-schema --keys` between the "
        "config-keys markers"
    )
    rows = [ln.split("|")[1].strip().strip("`") for ln in table.splitlines()[2:]]
    assert rows == iter_keys()


def test_docs_key_tables_name_only_schema_keys() -> None:
    """Every `| key | ...` table in docs/configuration.md (the generated one and the prose
    tables such as "Listener limits") names only keys the schema has."""
    keys = set(iter_keys())
    named, in_key_table = [], False
    for ln in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in ln.split("|")[1:-1]] if ln.startswith("|") else []
        if not cells:
            in_key_table = False
        elif cells[0] == "key":
            in_key_table = True
        elif in_key_table and not cells[0].startswith("---"):
            named.append(cells[0].strip("`"))
    assert len(named) > len(keys)  # the generated table and at least one prose table
    assert not [k for k in named if k not in keys], "docs name keys the schema lacks"


def test_json_schema_matches_the_models() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    for name, sub in schema["$defs"].items():
        assert sub["additionalProperties"] is False, name
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    jsonschema.validate(example, schema)
    for bad in (
        {"network": {"prot": 1}},
        {"network": {"port": 70000}},
        {"storage": {"durability": "sometimes"}},
        {"node": {"roles": ["gpu"]}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"network": {"port": "abc"}}, 'network.port: expected an integer 0..65535, got "abc"'),
        ({"network": {"port": 70000}}, "network.port: expected an integer 0..65535, got 70000"),
        ({"network": {"port": 2.5}}, "network.port: expected an integer 0..65535, got 2.5"),
        ({"network": {"port": True}}, "network.port: expected an integer 0..65535, got True"),
        ({"network": 5}, "network: expected a table, got 5"),
        ({"network": {"allowed_callers": "PACS"}}, "network.allowed_callers: expected a list"),
        (
            {"network": {"max_associations_per_host": 11}},
            "network.max_associations_per_host: expected 0 (= half of max_associations) or 1..10",
        ),
        (
            {"network": {"max_associate_rq_size": "1KiB"}},
            "network.max_associate_rq_size: expected a size of at least 4096 bytes",
        ),
        (
            {"network": {"receiver_processes": 65}},
            "network.receiver_processes: expected an integer 0..64, got 65",
        ),
        ({"network": {"prot": 1}}, "network.prot: unknown key"),
        ({"nework": {}}, "nework: unknown key"),
        ({"network": {"ae_title": "WAY-TOO-LONG-AE-TITLE"}}, "network.ae_title"),
        (
            {"network": {"allowed_callers": [{"ae_title": "PACS", "host": "10.0.0.300"}]}},
            "network.allowed_callers[0].host",
        ),
        (
            {"network": {"allowed_callers": [{"ae": "PACS"}]}},
            "network.allowed_callers[0].ae: unknown",
        ),
        ({"assembler": {"quiet_time_s": -1}}, "assembler.quiet_time_s: expected a positive number"),
        (
            {"assembler": {"quiet_time_s": "10"}},
            'assembler.quiet_time_s: expected a positive number, got "10"',
        ),
        ({"selection": {"modalities": ["CT", 3]}}, "selection.modalities[1]: expected a string"),
        (
            {"selection": {"slice_thickness_min_mm": 12}},
            "selection.slice_thickness_min_mm: must be",
        ),
        ({"selection": {"prefer": "newest"}}, "selection.prefer"),
        ({"selection": {"head_patterns": ["(unclosed"]}}, "selection.head_patterns[0]"),
        ({"selection": {"min_slices": 0}}, "selection.min_slices"),
        ({"model": {"device": "gpu"}}, 'model.device: expected "cpu", "cuda", "cuda:N" or "mps"'),
        ({"model": {"isolation": "fork"}}, "model.isolation: expected one of process, thread, got"),
        ({"model": {"job_timeout_s": 700}}, "model.job_timeout_s: must be smaller than"),
        (
            {"storage": {"durability": "sometimes"}},
            'storage.durability: expected one of fsync, os, got "sometimes" ("fsync" = safe',
        ),
        ({"storage": {"data_dir": ""}}, "storage.data_dir: required"),
        ({"storage": {"min_free_disk": "lots"}}, "storage.min_free_disk"),
        ({"storage": {"min_free_disk": "150%"}}, "storage.min_free_disk"),
        ({"tls": {"enabled": True}}, "tls.certificate: required"),
        (
            {
                "destinations": [
                    {"name": "a", "ae_title": "A", "port": 104},
                    {"name": "a", "ae_title": "B", "port": 105},
                ]
            },
            "destinations[1].name",
        ),
        (
            {"destinations": [{"name": "a", "ae_title": "A", "port": 0}]},
            "destinations[0].port: expected an integer 1..65535, got 0",
        ),
        ({"destinations": [{"ae_title": "A"}]}, "destinations[0].name: required"),
        (
            {"destinations": [{"name": "a", "ae_title": "A", "calling_ae_title": "A\\B"}]},
            "destinations[0].calling_ae_title: expected an AE title",
        ),
        (
            {"audit": {"store_phi": "yes"}},
            'audit.store_phi: expected a boolean (true or false), got "yes"',
        ),
        (
            {"logging": {"level": "verbose"}},
            "logging.level: expected DEBUG, INFO, WARNING or ERROR",
        ),
        (
            {"report": {"evidence_key_images": 21}},
            "report.evidence_key_images: expected an integer 1..20, got 21",
        ),
        (
            {"retry": {"export_backoff_base_s": 100, "export_backoff_max_s": 10}},
            "retry.export_backoff_base_s",
        ),
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    assert message in str(exc.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[network]\nport = "abc"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: network\.port"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[network\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_sizes_and_overrides(tmp_path: Path) -> None:
    cfg = config_from_dict({"storage": {"min_free_disk": "2GiB"}})
    assert cfg.free_disk_threshold(10**12) == 2 * 1024**3
    cfg = config_from_dict({"storage": {"min_free_disk": "5%"}})
    assert cfg.free_disk_threshold(1000) == 50
    cfg = with_overrides(load_config(None), port=4242, data_dir=tmp_path)
    assert cfg.network.port == 4242 and cfg.data_dir == tmp_path.resolve()
    with pytest.raises(ConfigError, match="network.port"):
        with_overrides(load_config(None), port=99999)


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "node.toml"
    p.write_text(
        '[storage]\ndata_dir = "data"\ndatabase_url = ""\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nport = 104\n'
    )
    cfg = load_config(p)
    assert cfg.data_dir == (tmp_path / "sub" / "data").resolve()
    assert cfg.destination("pacs").ae_title == "PACS" and cfg.destination("x") is None


def test_every_bad_key_is_named_at_once(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[network]\nport = 70000\nae_title = ""\n[model]\nworkers = 0\n'
        '[selection]\nprefer = "newest"\n'
    )
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    lines = str(exc.value).splitlines()
    assert sorted(ln.split(": ")[1] for ln in lines) == [
        "model.workers",
        "network.ae_title",
        "network.port",
        "selection.prefer",
    ]
    assert all(ln.startswith(f"{bad}: ") for ln in lines)


def test_demo_checkpoint_name_in_a_config_file(tmp_path: Path, monkeypatch) -> None:
    """`checkpoint = "demo"` (and in [[model.shadow]]) names the packaged demo checkpoint, as
    `--checkpoint demo` does; the node's start-up check used to read it as a folder."""
    from molre.checkpoint import DEMO_NAME, default_checkpoint_path, resolve_checkpoint_dir
    from node.service import NodeService

    assert DEMO_CHECKPOINT == DEMO_NAME
    (tmp_path / "etc").mkdir()
    p = tmp_path / "etc" / "node.toml"
    p.write_text(
        '[model]\ncheckpoint = "demo"\n[[model.shadow]]\nname = "again"\ncheckpoint = "demo"\n'
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(p)
    assert cfg.model.checkpoint == "demo" and cfg.model.shadow[0].checkpoint == "demo"
    assert NodeService(cfg)._check_checkpoint() == "packaged demo checkpoint"
    # what the inference process does with it (node.worker.make_engine -> Predictor)
    assert resolve_checkpoint_dir(cfg.model.shadow[0].checkpoint) == default_checkpoint_path()
    # a folder named demo next to the config file is that folder, like any relative path
    (tmp_path / "etc" / "demo").mkdir()
    cfg = load_config(p)
    assert cfg.model.checkpoint == str((tmp_path / "etc" / "demo").resolve())
    assert cfg.model.shadow[0].checkpoint == cfg.model.checkpoint
    assert NodeService(cfg)._check_checkpoint() == cfg.model.checkpoint
    # and a checkpoint folder that is not there still stops the start
    p.write_text('[model]\ncheckpoint = "nowhere"\n')
    with pytest.raises(ConfigError, match="model.checkpoint: .*nowhere does not exist"):
        NodeService(load_config(p))._check_checkpoint()
