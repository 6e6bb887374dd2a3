"""Training: focal loss masking, the LR schedule, learning on toy phantoms, exact resume, DDP."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from molre.losses import focal_loss, prevalence_weights
from molre.training.schedule import warmup_cosine_factor


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    from molre.training.toydata import ensure_toy_run

    return ensure_toy_run(tmp_path_factory.getbasetemp() / "molre-toy")


# ---------------------------------------------------------------------------------- unit tests


def test_focal_loss_masks_nan_and_matches_manual_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.0]])
    targets = torch.tensor([[1.0, float("nan"), 0.0], [0.0, 1.0, float("nan")]])
    pw = torch.tensor([3.0, 1.0, 2.0])
    got = focal_loss(logits, targets, gamma=2.0, pos_weight=pw)
    terms = []
    for i in range(2):
        for f in range(3):
            y = targets[i, f].item()
            if math.isnan(y):
                continue
            p = 1 / (1 + math.exp(-logits[i, f].item()))
            if y == 1:
                terms.append(-pw[f].item() * (1 - p) ** 2 * math.log(p))
            else:
                terms.append(-(p**2) * math.log(1 - p))
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    # gamma = 0 without weights is plain BCE over the labelled entries
    bce = F.binary_cross_entropy_with_logits(
        logits[~torch.isnan(targets)], targets[~torch.isnan(targets)]
    )
    assert focal_loss(logits, targets, gamma=0.0).item() == pytest.approx(bce.item(), rel=1e-5)
    # masked entries get no gradient at all
    lg = logits.clone().requires_grad_(True)
    focal_loss(lg, targets).backward()
    assert lg.grad[0, 1] == 0 and lg.grad[1, 2] == 0 and lg.grad[0, 0] != 0
    # nothing labelled: zero, finite
    assert focal_loss(logits, torch.full_like(logits, float("nan"))).item() == 0.0


def test_prevalence_weights():
    y = np.array([[1, 0, np.nan], [0, 0, np.nan], [0, 0, np.nan], [0, 1, np.nan]], np.float32)
    w = prevalence_weights(y)
    assert w.tolist() == pytest.approx([3.0, 3.0, 1.0])
    assert prevalence_weights(np.array([[1.0], [0.0]] * 1 + [[0.0]] * 98), max_weight=20)[0] == 20.0


def test_warmup_cosine_schedule():
    f = [warmup_cosine_factor(s, 100, 10, floor=0.0) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # monotone decay after warm-up
    assert f[-1] < 0.01


# ------------------------------------------------------------------------------ integration


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epochs": 0}, "TrainConfig.epochs: expected an integer >= 1, got 0"),
        ({"adapter": "dora"}, 'TrainConfig.adapter: expected one of molre, lora, none, got "dora"'),
        ({"lr": 0.0}, "TrainConfig.lr: expected a positive number, got 0.0"),
        ({"limit": 0}, "TrainConfig.limit: expected an integer >= 1, got 0"),
        ({"batch_size": "4"}, 'TrainConfig.batch_size: expected an integer >= 1, got "4"'),
        ({"random_init": True, "weights": "w.safetensors"}, "TrainConfig.random_init: "),
        ({"epohcs": 3}, "TrainConfig.epohcs: unknown key"),
    ],
)
def test_train_config_errors_name_the_field(kwargs, message):
    from common.errors import ConfigError
    from molre.training import TrainConfig

    with pytest.raises(ConfigError) as err:
        TrainConfig(backbone="tiny-3d", data="m.csv", out="run", **kwargs)
    assert str(err.value).startswith(message)


def test_train_config_paths_and_dict():
    from molre.training import TrainConfig

    cfg = TrainConfig(backbone="tiny-3d", data="m.csv", out=Path("run"), targets=(r".*qkv",))
    assert cfg.data == Path("m.csv") and cfg.targets == [r".*qkv"]
    d = cfg.to_dict()
    assert d["data"] == "m.csv" and d["out"] == "run" and d["alpha"] == 16.0
    assert list(d)[:5] == ["backbone", "data", "out", "weights", "adapter"]
    assert json.loads(json.dumps(d)) == d


def test_two_epochs_learn_and_write_run(toy_run):
    manifest, run = toy_run
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert lines[-1]["step"] == 18  # ceil(33 train volumes / batch 4) * 2 epochs
    best = max(l["val_macro_auc"] for l in lines)
    assert best > 0.7, lines
    for l in lines:
        assert l["volumes_per_s"] > 0 and math.isfinite(l["train_loss"])
        usage = l["expert_usage"]
        assert usage, "expert usage must be logged per adapted layer"
        for layer in usage.values():
            assert len(layer["mean_gate"]) == 6
            assert sum(layer["mean_gate"]) == pytest.approx(1.0, abs=1e-4)
            assert 0 < layer["entropy"] <= math.log(6) + 1e-6
    for d in ("best", "last"):
        assert (run / d / "adapter.safetensors").is_file() and (run / d / "model.json").is_file()
    assert (run / "last" / "trainer_state.pt").is_file()
    card = json.loads((run / "best" / "model.json").read_text())
    assert card["adapter"]["type"] == "molre" and card["adapter"]["config"]["experts"] == 6
    assert card["training"]["counts"]["train"] == 33 and card["training"]["counts"]["val"] == 21
    assert card["backbone"]["init_seed"] == 0 and card["backbone"]["weights_file"]
    assert set(card["thresholds"]) == set(card["training"]["prevalence_train"])
    assert all(
        t["method"] in ("youden_j", "uninformative", "default") for t in card["thresholds"].values()
    )
    assert card["metrics"]["macro_auc"] == pytest.approx(max(l["val_macro_auc"] for l in lines))
    # the backbone never goes into the adapter file
    from safetensors.torch import load_file

    keys = load_file(str(run / "best" / "adapter.safetensors")).keys()
    assert all(("lora_" in k or ".router." in k or not k.startswith("backbone.")) for k in keys)
    assert any(k.startswith("head.") for k in keys)


def test_resume_continues_exactly(toy_run, tmp_path):
    from safetensors.torch import load_file

    from molre.training import train
    from molre.training.toydata import toy_train_config

    manifest, run = toy_run
    cache = run.parent / "cache"
    out = tmp_path / "interrupted"
    # the same 2-epoch run, stopped after its first epoch (as if killed), then resumed
    r1 = train(toy_train_config(manifest, out, cache, epochs=2, stop_after_epoch=1))
    assert r1.global_step == 9 and r1.epochs_run == 1
    r2 = train(toy_train_config(manifest, out, cache, epochs=2, resume=out))
    assert r2.epochs_run == 1 and r2.global_step == 18
    a = load_file(str(run / "last" / "adapter.safetensors"))
    b = load_file(str(out / "last" / "adapter.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lb] == [1, 2]
    for x, y in zip(la, lb):
        assert x["step"] == y["step"] and x["train_loss"] == y["train_loss"]
        assert x["val_macro_auc"] == y["val_macro_auc"]
    # resuming with different options is refused with the option named
    from common.errors import MolreError

    with pytest.raises(MolreError, match="lr"):
        train(toy_train_config(manifest, out, cache, epochs=3, resume=out, lr=0.5))


def test_flip_augmentation_axis_draws_and_refusals():
    from types import SimpleNamespace

    from common.errors import ConfigError
    from molre.catalog import load_catalog
    from molre.training.loop import _flip_dim, _flip_some

    cat = load_catalog()
    cfg = SimpleNamespace(augment="flip")
    spl = SimpleNamespace(params={"orientation": "SPL"})
    assert _flip_dim(cfg, spl, 3, cat) == 4  # (B, C, S, P, L)
    assert _flip_dim(cfg, spl, 2, cat) == 4  # (B, S, C, P, L)
    slp = SimpleNamespace(params={"orientation": "SLP"})
    assert _flip_dim(cfg, slp, 3, cat) == 3 and _flip_dim(cfg, slp, 2, cat) == 3
    assert _flip_dim(SimpleNamespace(augment="none"), spl, 3, cat) is None
    names = {"left_mca_infarct": "Left MCA infarct", "hydrocephalus": "Hydrocephalus"}

    class Sided:
        keys = list(names)

        def __getitem__(self, k):
            return SimpleNamespace(name=names[k])

    with pytest.raises(ConfigError, match="left_mca_infarct"):
        _flip_dim(cfg, spl, 3, Sided())

    x = torch.arange(64 * 2 * 3 * 4, dtype=torch.float32).reshape(64, 1, 2, 3, 4)
    a = _flip_some(x, 4, seed=0, epoch=1, batch=2)
    assert torch.equal(a, _flip_some(x, 4, seed=0, epoch=1, batch=2))  # same draw on resume
    assert not torch.equal(a, _flip_some(x, 4, seed=0, epoch=2, batch=2))
    flipped = [bool(torch.equal(a[i], x[i].flip(3))) for i in range(64)]
    kept = [bool(torch.equal(a[i], x[i])) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept))  # each volume mirrored whole, or not
    assert 16 < sum(flipped) < 48


def test_flip_augmentation_trains_differently_and_is_recorded(toy_run, tmp_path):
    from safetensors.torch import load_file

    from molre.training import train
    from molre.training.toydata import toy_train_config

    manifest, run = toy_run
    out = tmp_path / "flip"
    res = train(toy_train_config(manifest, out, run.parent / "cache", augment="flip"))
    card = json.loads((out / "last" / "model.json").read_text())
    assert card["training"]["augment"] == "flip"
    assert res.best_val_macro_auc is not None and res.best_val_macro_auc > 0.6
    plain = load_file(str(run / "last" / "adapter.safetensors"))
    aug = load_file(str(out / "last" / "adapter.safetensors"))
    assert any(not torch.equal(plain[k], aug[k]) for k in plain)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(
    rank: int, world: int, port: int, manifest: str, out: str, cache: str, report: str
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    import molre.checkpoint as ck
    import molre.training.loop as loop
    from molre.training import train
    from molre.training.toydata import toy_train_config

    writes = []
    real_save, real_line = ck.save_checkpoint, loop._json_line
    ck.save_checkpoint = lambda *a, **k: (writes.append("checkpoint"), real_save(*a, **k))[1]
    loop._json_line = lambda *a, **k: (writes.append("metrics"), real_line(*a, **k))[1]
    res = train(toy_train_config(Path(manifest), Path(out), Path(cache), epochs=1, batch_size=4))
    Path(report, f"rank{rank}.json").write_text(
        json.dumps({"writes": writes, "step": res.global_step})
    )
    if dist.is_initialized():
        dist.destroy_process_group()


def test_ddp_two_processes_gloo_only_rank0_writes(toy_run, tmp_path):
    import torch.multiprocessing as mp

    manifest, run = toy_run
    out, report = tmp_path / "ddp", tmp_path / "report"
    report.mkdir()
    mp.spawn(
        _ddp_worker,
        args=(2, _free_port(), str(manifest), str(out), str(run.parent / "cache"), str(report)),
        nprocs=2,
        join=True,
    )
    r0 = json.loads((report / "rank0.json").read_text())
    r1 = json.loads((report / "rank1.json").read_text())
    assert r1["writes"] == [] and "checkpoint" in r0["writes"] and "metrics" in r0["writes"]
    # 33 training volumes split over 2 ranks (17 each, padded), batch 4: 5 steps per epoch
    assert r0["step"] == r1["step"] == 5
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 5
    card = json.loads((out / "best" / "model.json").read_text())
    assert card["training"]["world_size"] == 2


def test_cache_skips_bad_series_with_reason_and_reuses_good_ones(toy_run, tmp_path):
    from common.errors import MolreError
    from molre.backbones import create_backbone
    from molre.cache import VolumeCache
    from molre.training.loop import _build_recipe

    manifest, _ = toy_run
    good = sorted(d for d in manifest.parent.iterdir() if d.is_dir())[0]
    empty = tmp_path / "empty_series"
    empty.mkdir()
    (empty / "junk.dcm").write_bytes(b"not dicom")
    recipe = _build_recipe(create_backbone("tiny-3d"), {"hu_range": [0.0, 100.0]})
    cache = VolumeCache(tmp_path / "c", recipe)
    rep = cache.build([good, empty], progress=False)
    assert list(rep.paths) == [str(good)] and rep.built == 1
    assert str(empty) in rep.failures and rep.failures[str(empty)]
    x = cache.get(good)
    assert tuple(x.shape) == recipe.output_shape()
    again = cache.build([good], progress=False)
    assert again.reused == 1 and again.built == 0
    assert not list(cache.dir.glob("*.tmp"))
    with pytest.raises(MolreError, match="none of the 1 series"):
        cache.build([empty], progress=False)


_CACHE_AFTER_TORCH = """
import sys, torch
from molre.backbones.phantom import phantom_recipe
from molre.cache import VolumeCache
from molre.data.preprocess import Recipe
from molre.data.synth import generate_dataset
out = sys.argv[1]
generate_dataset(out + "/s", 2, seed=5, size=64, n_slices=24, slice_thickness=5.0,
                 progress=False, masks=False)
torch.set_num_threads(2)
a = torch.rand(3, 64, 256, 256)  # the parent's intra-op (OpenMP) pool runs
float(((a - 0.5) / 0.2).clamp(0, 1).sum())
cache = VolumeCache(out + "/c", Recipe.from_dict(phantom_recipe()))
rep = cache.build([out + "/s/series_0001", out + "/s/series_0002"], workers=2, progress=False)
print("built", rep.built, sorted(rep.failures))
"""


def test_cache_workers_start_cleanly_after_torch_ran_in_the_parent(tmp_path):
    """Preprocessing workers are spawned: forked after torch's thread pool had run (a user
    evaluating, then building a cache in one process), they hung forever in the first
    parallel tensor op (`torch.cat` of the windows), with no error."""
    import subprocess
    import sys

    try:
        r = subprocess.run(
            [sys.executable, "-c", _CACHE_AFTER_TORCH, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
    except subprocess.TimeoutExpired:
        pytest.fail("cache workers hung after torch ran in the parent process")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "built 2 []" in r.stdout


def test_external_backbone_weights_are_shipped_and_digest_checked(toy_run, tmp_path):
    """Adapters trained on saved backbone weights with save_backbone=True ship exactly those
    weights and load back through the digest check, without the original file."""
    from safetensors.torch import load_file, save_file

    from molre.backbones import create_backbone, weights_digest
    from molre.checkpoint import Predictor
    from molre.training.loop import train
    from molre.training.toydata import toy_train_config

    manifest, _ = toy_run
    cache = manifest.parent.parent / "cache"  # same recipe as the toy run: volumes are reused
    torch.manual_seed(3)
    init = create_backbone("tiny-3d").state_dict()
    gen = torch.Generator().manual_seed(4)
    state = {
        k: (v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v)
        for k, v in init.items()
    }
    wfile = tmp_path / "pre.safetensors"
    save_file(state, str(wfile))
    out = tmp_path / "run"
    r = train(
        toy_train_config(
            manifest, out, cache, epochs=1, weights=str(wfile), save_backbone=True, limit=20
        )
    )
    ckpt = r.best_dir or r.last_dir
    card = json.loads((ckpt / "model.json").read_text())
    assert card["backbone"]["weights_file"] == "backbone.safetensors"
    assert card["backbone"]["batchnorm_calibrated"] is None
    shipped = load_file(str(ckpt / "backbone.safetensors"))
    assert all(torch.equal(shipped[k], state[k]) for k in state)
    assert card["backbone"]["weights_digest"] == weights_digest(
        create_backbone("tiny-3d", weights=str(wfile))
    )
    wfile.unlink()  # the checkpoint must not need the original file
    p = Predictor.from_checkpoint(ckpt)
    assert p.predict_tensor(torch.zeros((1, *p.recipe.output_shape()))).shape == (1, 3)
