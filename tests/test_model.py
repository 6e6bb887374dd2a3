"""HeadCTClassifier / build_model: every backbone end to end, pooling, routing granularity, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from molre.adapters import MoLREConfig, adapted_layers, adapter_state_dict, expert_usage
from molre.backbones import create_backbone, weights_digest
from molre.catalog import load_catalog
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
    "medsiglip": (
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        (2, 3, 3, 32, 32),
    ),
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
    hooks = [
        layer.router.register_forward_hook(lambda mod, inp, out: gates.append(out))
        for layer in adapted_layers(m2.backbone).values()
    ]
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
        any(part in n for part in (".lora_A.", ".lora_B.", ".router.")) for n in backbone_trainable
    )
    # frozen base weights get no gradient; adapter weights do
    model.train()
    model(torch.randn(1, 2, 3, 64, 64)).sum().backward()
    assert model.backbone.blocks[0].attn.qkv.base_layer.weight.grad is None
    assert model.backbone.blocks[0].attn.qkv.lora_B.weight.grad is not None

    probe = build_model("tiny-3d", 3, None)
    assert probe.adapter_config is None
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {
        "head.weight",
        "head.bias",
    }
    assert set(probe.trainable_state_dict()) == {"head.weight", "head.bias"}


def test_trainable_state_dict_matches_adapter_state_dict_and_roundtrips():
    torch.manual_seed(6)
    a = build_model("tiny-2d", 4, MoLREConfig())
    state = a.trainable_state_dict()
    assert set(state) == set(adapter_state_dict(a))
    assert not any(".base_layer." in k for k in state)
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

    write_phantom_series(
        tmp_path,
        np.random.default_rng(0),
        ["subdural_hemorrhage"],
        size=64,
        n_slices=12,
        slice_thickness=5.0,
    )
    model = build_model(name, catalog, MoLREConfig())
    params = {k: v for k, v in model.spec.recipe.items() if k != "name"}
    recipe = make_recipe(model.spec.recipe["name"], **params)
    x = recipe(read_series(tmp_path))
    want = recipe.output_shape()
    if model.spec.dims == 2:  # 2D backbones read every slice of the series by default
        assert want[0] == 0
        want = (12, *want[1:])
    assert tuple(x.shape) == want
    with torch.no_grad():
        logits = model(x[None])
    assert logits.shape == (1, len(catalog)) and torch.isfinite(logits).all()


def test_variable_slice_counts_are_padded_and_masked(tmp_path):
    """2D series keep all their slices: a padded batch predicts what each series alone does,
    through the model and through the training loop's loader (collate + predict_tensors)."""
    from molre.model import pad_slices
    from molre.training.loop import _CachedDataset, predict_tensors

    torch.manual_seed(0)
    model = build_model("tiny-2d", 4, MoLREConfig(experts=2, rank=2))
    model.slice_chunk = 4  # 9 + 5 slices go through the backbone in chunks
    a, b = torch.randn(9, 3, 64, 64), torch.randn(5, 3, 64, 64)
    x, mask = pad_slices([a, b])
    assert x.shape == (2, 9, 3, 64, 64) and mask.sum(1).tolist() == [9, 5]
    assert torch.equal(x[1, 5:], torch.zeros(4, 3, 64, 64))
    with torch.no_grad():
        alone = torch.cat([model(a[None]), model(b[None])])
        torch.testing.assert_close(model(x, mask), alone, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(x), alone, atol=1e-4)  # unmasked padding would change it
    paths = []
    for i, t in enumerate((a, b, a[:3])):
        torch.save(t, tmp_path / f"{i}.pt")
        paths.append(tmp_path / f"{i}.pt")
    ds = _CachedDataset(paths, torch.zeros(3, 4).numpy())
    probs, _ = predict_tensors(model, ds, batch_size=3, device=torch.device("cpu"))
    with torch.no_grad():
        want = torch.sigmoid(torch.cat([model(t[None]) for t in (a, b, a[:3])])).numpy()
    np.testing.assert_allclose(probs, want, rtol=1e-4, atol=1e-5)
    same, none = pad_slices([a, a])
    assert none is None and same.shape == (2, 9, 3, 64, 64)


def test_recipe_reads_every_slice_unless_told_otherwise(tmp_path):
    import numpy as np

    from molre.data.preprocess import make_recipe
    from molre.data.synth import write_phantom_series
    from molre.data.volume import read_series

    write_phantom_series(
        tmp_path, np.random.default_rng(1), [], size=64, n_slices=15, slice_thickness=5.0
    )
    vol = read_series(tmp_path)
    assert make_recipe("slices-2d", size=32)(vol).shape[0] == 16  # the recipe's own default
    assert make_recipe("slices-2d", n_slices=0, size=32)(vol).shape == (15, 3, 32, 32)
    assert make_recipe("slices-2d", n_slices=None, size=32).params["n_slices"] == 0
    assert make_recipe("slices-2d", n_slices=4, size=32)(vol).shape == (4, 3, 32, 32)
    with pytest.raises(ConfigError, match="0 = every slice"):
        make_recipe("slices-2d", n_slices=-1)
    for name in ("dinov3-small", "medsiglip", "tiny-2d"):
        from molre.backbones import get_spec

        assert get_spec(name).recipe["n_slices"] == 0, name


def test_preset_selects_the_adapter_placement():
    from molre.backbones import preset_targets

    paper = build_model("tiny-2d", 3, MoLREConfig(experts=2, rank=2))
    light = build_model("tiny-2d", 3, MoLREConfig(experts=2, rank=2), preset="light")
    assert paper.adapted == [
        "patch_embed.proj",
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.1.attn.qkv",
        "blocks.1.attn.proj",
    ]
    assert light.adapted == ["blocks.1.attn.qkv"]
    assert light.adapter_config.targets == preset_targets(light.spec, "light")
    with pytest.raises(ConfigError, match="no adapter preset"):
        build_model("tiny-2d", 3, MoLREConfig(), preset="heavy")
