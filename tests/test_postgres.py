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
    assert (
        mask_url("postgresql://molre:s3cr%40t@db.example:5432/molre")
        == "postgresql://molre:***@db.example:5432/molre"
    )
    assert (
        mask_url("postgresql+psycopg://u:p@h/d?sslmode=require&password=x")
        == "postgresql+psycopg://u:***@h/d?sslmode=require&password=***"
    )
    assert mask_url("sqlite:////var/lib/molre/molre.db") == "sqlite:////var/lib/molre/molre.db"
    assert mask_url("postgresql://u@h/d") == "postgresql://u@h/d"
    assert "hunter2" not in mask_url("postgresql://u:hunter2@[::1]:5/d")


def test_config_check_never_prints_the_password(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[storage]\ndata_dir = "%s"\n'
        'database_url = "postgresql://molre:hunter2@127.0.0.1:1/molre"\n' % (tmp_path / "data")
    )
    result = CliRunner().invoke(app, ["config-check", "-c", str(cfg), "--show"])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    assert "postgresql://molre:***@127.0.0.1:1/molre" in result.output


# -- several nodes on one database (both backends) ------------------------------------------------
import datetime as dt  # noqa: E402

import pytest  # noqa: E402
from sqlalchemy import select  # noqa: E402

from storage import FindingResult, InstanceHeader, InvalidTransition, SeriesState, Store  # noqa: E402
from storage.models import Association, Event, Export, Job  # noqa: E402
from tests.demo_history import ManualClock  # noqa: E402

T0 = dt.datetime(2026, 2, 1, 9, 0, tzinfo=dt.timezone.utc)


@pytest.fixture()
def two_nodes(db_url: str):
    """Stores of nodes 'edge-a' and 'gpu-b' on one migrated database, one clock."""
    db = Database(db_url)
    db.upgrade()
    clock = ManualClock(T0)
    yield Store(db, clock=clock, node="edge-a"), Store(db, clock=clock, node="gpu-b"), clock
    db.dispose()


def _series_to_queue(store: Store, uid: str) -> int:
    store.record_instance(
        None,
        InstanceHeader(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid=uid + ".1",
            study_uid="4.4",
            series_uid=uid,
            modality="CT",
            instance_number=1,
        ),
        spool_path=f"/s/{uid}",
        size=1,
        sha256=None,
        status="stored",
    )
    store.transition(uid, "complete")
    store.transition(uid, "selected")
    return store.enqueue_job(uid)


def _events(store: Store, kind: str) -> list[Event]:
    with store.db.session(write=False) as s:
        return list(s.execute(select(Event).where(Event.kind == kind).order_by(Event.id)).scalars())


def test_recovery_touches_only_this_nodes_work(two_nodes) -> None:
    a, b, _ = two_nodes
    _series_to_queue(a, "4.1")
    _series_to_queue(a, "4.2")
    job_b = b.claim_job("gpu-b:w0")  # gpu-b is inferring 4.1
    assoc_a = a.begin_association("CT1", "MOLRE", "127.0.0.1", 1)  # edge-a is receiving
    job_a = a.claim_job("edge-a:w0")
    # edge-a restarts: its own job and association are recovered, gpu-b's are not
    counts = a.recover_on_start()
    assert (counts["jobs_requeued"], counts["associations_aborted"]) == (1, 1)
    with a.db.session(write=False) as s:
        states = {j.id: (j.state, j.node) for j in s.execute(select(Job)).scalars()}
        assert s.get(Association, assoc_a).outcome == "aborted"
    assert states[job_b.id] == ("running", "gpu-b")
    assert states[job_a.id][0] == "queued"
    assert b.get_series(job_b.series_uid).state is SeriesState.INFERRING
    # gpu-b finishes normally: nothing of its result was thrown away
    assert b.finish_job(
        job_b.id,
        results=[FindingResult("k", 0.9, True)],
        checkpoint_hash="h",
        model_name="m",
        report_path=None,
        report_sop_uid="9.1",
        destinations=["PACS"],
    )
    # gpu-b's association is not closed by edge-a starting
    assoc_b = b.begin_association("CT2", "MOLRE", "127.0.0.1", 2)
    a.recover_on_start()
    with a.db.session(write=False) as s:
        assert s.get(Association, assoc_b).outcome == "open"
        assert s.get(Association, assoc_b).node == "gpu-b"


def test_export_claims_are_exclusive_leased_and_audited(two_nodes) -> None:
    a, b, clock = two_nodes
    for uid in ("4.5", "4.6", "4.7"):
        _series_to_queue(a, uid)
        claim = a.claim_job("edge-a:w0")
        a.finish_job(
            claim.id,
            results=[],
            checkpoint_hash="h",
            model_name="m",
            report_path="/r.dcm",
            report_sop_uid="9." + uid,
            destinations=["PACS"],
        )
    got_a = a.claim_exports(lease_s=60, limit=2)
    got_b = b.claim_exports(lease_s=60, limit=10)
    assert len(got_a) == 2 and len(got_b) == 1
    assert not {e.id for e in got_a} & {e.id for e in got_b}
    assert a.claim_exports() == [] == b.claim_exports()  # all held
    assert a.due_exports() == []
    b.record_export_attempt(got_b[0].id, ok=True, status=0)
    # edge-a's dispatcher dies mid-send; after the lease gpu-b takes its exports over
    clock.advance(61)
    taken = b.claim_exports(lease_s=60)
    assert {e.id for e in taken} == {e.id for e in got_a}
    reclaimed = _events(b, "reclaimed")
    assert {(e.details["previous_node"], e.details["node"]) for e in reclaimed} == {
        ("edge-a", "gpu-b")
    }
    for e in taken:
        b.record_export_attempt(e.id, ok=True, status=0)
    # edge-a's late send is recorded, not dropped silently
    a.record_export_attempt(got_a[0].id, ok=True, status=0)
    late = _events(a, "late_attempt")
    assert len(late) == 1 and late[0].details["node"] == "edge-a"
    with a.db.session(write=False) as s:
        rows = s.execute(select(Export)).scalars().all()
        assert {(x.state, x.attempts, x.claimed_by) for x in rows} == {("delivered", 1, None)}
    assert [a.get_series(u).state for u in ("4.5", "4.6", "4.7")] == [SeriesState.DELIVERED] * 3


def test_release_does_not_burn_an_attempt_and_retry_requeues_failed(two_nodes) -> None:
    a, b, _ = two_nodes
    _series_to_queue(a, "4.8")
    claim = b.claim_job("gpu-b:w0")
    assert b.release_job(
        claim.id, "gpu-b:w0", "instance files not visible from node gpu-b", delay_s=0
    )
    assert b.get_series("4.8").state is SeriesState.QUEUED
    assert not b.release_job(claim.id, "gpu-b:w0", "again")  # no longer this worker's
    again = a.claim_job("edge-a:w0")
    assert (again.id, again.attempts) == (claim.id, 1)
    rel = _events(a, "released")
    assert rel[0].details["node"] == "gpu-b" and "not visible" in rel[0].details["reason"]
    assert not a.fail_job(again.id, "model crashed", max_attempts=1, retry_delay_s=0)
    assert a.get_series("4.8").state is SeriesState.FAILED
    job_id = a.retry_series("4.8")
    rec = a.get_series("4.8")
    assert (rec.state, rec.reason) == (SeriesState.QUEUED, None)
    assert b.claim_job("gpu-b:w0").id == job_id
    with pytest.raises(InvalidTransition, match="not failed"):
        a.retry_series("4.8")


def test_exclusive_has_one_holder_across_nodes(two_nodes) -> None:
    a, b, _ = two_nodes
    with a.exclusive("assembler") as mine_a:
        assert mine_a
        with b.exclusive("assembler") as mine_b:
            # PostgreSQL: one holder across nodes; SQLite (one node per database): always
            assert mine_b is (a.db.dialect != "postgresql")
        with b.exclusive("other") as other:
            assert other
    with b.exclusive("assembler") as mine_b:
        assert mine_b


def test_audit_retry_requeues_a_failed_series(db_url: str) -> None:
    db = Database(db_url)
    db.upgrade()
    store = Store(db, node="edge-a")
    _series_to_queue(store, "4.9")
    claim = store.claim_job("edge-a:w0")
    store.fail_job(claim.id, "series not readable: x", max_attempts=1, retry_delay_s=0)
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "retry", "4.9", "--db", db_url])
    assert ok.exit_code == 0, ok.output
    assert "queued again as job" in ok.output
    assert store.get_series("4.9").state is SeriesState.QUEUED
    again = runner.invoke(app, ["audit", "retry", "4.9", "--db", db_url])
    assert again.exit_code != 0 and "not failed" in str(again.exception or again.output)
    unknown = runner.invoke(app, ["audit", "retry", "9.9.9", "--db", db_url])
    assert unknown.exit_code != 0
    db.dispose()
