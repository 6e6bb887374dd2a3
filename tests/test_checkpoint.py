"""Checkpoint format: save → load reproduces predictions; mismatches fail with a clear message;
the packaged demo loads and predicts a DICOM series."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.errors import CheckpointError
from molre.checkpoint import (
    Predictor,
    checkpoint_hash,
    default_checkpoint_path,
    load_card,
    load_checkpoint,
    save_checkpoint,
    trainable_state_dict,
)


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    from molre.training.toydata import ensure_toy_run

    return ensure_toy_run(tmp_path_factory.getbasetemp() / "molre-toy")


def _series_dirs(manifest: Path, split: str) -> list[Path]:
    from molre.catalog import load_catalog
    from molre.data.manifest import read_manifest

    return [Path(r.path) for r in read_manifest(manifest, load_catalog()) if r.split == split]


def test_save_load_roundtrip_reproduces_predictions(toy_run, tmp_path):
    manifest, run = toy_run
    a = load_checkpoint(run / "best")
    x = torch.rand(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ya = a.model(x)
    bb = load_file(str(run / "best" / "backbone.safetensors"))
    h = save_checkpoint(tmp_path / "copy", a.model, a.card, backbone_state=bb)
    assert h == a.checkpoint_hash  # same tensors + same card -> same hash
    b = load_checkpoint(tmp_path / "copy")
    with torch.no_grad():
        yb = b.model(x)
    assert torch.equal(ya, yb)
    assert b.checkpoint_hash == h
    # the hash changes when anything in the card changes
    card2 = dict(a.card, model_version="other")
    assert checkpoint_hash(trainable_state_dict(a.model), card2) != h


def test_predictor_predicts_a_dicom_series(toy_run):
    manifest, run = toy_run
    series = _series_dirs(manifest, "test")[0]
    p = Predictor.from_checkpoint(run)  # a run dir resolves to best/
    r1 = p.predict_series(series)
    r2 = Predictor.from_checkpoint(run / "best").predict_series(sorted(series.iterdir()))
    assert set(r1.probabilities) == set(p.catalog.keys)
    assert r1.probabilities == r2.probabilities
    assert all(0.0 <= v <= 1.0 for v in r1.probabilities.values())
    for k, v in r1.probabilities.items():
        assert r1.decisions[k] == (v >= p.thresholds[k])
    assert len(r1.used_sop_instance_uids) == 24 and len(set(r1.used_sop_instance_uids)) == 24
    assert r1.checkpoint_hash == p.checkpoint_hash and len(p.checkpoint_hash) == 64
    assert r1.is_demo is False and r1.model_name and r1.model_version
    json.dumps(r1.to_dict())


def test_wrong_backbone_digest_is_refused(toy_run, tmp_path):
    _, run = toy_run
    bad = tmp_path / "bad"
    shutil.copytree(run / "best", bad)
    state = load_file(str(bad / "backbone.safetensors"))
    k = sorted(k for k in state if state[k].is_floating_point())[0]
    state[k] = state[k] + 0.01
    save_file(state, str(bad / "backbone.safetensors"))
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(bad)
    # the card's digest edited instead: same refusal, naming the backbone
    bad2 = tmp_path / "bad2"
    shutil.copytree(run / "best", bad2)
    card = json.loads((bad2 / "model.json").read_text())
    card["backbone"]["weights_digest"] = "0" * 64
    (bad2 / "model.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="tiny-3d.*digest|digest.*tiny-3d"):
        load_checkpoint(bad2)


def test_different_catalog_is_refused_with_the_findings_named(toy_run):
    from molre.catalog import Catalog, load_catalog

    _, run = toy_run
    full = load_catalog()
    with pytest.raises(CheckpointError, match="findings missing from the checkpoint") as e:
        load_checkpoint(run / "best", catalog=full)
    assert "intracranial_hemorrhage" in str(e.value)
    card = load_card(run / "best")
    same = Catalog.from_dict(card["catalog"])
    assert load_checkpoint(run / "best", catalog=same).catalog == same
    reordered = Catalog(list(reversed(list(same))))
    with pytest.raises(CheckpointError, match="different order"):
        load_checkpoint(run / "best", catalog=reordered)


def test_missing_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(CheckpointError, match="looked for") as e:
        Predictor.from_checkpoint(tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "model.json") in str(e.value)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.json").write_text(
        json.dumps(
            {"format_version": 1, "backbone": {}, "catalog": {}, "recipe": {}, "adapter": {}}
        )
    )
    with pytest.raises(CheckpointError, match="adapter.safetensors"):
        load_checkpoint(tmp_path / "half")


def test_packaged_demo_checkpoint_loads_and_is_labelled():
    d = default_checkpoint_path()
    card = load_card(d)
    assert card["is_demo"] is True
    assert "not for clinical use" in card["disclaimer"].lower()
    # MoLRE on the packaged, frozen phantom-3d: the checkpoint names the shipped weights
    assert card["backbone"]["name"] == "phantom-3d"
    assert card["backbone"]["weights_source"].startswith("packaged:")
    assert card["adapter"]["config"]["experts"] == 6 and card["adapter"]["config"]["rank"] == 8
    size = sum(f.stat().st_size for f in d.iterdir())
    assert size < 8 * 2**20
    assert load_card("demo") == card  # every command accepts "demo" for it
    p = Predictor.from_checkpoint(None)
    assert p.is_demo and p.card["adapter"]["config"]["experts"] == 6
    x = torch.zeros((1, *p.recipe.output_shape()))
    probs = p.predict_tensor(x)
    assert probs.shape == (1, len(p.catalog.keys)) and np.isfinite(probs).all()


def test_assessed_findings_are_those_with_validation_evidence():
    from molre.checkpoint import assessed_findings

    card = {
        "catalog": {"findings": [{"key": "a"}, {"key": "b"}, {"key": "c"}]},
        "metrics": {"auc": {"a": 0.9, "b": None, "c": 0.55}},
    }
    assert assessed_findings(card) == ["a", "c"]  # b had no positives/negatives in validation
    assert assessed_findings({**card, "assessed_findings": ["c"]}) == ["c"]
    assert assessed_findings({"catalog": card["catalog"]}) == ["a", "b", "c"]  # no metrics
