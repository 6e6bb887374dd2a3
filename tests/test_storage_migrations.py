"""Alembic migrations: the packaged revisions build the models' schema and upgrade old data."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from common.errors import MolreError
from storage import Database, FindingResult, SeriesState, Store
from storage.migrate import MIGRATIONS_DIR, head_revision
from storage.models import Base

ROOT = Path(__file__).resolve().parents[1]


def test_head_schema_matches_models(tmp_path: Path) -> None:
    db = Database(tmp_path / "a.db")
    db.upgrade()
    assert db.current_revision() == head_revision() == "0006"
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    db.upgrade()  # idempotent
    assert db.current_revision() == "0006"


def test_revision_0001_database_upgrades_with_rows_intact(tmp_path: Path) -> None:
    db = Database(tmp_path / "old.db")
    db.upgrade("0001")
    assert db.current_revision() == "0001"
    cols = {c["name"] for c in inspect(db.engine).get_columns("series")}
    assert "priority" not in cols
    t = "2026-01-01 10:00:00"
    with db.session() as s:  # rows as a 0001-era node wrote them
        s.execute(
            text(
                "INSERT INTO studies (study_uid, accession_number, created_at) "
                "VALUES ('1.1', 'A1', :t)"
            ),
            {"t": t},
        )
        s.execute(
            text(
                "INSERT INTO series (series_uid, study_uid, state, version, instance_count, "
                "first_instance_at, last_instance_at, created_at, updated_at, reported_at) "
                "VALUES ('1.1.1', '1.1', 'reported', 1, 3, :t, :t, :t, :t, :t)"
            ),
            {"t": t},
        )
        s.execute(
            text(
                "INSERT INTO jobs (series_uid, version, state, attempts, enqueued_at) "
                "VALUES ('1.1.1', 1, 'done', 1, :t)"
            ),
            {"t": t},
        )
        s.execute(
            text(
                "INSERT INTO exports (series_uid, series_version, job_id, destination, state, "
                "attempts, next_attempt_at, created_at) "
                "VALUES ('1.1.1', 1, 1, 'PACS', 'pending', 0, :t, :t)"
            ),
            {"t": t},
        )
        s.execute(
            text(
                "INSERT INTO events (at, entity, entity_id, kind, to_state, series_uid) "
                "VALUES (:t, 'series', '1.1.1', 'transition', 'reported', '1.1.1')"
            ),
            {"t": t},
        )
    db.dispose()

    db = Database(tmp_path / "old.db")
    db.upgrade()
    assert db.current_revision() == "0006"
    store = Store(db)
    rec = store.get_series("1.1.1")
    assert (rec.state, rec.instance_count, rec.priority, rec.accession_number) == (
        SeriesState.REPORTED,
        3,
        0,
        "A1",
    )
    assert rec.reported_at == dt.datetime(2026, 1, 1, 10, tzinfo=dt.timezone.utc)
    due = store.due_exports()
    assert [(e.destination, e.report_sop_uid) for e in due] == [("PACS", None)]
    store.record_export_attempt(due[0].id, ok=True, status=0)
    assert store.get_series("1.1.1").state is SeriesState.DELIVERED
    assert [e["kind"] for e in store.timeline("1.1.1")] == ["transition", "delivered", "transition"]
    idx = {i["name"] for i in inspect(db.engine).get_indexes("exports")}
    assert "ix_exports_due" in idx


def test_downgrade_to_0001_and_back(tmp_path: Path) -> None:
    from alembic import command

    from storage.migrate import alembic_config

    db = Database(tmp_path / "d.db")
    db.upgrade()
    cfg = alembic_config(db)
    with db.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    assert db.current_revision() == "0001"
    assert "report_sop_uid" not in {c["name"] for c in inspect(db.engine).get_columns("exports")}
    db.upgrade()
    assert db.current_revision() == "0006"


def test_unknown_revision_is_a_clear_error(tmp_path: Path) -> None:
    db = Database(tmp_path / "f.db")
    db.upgrade()
    with db.session() as s:
        s.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(MolreError, match="0099"):
        db.upgrade()


def test_concurrent_first_upgrade_from_processes(db_url: str) -> None:
    """Three processes migrate one empty database at once (SQLite: BEGIN IMMEDIATE;
    PostgreSQL: advisory lock) -- all succeed, the schema is at head once."""
    url = db_url
    code = "import sys; from storage import Database; Database(sys.argv[1]).upgrade(); print('ok')"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, url],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    db = Database(url)
    assert db.current_revision() == "0006"
    db.dispose()


def test_migrations_ship_in_package_data() -> None:
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["storage"]
    assert "migrations/*" in patterns and "migrations/**/*" in patterns
    assert {p.name for p in (MIGRATIONS_DIR / "versions").glob("*.py")} >= {
        "0001_initial.py",
        "0002_priority_report_uid.py",
        "0003_instance_sop_series_index.py",
        "0004_patient_key.py",
        "0005_node_ownership.py",
    }
    assert (MIGRATIONS_DIR / "env.py").is_file()


def test_sqlite_pragmas_and_bare_path(tmp_path: Path) -> None:
    db = Database(tmp_path / "sub" / "p.db")  # bare path, parent created
    assert db.url.startswith("sqlite:///")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 30000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_postgres_sql_compiles() -> None:
    """The SQL the PG dialect runs (the PostgreSQL variants of the storage tests run it)."""
    from sqlalchemy.dialects import postgresql, sqlite

    from storage.store import claim_statement

    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    pg = str(claim_statement(now).compile(dialect=postgresql.dialect()))
    assert "FOR UPDATE OF jobs SKIP LOCKED" in pg
    assert "ORDER BY series.priority DESC, jobs.id" in pg
    lite = str(claim_statement(now).compile(dialect=sqlite.dialect()))
    assert "FOR UPDATE" not in lite
    ins = (
        postgresql.insert(Base.metadata.tables["studies"])
        .values(study_uid="1")
        .on_conflict_do_nothing()
    )
    assert "ON CONFLICT DO NOTHING" in str(ins.compile(dialect=postgresql.dialect()))
    from sqlalchemy.schema import CreateTable

    ddl = str(CreateTable(Base.metadata.tables["events"]).compile(dialect=postgresql.dialect()))
    assert "details JSON" in ddl and "at TIMESTAMP WITHOUT TIME ZONE" in ddl


def test_postgres_url_mapping_and_missing_driver() -> None:
    from storage.db import normalise_url

    assert normalise_url("postgresql://u:p@h/db").startswith("postgresql+psycopg://u:p@h/db")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        with pytest.raises(MolreError, match="postgres"):
            Database("postgresql://u@127.0.0.1:1/db")
    with pytest.raises(MolreError, match="unsupported"):
        Database("mysql://u@h/db")


def test_finding_result_roundtrip_types(tmp_path: Path) -> None:
    import numpy as np

    db = Database(tmp_path / "n.db")
    db.upgrade()
    store = Store(db)
    from storage import InstanceHeader

    store.record_instance(
        None,
        InstanceHeader(
            sop_instance_uid="1",
            study_uid="2",
            series_uid="3",
            meta={"SliceThickness": np.float32(5.0)},
        ),
        spool_path=None,
        size=1,
        sha256=None,
        status="stored",
    )
    for st in ("complete", "selected"):
        store.transition("3", st)
    store.enqueue_job("3")
    c = store.claim_job("w")
    store.finish_job(
        c.id,
        results=[FindingResult("k", np.float32(0.25), np.bool_(False))],
        checkpoint_hash="h",
        model_name="m",
        report_path=Path("/r.dcm"),
        report_sop_uid="4",
        destinations=["D"],
    )
    f = store.findings()[0]
    assert f["probability"] == 0.25 and f["decision"] is False
    assert store.due_exports()[0].report_path == "/r.dcm"
    assert store.series_instances("3")[0].meta == {"SliceThickness": 5.0}


def test_postgres_offline_migration_sql() -> None:
    """The migrations render valid-looking PostgreSQL DDL (Alembic offline mode, no server)."""
    import io

    from alembic import command
    from alembic.config import Config

    buf = io.StringIO()
    cfg = Config(output_buffer=buf)
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", "postgresql://u@h/db")
    command.upgrade(cfg, "head", sql=True)
    sql = buf.getvalue()
    assert "id SERIAL NOT NULL" in sql
    assert "ALTER TABLE series ADD COLUMN priority INTEGER DEFAULT '0' NOT NULL" in sql
    assert "CREATE INDEX ix_exports_due ON exports (state, next_attempt_at)" in sql
    assert "UPDATE alembic_version SET version_num='0004'" in sql
    assert "ALTER TABLE exports ADD COLUMN lease_expires_at TIMESTAMP WITHOUT TIME ZONE" in sql
    assert "UPDATE alembic_version SET version_num='0005'" in sql
