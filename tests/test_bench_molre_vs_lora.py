"""`bench/molre_vs_lora.py --quick`: the benchmark's own code path, CI-sized."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_quick_benchmark_runs_and_reports_paired_intervals(tmp_path: Path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "molre_vs_lora.py"),
            "--quick",
            "--out",
            str(tmp_path),
            "--boot",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=880,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "molre_vs_lora_quick.json").read_text())
    assert set(res["settings"]) == {"multi", "single"}
    for setting in res["settings"].values():
        summary = setting["summary"]
        assert set(summary) == {
            "linear_probe",
            "lora_r8",
            "lora_r48",
            "molre_k6_r8",
            "molre_uniform",
            "molre_oracle",
        }
        ref = summary["lora_r48"]["delta_vs_lora_r48_per_seed"][0]
        assert ref["delta"] == 0.0  # the reference against itself
        d = summary["molre_k6_r8"]["delta_vs_lora_r48_per_seed"][0]
        assert d["lo"] <= d["delta"] <= d["hi"]
    # every variant x seed is an evaluate-style folder that `molre-node compare` reads
    from molre.evaluate import compare_runs

    runs = [
        tmp_path / "molre_vs_lora_quick" / "multi" / "seed0" / v
        for v in ("lora_r48", "molre_k6_r8")
    ]
    cmp = compare_runs(runs, tmp_path / "cmp", n_boot=20, progress=False)
    assert len(cmp["runs"]) == 2
    assert (tmp_path / "molre_vs_lora_quick" / "expert_usage_multi.png").is_file()
    assert "| multi | molre_k6_r8 |" in (tmp_path / "molre_vs_lora_quick.md").read_text()
    # an interrupted run is summarised from the same folders: the same macro AUC per variant
    full = {s: r["summary"] for s, r in res["settings"].items()}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "molre_vs_lora.py"),
            "--quick",
            "--from-runs",
            "--out",
            str(tmp_path),
            "--boot",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((tmp_path / "molre_vs_lora_quick.json").read_text())["settings"]
    for s, summary in full.items():
        assert again[s]["seeds_completed"] == [0] and again[s]["partial"] is False
        for v, x in summary.items():
            assert again[s]["summary"][v]["macro_auc"]["mean"] == pytest.approx(
                x["macro_auc"]["mean"], abs=2e-3
            )
