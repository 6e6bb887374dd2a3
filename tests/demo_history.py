"""Test fixture: a small, realistic audit history played through the public `Store` API.

Why it exists: the audit CLI, docs/audit.md and the tests all need a database that looks like a
node's after a day of work (delivered, skipped, failed, retrying and still-receiving series)
without running the DICOM service. Because it only calls `Store` methods, it also exercises the
same code paths the node uses. Try it::

    python -m tests.demo_history /tmp/demo.db && molre-node audit studies --db /tmp/demo.db
"""

from __future__ import annotations

import datetime as dt
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import CTImageStorage as CT_IMAGE
from pydicom.uid import ExplicitVRLittleEndian as EXPLICIT_LE

from storage.db import Database
from storage.spool import Spool
from storage.store import FindingResult, InstanceHeader, SeriesState, Store


class ManualClock:
    """A clock the caller advances (demo data spread over hours, tests without sleeping)."""

    def __init__(self, start: dt.datetime) -> None:
        self.t = start

    def __call__(self) -> dt.datetime:
        return self.t

    def advance(self, seconds: float) -> dt.datetime:
        self.t = self.t + dt.timedelta(seconds=seconds)
        return self.t


@dataclass
class DemoUIDs:
    """UIDs of what :func:`seed_demo` created, by role."""

    studies: dict[str, str] = field(default_factory=dict)
    series: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[Path]] = field(default_factory=dict)


def _header(study: str, series: str, n: int, acc: str, desc: str) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=CT_IMAGE,
        sop_instance_uid=f"{series}.{n}",
        study_uid=study,
        series_uid=series,
        modality="CT",
        transfer_syntax=EXPLICIT_LE,
        accession_number=acc,
        instance_number=n,
        meta={
            "SeriesDescription": desc,
            "StudyDescription": "CT HEAD WO",
            "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
            "SliceThickness": 5.0,
            "Rows": 64,
            "Columns": 64,
        },
        phi={"PatientName": "Demo^Patient", "PatientID": "DEMO-1", "PatientBirthDate": "19700101"},
    )


def _receive(
    store: Store,
    clock: ManualClock,
    spool: Spool | None,
    study: str,
    series: str,
    acc: str,
    desc: str,
    n: int,
    *,
    release: bool = True,
) -> list[Path]:
    assoc = store.begin_association("SCANNER", "MOLRE", "127.0.0.1", 40000)
    files = []
    for i in range(1, n + 1):
        clock.advance(0.2)
        data = f"fake-dicom {series} {i}".encode()
        path = spool.write_atomic(f"{study}/{series}/{series}.{i}.dcm", data) if spool else None
        if path is not None:
            files.append(path)
        store.record_instance(
            assoc,
            _header(study, series, i, acc, desc),
            spool_path=path,
            size=len(data),
            sha256=f"{i:064x}",
            status="stored",
        )
    store.end_association(assoc, "released" if release else "aborted")
    return files


def _infer(
    store: Store, clock: ManualClock, series: str, probs: dict[str, float], destinations: list[str]
) -> int:
    store.transition(series, SeriesState.COMPLETE)
    store.transition(series, SeriesState.SELECTED)
    store.enqueue_job(series)
    clock.advance(2)
    claim = store.claim_job("worker-1")
    assert claim is not None and claim.series_uid == series
    clock.advance(8)
    store.finish_job(
        claim.id,
        results=[FindingResult(k, p, p >= 0.5) for k, p in probs.items()],
        checkpoint_hash="c0ffee" * 4,
        model_name="molre-demo",
        report_path=None,
        report_sop_uid=f"{series}.99",
        destinations=destinations,
    )
    return claim.id


def seed_demo(store: Store, clock: ManualClock, spool: Spool | None = None) -> DemoUIDs:
    """Play a morning of node work into ``store`` (its clock must be ``clock``)."""
    u = DemoUIDs()
    root = "1.2.826.0.1.3680043.10.1234"
    u.studies = {"a": f"{root}.1", "b": f"{root}.2", "c": f"{root}.3"}
    u.series = {
        "delivered": f"{root}.1.1",
        "skipped": f"{root}.1.2",
        "retrying": f"{root}.2.1",
        "receiving": f"{root}.2.2",
        "failed": f"{root}.3.1",
    }
    a, b, c = u.studies["a"], u.studies["b"], u.studies["c"]

    # Study A: a head CT read and delivered; a scout series skipped by the selection rules.
    u.files["delivered"] = _receive(
        store, clock, spool, a, u.series["delivered"], "ACC-A", "HEAD 5mm", 4
    )
    u.files["skipped"] = _receive(store, clock, spool, a, u.series["skipped"], "ACC-A", "SCOUT", 1)
    store.transition(u.series["skipped"], SeriesState.COMPLETE)
    store.transition(u.series["skipped"], SeriesState.SKIPPED, reason="ImageType LOCALIZER")
    _infer(
        store,
        clock,
        u.series["delivered"],
        {"subdural_hemorrhage": 0.91, "intraparenchymal_hemorrhage": 0.12, "skull_fracture": 0.55},
        ["PACS"],
    )
    clock.advance(3)
    exp = store.due_exports()[0]
    store.record_export_attempt(exp.id, ok=True, status=0x0000)

    # Study B: reported but the PACS refuses the SR (retrying); a second series still arriving.
    u.files["retrying"] = _receive(
        store, clock, spool, b, u.series["retrying"], "ACC-B", "HEAD 5mm", 3
    )
    _infer(
        store,
        clock,
        u.series["retrying"],
        {"subdural_hemorrhage": 0.08, "acute_infarct": 0.73},
        ["PACS"],
    )
    clock.advance(1)
    exp = store.due_exports()[0]
    store.record_export_attempt(
        exp.id,
        ok=False,
        status=0xA700,
        error="Out of Resources",
        next_attempt_at=clock.advance(0) + dt.timedelta(seconds=30),
    )

    # Study C: the model failed on every attempt.
    u.files["failed"] = _receive(store, clock, spool, c, u.series["failed"], "ACC-C", "HEAD 5mm", 2)
    store.transition(u.series["failed"], SeriesState.COMPLETE)
    store.transition(u.series["failed"], SeriesState.SELECTED)
    store.enqueue_job(u.series["failed"])
    for _ in range(2):
        clock.advance(5)
        claim = store.claim_job("worker-1")
        assert claim is not None
        store.fail_job(
            claim.id,
            "SeriesError: slice spacing varies (ImagePositionPatient)",
            max_attempts=2,
            retry_delay_s=0,
        )

    # A rejected caller and a non-CT instance, then the still-receiving series.
    store.record_rejected_association(
        "UNKNOWN", "MOLRE", "10.0.0.9", 50000, reason="calling AE not allowed"
    )
    assoc = store.begin_association("SCANNER", "MOLRE", "127.0.0.1", 40001)
    store.record_instance(
        assoc,
        InstanceHeader(
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4", sop_instance_uid=f"{root}.9.1", modality="MR"
        ),
        spool_path=None,
        size=100,
        sha256=None,
        status="ignored",
        reason="not a CT storage class",
    )
    store.end_association(assoc, "released")
    clock.advance(60)
    u.files["receiving"] = _receive(
        store, clock, spool, b, u.series["receiving"], "ACC-B", "HEAD BONE", 2, release=False
    )
    return u


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.demo_history DB [SPOOL]`: write the demo history into a new database."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m tests.demo_history DB_FILE_OR_URL [SPOOL_DIR]", file=sys.stderr)
        return 2
    db = Database(args[0])
    db.upgrade()
    clock = ManualClock(dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=2))
    store = Store(db, clock=clock)
    seed_demo(store, clock, Spool(args[1]) if len(args) > 1 else None)
    print(f"demo audit history written to {db!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
