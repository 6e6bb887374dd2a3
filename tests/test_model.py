"""HeadCTClassifier / build_model: every backbone end to end, pooling, routing granularity, state."""

from __future__ import annotations

import pytest
import torch

from molre.adapters import MoLREConfig, adapted_layers, adapter_state_dict, expert_usage
from molre.backbones import create_backbone, weights_digest
from molre.catalog import load_catalog
from molre.errors import ConfigError
from molre.model import AttentionPool, HeadCTClassifier, build_model

# Small inputs per entry; the dinov3 models keep their real width but are shortened (depth=2)
# and built for 32 px so that a CPU forward takes a fraction of a second.
CASES = {
    "ct-fm": ({}, (2, 1, 16, 32, 32)),
    "tiny-3d": ({}, (2, 1, 16, 32, 32)),
    "dinov3-small": ({"img_size": 32, "depth": 2}, (2, 3, 3, 32, 32)),
    "dinov3-base": ({"img_size": 32, "depth": 2}, (2, 3, 3, 32, 32)),
    "dinov3-large": ({"img_size": 32, "depth": 2}, (2, 3, 3, 32, 32)),
    "tiny-2d": ({}, (2, 3, 3, 64, 64)),
    "medsiglip": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, (2, 3, 3, 32, 32)),
}


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


@pytest.mark.parametrize("name", list(CASES))
def test_every_backbone_builds_with_molre_and_predicts(name, catalog):
    if name == "medsiglip":
        pytest.importorskip("transformers", reason="medsiglip needs the optional transformers")
    overrides, shape = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, catalog, MoLREConfig(experts=6, rank=8), **overrides)
    assert model.spec.name == name
    assert model.adapter_config is not None
    assert model.adapter_config.targets == model.spec.default_targets
    assert model.adapted and set(adapted_layers(model.backbone)) == set(model.adapted)
    with torch.no_grad():
        logits = model(torch.randn(*shape))
    assert logits.shape == (shape[0], len(catalog))
    assert torch.isfinite(logits).all()


def test_injection_starts_as_the_base_model():
    """B=0 init: adapters do not change the features before training."""
    torch.manual_seed(1)
    plain = build_model("tiny-2d", 4, None)
    torch.manual_seed(1)
    adapted = build_model("tiny-2d", 4, MoLREConfig())
    x = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(adapted.features(x), plain.features(x))


def test_attention_pool_weights_sum_to_one_and_respect_mask():
    torch.manual_seed(2)
    model = build_model("tiny-2d", 3, MoLREConfig())
    with torch.no_grad():
        model.pool.query.normal_()  # non-uniform weights
        model(torch.randn(2, 5, 3, 64, 64))
    w = model.last_attention
    assert w.shape == (2, 5)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2))
    assert not torch.allclose(w, torch.full_like(w, 0.2))
    pool = AttentionPool(4)
    h = torch.randn(1, 3, 4)
    mask = torch.tensor([[True, False, True]])
    pooled, w = pool(h, mask)
    assert w[0, 1] == 0 and torch.isclose(w.sum(), torch.tensor(1.0))
    torch.testing.assert_close(pooled, (h[:, 0] + h[:, 2]) / 2)  # zero query = mean of real slices


def test_2d_routes_per_slice_and_3d_per_volume():
    torch.manual_seed(3)
    m2 = build_model("tiny-2d", 3, MoLREConfig(experts=6, rank=8))
    gates: list[torch.Tensor] = []
    hooks = [layer.router.register_forward_hook(lambda mod, inp, out: gates.append(out))
             for layer in adapted_layers(m2.backbone).values()]
    b, s = 2, 5
    with torch.no_grad():
        m2(torch.randn(b, s, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert len(gates) == len(m2.adapted)
    assert all(g.shape == (b * s, 6) for g in gates)
    # the slices of one volume get different gates (routing is really per slice)
    probs = torch.softmax(gates[0], dim=-1)
    assert not torch.allclose(probs[0], probs[1])
    assert {u["samples"] for u in expert_usage(m2).values()} == {b * s}

    torch.manual_seed(4)
    m3 = build_model("tiny-3d", 3, MoLREConfig(experts=6, rank=8))
    with torch.no_grad():
        m3(torch.randn(2, 1, 16, 32, 32))
    assert {u["samples"] for u in expert_usage(m3).values()} == {2}


def test_only_adapters_pool_and_head_train():
    torch.manual_seed(5)
    model = build_model("tiny-2d", 3, MoLREConfig())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias", "pool.query"} <= trainable
    backbone_trainable = {n for n in trainable if n.startswith("backbone.")}
    assert backbone_trainable and all(
        any(part in n for part in (".lora_down.", ".lora_up.", ".router.")) for n in backbone_trainable)
    # frozen base weights get no gradient; adapter weights do
    model.train()
    model(torch.randn(1, 2, 3, 64, 64)).sum().backward()
    assert model.backbone.blocks[0].attn.qkv.base.weight.grad is None
    assert model.backbone.blocks[0].attn.qkv.lora_up.weight.grad is not None

    probe = build_model("tiny-3d", 3, None)
    assert probe.adapter_config is None
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert set(probe.trainable_state_dict()) == {"head.weight", "head.bias"}


def test_trainable_state_dict_matches_adapter_state_dict_and_roundtrips():
    torch.manual_seed(6)
    a = build_model("tiny-2d", 4, MoLREConfig())
    state = a.trainable_state_dict()
    assert set(state) == set(adapter_state_dict(a))
    assert not any(".base." in k for k in state)
    with torch.no_grad():
        for v in a.parameters():
            if v.requires_grad:
                v.add_(0.01 * torch.randn_like(v))
    torch.manual_seed(6)
    b = build_model("tiny-2d", 4, MoLREConfig())
    b.load_trainable_state_dict(a.trainable_state_dict())
    x = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
    with pytest.raises(ConfigError, match="missing"):
        b.load_trainable_state_dict({"head.weight": state["head.weight"]})


def test_training_mode_keeps_backbone_batchnorm_frozen():
    torch.manual_seed(7)
    model = build_model("tiny-3d", 3, MoLREConfig(dropout=0.1))
    digest = weights_digest(model.backbone)
    model.train()
    assert model.training and model.head.training
    assert not model.backbone.training
    assert all(layer.training for layer in adapted_layers(model.backbone).values())
    model(torch.randn(2, 1, 16, 32, 32) * 3 + 1).sum().backward()
    assert weights_digest(model.backbone) == digest  # running stats untouched


def test_explicit_targets_are_respected_and_checked():
    model = build_model("tiny-2d", 3, MoLREConfig(targets=[r"blocks\.1\.attn\.qkv"]))
    assert model.adapted == ["blocks.1.attn.qkv"]
    backbone = create_backbone("tiny-3d")
    model = build_model(backbone, 3, MoLREConfig())
    assert model.backbone is backbone and model.adapted
    with pytest.raises(ConfigError, match="already built"):
        build_model(create_backbone("tiny-3d"), 3, None, weights="x.safetensors")


def test_input_shape_errors_are_clear():
    m2 = build_model("tiny-2d", 3, None)
    with pytest.raises(ValueError, match=r"\(B, S, 3, H, W\)"):
        m2(torch.randn(2, 3, 64, 64))
    with pytest.raises(TypeError, match="create_backbone"):
        HeadCTClassifier(torch.nn.Linear(3, 3), 3)


@pytest.mark.parametrize("name", ["tiny-3d", "tiny-2d"])
def test_phantom_series_through_recipe_and_model(name, tmp_path, catalog):
    """DICOM phantom → the backbone's own recipe → model: shapes agree end to end."""
    import numpy as np

    from molre.data.preprocess import make_recipe
    from molre.data.synth import write_phantom_series
    from molre.data.volume import read_series

    write_phantom_series(tmp_path, np.random.default_rng(0), ["subdural_hemorrhage"], size=64,
                         n_slices=12, slice_thickness=5.0)
    model = build_model(name, catalog, MoLREConfig())
    params = {k: v for k, v in model.spec.recipe.items() if k != "name"}
    recipe = make_recipe(model.spec.recipe["name"], **params)
    x = recipe(read_series(tmp_path))
    assert tuple(x.shape) == recipe.output_shape()
    with torch.no_grad():
        logits = model(x[None])
    assert logits.shape == (1, len(catalog)) and torch.isfinite(logits).all()
