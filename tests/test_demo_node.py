"""The first thing a new user tries: a phantom with a planted hemorrhage sent to `molre-node serve`
on its embedded defaults comes back with that finding Present; a normal phantom with none."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from molre.data.synth import write_phantom_series
from tests.nodeproc import NodeProcess, StorageSCP, sr_for, sr_presence, storescu

CALLERS = [{"ae_title": "DCMTKSCU", "host": ""}, {"ae_title": "TESTSCU", "host": "127.0.0.1"}]
#: Phantoms as `molre-node synth --findings ... --seed S` would draw them (full coverage, the
#: site's own matrix); fixed seeds so the test is deterministic.
ICH_SEED, NORMAL_SEED = 2, 12


def test_planted_hemorrhage_is_reported_present_and_normal_reports_nothing(tmp_path: Path):
    ich = write_phantom_series(
        tmp_path / "ich",
        np.random.default_rng(ICH_SEED),
        ["intraparenchymal_hemorrhage"],
        size=None,
        site="metro",
    )
    normal = write_phantom_series(
        tmp_path / "normal", np.random.default_rng(NORMAL_SEED), [], size=None, site="valley"
    )
    with StorageSCP("RESULTS") as scp:
        node = NodeProcess.create(
            tmp_path / "node",
            destinations=[scp.destination()],
            network={"allowed_callers": CALLERS},
        )
        with node:
            for info in (ich, normal):
                proc = storescu(info.paths, node.port, calling_ae="DCMTKSCU")
                assert proc.returncode == 0, proc.stdout + proc.stderr
            found = sr_presence(sr_for(scp, ich.series_uid, node), tmp_path)
            clean = sr_presence(sr_for(scp, normal.series_uid, node), tmp_path)
    # the demo reports exactly the 12 findings it was trained and validated on
    assert len(found) == 12 and set(found) == set(clean)
    assert found["intraparenchymal_hemorrhage"][1], found
    assert not any(present for _, present in clean.values()), clean
    assert found["intraparenchymal_hemorrhage"][0] > clean["intraparenchymal_hemorrhage"][0]
