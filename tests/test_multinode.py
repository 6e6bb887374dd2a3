"""Several real nodes on ONE PostgreSQL database (issue 15; docs/operations.md section 9).

Two receiving nodes (receive, assemble, dispatch) and two inference nodes (infer) share one
database and one data dir (the supported shared-storage model: the same path on every node).
Twelve series go to both receivers in parallel; one inference node is killed with SIGKILL while
it holds a job. Every series must reach the PACS exactly once (distinct and total SR SOP Instance
UIDs, SRs per source series), and the audit trail must say what the PACS got.

Also here: one full node on PostgreSQL (the single-node path end to end on the other backend).
Skipped without a PostgreSQL server (tests/pgcluster.py; MOLRE_TEST_PG=required in CI).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.nodeproc import (
    NodeProcess,
    StorageSCP,
    make_ct_series,
    send_folder,
    sql,
    sr_for,
    sr_presence,
    wait_until,
)
from tests.orthanc import model_section

FINDINGS = [
    "subdural_hemorrhage",
    "intraparenchymal_hemorrhage",
    "hydrocephalus",
    "acute_infarct",
    "epidural_hematoma",
    "skull_fracture",
]
N_SERIES = 12
EDGE_ROLES = ["receive", "assemble", "dispatch"]


@pytest.fixture()
def pg_url(pg_server):
    url = pg_server.create_database()
    yield url
    pg_server.drop_database(url)


def _details(value) -> dict:
    return value if isinstance(value, dict) else json.loads(value or "{}")


def _sr_series(ds) -> list[str]:
    """Source series an SR reports on (its evidence)."""
    return [
        se.SeriesInstanceUID
        for st in ds.CurrentRequestedProcedureEvidenceSequence
        for se in st.ReferencedSeriesSequence
    ]


def test_two_receivers_two_workers_one_killed_every_series_reported_once(
    tmp_path: Path, pg_url: str
) -> None:
    shared = tmp_path / "shared-data"  # one data dir (spool + reports) for every node
    model = {**model_section(), "job_lease_s": 20.0, "job_timeout_s": 15.0}
    with StorageSCP("PACS") as pacs:
        common = dict(
            database_url=pg_url,
            data_dir=shared,
            destinations=[pacs.destination()],
            model=model,
            retry={
                "max_attempts": 4,
                "job_retry_delay_s": 0.5,
                "export_backoff_base_s": 0.5,
                "export_backoff_max_s": 2.0,
            },
        )
        edges = [
            NodeProcess.create(
                tmp_path,
                config_name=f"edge-{i}.toml",
                ae_title="MOLRE",
                node={"name": f"edge-{i}", "roles": EDGE_ROLES},
                **common,
            )
            for i in (1, 2)
        ]
        gpus = [
            NodeProcess.create(
                tmp_path,
                config_name=f"gpu-{i}.toml",
                node={"name": f"gpu-{i}", "roles": ["infer"]},
                **common,
            )
            for i in (1, 2)
        ]
        nodes = edges + gpus
        try:
            for n in nodes:  # all at once on an empty database: migrations are serialised
                n.start(wait=False)
            for n in nodes:
                n.wait_ready(120)
            series = [
                make_ct_series(
                    tmp_path / f"s{i}",
                    [FINDINGS[i % len(FINDINGS)]],
                    n_slices=12,
                    size=64,
                    seed=100 + i,
                )
                for i in range(N_SERIES)
            ]
            with ThreadPoolExecutor(max_workers=4) as pool:
                sent = list(pool.map(lambda i: edges[i % 2].send(series[i].paths), range(N_SERIES)))
            assert all(r.statuses == [0] * 12 for r in sent)

            # kill -9 an inference node while it holds a job (whichever holds one first)
            def held():
                rows = sql(
                    edges[0],
                    "SELECT id, node FROM jobs WHERE state = 'running' "
                    "AND node IN ('gpu-1', 'gpu-2')",
                )
                return rows[0] if rows else None

            killed_job, killed_name = wait_until(
                held, 90, interval=0.05, what="a job running on an inference node"
            )
            victim = next(g for g in gpus if g.config_path.stem == killed_name)
            victim.kill()
            survivor = next(g for g in gpus if g is not victim)

            uids = [s.series_uid for s in series]

            def all_delivered():
                for n in nodes:
                    if n.alive is False and n is not victim:
                        raise RuntimeError(f"{n.config_path.stem} died:\n{n.log_tail()}")
                states = dict(sql(edges[0], "SELECT series_uid, state FROM series"))
                return all(states.get(u) == "delivered" for u in uids)

            try:
                wait_until(all_delivered, 150, interval=0.5, what="every series delivered")
            except TimeoutError as exc:
                states = sql(edges[0], "SELECT series_uid, state, reason FROM series")
                raise AssertionError(
                    f"{exc}\n{states}\n--- survivor ---\n{survivor.log_tail(30)}"
                ) from None
            time.sleep(2.0)  # a duplicate in flight would arrive now

            # -- the PACS: exactly one SR per series -----------------------------------------
            srs = [d for d in list(pacs.received) if d.Modality == "SR"]
            sops = [str(d.SOPInstanceUID) for d in srs]
            per_series = Counter(u for d in srs for u in _sr_series(d))
            assert len(sops) == N_SERIES, Counter(sops)
            assert len(set(sops)) == N_SERIES
            assert per_series == Counter({u: 1 for u in uids})

            # -- the audit trail says the same -------------------------------------------------
            delivered = sql(
                edges[0],
                "SELECT series_uid, report_sop_uid, state, attempts, claimed_by FROM exports",
            )
            assert sorted(r[1] for r in delivered) == sorted(sops)
            assert {r[0] for r in delivered} == set(uids)
            assert all(r[2] == "delivered" and r[4] is None for r in delivered)
            events = sql(edges[0], "SELECT entity, kind, series_uid, details FROM events")
            kinds = Counter((e, k) for e, k, _, _ in events)
            assert kinds[("export", "delivered")] == N_SERIES
            assert kinds[("export", "late_attempt")] == 0
            assert kinds[("job", "late_finish")] == 0
            assert kinds[("series", "created")] == N_SERIES  # INSERT .. RETURNING on PG
            dispatchers = {
                _details(d)["node"] for e, k, _, d in events if (e, k) == ("export", "delivered")
            }
            assert dispatchers <= {"edge-1", "edge-2"}
            # the killed node's job was taken over after its lease, by the other worker node
            reclaimed = [
                (_details(d), s) for e, k, s, d in events if (e, k) == ("job", "reclaimed")
            ]
            assert any(
                d["node"] == survivor.config_path.stem
                and str(d["previous_worker"]).startswith(killed_name + ":")
                for d, _ in reclaimed
            ), reclaimed
            jobs = sql(edges[0], "SELECT id, state, node FROM jobs")
            assert Counter(s for _, s, _ in jobs if s != "superseded") == {"done": N_SERIES}
            assert dict((i, n) for i, _, n in jobs)[killed_job] == survivor.config_path.stem
            # what each SR says is what the results table holds
            for ds in srs:
                uid = _sr_series(ds)[0]
                rows = sql(
                    edges[0],
                    "SELECT r.finding_key, r.probability, r.decision "
                    "FROM results r JOIN jobs j ON j.id = r.job_id "
                    "WHERE r.series_uid = ? AND j.state = 'done'",
                    uid,
                )
                in_sr = sr_presence(ds, tmp_path)
                assert rows and set(in_sr) == {k for k, _, _ in rows}
                for k, p, d in rows:
                    assert in_sr[k][0] == pytest.approx(p, abs=1e-5)
                    assert in_sr[k][1] == bool(d)
            # nodes recorded on what they own
            owners = {n for (n,) in sql(edges[0], "SELECT DISTINCT node FROM associations")}
            assert owners == {"edge-1", "edge-2"}
            assert {n for _, _, n in jobs} <= {"gpu-1", "gpu-2"}
        finally:
            for n in nodes:
                if n.alive:
                    rc = n.stop(timeout=30)
                    assert rc == 0 or n is victim, f"{n.config_path.stem}: {rc}\n{n.log_tail()}"
                else:
                    n.kill()


def test_one_node_on_postgresql_end_to_end(tmp_path: Path, pg_url: str) -> None:
    """The single-node path (DICOM in, SR out, audit) on PostgreSQL, incl. a kill -9 restart."""
    from tests.test_node_service import check_sr_matches_audit

    with StorageSCP("RESULTS") as scp:
        node = NodeProcess.create(
            tmp_path, destinations=[scp.destination()], database_url=pg_url, model=model_section()
        )
        with node:
            a = make_ct_series(tmp_path / "a", ["subdural_hemorrhage"], n_slices=12, seed=1)
            assert send_folder(a.paths, node.port).statuses == [0] * 12
            ds = sr_for(scp, a.series_uid, node)
            check_sr_matches_audit(node, ds, a.series_uid, tmp_path)
            node.wait_series_state(a.series_uid, ["delivered"], timeout=30)
            # kill -9 right after Success for every instance; the restart finishes the series
            b = make_ct_series(tmp_path / "b", ["hydrocephalus"], n_slices=12, seed=2)
            assert node.send(b.paths).statuses == [0] * 12
            node.kill()
            node.start()
            ds = sr_for(scp, b.series_uid, node)
            check_sr_matches_audit(node, ds, b.series_uid, tmp_path)
            node.wait_series_state(b.series_uid, ["delivered"], timeout=30)
            assert node.stop() == 0
        srs = [d for d in scp.received if d.Modality == "SR"]
        assert len(srs) == 2 == len({d.SOPInstanceUID for d in srs})
        assert sql(node, "SELECT COUNT(*) FROM instances WHERE status = 'stored'")[0][0] == 24
        created = sql(
            node, "SELECT COUNT(*) FROM events WHERE entity = 'series' AND kind = 'created'"
        )[0][0]
        assert created == 2
