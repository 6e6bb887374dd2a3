"""Node configuration: defaults, the example file, and messages that name the bad key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from common.errors import ConfigError
from node.config import NodeConfig, config_from_dict, iter_keys, load_config, with_overrides

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.toml"


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


def test_every_dataclass_field_is_a_key() -> None:
    keys = set(iter_keys())
    for f in dataclasses.fields(NodeConfig):
        if f.metadata.get("internal"):
            continue
        assert any(k == f.name or k.startswith(f.name + ".") or k.startswith(f.name + "[]")
                   for k in keys), f.name


@pytest.mark.parametrize("data, message", [
    ({"network": {"port": "abc"}}, 'network.port: expected integer 1..65535, got "abc"'),
    ({"network": {"port": 70000}}, "network.port: expected integer 0..65535, got 70000"),
    ({"network": {"prot": 1}}, "network.prot: unknown key"),
    ({"nework": {}}, "nework: unknown key"),
    ({"network": {"ae_title": "WAY-TOO-LONG-AE-TITLE"}}, "network.ae_title"),
    ({"network": {"allowed_callers": [{"ae_title": "PACS", "host": "10.0.0.300"}]}},
     "network.allowed_callers[0].host"),
    ({"network": {"allowed_callers": [{"ae": "PACS"}]}}, "network.allowed_callers[0].ae: unknown"),
    ({"assembler": {"quiet_time_s": -1}}, "assembler.quiet_time_s"),
    ({"assembler": {"quiet_time_s": "10"}}, "assembler.quiet_time_s: expected number"),
    ({"selection": {"prefer": "newest"}}, "selection.prefer"),
    ({"selection": {"head_patterns": ["(unclosed"]}}, "selection.head_patterns[0]"),
    ({"selection": {"min_slices": 0}}, "selection.min_slices"),
    ({"model": {"device": "gpu"}}, "model.device"),
    ({"model": {"isolation": "fork"}}, "model.isolation"),
    ({"storage": {"min_free_disk": "lots"}}, "storage.min_free_disk"),
    ({"storage": {"min_free_disk": "150%"}}, "storage.min_free_disk"),
    ({"tls": {"enabled": True}}, "tls.certificate: required"),
    ({"destinations": [{"name": "a", "ae_title": "A", "port": 104},
                       {"name": "a", "ae_title": "B", "port": 105}]}, "destinations[1].name"),
    ({"destinations": [{"name": "a", "ae_title": "A", "port": 0}]}, "destinations[0].port"),
    ({"audit": {"store_phi": "yes"}}, "audit.store_phi: expected boolean"),
    ({"retry": {"export_backoff_base_s": 100, "export_backoff_max_s": 10}},
     "retry.export_backoff_base_s"),
])
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    assert message in str(exc.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[network]\nport = \"abc\"\n")
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
    p.write_text('[storage]\ndata_dir = "data"\ndatabase_url = ""\n'
                 '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nport = 104\n')
    cfg = load_config(p)
    assert cfg.data_dir == (tmp_path / "sub" / "data").resolve()
    assert cfg.destination("pacs").ae_title == "PACS" and cfg.destination("x") is None
