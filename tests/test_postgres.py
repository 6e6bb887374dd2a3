"""PostgreSQL specifics and multi-node storage semantics (tests/pgcluster.py starts the server).

Storage, concurrency and migration tests run on both backends through their own fixtures; this
file holds what only matters once several nodes share one database.
"""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.main import app
from storage.db import Database, mask_url


def test_mask_url_hides_passwords() -> None:
    assert mask_url("postgresql://molre:s3cr%40t@db.example:5432/molre") == \
        "postgresql://molre:***@db.example:5432/molre"
    assert mask_url("postgresql+psycopg://u:p@h/d?sslmode=require&password=x") == \
        "postgresql+psycopg://u:***@h/d?sslmode=require&password=***"
    assert mask_url("sqlite:////var/lib/molre/molre.db") == "sqlite:////var/lib/molre/molre.db"
    assert mask_url("postgresql://u@h/d") == "postgresql://u@h/d"
    assert "hunter2" not in mask_url("postgresql://u:hunter2@[::1]:5/d")


def test_config_check_never_prints_the_password(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[storage]\ndata_dir = "%s"\n'
                   'database_url = "postgresql://molre:hunter2@127.0.0.1:1/molre"\n'
                   % (tmp_path / "data"))
    result = CliRunner().invoke(app, ["config-check", "-c", str(cfg), "--show"])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    assert "postgresql://molre:***@127.0.0.1:1/molre" in result.output
