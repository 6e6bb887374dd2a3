"""Checkpoints trained on external backbone weights: train -> evaluate / infer -> the real node.

A site with pretrained CT-FM / DINOv3 / MedSigLIP weights trains adapters on them; the checkpoint
never ships those weights, so every consumer must be told where they are (`--weights` for the CLI,
`[model] weights` for the node) in the same forms `train` accepts: a file, a published-layout
directory, or `hf://org/name` from the offline Hugging Face cache. Here a tiny-3d backbone saved
with safetensors stands in for the licensed weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from common.errors import ConfigError, WeightsError
from tests.nodeproc import NodeProcess, StorageSCP, make_ct_series, send_folder, wait_until


def _run_cli(args: list[str]):
    from typer.testing import CliRunner

    from cli.main import app
    from common.log import configure_logging

    try:
        return CliRunner().invoke(app, args)
    finally:
        configure_logging()  # the app's callback bound the loggers to CliRunner's stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint dir, manifest, backbone state): adapters trained on saved tiny-3d weights
    that the checkpoint does not ship; the weights file is gone from where training read it."""
    from molre.backbones import create_backbone
    from molre.training.loop import train
    from molre.training.toydata import make_toy_dataset, toy_train_config

    base = tmp_path_factory.mktemp("realweights")
    manifest = make_toy_dataset(base / "data", count=12, seed=5, splits=(0.5, 0.34, 0.16))
    torch.manual_seed(11)
    state = {k: v.clone().contiguous() for k, v in create_backbone("tiny-3d").state_dict().items()}
    wfile = base / "site-weights" / "tiny.safetensors"
    wfile.parent.mkdir()
    save_file(state, str(wfile))
    res = train(
        toy_train_config(
            manifest,
            base / "run",
            base / "cache",
            epochs=1,
            weights=str(wfile),
            save_backbone=False,
        )
    )
    ckpt = res.best_dir or res.last_dir
    card = json.loads((ckpt / "model.json").read_text())
    assert card["backbone"]["weights_source"] == str(wfile.resolve())
    assert "weights_file" not in card["backbone"] and not (ckpt / "backbone.safetensors").exists()
    shutil.rmtree(wfile.parent)  # as if the run had been copied to another machine
    return ckpt, manifest, state


def _hf_cache(root: Path, state: dict) -> Path:
    """An offline Hugging Face cache holding `state` as hf://acme/tiny3d (what
    `huggingface-cli download` leaves behind)."""
    cache = root / "hub"
    repo = cache / "models--acme--tiny3d"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(state, str(snap / "model.safetensors"))
    return cache


def test_checkpoint_names_the_missing_weights_and_loads_with_them(trained, tmp_path):
    from molre.checkpoint import Predictor

    ckpt, _, state = trained
    with pytest.raises(WeightsError, match=r"\[model\] weights"):
        Predictor.from_checkpoint(ckpt)
    f = tmp_path / "w.safetensors"
    save_file(state, str(f))
    p = Predictor.from_checkpoint(ckpt, weights=str(f))
    assert p.predict_tensor(torch.zeros((1, *p.recipe.output_shape()))).shape == (1, 3)
    other = {k: (v + 1 if v.is_floating_point() else v) for k, v in state.items()}
    save_file(other, str(f))
    with pytest.raises(Exception, match="digest mismatch"):
        Predictor.from_checkpoint(ckpt, weights=str(f))


def test_infer_and_evaluate_accept_an_hf_reference(trained, tmp_path, monkeypatch):
    """`--weights hf://org/name` reaches the loader intact (a Path option made it hf:/org/name)."""
    import huggingface_hub.constants as hfc

    ckpt, manifest, state = trained
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(_hf_cache(tmp_path, state)))
    series = sorted(p for p in manifest.parent.iterdir() if p.is_dir())[-1]
    res = _run_cli(
        ["infer", str(series), "--checkpoint", str(ckpt), "--weights", "hf://acme/tiny3d", "--json"]
    )
    assert res.exit_code == 0, (res.output, res.exception)
    out = json.loads(res.stdout[res.stdout.index("{") :])
    assert set(out["probabilities"]) == _assessed(ckpt)
    res = _run_cli(
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(manifest),
            "--out",
            str(tmp_path / "eval"),
            "--weights",
            "hf://acme/tiny3d",
            "--split",
            "all",
            "--bootstrap",
            "20",
        ]
    )
    assert res.exit_code == 0, (res.output, res.exception)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_cases"] == 12


def test_node_config_weights_key_resolves_relative_paths():
    from node.config import config_from_dict

    base = Path("/srv/molre")
    rel = config_from_dict({"model": {"weights": "weights/ct-fm"}}, base_dir=base)
    assert rel.model.weights == str((base / "weights/ct-fm").resolve())
    hf = config_from_dict(
        {"model": {"weights": "hf://project-lighter/ct_fm_feature_extractor"}}, base_dir=base
    )
    assert hf.model.weights == "hf://project-lighter/ct_fm_feature_extractor"
    assert config_from_dict({}, base_dir=base).model.weights == ""


def test_node_serves_a_checkpoint_trained_on_external_weights(trained, tmp_path):
    """The real node (inference child process) loads the checkpoint with `[model] weights`
    given relative to its config file, reads a series sent over DICOM and returns an SR."""
    ckpt, _, state = trained
    (tmp_path / "bb").mkdir()
    save_file(state, str(tmp_path / "bb" / "tiny.safetensors"))
    info = make_ct_series(tmp_path / "series", ["intraparenchymal_hemorrhage"], n_slices=12, seed=3)
    with StorageSCP("RESULTS") as scp:
        node = NodeProcess.create(
            tmp_path,
            destinations=[scp.destination()],
            model={"checkpoint": str(ckpt), "weights": "bb/tiny.safetensors"},
        )
        node.start()
        try:
            res = send_folder(info.paths, node.port, calling_ae="TESTSCU")
            assert res.statuses == [0] * len(info.paths)
            try:
                sr = wait_until(
                    lambda: next((d for d in list(scp.received) if d.Modality == "SR"), None),
                    150,
                    interval=0.3,
                    what="SR",
                )
            except TimeoutError as exc:
                raise AssertionError(f"{exc}\n{node.log_tail(40)}") from None
            assert sr.StudyInstanceUID == info.study_uid
        finally:
            assert node.stop() == 0, node.log_tail(30)
    import sqlite3

    con = sqlite3.connect(f"file:{node.data_dir / 'molre.db'}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT finding_key FROM results WHERE series_uid = ?", (info.series_uid,)
        ).fetchall()
    finally:
        con.close()
    assert {r[0] for r in rows} == _assessed(ckpt)


def test_train_refuses_random_init_of_a_pretrained_backbone(tmp_path):
    missing = tmp_path / "no-manifest.csv"
    res = _run_cli(
        ["train", "--backbone", "ct-fm", "--data", str(missing), "--out", str(tmp_path / "run")]
    )
    assert isinstance(res.exception, ConfigError)
    assert "--random-init" in str(res.exception) and "--weights" in str(res.exception)
    assert not (tmp_path / "run").exists()
    # asked for explicitly: a loud warning, and training goes on (here to the missing manifest)
    res = _run_cli(
        [
            "train",
            "--backbone",
            "ct-fm",
            "--random-init",
            "--data",
            str(missing),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert "RANDOM weights" in res.output
    assert res.exception is not None and "no-manifest.csv" in str(res.exception)
    assert not isinstance(res.exception, ConfigError) or "--random-init" not in str(res.exception)
    # tiny test backbones need no weights; --slices is for 2D backbones only
    res = _run_cli(["train", "--backbone", "tiny-3d", "--slices", "8", "--data", str(missing)])
    assert isinstance(res.exception, ConfigError) and "2D backbones" in str(res.exception)


def _assessed(ckpt) -> set[str]:
    """The toy checkpoint's findings with validation evidence (only those are reported)."""
    from molre.checkpoint import assessed_findings, load_card

    found = set(assessed_findings(load_card(ckpt)))
    assert found and found <= {
        "intraparenchymal_hemorrhage",
        "hydrocephalus",
        "intracranial_calcification",
    }
    return found
