"""Node-side pieces of the several-nodes topology (issue 15): roles, a worker that cannot see a
series' files, the start-up temp clean-up of a shared spool. The whole topology runs in
tests/test_multinode.py."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from common.errors import ConfigError
from node.config import config_from_dict, with_overrides
from node.worker import RELEASE_DELAY_S, Worker
from storage import Database, InstanceHeader, Spool, Store
from storage.models import Event, Job
from storage.spool import TEMP_PREFIX
from tests.demo_history import ManualClock
from tests.test_node_worker import FakeEngine

T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.timezone.utc)


def _queued_series(store: Store, uid: str, paths: list[str]) -> int:
    for i, path in enumerate(paths, 1):
        store.record_instance(
            None,
            InstanceHeader(
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                sop_instance_uid=f"{uid}.{i}",
                study_uid="7.7",
                series_uid=uid,
                modality="CT",
                instance_number=i,
            ),
            spool_path=path,
            size=1,
            sha256=None,
            status="stored",
        )
    store.transition(uid, "complete")
    store.transition(uid, "selected")
    return store.enqueue_job(uid)


def test_worker_that_sees_no_file_releases_the_job_without_burning_an_attempt(
    tmp_path: Path,
) -> None:
    cfg = config_from_dict(
        {
            "storage": {"data_dir": str(tmp_path / "data")},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "port": 104}],
            "retry": {"max_attempts": 1},
            "model": {"isolation": "thread"},
        }
    )
    db = Database(cfg.database_url)
    db.upgrade()
    clock = ManualClock(T0)
    store = Store(db, clock=clock, node="gpu-7")
    spool = Spool(cfg.spool_dir)
    # files on another node's disk: none visible here
    elsewhere = [f"/nonexistent/edge-1/spool/{i}.dcm" for i in range(3)]
    job_id = _queued_series(store, "8.1", elsewhere)
    # a series with one of its two files gone is a real loss: that one fails, as on one node
    present = tmp_path / "present.dcm"
    present.write_bytes(b"x")
    _queued_series(store, "8.2", [str(present), str(tmp_path / "gone.dcm")])

    worker = Worker(cfg, store, spool)
    worker.engine = FakeEngine(set(), set())
    assert worker.worker_id.startswith("gpu-7:")
    assert worker.run_once() and worker.run_once()
    assert worker.engine.calls == 0  # neither series reached the model

    with db.session(write=False) as s:
        job = s.get(Job, job_id)
        released = s.execute(select(Event).where(Event.kind == "released")).scalars().all()
    assert (job.state, job.attempts, job.worker_id) == ("queued", 0, None)
    assert job.not_before is not None
    assert str(store.get_series("8.1").state) == "queued"
    assert len(released) == 1 and released[0].entity_id == str(job_id)
    assert released[0].details["node"] == "gpu-7"
    assert "not visible from node gpu-7" in released[0].details["reason"]
    assert "/nonexistent/edge-1/spool/0.dcm" in released[0].details["reason"]
    failed = store.get_series("8.2")
    assert str(failed.state) == "failed" and "1 of 2 stored instance" in failed.reason

    # not claimable again at once (no claim/release spin), by anyone after the delay
    assert store.claim_job("gpu-7:w0") is None
    clock.advance(RELEASE_DELAY_S + 1)
    other = Store(db, clock=clock, node="gpu-8")
    claim = other.claim_job("gpu-8:w0", max_attempts=1)
    assert claim is not None and claim.id == job_id and claim.attempts == 1
    db.dispose()


def _service(tmp_path: Path, roles: str):
    from node.service import NodeService

    cfg = config_from_dict(
        {
            "network": {"host": "127.0.0.1", "port": 0},
            "storage": {"data_dir": str(tmp_path / "data"), "min_free_disk": "0"},
            "node": {"name": "edge-9"},
        }
    )
    return NodeService(with_overrides(cfg, roles=roles))


def test_roles_build_only_their_parts(tmp_path: Path) -> None:
    svc = _service(tmp_path / "r", "receive")
    svc.start()
    try:
        assert svc.receiver is not None and svc.port
        assert (svc.workers, svc.assembler, svc.dispatcher) == (None, None, None)
        from tests.nodeproc import echo

        assert echo(svc.port, svc.config.network.ae_title) == 0
    finally:
        svc.stop()
    svc = _service(tmp_path / "d", "assemble,dispatch")
    svc.start()
    try:
        assert (svc.receiver, svc.workers, svc.port) == (None, None, None)
        assert svc.assembler is not None and svc.dispatcher is not None
        with svc.store.db.session(write=False) as s:
            started = s.execute(
                select(Event).where(Event.entity == "node", Event.kind == "started")
            ).scalar_one()
        assert started.entity_id == "edge-9"
        assert started.details["roles"] == ["assemble", "dispatch"]
    finally:
        svc.stop()


def test_roles_are_validated() -> None:
    cfg = config_from_dict({})
    assert cfg.node.roles == ["receive", "assemble", "infer", "dispatch"]
    assert with_overrides(cfg, roles=" infer , dispatch").node.roles == ["infer", "dispatch"]
    with pytest.raises(ConfigError, match="node.roles"):
        with_overrides(config_from_dict({}), roles="receive,gpu")
    with pytest.raises(ConfigError, match="node.roles"):
        config_from_dict({"node": {"roles": []}})
    with pytest.raises(ConfigError, match="node.name"):
        config_from_dict({"node": {"name": "edge 1; drop"}})


def test_clean_temp_min_age_leaves_young_temp_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    d = spool.root / "instances" / "1.2" / "3.4"
    d.mkdir(parents=True)
    old, young = d / (TEMP_PREFIX + "old"), d / (TEMP_PREFIX + "young")
    kept = d / "5.6.dcm"  # a stored instance is never a temp file
    for f in (old, young, kept):
        f.write_bytes(b"x")
    hour_ago = time.time() - 2 * 3600
    os.utime(old, (hour_ago, hour_ago))
    os.utime(kept, (hour_ago, hour_ago))
    assert spool.clean_temp(min_age_s=3600) == 1  # shared spool: only the abandoned one
    assert not old.exists() and young.exists() and kept.exists()
    assert spool.clean_temp() == 1  # one node, own spool: every temp file is a leftover
    assert not young.exists() and kept.exists()
