"""`molre-node audit …` on a seeded database: every command, every format parses back."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from common.errors import MolreError
from storage import Database, Spool, Store
from tests.demo_history import ManualClock, seed_demo

runner = CliRunner()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    data = tmp_path_factory.mktemp("node-data")
    db = Database(data / "molre.db")
    db.upgrade()
    # an old history (10 days ago) so prune has something to do
    clock = ManualClock(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10))
    uids = seed_demo(Store(db, clock=clock), clock, Spool(data / "spool"))
    db.dispose()
    return data, uids


def run(*args: str) -> str:
    result = runner.invoke(app, ["audit", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.stdout


def db_args(data: Path) -> list[str]:
    return ["--db", str(data / "molre.db")]


def test_studies_json_csv_table(seeded) -> None:
    data, u = seeded
    rows = json.loads(run("studies", *db_args(data), "--format", "json"))
    assert {r["study_uid"] for r in rows} == set(u.studies.values())
    assert all("patient_name" not in r for r in rows)
    parsed = list(csv.DictReader(io.StringIO(run("studies", *db_args(data), "-f", "csv"))))
    assert [r["study_uid"] for r in parsed] == [r["study_uid"] for r in rows]
    assert {r["accession_number"] for r in parsed} == {"ACC-A", "ACC-B", "ACC-C"}
    table = run("studies", *db_args(data))
    assert all(uid in table for uid in u.studies.values())
    assert table.splitlines()[0].split()[:2] == ["study_uid", "accession_number"]


def test_series_filters(seeded) -> None:
    data, u = seeded
    rows = json.loads(run("series", *db_args(data), "--state", "failed", "-f", "json"))
    assert [r["series_uid"] for r in rows] == [u.series["failed"]]
    assert "slice spacing" in rows[0]["reason"]
    rows = json.loads(run("series", *db_args(data), "--study", u.studies["b"], "-f", "json"))
    assert {r["state"] for r in rows} == {"reported", "receiving"}
    with pytest.raises(MolreError, match="--state"):
        run("series", *db_args(data), "--state", "bogus")


def test_show_timeline_in_time_order(seeded) -> None:
    data, u = seeded
    rows = json.loads(run("show", u.series["delivered"], *db_args(data), "-f", "json"))
    times = [dt.datetime.fromisoformat(r["at"]) for r in rows]
    assert times == sorted(times)
    assert [r["to_state"] for r in rows if r["entity"] == "series"][-1] == "delivered"
    csv_rows = list(
        csv.DictReader(io.StringIO(run("show", u.studies["a"], *db_args(data), "-f", "csv")))
    )
    assert {"at", "entity", "kind", "details"} <= set(csv_rows[0])
    assert any(
        json.loads(r["details"] or "{}").get("reason") == "ImageType LOCALIZER" for r in csv_rows
    )
    with pytest.raises(MolreError, match="9.9.9"):
        run("show", "9.9.9", *db_args(data))


def test_events_across_the_node(seeded) -> None:
    """`audit events` finds what belongs to no study (a refused association) and filters by
    entity, kind and time, newest first."""
    data, u = seeded
    rows = json.loads(run("events", *db_args(data), "--limit", "0", "-f", "json"))
    times = [dt.datetime.fromisoformat(r["at"]) for r in rows]
    assert times == sorted(times, reverse=True)
    assert {"association", "series", "job", "export"} <= {r["entity"] for r in rows}
    refused = json.loads(
        run("events", *db_args(data), "--entity", "association", "--kind", "rejected", "-f", "json")
    )
    assert refused and all(r["kind"] == "rejected" for r in refused)
    assert all(r["details"]["reason"] for r in refused)
    assert all(r["series_uid"] is None for r in refused)
    # --since: the seeded history is 10 days old
    assert json.loads(run("events", *db_args(data), "--since", "1d", "-f", "json")) == []
    assert len(json.loads(run("events", *db_args(data), "--limit", "3", "-f", "json"))) == 3
    table = run("events", *db_args(data), "--entity", "association")
    assert table.splitlines()[0].split()[:3] == ["at", "entity", "entity_id"]


def test_findings_filters(seeded) -> None:
    data, u = seeded
    rows = json.loads(
        run(
            "findings",
            *db_args(data),
            "--finding",
            "subdural_hemorrhage",
            "--min-prob",
            "0.5",
            "-f",
            "json",
        )
    )
    assert [(r["series_uid"], r["probability"], r["decision"]) for r in rows] == [
        (u.series["delivered"], 0.91, True)
    ]
    assert json.loads(run("findings", *db_args(data), "--since", "1d", "-f", "json")) == []
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=11)).date().isoformat()
    rows = list(
        csv.DictReader(io.StringIO(run("findings", *db_args(data), "--since", since, "-f", "csv")))
    )
    assert len(rows) == 5 and {r["decision"] for r in rows} == {"Present", "Absent"}
    table = run("findings", *db_args(data), "--finding", "subdural_hemorrhage")
    assert "Present" in table and "True" not in table
    with pytest.raises(MolreError, match="--since"):
        run("findings", *db_args(data), "--since", "yesterday-ish")


def test_findings_unknown_key_lists_the_valid_ones(seeded) -> None:
    data, _ = seeded
    with pytest.raises(
        MolreError,
        match="'subdural' is not a finding key.*Did you mean "
        ".*subdural_hemorrhage.*Valid keys: .*hydrocephalus",
    ):
        run("findings", *db_args(data), "--finding", "subdural")
    result = runner.invoke(app, ["audit", "findings", "--help"])
    assert result.exit_code == 0 and "molre-node models" not in result.stdout


def test_exports_pending_failed(seeded) -> None:
    data, u = seeded
    all_rows = json.loads(run("exports", *db_args(data), "-f", "json"))
    assert {r["state"] for r in all_rows} == {"delivered", "pending"}
    failed = json.loads(run("exports", *db_args(data), "--failed", "-f", "json"))
    assert [(r["series_uid"], r["last_status"], r["last_error"]) for r in failed] == [
        (u.series["retrying"], "0xA700", "Out of Resources")
    ]
    pending = list(
        csv.DictReader(io.StringIO(run("exports", *db_args(data), "--pending", "-f", "csv")))
    )
    assert [r["destination"] for r in pending] == ["PACS"]


def test_stats_formats(seeded) -> None:
    data, _ = seeded
    payload = json.loads(run("stats", *db_args(data), "-f", "json"))
    assert payload["series"]["delivered"] == 1
    assert payload["latency"]["reported_to_delivered"]["p50_s"] == 3.0
    rows = list(csv.DictReader(io.StringIO(run("stats", *db_args(data), "-f", "csv"))))
    metrics = {r["metric"]: r["value"] for r in rows}
    assert metrics["series.failed"] == "1"
    assert float(metrics["latency.received_to_reported.p90_s"]) > 0
    assert "latency.received_to_delivered.p99_s" in run("stats", *db_args(data))


def test_config_file_selects_database(seeded, tmp_path: Path) -> None:
    data, u = seeded
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{data}"\n')
    rows = json.loads(run("studies", "--config", str(cfg), "-f", "json"))
    assert {r["study_uid"] for r in rows} == set(u.studies.values())
    with pytest.raises(MolreError, match="no audit database"):
        run("studies", "--db", str(tmp_path / "missing.db"))


def test_prune_dry_run_then_real(seeded, tmp_path: Path) -> None:
    data, u = seeded
    # work on a copy so the other tests keep their data
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    with Database(copy / "molre.db").session() as s:
        from sqlalchemy import func

        from storage.models import Instance

        s.execute(
            Instance.__table__.update().values(
                spool_path=func.replace(Instance.spool_path, str(data), str(copy))
            )
        )
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{copy}"\n')
    files_before = sorted(p for p in (copy / "spool").rglob("*.dcm"))
    dry = json.loads(
        run("prune", "--older-than", "5d", "--dry-run", "--config", str(cfg), "-f", "json")
    )
    assert dry["dry_run"] is True
    assert sorted(dry["series"]) == sorted(
        [u.series["delivered"], u.series["skipped"], u.series["failed"]]
    )
    assert sorted(p for p in (copy / "spool").rglob("*.dcm")) == files_before
    out = run("prune", "--older-than", "5d", "--config", str(cfg))
    assert out.startswith("removed") and "3 series" in out
    left = sorted(p for p in (copy / "spool").rglob("*.dcm"))
    assert len(left) == len(files_before) - len(dry["files"]) and left
    assert all(u.series["retrying"] in str(p) or u.series["receiving"] in str(p) for p in left)
    states = {r["state"] for r in json.loads(run("series", "--config", str(cfg), "-f", "json"))}
    assert states == {"reported", "receiving"}
    with pytest.raises(MolreError, match="--older-than"):
        run("prune", "--older-than", "soon", "--config", str(cfg))
    with pytest.raises(MolreError, match="retention_days"):
        run("prune", "--config", str(cfg))
