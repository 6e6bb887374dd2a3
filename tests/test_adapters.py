"""molre.adapters: LoRA equivalence with PEFT, identity at injection, routing, training, state."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from common.errors import MolreError
from molre.adapters import (
    ADAPTER_FILE,
    CONFIG_FILE,
    MoLREConfig,
    MoLREConv,
    MoLRELayer,
    MoLRELinear,
    adapted_layers,
    adapter_report,
    adapter_state_dict,
    balance_loss,
    expert_usage,
    inject_adapters,
    load_adapter_state_dict,
    load_adapters,
    merge_adapters,
    read_adapter_config,
    reset_expert_usage,
    save_adapters,
)


# ---------------------------------------------------------------------------------------------
# Small models of the three supported kinds
# ---------------------------------------------------------------------------------------------
class TokenNet(nn.Module):
    """ViT-like: (B, T, C) tokens through qkv/proj linears, plus a head."""

    def __init__(self, dim: int = 16, out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(3 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.proj(torch.relu(self.qkv(x))))
        return self.head(self.drop(h).mean(dim=1))


class Conv2dNet(nn.Module):
    def __init__(self, dilation: int = 2) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=dilation, dilation=dilation)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(torch.relu(self.c1(x)))
        return self.head(h.mean(dim=(2, 3)))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv3d(1, 6, 3, padding=1)
        self.c2 = nn.Conv3d(6, 6, (3, 3, 1), stride=(1, 2, 2), padding=(1, 1, 0))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c2(torch.relu(self.c1(x)))
        return self.head(h.mean(dim=(2, 3, 4)))


CASES = {
    "linear": (TokenNet, ["qkv", "proj"], lambda: torch.randn(4, 7, 16)),
    "conv2d": (Conv2dNet, ["c1", "c2"], lambda: torch.randn(3, 3, 12, 12)),
    "conv3d": (Conv3dNet, ["c1", "c2"], lambda: torch.randn(2, 1, 6, 8, 8)),
}


def _make(kind: str, seed: int = 0, model_kwargs: dict | None = None, **cfg):
    torch.manual_seed(seed)
    cls, targets, xfn = CASES[kind]
    model = cls(**(model_kwargs or {}))
    config = MoLREConfig(targets=targets, **{"experts": 4, "rank": 2, "router_hidden": 8, **cfg})
    return model, config, xfn()


def _randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------------------------------------
# Equivalence and identity
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv3d"])
def test_experts1_equals_peft_lora(kind: str) -> None:
    from peft import LoraConfig, get_peft_model

    # PEFT builds its A conv without the base's dilation (ours keeps it), so compare undilated.
    base, config, x = _make(
        kind,
        experts=1,
        rank=3,
        alpha=7.0,
        model_kwargs={"dilation": 1} if kind == "conv2d" else None,
    )
    ours = copy.deepcopy(base)
    names = inject_adapters(ours, config)
    _randomize_adapters(ours)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=7.0, target_modules=names))
    with torch.no_grad():
        for name in names:
            lay = ours.get_submodule(name)
            assert lay.router is None
            peft_layer = ref.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(lay.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(lay.lora_B.weight)
    ours.eval()
    ref.eval()
    with torch.no_grad():
        y_ours, y_ref, y_base = ours(x), ref(x), base(x)
    assert (y_ours - y_base).abs().max() > 1e-3  # the adapters really do something
    assert (y_ours - y_ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv3d"])
@pytest.mark.parametrize("experts", [1, 4])
def test_fresh_injection_returns_exact_base_output(kind: str, experts: int) -> None:
    base, config, x = _make(kind, experts=experts)
    model = copy.deepcopy(base)
    names = inject_adapters(model, config)
    assert names == CASES[kind][1]
    assert all(isinstance(model.get_submodule(n), (MoLRELinear, MoLREConv)) for n in names)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))


def test_stacked_down_projection_shapes_follow_base_conv() -> None:
    model, config, _ = _make("conv2d", experts=3, rank=2)
    inject_adapters(model, config)
    c2 = model.c2
    assert isinstance(c2, MoLREConv)
    assert c2.lora_A.out_channels == 6  # K * r in one conv
    assert c2.lora_A.kernel_size == (3, 3) and c2.lora_A.stride == (2, 2)
    assert c2.lora_A.padding == (2, 2) and c2.lora_A.dilation == (2, 2)
    assert c2.lora_B.kernel_size == (1, 1) and c2.lora_B.in_channels == 6


# ---------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------
def _capture_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    for name, layer in adapted_layers(model).items():
        layer.register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0].detach())
        )
    return seen


def _train_step(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    loss = model(x).pow(2).mean() + balance_loss(model)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("kind", ["linear", "conv3d"])
def test_gates_are_per_sample_and_sum_to_one(kind: str) -> None:
    model, config, x = _make(kind, experts=5)
    inject_adapters(model, config)
    seen = _capture_inputs(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _train_step(model, x, opt)
    model.eval()
    with torch.no_grad():
        model(x)
        for name, layer in adapted_layers(model).items():
            gates = layer.route(seen[name])
            assert gates.shape == (x.shape[0], 5)
            assert torch.allclose(gates.sum(-1), torch.ones(x.shape[0]), atol=1e-6)
            assert (gates > 0).all()
            assert not torch.allclose(
                gates[0], gates[1], atol=1e-6
            )  # different inputs, different gates
            # per-sample: routing sample 1 alone gives the same gates as inside the batch
            alone = layer.route(seen[name][1:2])
            assert torch.allclose(alone[0], gates[1], atol=1e-6)


def test_output_of_one_sample_does_not_depend_on_the_rest_of_the_batch() -> None:
    model, config, x = _make("linear", experts=3)
    inject_adapters(model, config)
    _randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        full = model(x)
        single = model(x[2:3])
    assert torch.allclose(full[2:3], single, atol=1e-5)


def test_mixture_equals_explicit_sum_over_experts() -> None:
    """The stacked path computes base(x) + scale · Σ_i g_i B_i A_i x (the paper's formula)."""
    model, config, x = _make("linear", experts=3, rank=2, alpha=6.0)
    inject_adapters(model, config)
    _randomize_adapters(model)
    layer = model.qkv
    seen = _capture_inputs(model)
    model.eval()
    with torch.no_grad():
        model(x)
        xin = seen["qkv"]
        got = layer(xin)
        gates = layer.route(xin)
        A = layer.lora_A.weight.view(3, 2, -1)  # (K, r, in)
        B = layer.lora_B.weight.view(layer.out_features, 3, 2)  # (out, K, r)
        want = layer.base_layer(xin)
        for i in range(3):
            delta = xin @ A[i].T @ B[:, i, :].T * (6.0 / 2)
            want = want + gates[:, i].view(-1, 1, 1) * delta
    assert torch.allclose(got, want, atol=1e-5)


def test_top_k_keeps_k_largest_gates_renormalised() -> None:
    model, config, x = _make("linear", experts=5, top_k=2)
    inject_adapters(model, config)
    dense = copy.deepcopy(model)
    for layer in adapted_layers(dense).values():
        layer.top_k = None
    seen = _capture_inputs(model)
    with torch.no_grad():
        model(x)
        gates = model.qkv.route(seen["qkv"])
        probs = dense.qkv.route(seen["qkv"])
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.allclose(gates.sum(-1), torch.ones(len(gates)), atol=1e-6)
    top = probs.topk(2, dim=-1)
    assert torch.equal(gates.topk(2, dim=-1).indices.sort(-1).values, top.indices.sort(-1).values)
    assert torch.allclose(
        gates.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True), atol=1e-6
    )


def test_temperature_divides_router_logits() -> None:
    model, config, x = _make("linear", experts=4, temperature=3.0)
    inject_adapters(model, config)
    seen = _capture_inputs(model)
    with torch.no_grad():
        model(x)
        layer = model.qkv
        xin = seen["qkv"]
        logits = layer.router(xin.mean(dim=1))
        gates = layer.route(xin)
    assert torch.allclose(gates, torch.softmax(logits / 3.0, dim=-1), atol=1e-6)
    # higher temperature -> flatter gates (higher entropy) than temperature 1
    flat = -(gates * gates.log()).sum(-1)
    sharp_p = torch.softmax(logits, dim=-1)
    assert (flat > -(sharp_p * sharp_p.log()).sum(-1)).all()


def test_expert_usage_statistics_and_reset() -> None:
    model, config, x = _make("conv3d", experts=3)
    inject_adapters(model, config)
    model.eval()
    with torch.no_grad():
        model(x)
        model(x[:1])
        usage = expert_usage(model)
        g_full = model.c1.route(x)  # c1 reads the network input directly
        g_one = model.c1.route(x[:1])
    u = usage["c1"]
    assert u["samples"] == x.shape[0] + 1
    assert len(u["mean_gate"]) == 3 and abs(sum(u["mean_gate"]) - 1.0) < 1e-5
    want = (g_full.sum(0) + g_one[0]) / (x.shape[0] + 1)
    assert torch.allclose(torch.tensor(u["mean_gate"]), want, atol=1e-5)
    ent = lambda g: -(g * g.log()).sum(-1)  # noqa: E731
    want_ent = (ent(g_full).sum() + ent(g_one).sum()) / (x.shape[0] + 1)
    assert u["entropy"] == pytest.approx(want_ent.item(), abs=1e-5)
    json.dumps(usage)  # plain floats, loggable
    reset_expert_usage(model)
    assert expert_usage(model)["c1"] == {"mean_gate": [0.0, 0.0, 0.0], "entropy": 0.0, "samples": 0}


def test_balance_loss_zero_when_disabled_and_cv2_when_enabled() -> None:
    model, config, x = _make("linear", experts=4)
    inject_adapters(model, config)
    model.train()
    model(x)
    zero = balance_loss(model)
    assert zero.shape == () and zero.item() == 0.0

    model, config, x = _make("linear", experts=4, balance_weight=0.5)
    inject_adapters(model, config)
    seen = _capture_inputs(model)
    model.train()
    model(x)
    loss = balance_loss(model)
    with torch.no_grad():
        terms = []
        for name, layer in adapted_layers(model).items():
            p = layer.route(seen[name]).mean(0)
            terms.append(4 * (p * p).sum() - 1)
    assert torch.allclose(loss.detach(), 0.5 * torch.stack(terms).mean(), atol=1e-6)
    assert loss.item() > 0
    loss.backward()
    assert model.qkv.router.fc2.weight.grad is not None
    assert model.qkv.router.fc2.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Training: only adapters move
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_only_adapter_parameters_train(kind: str) -> None:
    model, config, x = _make(kind, experts=3)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    inject_adapters(model, config)
    layers = adapted_layers(model)
    adapter_ids = {id(p) for lay in layers.values() for p in lay.adapter_parameters()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in adapter_ids), name
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # Adam: step sizes do not depend on how small the first router gradients are
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for _ in range(2):  # step 1 moves B (zero-initialised); step 2 also moves A and the router
        _train_step(model, x, opt)
    after = dict(model.named_parameters())
    for n, before in adapter_before.items():
        assert not torch.equal(after[n], before), f"{n} did not change"
    # every original tensor (incl. buffers) is bit-identical under its adapted name
    current = model.state_dict()
    for k, v in base_before.items():
        parent, _, leaf = k.rpartition(".")
        key = f"{parent}.base_layer.{leaf}" if parent in layers else k
        assert torch.equal(current[key], v), k


# ---------------------------------------------------------------------------------------------
# Adapter state
# ---------------------------------------------------------------------------------------------
def test_state_holds_adapters_and_caller_trainable_parameters_only() -> None:
    model, config, _ = _make("linear", experts=2)
    inject_adapters(model, config)
    keys = set(adapter_state_dict(model))
    assert all(".lora_" in k or ".router." in k for k in keys)
    assert "qkv.router.fc1.weight" in keys and "proj.lora_B.weight" in keys
    model.head.requires_grad_(True)
    keys2 = set(adapter_state_dict(model))
    assert keys2 - keys == {"head.weight", "head.bias"}
    assert not any(".base_layer." in k for k in keys2)


@pytest.mark.parametrize("as_file", [False, True])
def test_save_load_reproduces_outputs_bit_for_bit(tmp_path, as_file: bool) -> None:
    model, config, x = _make("conv3d", experts=3, balance_weight=0.1)
    inject_adapters(model, config)
    model.head.requires_grad_(True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(3):
        _train_step(model, x, opt)
    target = tmp_path / "ckpt" / ("my.safetensors" if as_file else "")
    written = save_adapters(model, target)
    if as_file:
        assert written == target and (tmp_path / "ckpt" / "my_config.json").is_file()
    else:
        assert (
            written == tmp_path / "ckpt" / ADAPTER_FILE
            and (tmp_path / "ckpt" / CONFIG_FILE).is_file()
        )
    assert read_adapter_config(target) == config

    fresh, config2, _ = _make("conv3d", experts=3, balance_weight=0.1)  # same seed -> same backbone
    inject_adapters(fresh, read_adapter_config(target))
    fresh.head.requires_grad_(True)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
    # a lone safetensors file (no JSON beside it) still loads: config is in the metadata
    if as_file:
        (tmp_path / "ckpt" / "my_config.json").unlink()
    load_adapters(fresh, target)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_strict_load_names_wrong_keys_and_shapes() -> None:
    model, config, _ = _make("linear", experts=2)
    inject_adapters(model, config)
    state = adapter_state_dict(model)
    bad = dict(state)
    bad["qkv.lora_dwn.weight"] = bad.pop("qkv.lora_A.weight")
    with pytest.raises(MolreError) as err:
        load_adapter_state_dict(model, bad)
    assert "qkv.lora_dwn.weight" in str(err.value) and "qkv.lora_A.weight" in str(err.value)
    report = load_adapter_state_dict(model, bad, strict=False)
    assert report == {"missing": ["qkv.lora_A.weight"], "unexpected": ["qkv.lora_dwn.weight"]}
    wrong = dict(state)
    wrong["proj.lora_B.weight"] = torch.zeros(3, 3)
    with pytest.raises(MolreError, match=r"proj\.lora_B\.weight: saved \(3, 3\)"):
        load_adapter_state_dict(model, wrong)
    based = dict(state)
    based["qkv.base_layer.weight"] = model.qkv.base_layer.weight.detach().clone()
    with pytest.raises(MolreError, match="frozen base"):
        load_adapter_state_dict(model, based)


def test_load_rejects_config_mismatch(tmp_path) -> None:
    model, config, _ = _make("linear", experts=2, rank=2)
    inject_adapters(model, config)
    save_adapters(model, tmp_path)
    other, config_b, _ = _make("linear", experts=3, rank=2)
    inject_adapters(other, config_b)
    with pytest.raises(MolreError, match=r"experts: saved 2 vs model 3"):
        load_adapters(other, tmp_path)
    with pytest.raises(MolreError, match="no adapter file"):
        load_adapters(other, tmp_path / "missing")
    partial, _, _ = _make("linear", experts=2, rank=2)
    inject_adapters(
        partial, MoLREConfig(experts=2, rank=2, router_hidden=8, targets=["qkv", "proj"])
    )
    (tmp_path / CONFIG_FILE).write_text(
        json.dumps({"config": config.to_dict(), "adapted": ["qkv", "head"]}), encoding="utf-8"
    )
    with pytest.raises(MolreError, match="adapted layers differ"):
        load_adapters(partial, tmp_path)


# ---------------------------------------------------------------------------------------------
# Merge and report
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "conv2d", "conv3d"])
def test_merge_lora_reproduces_outputs_with_plain_layers(kind: str) -> None:
    model, config, x = _make(kind, experts=1, rank=3)
    inject_adapters(model, config)
    _randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        before = model(x)
        merged = merge_adapters(model)
        after = merged(x)
    assert merged is model
    assert not any(isinstance(m, MoLRELayer) for m in model.modules())
    for name in CASES[kind][1]:
        assert type(model.get_submodule(name)) in (nn.Linear, nn.Conv2d, nn.Conv3d)
    assert (after - before).abs().max().item() < 1e-5


def test_merge_refuses_routed_mixture() -> None:
    model, config, _ = _make("linear", experts=2)
    inject_adapters(model, config)
    with pytest.raises(MolreError, match="experts=2"):
        merge_adapters(model)
    assert isinstance(model.qkv, MoLRELinear)  # nothing was half-merged


def test_adapter_report_counts() -> None:
    model, config, _ = _make("linear", experts=4, rank=2, router_hidden=8)
    n_base = sum(p.numel() for p in model.parameters())
    inject_adapters(model, config)
    rep = adapter_report(model)
    assert rep["base_params"] == n_base
    qkv = 16 * 8 + 8 * 48 + (16 * 8 + 8) + (8 * 4 + 4)  # down, up, router fc1, fc2
    proj = 48 * 8 + 8 * 16 + (48 * 8 + 8) + (8 * 4 + 4)
    rows = {r["name"]: r for r in rep["layers"]}
    assert rows["qkv"] == {
        "name": "qkv",
        "type": "Linear",
        "in": 16,
        "out": 48,
        "experts": 4,
        "rank": 2,
        "adapter_params": qkv,
    }
    assert rows["proj"]["adapter_params"] == proj
    assert rep["adapter_params"] == qkv + proj == rep["trainable_params"]
    assert rep["overhead_percent"] == pytest.approx(100 * (qkv + proj) / n_base)


# ---------------------------------------------------------------------------------------------
# Errors and config
# ---------------------------------------------------------------------------------------------
def test_pattern_matching_nothing_is_named() -> None:
    model, _, _ = _make("linear")
    with pytest.raises(MolreError, match=r"'nope\\\\.qkv'"):
        inject_adapters(model, MoLREConfig(targets=["qkv", r"nope\.qkv"]))
    assert not adapted_layers(model)  # nothing injected on error


def test_fullmatch_semantics_and_container_patterns() -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = TokenNet()

    model = Outer()
    with pytest.raises(MolreError, match="container"):
        inject_adapters(model, MoLREConfig(targets=["block"]))
    with pytest.raises(MolreError, match="matched no"):
        inject_adapters(model, MoLREConfig(targets=["qkv"]))  # fullmatch: 'block.qkv' != 'qkv'
    # a broad pattern skips parameter-free leaves (Dropout) but rejects LayerNorm/Embedding
    with pytest.raises(MolreError, match=r"block\.norm \(LayerNorm\)"):
        inject_adapters(model, MoLREConfig(targets=[r"block\..*"]))
    names = inject_adapters(model, MoLREConfig(targets=[r".*\.(qkv|proj|drop)"]))
    assert names == ["block.qkv", "block.proj"]


def test_unsupported_type_and_double_injection() -> None:
    model, config, _ = _make("linear")
    with pytest.raises(MolreError, match=r"embed \(Embedding\)"):
        inject_adapters(model, MoLREConfig(targets=["embed", "qkv"]))
    inject_adapters(model, config)
    with pytest.raises(MolreError, match="already has MoLRE adapters"):
        inject_adapters(model, config)


def test_multihead_attention_out_proj_rejected() -> None:
    model = nn.Module()
    model.mha = nn.MultiheadAttention(8, 2)
    with pytest.raises(MolreError, match="MultiheadAttention"):
        inject_adapters(model, MoLREConfig(targets=[r"mha\.out_proj"]))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"rank": 0}, "rank"),
        ({"experts": 0}, "experts"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": 7}, "top_k"),
        ({"balance_weight": -1.0}, "balance_weight"),
        ({"targets": []}, "targets"),
        ({"targets": "qkv"}, "targets"),
        ({"targets": ["("]}, "targets"),
    ],
)
def test_config_validation_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(MolreError, match=rf"^MoLREConfig\.{key}(\[0\])?: "):
        MoLREConfig(**kwargs)


def test_config_round_trip_and_unknown_key() -> None:
    cfg = MoLREConfig(experts=3, rank=4, alpha=8, targets=[r".*qkv"], top_k=2, temperature=0.5)
    d = cfg.to_dict()
    assert MoLREConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert cfg.scaling == 2.0
    with pytest.raises(MolreError, match=r"^MoLREConfig\.rnak: unknown key"):
        MoLREConfig.from_dict({**d, "rnak": 3})


def test_bf16_forward_keeps_dtype() -> None:
    model, config, x = _make("linear", experts=3)
    inject_adapters(model, config)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        y = model(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert model.qkv.router.fc1.weight.dtype == torch.bfloat16
    assert model.qkv.usage_gate_sum.dtype == torch.float32  # statistics stay exact-ish
    assert expert_usage(model)["qkv"]["samples"] == x.shape[0]


def test_compiles_without_graph_breaks() -> None:
    model, config, x = _make("linear", experts=3, top_k=2, balance_weight=0.1)
    inject_adapters(model, config)
    _randomize_adapters(model)
    model.train()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    y = compiled(x)
    assert torch.allclose(y, model(x), atol=1e-6)
    assert expert_usage(model)["qkv"]["samples"] == 2 * x.shape[0]


def test_inject_on_meta_device_counts_parameters_without_memory() -> None:
    """Backbone listings inject on the meta device to count adapter overhead for huge models."""
    with torch.device("meta"):
        model = TokenNet()
        inject_adapters(
            model, MoLREConfig(experts=4, rank=2, router_hidden=8, targets=["qkv", "proj"])
        )
    assert model.qkv.lora_A.weight.device.type == "meta"
    assert model.qkv.usage_gate_sum.device.type == "meta"
    cpu_model, config, _ = _make("linear", experts=4, rank=2, router_hidden=8)
    inject_adapters(cpu_model, config)
    assert adapter_report(model)["adapter_params"] == adapter_report(cpu_model)["adapter_params"]


def test_usage_statistics_stay_out_of_state_dicts() -> None:
    model, config, _ = _make("linear", experts=3)
    inject_adapters(model, config)
    keys = set(model.state_dict())
    assert not any("usage_" in k for k in keys)
    assert "qkv.base_layer.weight" in keys and "qkv.lora_B.weight" in keys
