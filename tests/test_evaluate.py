"""Metrics (AUC, bootstrap by case, Youden thresholds, paired bootstrap) and the evaluate /
compare / infer commands on a small trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from molre.training import metrics as M


def _brute_auc(y, s):
    y = np.asarray(y, float)
    s = np.asarray(s, float)
    pos, neg = s[y == 1], s[y == 0]
    gt = (pos[:, None] > neg[None, :]).sum()
    eq = (pos[:, None] == neg[None, :]).sum()
    return (gt + 0.5 * eq) / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties_and_nan():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 150).astype(float)
    s = np.round(rng.normal(size=150) + y, 1)  # rounding creates ties
    assert M.auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)
    y2 = y.copy()
    y2[:20] = np.nan
    assert M.auc(y2, s) == pytest.approx(_brute_auc(y[20:], s[20:]), abs=1e-12)
    assert M.auc([1, 1, 1], [0.1, 0.2, 0.3]) is None  # no negatives -> n/a, not 0.5
    assert M.auc([0, 1], [0.2, 0.9]) == 1.0


def test_bootstrap_weights_equal_explicit_resampling():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 80).astype(float)
    s = rng.normal(size=80) + y
    w = M.bootstrap_weights(80, 5, seed=3)
    assert (w.sum(1) == 80).all()
    got = M.weighted_auc(y, s, w)
    for b in range(5):
        idx = np.repeat(np.arange(80), w[b].astype(int))
        assert got[b] == pytest.approx(_brute_auc(y[idx], s[idx]), abs=1e-12)
    # seeded: same seed -> same resamples
    assert np.array_equal(w, M.bootstrap_weights(80, 5, seed=3))


def test_youden_threshold_and_sens_spec():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1], float)
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    t = M.youden_threshold(y, s)
    sens, spec = M.sens_spec(y, s, t)
    # best J: threshold 0.7 (sens 0.75, spec 1.0, J 0.75) vs 0.4 (sens 1, spec 0.75, J 0.75):
    # ties go to the higher threshold (fewer false alarms)
    assert t == pytest.approx(0.7)
    assert (sens, spec) == (0.75, 1.0)
    assert M.youden_threshold([1, 1], [0.2, 0.3]) is None


def test_specificity_threshold_is_the_lowest_with_enough_true_negatives():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(100), np.ones(40)]
    s = np.r_[rng.random(100), rng.random(40) + 0.5]
    t = M.specificity_threshold(y, s, 0.98)
    _, spec = M.sens_spec(y, s, t)
    assert spec == 0.98  # exactly 98 of 100 negatives below it
    # any lower threshold (the next score down) loses a true negative
    below = np.max(s[s < t])
    assert M.sens_spec(y, s, below)[1] < 0.98
    assert M.specificity_threshold(y, s, 0.0) == pytest.approx(np.min(s[y == 0]))
    assert M.specificity_threshold([1, 1], [0.2, 0.3], 0.98) is None


def test_choose_thresholds_guards_uninformative_scores():
    """Youden on a chance-level score picks an arbitrary (often tiny) threshold; the model card
    must not ship that as the operating point."""
    from molre.training.loop import MIN_INFORMATIVE_AUC, choose_thresholds

    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, (n, 3)).astype(float)
    good = np.clip(0.5 * y + rng.uniform(0, 0.5, (n, 3)), 0, 1)  # AUC ~0.75
    noise = rng.uniform(0.0, 0.1, n)  # chance: all small probabilities
    probs = np.stack([good[:, 0], noise, good[:, 2]], 1)
    y[:, 2] = np.nan  # not labelled on validation
    th = choose_thresholds(y, probs, ["a", "b", "c"])
    assert th["a"]["method"] == "youden_j" and th["a"]["validation_auc"] >= MIN_INFORMATIVE_AUC
    assert th["b"]["method"] == "uninformative"
    assert th["b"]["value"] > 0.5 and th["b"]["value"] > noise[y[:, 1] == 0].max()
    assert (noise >= th["b"]["value"]).sum() == 0  # nothing is called present
    assert th["c"]["method"] == "default" and th["c"]["value"] == 0.5


def test_paired_bootstrap_detects_better_model():
    rng = np.random.default_rng(4)
    n = 300
    labels = rng.integers(0, 2, (n, 3)).astype(float)
    good = labels + rng.normal(0, 0.5, (n, 3))
    bad = labels + rng.normal(0, 2.0, (n, 3))
    r = M.paired_bootstrap(labels, bad, good, n_boot=300, seed=0)
    assert r.delta > 0.1 and r.ci_low > 0 and r.p_value < 0.05
    same = M.paired_bootstrap(labels, good, good, n_boot=100, seed=0)
    assert same.delta == 0.0 and same.p_value == 1.0


def test_evaluate_arrays_reports_na_for_findings_without_positives():
    from molre.catalog import Catalog, load_catalog

    cat = load_catalog()
    keys = cat.keys[:3]
    sub = Catalog([cat.get(k) for k in keys])
    labels = np.array([[0, 0, np.nan], [1, 0, np.nan], [0, 0, 1], [1, 0, 0]], float)
    probs = np.array([[0.1, 0.2, 0.3], [0.9, 0.1, 0.3], [0.2, 0.5, 0.9], [0.8, 0.4, 0.1]])
    from molre.evaluate import evaluate_arrays

    res = evaluate_arrays(labels, probs, sub, {keys[0]: 0.5}, n_boot=50, seed=0)
    assert res["per_finding"][keys[0]]["auc"] == 1.0
    assert res["per_finding"][keys[1]]["auc"] is None  # no positives
    assert res["per_finding"][keys[1]]["note"].startswith("n/a")
    assert res["per_finding"][keys[0]]["sensitivity"] == 1.0
    assert res["n_findings_with_auc"] == 2
    assert res["macro_auc"] == pytest.approx((1.0 + 1.0) / 2)


# ------------------------------------------------------------------ evaluate / compare / infer


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    from molre.training.toydata import ensure_toy_run

    return ensure_toy_run(tmp_path_factory.getbasetemp() / "molre-toy")


def _app():
    import typer

    from cli import train_cmd

    app = typer.Typer()
    train_cmd.register(app)
    return app


def test_evaluate_writes_metrics_report_predictions_and_plots(toy_run, tmp_path):
    from typer.testing import CliRunner

    manifest, run = toy_run
    out = tmp_path / "eval"
    res = CliRunner().invoke(
        _app(),
        [
            "evaluate",
            "--checkpoint",
            str(run),
            "--data",
            str(manifest),
            "--out",
            str(out),
            "--split",
            "val",
            "--bootstrap",
            "200",
            "--cache-dir",
            str(run.parent / "cache"),
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_cases"] == 21 and m["split"] == "val"
    assert m["bootstrap"]["resamples"] == 200 and m["bootstrap"]["unit"] == "case"
    for k, v in m["per_finding"].items():
        assert v["auc"] is not None and v["ci_low"] <= v["auc"] <= v["ci_high"]
        assert 0 <= v["sensitivity"] <= 1 and 0 <= v["specificity"] <= 1
    assert m["macro_ci_low"] <= m["macro_auc"] <= m["macro_ci_high"]
    # the run's best epoch was chosen by exactly this metric on exactly these cases
    card = json.loads((run / "best" / "model.json").read_text())
    assert m["macro_auc"] == pytest.approx(card["metrics"]["macro_auc"], abs=1e-6)
    assert "hemorrhage" in m["per_category"]
    report = (out / "report.md").read_text()
    assert "| finding | AUC [95 % CI]" in report and "intraparenchymal_hemorrhage" in report
    from molre.evaluate import read_predictions

    p = read_predictions(out)
    assert len(p.case_ids) == 21 and p.probs.shape == (21, 3)
    assert np.isnan(p.labels).any()  # unlabelled entries survive as blanks
    pngs = m["roc_plots"]
    assert pngs and all((out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in pngs)
    # a split that does not exist: clear error naming the splits present
    res = CliRunner().invoke(
        _app(),
        [
            "evaluate",
            "--checkpoint",
            str(run),
            "--data",
            str(manifest),
            "--out",
            str(tmp_path / "x"),
            "--split",
            "nosuch",
        ],
    )
    assert res.exit_code != 0 and "splits present: test, train, val" in str(res.exception)


def test_compare_paired_bootstrap_and_infer(toy_run, tmp_path):
    from typer.testing import CliRunner

    from molre.evaluate import compare_runs

    manifest, run = toy_run
    r = compare_runs(
        [run / "best", run / "last"],
        tmp_path / "cmp",
        data=manifest,
        split="val",
        n_boot=200,
        seed=0,
        progress=False,
        cache_dir=run.parent / "cache",
    )
    assert r["cases"] == 21 and len(r["runs"]) == 2
    first, second = r["runs"]
    assert "vs_first" not in first and first["adapter"] == "molre"
    assert first["trainable_params"] > 0
    vs = second["vs_first"]
    assert vs["delta"] == pytest.approx(second["macro_auc"] - first["macro_auc"], abs=1e-9)
    assert vs["ci_low"] <= vs["delta"] <= vs["ci_high"] and 0 < vs["p_value"] <= 1
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "macro AUC [95 % CI]" in md and "Δ vs first" in md
    json.loads((tmp_path / "cmp" / "compare.json").read_text())
    # compare also accepts evaluate output dirs (no re-evaluation)
    r2 = compare_runs(
        [tmp_path / "cmp" / "run0", tmp_path / "cmp" / "run1"],
        tmp_path / "cmp2",
        n_boot=200,
        seed=0,
    )
    assert r2["runs"][1]["vs_first"]["delta"] == pytest.approx(vs["delta"])

    series = [d for d in sorted((manifest.parent).iterdir()) if d.is_dir()][0]
    res = CliRunner().invoke(_app(), ["infer", str(series), "--checkpoint", str(run), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{") :])
    assert set(out["probabilities"]) == {
        "intraparenchymal_hemorrhage",
        "hydrocephalus",
        "intracranial_calcification",
    }
    assert len(out["used_sop_instance_uids"]) == 24
    res = CliRunner().invoke(_app(), ["infer", str(series), "--checkpoint", str(run)])
    assert res.exit_code == 0 and "hydrocephalus" in res.output


def test_synth_phantoms_through_train_evaluate_infer_cli(tmp_path):
    """The researcher's path on the project's own phantoms (not the toy heads): `synth` writes
    DICOM + a 75-column manifest with blanks, `train` learns the 12 labelled findings and
    masks the rest, `evaluate` and `infer` read the checkpoint back."""
    import typer
    from typer.testing import CliRunner

    from cli import data_cmd, train_cmd
    from molre.catalog import load_catalog
    from molre.data.synth import PHANTOM_FINDINGS

    app = typer.Typer()
    data_cmd.register(app)
    train_cmd.register(app)
    cli = CliRunner()
    data, run = tmp_path / "phantoms", tmp_path / "run"
    res = cli.invoke(
        app,
        [
            "synth",
            "--out",
            str(data),
            "--count",
            "14",
            "--seed",
            "5",
            "--size",
            "40",
            "--thickness",
            "5",
            "--prevalence",
            "0.5",
            "--normal-fraction",
            "0.1",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    res = cli.invoke(
        app,
        [
            "train",
            "--backbone",
            "tiny-3d",
            "--data",
            str(data / "manifest.csv"),
            "--out",
            str(run),
            "--adapter",
            "lora",
            "--rank",
            "4",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--seed",
            "0",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    card = json.loads((run / "best" / "model.json").read_text())
    cat = load_catalog()
    assert [f["key"] for f in card["catalog"]["findings"]] == cat.keys  # full catalog kept
    prevalence = card["training"]["prevalence_train"]
    # only the plantable findings have labels; the other 63 columns are blank and masked out
    labelled = {k for k, v in prevalence.items() if v is not None}
    assert labelled and labelled <= set(PHANTOM_FINDINGS)
    for k in PHANTOM_FINDINGS:
        assert card["thresholds"][k]["method"] in ("youden_j", "uninformative", "default")
    assert card["thresholds"]["chronic_subdural_hematoma"]["method"] == "default"

    out = tmp_path / "eval"
    res = cli.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(run),
            "--data",
            str(data / "manifest.csv"),
            "--out",
            str(out),
            "--split",
            "test",
            "--bootstrap",
            "50",
            "--cache-dir",
            str(run / "cache"),
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["split"] == "test" and m["n_cases"] >= 1
    assert set(m["per_finding"]) >= set(PHANTOM_FINDINGS)

    series = sorted(p for p in data.iterdir() if p.is_dir() and p.name.startswith("series_"))[0]
    res = cli.invoke(app, ["infer", str(series), "--checkpoint", str(run), "--json"])
    assert res.exit_code == 0, res.output
    pred = json.loads(res.output[res.output.index("{") :])
    # only what the checkpoint has validation evidence for is reported; the other 63 catalog
    # findings are "not assessed", never Present
    evidence = {k for k, v in card["metrics"]["auc"].items() if v is not None}
    assert evidence and evidence <= set(PHANTOM_FINDINGS)
    assert set(pred["probabilities"]) == set(pred["decisions"]) == evidence
    assert set(pred["not_assessed"]) == set(cat.keys) - evidence
    assert "glioma" not in pred["decisions"] and "chiari_malformation" not in pred["decisions"]
    assert len(pred["used_sop_instance_uids"]) == len(list(series.glob("*.dcm")))
