"""storage: spool atomicity, state machine + events, queue semantics, audit queries, prune."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from storage import (
    ALLOWED_TRANSITIONS,
    Database,
    FindingResult,
    InstanceHeader,
    InvalidTransition,
    SeriesState,
    Spool,
    Store,
)
from storage.models import Association, Event, Instance, Study
from tests.demo_history import ManualClock, seed_demo

T0 = dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.timezone.utc)


@pytest.fixture()
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request) -> str:
    """Every database test runs on SQLite and on a real PostgreSQL server (tests/pgcluster.py)."""
    return request.param


@pytest.fixture(scope="module")
def template_db(tmp_path_factory, backend: str, request):
    """Migrate once per module, copy per test: Alembic on every test would dominate run time.

    SQLite: a file copied per test; PostgreSQL: a database used as ``CREATE DATABASE … TEMPLATE``.
    """
    if backend == "postgresql":
        server = request.getfixturevalue("pg_server")
        url = server.create_database()
        database = Database(url)
        database.upgrade()
        database.dispose()  # a template must have no open connection
        yield server, url
        server.drop_database(url)
        return
    path = tmp_path_factory.mktemp("template") / "audit.db"
    database = Database(f"sqlite:///{path}")
    database.upgrade()
    database.dispose()  # last connection closed: WAL checkpointed into the main file
    yield None, path


def _copy_db(template, tmp_path: Path, name: str = "audit.db") -> tuple[Database, object]:
    """A new Database with the template's content; returns it and what to drop afterwards."""
    server, src = template
    if server is None:
        shutil.copyfile(src, tmp_path / name)
        return Database(f"sqlite:///{tmp_path / name}"), None
    url = server.create_database(template=make_url(src).database)
    return Database(url), (server, url)


def _drop(database: Database, handle) -> None:
    database.dispose()
    if handle is not None:
        server, url = handle
        server.drop_database(url)


@pytest.fixture()
def db(tmp_path: Path, template_db) -> Database:
    database, handle = _copy_db(template_db, tmp_path)
    assert database.current_revision() == "0006"
    yield database
    _drop(database, handle)


@pytest.fixture()
def store(db: Database, clock: ManualClock) -> Store:
    return Store(db, clock=clock)


def header(
    series: str = "1.2.3.1", sop: str = "1.2.3.1.1", study: str = "1.2.3", n: int = 1, **kw
) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=sop,
        study_uid=study,
        series_uid=series,
        modality="CT",
        transfer_syntax="1.2.840.10008.1.2.1",
        accession_number="ACC1",
        instance_number=n,
        meta={"SeriesDescription": "HEAD"},
        phi={"PatientName": "Doe^Jane", "PatientID": "P123", "PatientBirthDate": "19600101"},
        **kw,
    )


def receive(
    store: Store,
    series: str = "1.2.3.1",
    n: int = 2,
    assoc: int | None = None,
    study: str = "1.2.3",
) -> None:
    for i in range(1, n + 1):
        store.record_instance(
            assoc,
            header(series, f"{series}.{i}", study, i),
            spool_path=f"/spool/{series}.{i}",
            size=10,
            sha256=f"{i:064x}",
            status="stored",
        )


def events(db: Database, entity: str | None = None) -> list[Event]:
    with db.session(write=False) as s:
        q = select(Event).order_by(Event.id)
        if entity:
            q = q.where(Event.entity == entity)
        return list(s.execute(q).scalars())


def to_reported(
    store: Store, clock: ManualClock, series: str = "1.2.3.1", destinations=("PACS",)
) -> int:
    store.transition(series, "complete")
    store.transition(series, "selected")
    store.enqueue_job(series)
    claim = store.claim_job("w")
    clock.advance(5)
    store.finish_job(
        claim.id,
        results=[FindingResult("subdural_hemorrhage", 0.8, True)],
        checkpoint_hash="abc",
        model_name="m",
        report_path=None,
        report_sop_uid="9.9",
        destinations=list(destinations),
    )
    return claim.id


# -- spool ------------------------------------------------------------------------------------
def test_spool_write_atomic_and_no_temp_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    p = spool.write_atomic("a/b/c.dcm", b"x" * 1000)
    assert p == spool.root / "a/b/c.dcm" and p.read_bytes() == b"x" * 1000
    p2 = spool.write_atomic("a/b/c.dcm", b"new")  # replace in place
    assert p2.read_bytes() == b"new"
    assert [f.name for f in (spool.root / "a/b").iterdir()] == ["c.dcm"]
    for bad in ("../escape.dcm", "/abs.dcm", "a/../../x", ""):
        with pytest.raises(ValueError):
            spool.path(bad)


def test_spool_partial_write_never_visible(tmp_path: Path, monkeypatch) -> None:
    spool = Spool(tmp_path / "spool")
    seen = []
    real_fsync = os.fsync

    def fsync_then_crash(fd):
        # at fsync time the data is only in the temp file; the final name must not exist yet
        seen.append((spool.root / "s/x.dcm").exists())
        real_fsync(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync_then_crash)
    with pytest.raises(OSError):
        spool.write_atomic("s/x.dcm", b"data")
    monkeypatch.undo()
    assert seen == [False]
    assert not (spool.root / "s/x.dcm").exists()
    assert list((spool.root / "s").iterdir()) == []  # temp file cleaned up on failure


def test_spool_clean_temp_and_remove(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (spool.root / "d").mkdir()
    (spool.root / "d" / ".tmp-crashed.part").write_bytes(b"half")
    kept = spool.write_atomic("d/keep.dcm", b"ok")
    assert spool.clean_temp() == 1
    assert [f.name for f in (spool.root / "d").iterdir()] == ["keep.dcm"]
    assert spool.remove(kept) is True and not (spool.root / "d").exists()  # empty dir pruned
    assert spool.remove("d/keep.dcm") is False
    with pytest.raises(ValueError):
        spool.remove(tmp_path / "outside.dcm")
    assert spool.free_bytes() > 0


# -- state machine ------------------------------------------------------------------------------
def test_every_transition_writes_an_event(store: Store, db: Database, clock) -> None:
    receive(store)
    path = ["complete", "selected", "queued", "inferring", "reported", "delivered"]
    before = len(events(db, "series"))
    for state in path:
        clock.advance(1)
        store.transition("1.2.3.1", state, details={"by": "test"})
        assert store.get_series("1.2.3.1").state is SeriesState(state)
    evs = events(db, "series")[before:]
    assert [(e.from_state, e.to_state) for e in evs] == list(zip(["receiving"] + path[:-1], path))
    assert all(e.details["by"] == "test" and e.series_uid == "1.2.3.1" for e in evs)
    rec = store.get_series("1.2.3.1")
    assert rec.completed_at and rec.reported_at and rec.delivered_at
    assert rec.reported_at - rec.completed_at == dt.timedelta(seconds=4)


@pytest.mark.parametrize("start", list(SeriesState))
def test_illegal_transitions_raise_and_write_nothing(db: Database, clock, start) -> None:
    store = Store(db, clock=clock)
    receive(store)
    # walk to `start` along legal moves
    route = {
        "receiving": [],
        "complete": ["complete"],
        "selected": ["complete", "selected"],
        "skipped": ["complete", "skipped"],
        "queued": ["complete", "selected", "queued"],
        "inferring": ["complete", "selected", "queued", "inferring"],
        "reported": ["complete", "selected", "queued", "inferring", "reported"],
        "delivered": ["complete", "selected", "queued", "inferring", "reported", "delivered"],
        "failed": ["complete", "failed"],
    }[start.value]
    for st in route:
        store.transition("1.2.3.1", st, reason="r" if st in ("skipped", "failed") else None)
    n_events = len(events(db))
    illegal = [s for s in SeriesState if s not in ALLOWED_TRANSITIONS[start]]
    assert illegal
    for target in illegal:
        with pytest.raises(InvalidTransition):
            store.transition("1.2.3.1", target)
    assert store.get_series("1.2.3.1").state is start
    assert len(events(db)) == n_events


def test_skip_and_fail_keep_reason(store: Store) -> None:
    receive(store)
    store.transition("1.2.3.1", "complete")
    store.transition("1.2.3.1", "skipped", reason="SliceThickness 10 > 5")
    rec = store.get_series("1.2.3.1")
    assert rec.state is SeriesState.SKIPPED and rec.reason == "SliceThickness 10 > 5"


# -- instances, studies, PHI ----------------------------------------------------------------------
def test_record_instance_counts_and_no_phi_by_default(store: Store, db: Database) -> None:
    a = store.begin_association("SCU", "MOLRE", "127.0.0.1", 4242)
    receive(store, n=3, assoc=a)
    store.record_instance(
        a,
        header(sop="1.2.3.1.1"),
        spool_path=None,
        size=10,
        sha256="1".zfill(64),
        status="duplicate",
    )
    store.record_instance(
        a,
        InstanceHeader(sop_instance_uid="9.9"),
        spool_path=None,
        size=5,
        sha256=None,
        status="ignored",
        reason="not CT",
    )
    store.record_instance(
        a,
        header(sop="1.2.3.1.2"),
        spool_path="/spool/other",
        size=10,
        sha256="f" * 64,
        status="conflict",
        reason="same UID other content",
    )
    store.end_association(a, "released")
    rec = store.get_series("1.2.3.1")
    assert rec.instance_count == 3 and rec.accession_number == "ACC1"
    assert [i.sop_instance_uid for i in store.series_instances("1.2.3.1")] == [
        "1.2.3.1.1",
        "1.2.3.1.2",
        "1.2.3.1.3",
    ]
    assert store.find_instance("1.2.3.1.2").spool_path == "/spool/1.2.3.1.2"
    assert store.find_instance("nope") is None
    with db.session(write=False) as s:
        study = s.execute(select(Study)).scalar_one()
        assoc = store.stats()["associations"]
        from storage.models import Association

        row = s.get(Association, a)
        assert (row.n_stored, row.n_duplicate, row.n_ignored, row.n_failed) == (3, 1, 1, 1)
        assert row.outcome == "released" and row.ended_at is not None
    assert study.patient_name is None and study.patient_id is None
    assert study.patient_birth_date is None
    assert assoc == {"released": 1}
    kinds = [e.kind for e in events(db, "instance")]
    assert kinds == ["duplicate", "ignored", "conflict"]


def test_store_phi_keeps_patient_columns(db: Database, clock) -> None:
    Store(db, store_phi=True, clock=clock).record_instance(
        None, header(), spool_path=None, size=1, sha256=None, status="stored"
    )
    with db.session(write=False) as s:
        study = s.execute(select(Study)).scalar_one()
    assert (study.patient_name, study.patient_id, study.patient_birth_date) == (
        "Doe^Jane",
        "P123",
        "19600101",
    )


def test_late_instance_reopens_as_new_version(store: Store, db: Database, clock) -> None:
    receive(store, n=2)
    to_reported(store, clock)
    assert store.get_series("1.2.3.1").version == 1
    clock.advance(10)
    store.record_instance(
        None,
        header(sop="1.2.3.1.3", n=3),
        spool_path="/s/3",
        size=1,
        sha256="3" * 64,
        status="stored",
    )
    rec = store.get_series("1.2.3.1")
    assert rec.state is SeriesState.RECEIVING and rec.version == 2 and rec.instance_count == 3
    assert rec.reported_at is None
    reopened = [e for e in events(db, "series") if e.kind == "reopened"]
    assert len(reopened) == 1 and reopened[0].from_state == "reported"
    assert reopened[0].details["version"] == 2
    # the old version's export keeps going but delivering it does not mark v2 delivered
    exp = store.due_exports()[0]
    assert exp.version == 1
    store.record_export_attempt(exp.id, ok=True, status=0)
    assert store.get_series("1.2.3.1").state is SeriesState.RECEIVING


def test_reopen_supersedes_running_job(store: Store, clock) -> None:
    receive(store)
    store.transition("1.2.3.1", "complete")
    store.transition("1.2.3.1", "selected")
    store.enqueue_job("1.2.3.1")
    claim = store.claim_job("w")
    store.record_instance(
        None, header(sop="late", n=9), spool_path=None, size=1, sha256=None, status="stored"
    )
    ok = store.finish_job(
        claim.id,
        results=[FindingResult("k", 0.1, False)],
        checkpoint_hash="h",
        model_name="m",
        report_path=None,
        report_sop_uid=None,
        destinations=["PACS"],
    )
    assert ok is False
    assert store.get_series("1.2.3.1").state is SeriesState.RECEIVING
    assert store.due_exports() == []
    assert store.claim_job("w2") is None


# -- completion ---------------------------------------------------------------------------------
def test_series_due_for_completion_quiet_and_release(store: Store, clock) -> None:
    a1 = store.begin_association("A", "MOLRE", "h", 1)
    receive(store, series="s.released", assoc=a1)
    a2 = store.begin_association("A", "MOLRE", "h", 2)
    receive(store, series="s.aborted", assoc=a2)
    a3 = store.begin_association("A", "MOLRE", "h", 3)
    receive(store, series="s.open", assoc=a3)
    store.end_association(a1, "released")
    store.end_association(a2, "aborted")
    now = clock.advance(3)
    assert store.series_due_for_completion(quiet_s=60, release_grace_s=5, now=now) == []
    now = clock.advance(3)  # released 6 s ago > grace 5 s
    assert store.series_due_for_completion(quiet_s=60, release_grace_s=5, now=now) == ["s.released"]
    now = clock.advance(60)
    assert sorted(store.series_due_for_completion(quiet_s=60, release_grace_s=5, now=now)) == [
        "s.aborted",
        "s.open",
        "s.released",
    ]
    store.transition("s.open", "complete")
    assert "s.open" not in store.series_due_for_completion(60, 5, now=now)


def test_release_of_one_of_two_associations_is_not_enough(store: Store, clock) -> None:
    a1 = store.begin_association("A", "MOLRE", "h", 1)
    a2 = store.begin_association("A", "MOLRE", "h", 2)
    store.record_instance(
        a1, header(sop="x1"), spool_path=None, size=1, sha256=None, status="stored"
    )
    store.record_instance(
        a2, header(sop="x2", n=2), spool_path=None, size=1, sha256=None, status="stored"
    )
    store.end_association(a1, "released")
    assert store.series_due_for_completion(600, 0, now=clock.advance(1)) == []
    store.end_association(a2, "released")
    assert store.series_due_for_completion(600, 0, now=clock.advance(1)) == ["1.2.3.1"]


# -- jobs -------------------------------------------------------------------------------------
def _queue(store: Store, n: int) -> list[str]:
    uids = [f"9.{i}" for i in range(n)]
    for uid in uids:
        receive(store, series=uid, n=1)
        store.transition(uid, "complete")
        store.transition(uid, "selected")
        store.enqueue_job(uid)
    return uids


def test_enqueue_is_idempotent_and_claim_moves_series(store: Store, db: Database) -> None:
    _queue(store, 1)
    assert store.enqueue_job("9.0") == store.enqueue_job("9.0")
    claim = store.claim_job("w1", lease_s=30)
    assert claim.series_uid == "9.0" and claim.attempts == 1 and claim.version == 1
    assert claim.study_uid == "1.2.3"
    assert store.get_series("9.0").state is SeriesState.INFERRING
    assert store.claim_job("w2") is None  # lease still valid


def test_priority_orders_claims(store: Store, db: Database) -> None:
    _queue(store, 3)
    from storage.models import Series

    with db.session() as s:
        s.execute(Series.__table__.update().where(Series.series_uid == "9.2").values(priority=5))
    assert store.claim_job("w").series_uid == "9.2"
    assert store.claim_job("w").series_uid == "9.0"


def test_expired_lease_is_reclaimed(store: Store, clock, db: Database) -> None:
    _queue(store, 1)
    first = store.claim_job("w1", lease_s=60)
    clock.advance(30)
    assert store.claim_job("w2", lease_s=60) is None
    clock.advance(31)
    second = store.claim_job("w2", lease_s=60)
    assert second.id == first.id and second.attempts == 2
    assert store.get_series("9.0").state is SeriesState.INFERRING
    assert [e.kind for e in events(db, "job")][-2:] == ["claimed", "reclaimed"]


def test_expired_lease_past_max_attempts_fails_series(store: Store, clock) -> None:
    _queue(store, 1)
    store.claim_job("w1", lease_s=1)
    clock.advance(2)
    assert store.claim_job("w2", lease_s=1, max_attempts=1) is None
    rec = store.get_series("9.0")
    assert rec.state is SeriesState.FAILED and "lease expired" in rec.reason


def test_fail_job_retries_then_fails(store: Store, clock, db: Database) -> None:
    _queue(store, 1)
    outcomes = []
    for attempt in range(1, 4):
        claim = store.claim_job("w")
        assert claim is not None and claim.attempts == attempt
        outcomes.append(
            store.fail_job(claim.id, f"boom {attempt}", max_attempts=3, retry_delay_s=10)
        )
        if outcomes[-1]:
            assert store.get_series("9.0").state is SeriesState.QUEUED
            assert store.claim_job("w") is None  # retry delay not over
            clock.advance(11)
    assert outcomes == [True, True, False]
    rec = store.get_series("9.0")
    assert rec.state is SeriesState.FAILED and rec.reason == "boom 3"
    assert store.claim_job("w") is None
    kinds = [e.kind for e in events(db, "job")]
    assert kinds.count("retry") == 2 and kinds[-1] == "failed"


def test_finish_job_creates_exports_and_delivery(store: Store, clock, db: Database) -> None:
    receive(store)
    to_reported(store, clock, destinations=("PACS", "ARCHIVE"))
    assert store.get_series("1.2.3.1").state is SeriesState.REPORTED
    due = store.due_exports()
    assert sorted(e.destination for e in due) == ["ARCHIVE", "PACS"]
    assert all(e.report_sop_uid == "9.9" for e in due)
    pacs = next(e for e in due if e.destination == "PACS")
    arch = next(e for e in due if e.destination == "ARCHIVE")
    retry_at = clock.t + dt.timedelta(seconds=120)
    store.record_export_attempt(
        pacs.id, ok=False, status=0xA700, error="Out of Resources", next_attempt_at=retry_at
    )
    store.record_export_attempt(arch.id, ok=True, status=0)
    assert [e.id for e in store.due_exports()] == []
    assert store.get_series("1.2.3.1").state is SeriesState.REPORTED  # not all delivered
    assert [e.id for e in store.due_exports(now=retry_at)] == [pacs.id]
    clock.t = retry_at
    store.record_export_attempt(pacs.id, ok=True, status=0)
    rec = store.get_series("1.2.3.1")
    assert rec.state is SeriesState.DELIVERED and rec.delivered_at == retry_at
    failed = store.exports(failed=True)
    assert failed == []
    rows = store.exports()
    assert {r["destination"]: r["attempts"] for r in rows} == {"PACS": 2, "ARCHIVE": 1}


def test_finish_without_destinations_stays_reported(store: Store, clock) -> None:
    receive(store)
    to_reported(store, clock, destinations=())
    assert store.get_series("1.2.3.1").state is SeriesState.REPORTED
    assert store.due_exports() == []


def test_recover_on_start(store: Store, clock, db: Database) -> None:
    _queue(store, 2)
    store.claim_job("w")  # crashed while inferring 9.0
    receive(store, series="9.sel", n=1)
    store.transition("9.sel", "complete")
    store.transition("9.sel", "selected")  # crashed before enqueue
    receive(store, series="9.cmp", n=1)
    store.transition("9.cmp", "complete")  # crashed before the selection decision
    cut = store.begin_association("SCANNER", "MOLRE", "127.0.0.1", 4000)  # node killed mid-way
    done = store.begin_association("SCANNER", "MOLRE", "127.0.0.1", 4001)
    store.end_association(done, "released")
    counts = store.recover_on_start()
    assert counts == {
        "jobs_requeued": 1,
        "series_enqueued": 1,
        "complete_pending": 1,
        "associations_aborted": 1,
        "exports_released": 0,
        "notifications_released": 0,
    }
    with db.session(write=False) as s:
        outcomes = {a.id: a.outcome for a in s.execute(select(Association)).scalars()}
    assert outcomes[cut] == "aborted" and outcomes[done] == "released"
    assert any(e.entity_id == str(cut) and e.kind == "aborted" for e in events(db, "association"))
    assert store.get_series("9.0").state is SeriesState.QUEUED
    assert store.get_series("9.sel").state is SeriesState.QUEUED
    assert store.series_in_state("complete") == ["9.cmp"]
    claimed = {store.claim_job("w").series_uid for _ in range(3)}
    assert claimed == {"9.0", "9.1", "9.sel"}


def test_log_event_and_json_safe_details(store: Store, db: Database) -> None:
    store.log_event("node", "node", "started", {"at": T0, "path": Path("/x"), "n": 3})
    ev = events(db, "node")[-1]
    assert ev.details == {"at": T0.isoformat(), "path": "/x", "n": 3}


# -- audit queries --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seeded_template(tmp_path_factory, template_db):
    """The demo history, seeded once per module (spool + database) and copied per test."""
    root = tmp_path_factory.mktemp("seeded")
    database, handle = _copy_db(template_db, root)
    clock = ManualClock(T0)
    uids = seed_demo(Store(database, clock=clock), clock, Spool(root / "spool"))
    database.dispose()
    server = template_db[0]
    yield root, uids, clock.t, (server, database.url if server else root / "audit.db")
    if handle is not None:
        _drop(database, handle)


@pytest.fixture()
def seeded(seeded_template, tmp_path: Path, clock: ManualClock):
    root, uids, end, template = seeded_template
    database, handle = _copy_db(template, tmp_path)
    shutil.copytree(root / "spool", tmp_path / "spool")
    clock.t = end
    spool = Spool(tmp_path / "spool")
    # the copied rows point at the template's spool: re-point them at this test's copy
    with database.session() as s:
        s.execute(
            Instance.__table__.update().values(
                spool_path=func.replace(Instance.spool_path, str(root / "spool"), str(spool.root))
            )
        )
    files = {
        k: [spool.root / p.relative_to(root / "spool") for p in v] for k, v in uids.files.items()
    }
    uids = dataclasses.replace(uids, files=files)
    yield Store(database, clock=clock), uids, spool
    _drop(database, handle)


def test_queries_on_seeded_db(seeded) -> None:
    store, u, _ = seeded
    studies = store.studies()
    assert [s["study_uid"] for s in studies] == [u.studies["c"], u.studies["b"], u.studies["a"]]
    assert "patient_name" not in studies[0]
    by_uid = {s["study_uid"]: s for s in studies}
    assert by_uid[u.studies["a"]]["states"] == "delivered:1 skipped:1"
    assert [r["series_uid"] for r in store.series(state="failed")] == [u.series["failed"]]
    assert {r["series_uid"] for r in store.series(study_uid=u.studies["b"])} == {
        u.series["retrying"],
        u.series["receiving"],
    }
    hits = store.findings(key="subdural_hemorrhage", min_prob=0.5)
    assert [(h["series_uid"], h["probability"]) for h in hits] == [(u.series["delivered"], 0.91)]
    assert {h["finding"] for h in store.findings(positive_only=True)} == {
        "subdural_hemorrhage",
        "skull_fracture",
        "acute_infarct",
    }
    assert store.findings(since=T0 + dt.timedelta(days=1)) == []
    pending = store.exports(pending=True)
    assert [p["series_uid"] for p in pending] == [u.series["retrying"]]
    assert store.exports(failed=True)[0]["last_status"] == "0xA700"


def test_timeline_is_ordered_and_complete(seeded) -> None:
    store, u, _ = seeded
    tl = store.timeline(u.series["delivered"])
    assert [e["at"] for e in tl] == sorted(e["at"] for e in tl)
    series_moves = [(e["from_state"], e["to_state"]) for e in tl if e["entity"] == "series"]
    assert series_moves == [
        (None, "receiving"),
        ("receiving", "complete"),
        ("complete", "selected"),
        ("selected", "queued"),
        ("queued", "inferring"),
        ("inferring", "reported"),
        ("reported", "delivered"),
    ]
    kinds = {(e["entity"], e["kind"]) for e in tl}
    assert {
        ("association", "opened"),
        ("association", "released"),
        ("job", "claimed"),
        ("export", "delivered"),
    } <= kinds
    study_tl = store.timeline(u.studies["a"])
    assert {e["series_uid"] for e in study_tl if e["series_uid"]} == {
        u.series["delivered"],
        u.series["skipped"],
    }
    assert store.timeline("ACC-A") == study_tl
    from storage import NotFound

    with pytest.raises(NotFound):
        store.timeline("1.2.999")


def test_stats_counts_and_percentiles(seeded) -> None:
    store, u, _ = seeded
    st = store.stats()
    assert st["series"] == {
        "delivered": 1,
        "skipped": 1,
        "reported": 1,
        "failed": 1,
        "receiving": 1,
    }
    assert st["exports"] == {"delivered": 1, "pending": 1}
    lat = st["latency"]
    assert lat["received_to_reported"]["n"] == 2
    assert lat["reported_to_delivered"] == {"n": 1, "p50_s": 3.0, "p90_s": 3.0, "p99_s": 3.0}
    from storage.queries import percentile

    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 90) is None
    assert percentile([0, 10], 90) == 9.0


# -- prune ------------------------------------------------------------------------------------
def test_prune_removes_only_eligible(seeded, clock) -> None:
    store, u, spool = seeded
    db = store.db
    all_files = {k: v for k, v in u.files.items()}
    assert all(p.exists() for ps in all_files.values() for p in ps)
    clock.advance(3 * 86400)
    dry = store.prune(dt.timedelta(days=1), dry_run=True, spool=spool)
    assert sorted(dry.series) == sorted(
        [u.series["delivered"], u.series["skipped"], u.series["failed"]]
    )
    assert all(p.exists() for ps in all_files.values() for p in ps)  # dry run touched nothing
    assert len(store.series(limit=None)) == 5
    real = store.prune(dt.timedelta(days=1), spool=spool)
    assert sorted(real.series) == sorted(dry.series) and real.files == dry.files
    assert real.studies == sorted([u.studies["a"], u.studies["c"]])
    for key in ("delivered", "skipped", "failed"):
        assert not any(p.exists() for p in all_files[key])
    for key in ("retrying", "receiving"):  # pending export / still receiving
        assert all(p.exists() for p in all_files[key])
    assert {r["series_uid"] for r in store.series(limit=None)} == {
        u.series["retrying"],
        u.series["receiving"],
    }
    assert [s["study_uid"] for s in store.studies()] == [u.studies["b"]]
    assert store.exports(pending=True)[0]["series_uid"] == u.series["retrying"]
    tl = store.timeline(u.studies["b"])
    assert tl and tl[0]["kind"] == "opened"  # kept series keep their association history
    with db.session(write=False) as s:
        assert (
            s.execute(
                select(func.count()).select_from(Instance).where(Instance.status == "ignored")
            ).scalar_one()
            == 0
        )
    # a second prune finds nothing more
    again = store.prune(dt.timedelta(days=1), spool=spool)
    assert again.series == [] and again.files == []


def test_prune_respects_retention_and_shared_files(store: Store, clock, tmp_path) -> None:
    spool = Spool(tmp_path / "sp")
    shared = spool.write_atomic("x/shared.dcm", b"1")
    store.record_instance(
        None, header(series="old", sop="s1"), spool_path=shared, size=1, sha256="a", status="stored"
    )
    store.transition("old", "complete")
    store.transition("old", "skipped", reason="r")
    clock.advance(86400 * 10)
    store.record_instance(
        None,
        header(series="new", sop="s1"),
        spool_path=shared,
        size=1,
        sha256="a",
        status="duplicate",
    )  # points at the same file
    rep = store.prune(dt.timedelta(days=5), spool=spool)
    assert rep.series == ["old"] and rep.files == [] and shared.exists()
    assert store.prune(dt.timedelta(days=30), spool=spool).series == []


def test_prune_removes_the_report_with_its_summary_and_evidence_images(
    store: Store, clock, tmp_path
) -> None:
    spool = Spool(tmp_path / "sp")
    _queue(store, 1)
    job = store.claim_job("w", lease_s=30)
    sr = spool.root / "reports" / "r1.dcm"
    companions = [
        sr.with_name("r1.sc.dcm"),
        sr.with_name("r1.ev001.dcm"),
        sr.with_name("r1.ev002.dcm"),
    ]
    other = sr.with_name("r10.ev001.dcm")  # another report's image: not a companion of r1
    for f in [sr, *companions, other]:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
    assert store.finish_job(
        job.id,
        results=[FindingResult("k", 0.9, True)],
        checkpoint_hash="h",
        model_name="m",
        report_path=str(sr),
        report_sop_uid="1",
        destinations=["PACS"],
    )
    store.record_export_attempt(store.due_exports()[0].id, ok=True, status=0)
    clock.advance(86400 * 10)
    rep = store.prune(dt.timedelta(days=5), spool=spool)
    assert rep.series == ["9.0"]
    assert not sr.exists() and not any(f.exists() for f in companions)
    assert other.exists()
    assert set(rep.files) >= {str(sr), *map(str, companions)}


def test_first_finisher_wins_after_lease_expiry(store: Store, clock, db: Database) -> None:
    _queue(store, 1)
    slow = store.claim_job("slow", lease_s=10)
    clock.advance(11)
    fast = store.claim_job("fast", lease_s=10)
    assert fast.id == slow.id
    res = [FindingResult("k", 0.9, True)]
    kw = dict(
        checkpoint_hash="h",
        model_name="m",
        report_path=None,
        report_sop_uid="1",
        destinations=["PACS"],
    )
    assert store.finish_job(fast.id, results=res, **kw) is True
    assert store.finish_job(slow.id, results=res, **kw) is False  # late: nothing doubled
    assert store.fail_job(slow.id, "late error", max_attempts=1, retry_delay_s=0) is False
    assert len(store.findings()) == 1 and len(store.due_exports()) == 1
    assert store.get_series("9.0").state is SeriesState.REPORTED
    exp = store.due_exports()[0]
    store.record_export_attempt(exp.id, ok=True, status=0)
    store.record_export_attempt(exp.id, ok=True, status=0)  # repeated ack changes nothing
    assert store.exports()[0]["attempts"] == 1
    assert "late_finish" in [e.kind for e in events(db, "job")]


def test_header_meta_with_pydicom_values_is_stored_as_json(store: Store) -> None:
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DSfloat

    h = header()
    h.meta = {
        "ImageType": MultiValue(str, ["ORIGINAL", "PRIMARY", "AXIAL"]),
        "SliceThickness": DSfloat("2.5"),
        "Bad": float("nan"),
    }
    store.record_instance(None, h, spool_path=None, size=1, sha256=None, status="stored")
    meta = store.series_instances("1.2.3.1")[0].meta
    assert meta == {
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "SliceThickness": 2.5,
        "Bad": None,
    }


# -- durability modes and the receiver's fast record path ---------------------------------------
def test_spool_durable_fsyncs_file_dir_and_new_parents(tmp_path: Path, monkeypatch) -> None:
    import storage.spool as spool_mod

    synced_dirs: list[Path] = []
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(spool_mod, "_fsync_dir", lambda p: synced_dirs.append(Path(p)))
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    spool = Spool(tmp_path / "spool")
    root = spool.root
    spool.write_atomic("a/b/c.dcm", b"x")
    # the file, its directory, and the entries of the two directories created for it
    assert len(fsyncs) == 1
    assert synced_dirs == [root / "a/b", root / "a", root]
    synced_dirs.clear()
    spool.write_atomic("a/b/d.dcm", b"y")  # directory already durable: only its own fsync
    assert synced_dirs == [root / "a/b"] and len(fsyncs) == 2

    fast = Spool(tmp_path / "fast", durable=False)
    synced_dirs.clear()
    fsyncs.clear()
    p = fast.write_atomic("s/e.dcm", [b"ab", b"cd"])  # chunks are written in order
    assert p.read_bytes() == b"abcd" and not fsyncs and not synced_dirs
    assert [f.name for f in p.parent.iterdir()] == ["e.dcm"]  # still temp file + rename
    # a directory removed behind the spool's back (prune in another process) is re-created
    fast.remove(p)
    assert not (fast.root / "s").exists()
    shutil.rmtree(fast.root / "s", ignore_errors=True)
    assert fast.write_atomic("s/e.dcm", b"again").read_bytes() == b"again"


def test_spool_recreates_directory_removed_by_another_process(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", durable=False)
    spool.write_atomic("x/y/1.dcm", b"1")
    shutil.rmtree(spool.root / "x")  # not via spool.remove: its cache still lists x/y
    assert spool.write_atomic("x/y/2.dcm", b"2").read_bytes() == b"2"


def test_record_instance_stored_counts_reopens_and_versions(
    store: Store, db: Database, clock
) -> None:
    a = store.begin_association("SCU", "MOLRE", "127.0.0.1", 4242)
    first = store.record_instance(
        a, header(sop="1.2.3.1.1"), spool_path="/s/1", size=10, sha256="a" * 64, status="stored"
    )  # creates the series
    second = store.record_instance(
        a,
        header(sop="1.2.3.1.2", n=2),
        spool_path="/s/2",
        size=11,
        sha256="b" * 64,
        status="stored",
    )  # series exists
    assert (second.series_version, second.status, second.size, second.instance_number) == (
        1,
        "stored",
        11,
        2,
    )
    assert second.id > first.id and second.meta == {"SeriesDescription": "HEAD"}
    # the same SOP UID stored again (e.g. an operator re-import) does not count twice
    store.record_instance(
        a,
        header(sop="1.2.3.1.2", n=2),
        spool_path="/s/2",
        size=11,
        sha256="b" * 64,
        status="stored",
    )
    clock.advance(30)
    store.record_instance(
        a,
        header(sop="1.2.3.1.3", n=3),
        spool_path="/s/3",
        size=12,
        sha256="c" * 64,
        status="stored",
    )
    rec = store.get_series("1.2.3.1")
    assert rec.instance_count == 3 and rec.version == 1
    assert rec.last_instance_at == T0 + dt.timedelta(seconds=30)
    assert rec.first_instance_at == T0
    # a series past 'receiving' is reopened, then later instances join the new version
    store.transition("1.2.3.1", "complete")
    late = store.record_instance(
        a, header(sop="1.2.3.1.4", n=4), spool_path="/s/4", size=1, sha256="d" * 64, status="stored"
    )
    after = store.record_instance(
        a, header(sop="1.2.3.1.5", n=5), spool_path="/s/5", size=1, sha256="e" * 64, status="stored"
    )
    assert (late.series_version, after.series_version) == (2, 2)
    rec = store.get_series("1.2.3.1")
    assert (rec.state.value, rec.version, rec.instance_count) == ("receiving", 2, 5)
    with db.session(write=False) as s:
        from storage.models import Association

        assert s.get(Association, a).n_stored == 6
        got = s.execute(
            select(Instance).where(Instance.sop_instance_uid == "1.2.3.1.5")
        ).scalar_one()
        assert got.received_at == T0 + dt.timedelta(seconds=30)
        assert (got.association_id, got.spool_path, got.sha256) == (a, "/s/5", "e" * 64)
    assert [e.kind for e in events(db, "series")] == ["created", "transition", "reopened"]
    assert store.find_instance("1.2.3.1.5").series_version == 2


def test_indexed_spool_paths_and_last_prune_cutoff(store: Store, clock) -> None:
    receive(store, n=2)
    assert store.indexed_spool_paths(["/spool/1.2.3.1.1", "/spool/nope"]) == {"/spool/1.2.3.1.1"}
    assert store.last_prune_cutoff() is None
    clock.advance(86400 * 40)
    store.prune(dt.timedelta(days=30))
    assert store.last_prune_cutoff() == T0 + dt.timedelta(days=10)
