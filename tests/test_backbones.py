"""Backbone registry: real architectures at random init, local weights loading, digest, CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from common.errors import ConfigError, WeightsError
from molre.adapters import MoLREConfig, adapter_report, inject_adapters
from molre.backbones import (
    BackboneSpec,
    create_backbone,
    get_spec,
    list_backbones,
    preset_targets,
    weights_digest,
)

ALL = ["ct-fm", "tiny-3d", "dinov3-small", "dinov3-base", "dinov3-large", "tiny-2d", "medsiglip"]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def ctfm() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("ct-fm")


def test_registry_lists_every_entry_with_a_spec():
    assert set(ALL) <= set(list_backbones())
    for name in list_backbones():
        spec = get_spec(name)
        assert isinstance(spec, BackboneSpec) and spec.name == name
        assert spec.dims in (2, 3)
        assert spec.recipe["name"] == ("ctfm-3d" if spec.dims == 3 else "slices-2d")
        assert spec.default_targets and all(re.compile(t) for t in spec.default_targets)
        assert BackboneSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown backbone 'vit-huge'.*ct-fm"):
        create_backbone("vit-huge")


def test_ctfm_matches_published_encoder(ctfm):
    from monai.networks.nets.segresnet_ds import SegResEncoder

    n = sum(p.numel() for p in ctfm.parameters())
    assert abs(n - 77.8e6) / 77.8e6 < 0.01, n
    # same keys and shapes as the published architecture (MONAI SegResEncoder, CT-FM settings)
    ref = SegResEncoder(spatial_dims=3, in_channels=1, init_filters=32, blocks_down=(1, 2, 2, 4, 4))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ctfm.state_dict().items()} == ref_shapes
    assert ctfm.spec.feature_dim == 512 and ctfm.spec.dims == 3
    assert ctfm.spec.recipe == {
        "name": "ctfm-3d",
        "spacing": [5.0, 2.0, 2.0],
        "roi": [48, 128, 128],
    }
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        maps = ctfm.feature_maps(x)
        feat = ctfm(x)
    assert [tuple(m.shape) for m in maps] == [
        (1, 32, 32, 32, 32),
        (1, 64, 16, 16, 16),
        (1, 128, 8, 8, 8),
        (1, 256, 4, 4, 4),
        (1, 512, 2, 2, 2),
    ]
    assert feat.shape == (1, 512)
    torch.testing.assert_close(feat, maps[-1].mean(dim=(2, 3, 4)))
    with pytest.raises(ValueError, match="divisible by 16"):
        ctfm(torch.randn(1, 1, 24, 32, 32))


def test_ctfm_presets_adapt_the_documented_convs(ctfm):
    """paper (default): conv_init + every block conv and the embedding downsample of the stride
    >= 4 stages; light: one conv under 0.5 %."""
    reports = {}
    for preset in ("paper", "light"):
        with torch.device("meta"):
            m = create_backbone("ct-fm")
            names = inject_adapters(
                m, MoLREConfig(experts=6, rank=8, targets=preset_targets(m.spec, preset))
            )
        reports[preset] = (names, adapter_report(m))
    paper, light = reports["paper"][0], reports["light"][0]
    assert paper[0] == "conv_init"
    assert sorted(n for n in paper if "downsample" in n) == [
        f"layers.{i}.downsample" for i in (1, 2, 3)
    ]
    blocks = [n for n in paper if ".blocks." in n]
    assert {n.split(".")[1] for n in blocks} == {"2", "3", "4"}
    assert len(blocks) == 2 * (2 + 4 + 4) and len(paper) == 1 + 3 + len(blocks)
    assert create_backbone("ct-fm").spec.default_targets == preset_targets(ctfm.spec, "paper")
    assert light == ["layers.3.blocks.3.conv2"]
    assert 10 < reports["paper"][1]["overhead_percent"] < 15
    assert 0 < reports["light"][1]["overhead_percent"] < 0.5
    assert reports["paper"][1]["base_params"] == sum(p.numel() for p in ctfm.parameters())
    with pytest.raises(ConfigError, match="no adapter preset 'heavy'.*paper, light"):
        preset_targets(ctfm.spec, "heavy")


@pytest.mark.parametrize("name", ["dinov3-small", "dinov3-base", "tiny-2d"])
def test_vit_paper_preset_is_patch_embedding_and_every_attention(name):
    m = create_backbone(name, img_size=32, depth=3) if name != "tiny-2d" else create_backbone(name)
    depth = len(m.blocks)
    names = inject_adapters(m, MoLREConfig(experts=2, rank=2, targets=m.spec.default_targets))
    assert names == ["patch_embed.proj"] + [
        f"blocks.{i}.attn.{k}" for i in range(depth) for k in ("qkv", "proj")
    ]
    light = preset_targets(m.spec, "light")
    assert light != m.spec.default_targets


def test_medsiglip_paper_preset_wraps_patch_embedding_and_still_runs():
    pytest.importorskip("transformers")
    kw = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    torch.manual_seed(0)
    m = create_backbone("medsiglip", **kw)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        before = m(x)
    names = inject_adapters(m, MoLREConfig(experts=3, rank=2, targets=m.spec.default_targets))
    assert names[0] == "model.embeddings.patch_embedding" and len(names) == 1 + 2 * 4
    with torch.no_grad():
        torch.testing.assert_close(m(x), before)  # up-projections start at zero


def test_weights_file_roundtrip_reproduces_outputs(tmp_path):
    torch.manual_seed(1)
    a = create_backbone("tiny-3d")
    torch.manual_seed(2)
    b0 = create_backbone("tiny-3d")
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(a(x), b0(x))
    f = tmp_path / "tiny.safetensors"
    save_file(_state(a), str(f))
    b = create_backbone("tiny-3d", weights=f)
    assert b.weights_source == str(f)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
    # .pt with a Lightning-style container and a DDP prefix
    pt = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _state(a).items()}, "epoch": 3}, pt)
    c = create_backbone("tiny-3d", weights=pt)
    with torch.no_grad():
        torch.testing.assert_close(c(x), a(x))


def test_published_directory_layout_with_prefix(tmp_path):
    torch.manual_seed(3)
    a = create_backbone("tiny-3d")
    d = tmp_path / "ct_fm_feature_extractor"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"init_filters": 8, "blocks_down": [1, 1, 1, 1]}))
    save_file({f"encoder.{k}": v for k, v in _state(a).items()}, str(d / "model.safetensors"))
    b = create_backbone("tiny-3d", weights=d)
    assert b.weights_source == str(d / "model.safetensors")
    assert weights_digest(b) == weights_digest(a)


def test_wrong_keys_are_listed(tmp_path):
    torch.manual_seed(4)
    a = create_backbone("tiny-3d")
    state = _state(a)
    del state["conv_init.weight"]
    state["extra.head.weight"] = torch.zeros(3)
    f = tmp_path / "bad.safetensors"
    save_file(state, str(f))
    with pytest.raises(WeightsError) as err:
        create_backbone("tiny-3d", weights=f)
    msg = str(err.value)
    assert "missing keys 1: conv_init.weight" in msg
    assert "unexpected keys 1: extra.head.weight" in msg
    assert str(f) in msg


def test_shape_mismatch_and_long_key_lists_are_capped(tmp_path):
    torch.manual_seed(5)
    wide = create_backbone("tiny-3d", init_filters=16)
    f = tmp_path / "wide.safetensors"
    save_file(_state(wide), str(f))
    with pytest.raises(WeightsError) as err:
        create_backbone("tiny-3d", weights=f)
    msg = str(err.value)
    assert "shape mismatches" in msg
    assert "conv_init.weight (file (16, 1, 3, 3, 3) vs model (8, 1, 3, 3, 3))" in msg
    n = sum(1 for v in wide.state_dict().values() if v.ndim > 0)
    assert f"shape mismatches {n}:" in msg and "more)" in msg  # first 20 + count


def test_missing_weights_path_says_where_and_how(tmp_path):
    missing = tmp_path / "nowhere" / "ct_fm"
    with pytest.raises(WeightsError) as err:
        create_backbone("ct-fm", weights=missing)
    msg = str(err.value)
    assert str(missing) in msg
    assert "huggingface-cli download project-lighter/ct_fm_feature_extractor" in msg


def test_hf_reference_resolves_from_offline_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    cache = tmp_path / "hub"
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))
    with pytest.raises(WeightsError, match="not in the offline Hugging Face cache"):
        create_backbone("tiny-3d", weights="hf://project-lighter/ct_fm_feature_extractor")
    # a cache populated elsewhere (huggingface-cli download) is found without network
    torch.manual_seed(6)
    a = create_backbone("tiny-3d")
    repo = cache / "models--acme--tiny3d"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(_state(a), str(snap / "model.safetensors"))
    b = create_backbone("tiny-3d", weights="hf://acme/tiny3d")
    assert weights_digest(b) == weights_digest(a)


def test_dinov3_meta_checkpoint_is_converted(tmp_path):
    """Meta's original layout (storage_tokens, ...) goes through timm's converter."""
    torch.manual_seed(7)
    a = create_backbone("tiny-2d")
    meta = {}
    for k, v in _state(a).items():
        k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
        meta[k.replace("gamma_2", "ls2.gamma")] = v
    dim = a.embed_dim
    meta["mask_token"] = torch.zeros(1, dim)  # pretraining-only tensors Meta ships
    meta["rope_embed.periods"] = torch.ones(dim // 8)
    meta["blocks.0.attn.qkv.bias"] = torch.zeros(3 * dim)  # all-zero bias of the distilled models
    meta["blocks.0.attn.qkv.bias_mask"] = torch.ones(3 * dim)
    f = tmp_path / "dinov3_meta.pth"
    torch.save(meta, f)
    b = create_backbone("tiny-2d", weights=f)
    assert weights_digest(b) == weights_digest(a)


def test_medsiglip_loads_vision_tower_of_full_siglip_checkpoint(tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="medsiglip needs the optional transformers"
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    cfg = transformers.SiglipConfig(
        vision_config=vision,
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=99,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    )
    torch.manual_seed(8)
    full = transformers.SiglipModel(cfg)
    d = tmp_path / "medsiglip-448"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    save_file(_state(full), str(d / "model.safetensors"))
    m = create_backbone("medsiglip", weights=d)  # shape from the directory's config.json
    assert m.spec.feature_dim == 32 and m.spec.recipe["size"] == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = full.vision_model(pixel_values=x).pooler_output
        torch.testing.assert_close(m(x), want)


def test_weights_digest_stable_and_sensitive():
    torch.manual_seed(9)
    a = create_backbone("tiny-2d")
    torch.manual_seed(9)
    b = create_backbone("tiny-2d")
    da = weights_digest(a)
    assert re.fullmatch(r"[0-9a-f]{64}", da)
    assert weights_digest(b) == da
    # adapters do not change the base digest (their tensors are excluded, names mapped back)
    inject_adapters(b, MoLREConfig(targets=b.spec.default_targets))
    assert weights_digest(b) == da
    with torch.no_grad():
        b.blocks[0].attn.qkv.base_layer.weight[0, 0] += 1e-3
    assert weights_digest(b) != da
    torch.manual_seed(10)
    assert weights_digest(create_backbone("tiny-2d")) != da


def test_weights_digest_includes_batchnorm_statistics():
    torch.manual_seed(11)
    a = create_backbone("tiny-3d")
    d0 = weights_digest(a)
    a.layers[0].blocks[0].norm1.running_mean.add_(0.5)
    assert weights_digest(a) != d0


def _run_cli(args: list[str]):
    from typer.testing import CliRunner

    from cli.main import app
    from common.log import configure_logging

    try:
        return CliRunner().invoke(app, args)
    finally:
        # the app's callback bound the loggers to CliRunner's (now closed) stderr
        configure_logging()


def test_cli_backbones_json_lists_every_entry():
    res = _run_cli(["backbones", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{") :])
    rows = {r["name"]: r for r in doc["backbones"]}
    assert set(rows) == set(list_backbones())
    assert (doc["experts"], doc["rank"]) == (6, 8)
    for name, r in rows.items():
        assert r["dims"] == get_spec(name).dims
        if r["error"]:
            assert name == "medsiglip" and "transformers" in r["error"]
            continue
        assert r["lora"]["adapter_params"] < r["molre"]["adapter_params"]
        assert r["default_preset"] == "paper" and set(r["presets"]) == {"paper", "light"}
        assert r["molre"] == r["presets"]["paper"]["molre"]
        light = r["presets"]["light"]["molre"]
        assert light["adapter_params"] < r["molre"]["adapter_params"], name
        if not name.startswith("tiny") and name != "phantom-3d":
            assert light["overhead_percent"] < 0.5, name  # light = the old placement
    # compact backbones (< 1 M params, 8-128-channel convs): a rank-48 adapter is not small
    # next to them, but the light preset (1x1x1 projections only) stays a few per cent
    assert rows["phantom-3d"]["presets"]["light"]["molre"]["overhead_percent"] < 6.0
    assert abs(rows["ct-fm"]["params"] - 77.8e6) / 77.8e6 < 0.01


def test_cli_backbones_counts_match_a_real_cpu_build():
    res = _run_cli(["backbones", "--json", "--only", "tiny-3d,tiny-2d"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("{") :])["backbones"]
    assert [r["name"] for r in rows] == ["tiny-3d", "tiny-2d"]
    for r in rows:
        m = create_backbone(r["name"])
        inject_adapters(m, MoLREConfig(experts=6, rank=8, targets=m.spec.default_targets))
        rep = adapter_report(m)
        assert r["params"] == rep["base_params"]
        assert r["molre"]["adapter_params"] == rep["adapter_params"]
        assert r["feature_dim"] == m.spec.feature_dim


def test_cli_backbones_table_and_unknown_name():
    res = _run_cli(["backbones", "--only", "tiny-3d"])
    assert res.exit_code == 0, res.output
    assert "tiny-3d" in res.stdout and "MoLRE(6,8)" in res.stdout and "3D" in res.stdout
    bad = _run_cli(["backbones", "--only", "nope"])
    assert bad.exit_code != 0
    assert isinstance(bad.exception, ConfigError)


def test_every_recipe_is_valid_and_fits_its_backbone():
    from molre.data.preprocess import make_recipe

    for name in list_backbones():
        spec = get_spec(name)
        params = {k: v for k, v in spec.recipe.items() if k != "name"}
        recipe = make_recipe(spec.recipe["name"], **params)
        shape = recipe.output_shape()
        if spec.dims == 3:
            with torch.device("meta"):
                net = create_backbone(name)
            channels = getattr(net, "in_channels", 1)  # one per CT window (phantom-3d: 3)
            assert shape[0] == channels and all(s % net.stride == 0 for s in shape[1:]), (
                name,
                shape,
            )
        else:
            assert shape[1] == 3 and shape[2] == shape[3] == spec.recipe["size"]
            assert recipe.params["normalize"] == ("siglip" if name == "medsiglip" else "imagenet")
