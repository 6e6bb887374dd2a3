"""The bad-input corpus against the real node: it stays up, and every case has a clear outcome.

Each case of `tests/badinput.py` is sent over its own association with its own calling AE title
(`BADnn`), so its audit rows can be found even when the object had no usable UID. After each case
the node must still answer C-ECHO. When everything is sent, each case's facts (DIMSE statuses,
instance rows, series states and reasons) must match one of its expected outcomes; all
mismatches are reported together in one table.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.badinput import (
    FAILURE,
    REFUSED,
    SUCCESS,
    BuiltCase,
    Outcome,
    build_corpus,
    status_class,
)
from tests.nodeproc import NodeProcess, StorageSCP, echo, send_folder, wait_until
from tests.orthanc import dcmtk_tool, have_dcmtk, model_section, sr_source_series

TERMINAL = {"delivered", "reported", "skipped", "failed"}
# two cases are sent with dcmtk's storescu (no preamble; Implicit VR)
needs_dcmtk = pytest.mark.skipif(not have_dcmtk(), reason="dcmtk not installed (storescu)")
PHI_VALUES = ("Müller", "Zoë", "山田", "Phantom^Synthetic", "MOLRE-PHANTOM")


def _case_ae(i: int) -> str:
    return f"BAD{i:02d}"


def _send_case(node: NodeProcess, case: BuiltCase, calling_ae: str) -> list[int | None]:
    """Send a case's items in order over one association per sender kind; statuses per item."""
    from node.dicomnet import AssociationError

    statuses: list[int | None] = []
    groups: list[tuple[str, list]] = []
    for item in case.items:
        if groups and groups[-1][0] == item.via:
            groups[-1][1].append(item)
        else:
            groups.append((item.via, [item]))
    for via, items in groups:
        paths = [it.path for it in items]
        if via == "storescu":
            env = dict(os.environ, TCP_NODELAY="1")
            # offer exactly the files' syntax when it is Implicit VR (else dcmtk would offer
            # Explicit first and convert on the fly)
            ts = pydicom.dcmread(paths[0], force=True).file_meta.get("TransferSyntaxUID")
            opts = ["-xi"] if ts == "1.2.840.10008.1.2" else []
            res = subprocess.run(
                [
                    dcmtk_tool("storescu"),
                    *opts,
                    "-aet",
                    calling_ae,
                    "-aec",
                    node.ae_title,
                    "127.0.0.1",
                    str(node.port),
                    *map(str, paths),
                ],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            # storescu exits non-zero when any store failed; per-object detail is in its log
            statuses += [0x0000 if res.returncode == 0 else 0xC000] * len(paths)
            continue
        try:
            result = send_folder(
                paths, node.port, called_ae=node.ae_title, calling_ae=calling_ae, timeout=60
            )
            statuses += list(result.statuses)
        except AssociationError:
            statuses += [None] * len(paths)
    return statuses


def _rows(db: Path, calling_ae: str) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        cur = con.execute(
            "select i.sop_instance_uid, i.series_uid, i.status, i.reason, i.spool_path, "
            "i.transfer_syntax "
            "from instances i join associations a on a.id = i.association_id "
            "where a.calling_ae = ? order by i.id",
            (calling_ae,),
        )
        return [dict(r) for r in cur.fetchall()]
    finally:
        con.close()


def _associations(db: Path, calling_ae: str) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [
            dict(r)
            for r in con.execute(
                "select id, outcome, reject_reason from associations where calling_ae = ?",
                (calling_ae,),
            ).fetchall()
        ]
    finally:
        con.close()


def _series(db: Path, uid: str) -> dict[str, Any] | None:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        row = con.execute(
            "select series_uid, state, reason from series where series_uid = ?", (uid,)
        ).fetchone()
        return dict(row) if row else None
    finally:
        con.close()


def _mismatch(
    o: Outcome,
    statuses: list[int | None],
    rows: list[dict[str, Any]],
    series: dict[str, dict[str, Any] | None],
) -> str | None:
    """None when the facts match outcome `o`, else why not."""
    classes = [status_class(s) for s in statuses]
    for k, c in enumerate(classes):
        allowed = o.dimse_last if (o.dimse_last and k == len(classes) - 1) else o.dimse
        if c not in allowed:
            return f"object {k}: status {statuses[k]!r} ({c}) not in {allowed}"
    if o.status_range is not None:
        lo, hi = o.status_range
        for s, c in zip(statuses, classes):
            if c == FAILURE and not (lo <= int(s) <= hi):  # type: ignore[arg-type]
                return f"failure status 0x{int(s):04X} outside 0x{lo:04X}-0x{hi:04X}"
    if o.instances is None:
        if rows:
            return f"expected no instance rows, got {[r['status'] for r in rows]}"
    else:
        sent = sum(1 for c in classes if c != REFUSED)
        if len(rows) != sent:
            return f"{len(rows)} instance rows for {sent} objects sent"
        for k, r in enumerate(rows):
            allowed = o.instances_last if (o.instances_last and k == len(rows) - 1) else o.instances
            if r["status"] not in allowed:
                return f"instance row {k}: status {r['status']!r} not in {allowed}"
    for role, rec in series.items():
        if role not in o.series:
            if rec is not None:
                return f"series {role}: expected none, got {rec['state']} ({rec['reason']})"
        elif rec is None:
            return f"series {role}: expected {o.series[role]}, got no series row"
        elif rec["state"] not in o.series[role]:
            return f"series {role}: {rec['state']} ({rec['reason']}) not in {o.series[role]}"
    if o.reason is not None:
        texts = [r["reason"] for r in rows if r["status"] in ("rejected", "ignored", "conflict")]
        texts += [rec["reason"] for rec in series.values() if rec is not None]
        if not any(o.reason_matches(t) for t in texts if t):
            return f"no recorded reason matches /{o.reason}/: {texts}"
    return None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[BuiltCase]:
    return build_corpus(tmp_path_factory.mktemp("badinput"), seed=7)


def test_corpus_has_enough_distinct_cases(corpus: list[BuiltCase]) -> None:
    """The corpus is what it says: >= 25 cases, each with outcomes, files that exist."""
    assert len(corpus) >= 25
    assert len({c.name for c in corpus}) == len(corpus)
    for case in corpus:
        assert case.items, case.name
        assert case.expected.alternatives, case.name
        assert all(it.path.is_file() for it in case.items), case.name
    by_name = {c.name: c for c in corpus}
    # spot-check that the corruption really is in the files
    trunc = by_name["truncated_in_pixel_data"].items[-1].path
    whole = by_name["truncated_in_pixel_data"].items[0].path
    assert trunc.stat().st_size < whole.stat().st_size - 1000
    assert by_name["missing_preamble"].items[0].path.read_bytes()[128:132] != b"DICM"
    import pydicom

    ds = pydicom.dcmread(by_name["wrong_sop_class_vs_context"].items[0].path)
    assert ds.SOPClassUID != ds.file_meta.MediaStorageSOPClassUID
    assert "SOPInstanceUID" not in pydicom.dcmread(
        by_name["missing_sop_instance_uid"].items[0].path
    )


@needs_dcmtk
def test_bad_input_corpus_against_node(corpus: list[BuiltCase], tmp_path: Path) -> None:
    with StorageSCP("BADPACS") as scp:
        node = NodeProcess.create(tmp_path, destinations=[scp.destination()], model=model_section())
        with node:
            db = node.data_dir / "molre.db"
            sent: dict[str, list[int | None]] = {}
            for i, case in enumerate(corpus):
                sent[case.name] = _send_case(node, case, _case_ae(i))
                assert node.alive, f"node died after case {case.name}:\n{node.log_tail()}"
                assert echo(node.port, node.ae_title, timeout=10) == 0, (
                    f"no C-ECHO after case {case.name}:\n{node.log_tail()}"
                )

            # every series that exists must settle in a terminal state
            def settled() -> bool:
                for case in corpus:
                    for uid in case.series_uids.values():
                        rec = _series(db, uid)
                        if rec is not None and rec["state"] not in TERMINAL:
                            return False
                return True

            problems: list[str] = []
            try:
                wait_until(settled, timeout=240, interval=0.5, what="all series terminal")
            except TimeoutError as exc:  # evaluate anyway: the table shows which ones hang
                problems.append(str(exc))
            matched: list[str] = []
            for i, case in enumerate(corpus):
                ae = _case_ae(i)
                assocs = _associations(db, ae)
                if not assocs:
                    problems.append(f"{case.name}: no association row for {ae}")
                    continue
                rows = _rows(db, ae)
                series = {role: _series(db, uid) for role, uid in case.series_uids.items()}
                why = [
                    (o, _mismatch(o, sent[case.name], rows, series))
                    for o in case.expected.alternatives
                ]
                ok = [o for o, w in why if w is None]
                if ok:
                    matched.append(f"{case.name}: {ok[0].label or 'ok'}")
                else:
                    problems.append(
                        f"{case.name}: " + " | ".join(f"[{o.label}] {w}" for o, w in why)
                    )
            print("\n".join(["bad-input outcomes:"] + matched))
            assert not problems, (
                "cases not matching any expected outcome:\n"
                + "\n".join(problems)
                + f"\n--- node log ---\n{node.log_tail(40)}"
            )

            # the file without preamble was stored as a proper Part-10 file
            pre = next(c for c in corpus if c.name == "missing_preamble")
            rows = _rows(db, _case_ae(corpus.index(pre)))
            spool = Path(rows[0]["spool_path"])
            assert spool.read_bytes()[128:132] == b"DICM"

            # the Implicit VR series was received (and kept) as Implicit VR
            imp = next(c for c in corpus if c.name == "implicit_vr_little_endian")
            rows = _rows(db, _case_ae(corpus.index(imp)))
            assert {r["transfer_syntax"] for r in rows} == {"1.2.840.10008.1.2"}

            # no patient name / ID in the node's log
            text = node.log_text()
            leaked = [v for v in PHI_VALUES if v in text]
            assert not leaked, f"PHI in node log: {leaked}"
            assert node.alive
        # exactly one SR for every series that was read, none for any other
        srs = [ds for ds in scp.received if ds.Modality == "SR"]
        per_series: dict[str, int] = {}
        for ds in srs:
            for uid in sr_source_series(ds):
                per_series[uid] = per_series.get(uid, 0) + 1
        delivered = {
            uid
            for case in corpus
            for uid in case.series_uids.values()
            if (_series(db, uid) or {}).get("state") == "delivered"
        }
        assert delivered, "no case was read at all"
        assert per_series == {uid: 1 for uid in delivered}


def test_status_class() -> None:
    assert status_class(0x0000) == SUCCESS
    assert status_class(0xB000) == "warning"
    assert status_class(0xA700) == FAILURE
    assert status_class(0xC000) == FAILURE
    assert status_class(None) == REFUSED
