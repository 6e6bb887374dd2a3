"""phantom-3d: dense-supervision pretraining, the shipped weights, and the demo that detects."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from molre.backbones.phantom import PHANTOM_RECIPE, packaged_card, packaged_weights
from molre.data.synth import PHANTOM_FINDINGS
from molre.training import pretrain as P


def test_sample_targets_follow_the_planted_findings():
    """A pretraining sample: the recipe's input, a non-empty mask for every planted finding on
    the half-resolution grid, nothing for the others, presence = what was planted."""
    from molre.data.preprocess import Recipe

    shape = Recipe.from_dict(PHANTOM_RECIPE).output_shape()
    seen = 0
    for i in range(6):
        s = P._sample_job((7, 0, i, 0.35, 0.0, ()))
        assert s.x.shape == shape and s.x.dtype == np.float16
        assert s.mask.shape == (len(PHANTOM_FINDINGS), *[n // 2 for n in shape[1:]])
        per = s.mask.reshape(len(PHANTOM_FINDINGS), -1).sum(1)
        assert ((per > 0) == (s.presence > 0)).all(), (s.site, per, s.presence)
        seen += int(s.presence.sum())
    assert seen >= 6  # the draw planted findings at all


def test_mask_on_grid_keeps_a_finding_smaller_than_a_voxel():
    mask = np.zeros((20, 40, 40), bool)
    mask[10, 20, 20] = True  # one native voxel
    idx = np.stack(
        np.meshgrid(np.arange(8) * 2.5, np.arange(16) * 2.5, np.arange(16) * 2.5, indexing="ij")
    ).reshape(3, -1)
    out = P._mask_on_grid(mask, idx, (8, 16, 16))
    assert out.shape == (4, 8, 8) and out.sum() == 1


def test_dense_loss_pulls_a_one_cell_finding_as_hard_as_a_large_one():
    """A switched-off map (logits -11 everywhere) with one planted one-cell finding and one
    planted large finding: the plain voxel loss barely moves the small finding's cell (its
    gradient is ~pos_weight / voxel count, and Dice's sigmoid gradient has vanished); with
    pos_balance the cell gets a pull of order one, like the large finding's cells in total."""

    def grads(pos_balance: float, max_cells: int = 0) -> tuple[float, float]:
        seg = torch.full((1, 2, 8, 16, 16), -11.0, requires_grad=True)
        target = torch.zeros(1, 2, 8, 16, 16)
        target[0, 0, 4, 8, 8] = 1.0  # a calcification: one cell
        target[0, 1, 2:6, 4:12, 4:12] = 1.0  # an edema: 256 cells
        P.dense_loss(seg, target, 5.0, 1.0, pos_balance, 0, max_cells).backward()
        g = seg.grad[0]
        return float(-g[0, 4, 8, 8]), float(-g[1][target[0, 1] > 0].sum())

    small0, large0 = grads(0.0)
    small1, large1 = grads(1.0)
    assert small0 < 1e-2 and small0 < large0 / 100  # the one-cell finding is all but ignored
    assert small1 > 0.4 and small1 > 100 * small0
    assert 0.5 < small1 / large1 < 2.0  # same pull whatever the finding's size
    # pos_balance_max_cells: only findings with few target cells get the extra pull
    small2, large2 = grads(1.0, 32)
    assert small2 == pytest.approx(small1) and large2 == pytest.approx(large0)


def test_dense_loss_silences_the_maps_of_a_normal_head_only():
    """hard_negatives: the highest cells of every map of a phantom with nothing planted are
    pulled down (order 1 / hard_negatives; the voxel mean alone gives ~1e-5); a phantom with a
    planted finding gets nothing from that term, whatever its other maps show."""
    seg = torch.full((2, 2, 8, 16, 16), -6.0)
    seg[0, 0, 2, 3, 3] = 5.0  # normal head, a map firing
    seg[1, 0, 2, 3, 3] = 5.0  # abnormal head, another map firing far from its finding
    seg.requires_grad_(True)
    target = torch.zeros(2, 2, 8, 16, 16)
    target[1, 1, 4, 8, 8] = 1.0
    P.dense_loss(seg, target, 5.0, 1.0, 0.0, 0).backward()
    plain = seg.grad.clone()
    seg.grad = None
    P.dense_loss(seg, target, 5.0, 1.0, 0.0, 8).backward()
    g = seg.grad - plain
    assert float(plain[0, 0, 2, 3, 3]) < 1e-3
    assert float(g[0, 0, 2, 3, 3]) > 0.05  # the normal head's false peak
    assert float(g[1].abs().max()) == 0.0  # the abnormal head is left to the other terms


def test_v2_architecture_reads_its_own_finer_grid():
    """The 2 mm architecture: a sample rendered for it has its recipe's shape, and the v2 network
    turns it into features and finding maps on the mask grid the sample carries."""
    from molre.backbones.phantom import PhantomUNet, phantom_recipe, phantom_sizes
    from molre.data.preprocess import Recipe

    v1 = Recipe.from_dict(phantom_recipe("v1")).output_shape()
    v2 = Recipe.from_dict(phantom_recipe("v2")).output_shape()
    assert v2[2] > v1[2] and v2[3] > v1[3]  # finer in-plane grid over the same head
    s = P._sample_job((7, 0, 1, 0.35, 0.0, (), True, "v2"))
    assert s.x.shape == v2 and s.mask.shape[1:] == tuple(n // 2 for n in v2[1:])
    torch.manual_seed(0)
    net = PhantomUNet(**phantom_sizes("v2")).eval()
    with torch.no_grad():
        feats, seg = net.dense(torch.from_numpy(s.x).float()[None])
    assert seg.shape[2:] == s.mask.shape[1:]
    assert feats.shape[0] == 1 and torch.isfinite(feats).all()


def test_lr_schedule_lets_a_time_budget_choose_the_epochs_after_the_first():
    spe = 50
    # warm-up over a fifth of an epoch, then flat to the end of epoch 1 whatever follows
    first = [[P.lr_factor(t, spe, e) for t in range(spe)] for e in (2, 6, 20)]
    assert first[0] == first[1] == first[2]
    assert first[0][0] < first[0][9] == 1.0 == first[0][-1]
    # then cosine to zero at the end of the last epoch
    tail = [P.lr_factor(t, spe, 6) for t in range(spe, 6 * spe)]
    assert all(a >= b for a, b in zip(tail, tail[1:])) and tail[-1] < 1e-3
    # a single epoch is the first epoch of any longer run (what a budget of one epoch ran)
    assert [P.lr_factor(t, spe, 1) for t in range(spe)] == first[0]


def test_time_budget_picks_the_epochs_and_the_card_names_them(tmp_path):
    """A budget smaller than one epoch's cost stops after the first epoch; the saved card's
    regenerate command is the exact run (epochs chosen, no budget) and says it is complete."""
    out = tmp_path / "w"
    P.main(
        [
            "--train-phantoms", "8", "--val-phantoms", "4", "--epochs", "5",
            "--batch-size", "4", "--workers", "1", "--sites", "metro",
            "--time-budget-min", "0.001", "--quiet", "--out", str(out),
        ]
    )  # fmt: skip
    card = json.loads((out / P.CARD_FILE).read_text())
    assert card["complete"] is True and card["epochs_run"] == 1
    assert card["history"][0]["epochs_planned"] == 1 and len(card["history"]) == 1
    assert "--epochs 1 " in card["regenerate"] and "--time-budget" not in card["regenerate"]
    assert card["config"]["epochs"] == 1 and card["config"]["time_budget_min"] == 0.0


def test_pretraining_is_deterministic_and_loads_as_the_backbone(tmp_path):
    from molre.backbones import create_backbone, weights_digest

    cfg = P.PretrainConfig(
        train_phantoms=8, val_phantoms=4, epochs=1, batch_size=4, sites=("metro", "valley")
    )
    a = P.pretrain(cfg, progress=False)
    b = P.pretrain(cfg, progress=False)
    assert a.sha256 == b.sha256  # same seed, same weights, bit for bit
    assert a.history[0]["dense_loss"] > 0 and a.validation["n"] == 4
    out = P.save(a, cfg, tmp_path / "w", "test")
    card = json.loads((out / P.CARD_FILE).read_text())
    assert card["weights_sha256"] == hashlib.sha256((out / P.WEIGHTS_FILE).read_bytes()).hexdigest()
    net = create_backbone("phantom-3d", weights=str(out / P.WEIGHTS_FILE))
    assert weights_digest(net) == card["state_sha256"] == a.sha256
    random = create_backbone("phantom-3d", pretrained=False)
    assert weights_digest(random) != a.sha256


def test_shipped_backbone_matches_its_card():
    """CI check of the packaged weights: file hash, tensor digest and size as the card says."""
    from molre.backbones import create_backbone, weights_digest

    path = packaged_weights()
    assert path is not None, "molre/resources/phantom-3d/model.safetensors is missing"
    card = packaged_card()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["weights_sha256"]
    assert path.stat().st_size < 20 * 2**20
    net = create_backbone("phantom-3d")
    assert str(net.weights_source).startswith("packaged:")
    assert weights_digest(net) == card["state_sha256"]
    # the card says how it was made and how well the pretraining itself detects
    assert "python -m molre.training.pretrain" in card["regenerate"]
    assert card["validation_presence_auc"]["macro_auc"] > 0.85  # shipped: 0.880


@pytest.fixture(scope="module")
def demo():
    from molre.checkpoint import Predictor

    return Predictor.from_checkpoint("demo")


def test_demo_detects_on_fresh_phantoms_from_every_site(demo):
    """A small freshly seeded evaluation of the packaged demo (not its training seed), read the
    way the node reads a series: macro AUC well above chance."""
    from molre.data.synth import SITES, render
    from molre.training.metrics import auc_matrix

    torch.set_num_threads(2)
    assert demo.card["backbone"]["name"] == "phantom-3d"
    rng = np.random.default_rng(20261203)
    probs, labels = [], []
    names = list(SITES)
    for i in range(40):
        k = int(rng.integers(len(PHANTOM_FINDINGS)))
        found = () if i % 5 == 0 else (PHANTOM_FINDINGS[k],)
        r = render(np.random.default_rng([99, i]), found, size=None, site=names[i % len(names)])
        pred = demo.predict_volume(r.volume())
        probs.append([pred.probabilities[f] for f in PHANTOM_FINDINGS])
        labels.append([float(f in found) for f in PHANTOM_FINDINGS])
    aucs = [a for a in auc_matrix(np.array(labels), np.array(probs)) if a is not None]
    assert len(aucs) >= 8
    assert float(np.mean(aucs)) > 0.75, aucs  # held-out 400: 0.88 (docs/training.md)
