"""Assembler against a real store: completion, rules, study-level preference, deferral."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from node.assembler import Assembler
from node.config import config_from_dict
from storage import Database, InstanceHeader, Store

STUDY = "1.2.826.0.1.3680043.8.498.1"


def add_series(store: Store, series_uid: str, n: int, **meta) -> None:
    base = {
        "Modality": "CT",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "BodyPartExamined": "HEAD",
        "SliceThickness": 5.0,
        "ConvolutionKernel": "H30s",
    }
    base.update(meta)
    for i in range(n):
        h = InstanceHeader(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid=f"{series_uid}.{i + 1}",
            study_uid=STUDY,
            series_uid=series_uid,
            modality="CT",
            instance_number=i + 1,
            meta=dict(base),
        )
        store.record_instance(
            None, h, spool_path=f"/nowhere/{i}.dcm", size=1, sha256=str(i), status="stored"
        )


def make(tmp_path: Path, **selection) -> tuple[Assembler, Store]:
    cfg = config_from_dict(
        {
            "storage": {"data_dir": str(tmp_path / "d")},
            "assembler": {"quiet_time_s": 5, "release_grace_s": 1},
            "selection": {"min_slices": 4, **selection},
        }
    )
    db = Database(cfg.database_url)
    db.upgrade()
    store = Store(db)
    return Assembler(cfg, store), store


def later(seconds: float = 60) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)


def test_quiet_time_then_preference_within_the_study(tmp_path: Path) -> None:
    asm, store = make(tmp_path)
    add_series(store, f"{STUDY}.10", 8, SliceThickness=5.0)
    add_series(store, f"{STUDY}.11", 20, SliceThickness=1.0)
    add_series(store, f"{STUDY}.12", 20, SliceThickness=0.6, ConvolutionKernel="H70h")
    add_series(store, f"{STUDY}.13", 2, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert asm.tick() == {"completed": 0, "selected": 0, "skipped": 0}  # not quiet yet
    counts = asm.tick(now=later())
    assert counts == {"completed": 4, "selected": 1, "skipped": 3}
    states = {u: store.get_series(f"{STUDY}.{u}") for u in (10, 11, 12, 13)}
    assert str(states[11].state) == "queued"
    assert states[13].reason == "image_type: LOCALIZER"
    assert states[10].reason.startswith(f"preference: series {STUDY}.11 preferred")
    assert "not soft tissue" in states[12].reason


def test_decision_waits_for_a_sibling_still_receiving(tmp_path: Path) -> None:
    asm, store = make(tmp_path)
    add_series(store, f"{STUDY}.20", 8, SliceThickness=5.0)
    asm.tick(now=later())
    assert str(store.get_series(f"{STUDY}.20").state) == "queued"  # alone: read at once
    add_series(store, f"{STUDY}.21", 8, SliceThickness=5.0)
    add_series(store, f"{STUDY}.22", 8, SliceThickness=2.0)
    # .21 complete, .22 (thinner) still receiving -> .21 waits
    store.transition(f"{STUDY}.21", "complete")
    asm.tick()
    assert str(store.get_series(f"{STUDY}.21").state) == "complete"
    asm.tick(now=later())
    assert str(store.get_series(f"{STUDY}.22").state) == "queued"
    assert "preference" in store.get_series(f"{STUDY}.21").reason


def test_prefer_all_reads_every_qualifying_series(tmp_path: Path) -> None:
    asm, store = make(tmp_path, prefer="all")
    add_series(store, f"{STUDY}.30", 8, SliceThickness=5.0)
    add_series(store, f"{STUDY}.31", 8, SliceThickness=1.0)
    assert asm.tick(now=later())["selected"] == 2
