"""Putting adapters into a model, folding them out again, and reading their diagnostics.

Target matching (decided here, documented in `MoLREConfig`): every pattern is applied with
`re.fullmatch` to each qualified module name from `model.named_modules()`.
- Matched `nn.Linear` / `nn.Conv2d` / `nn.Conv3d` (subclasses included) are adapted.
- Matched containers (modules with children) are ignored: patterns select leaf layers, so
  ``blocks\\.0\\.attn`` adapts nothing by itself; write ``blocks\\.0\\.attn\\..*``.
- Matched leaves without parameters of their own (Dropout, Identity, activations) are ignored,
  so broad patterns such as ``blocks\\..*\\.attn\\..*`` stay usable.
- A matched leaf with parameters of any other type (Embedding, LayerNorm, Conv1d, ...) is an error,
  as is an `nn.Linear` that belongs to an `nn.MultiheadAttention` (MHA reads its weight directly,
  so a wrapper would be bypassed), a pattern that adapts nothing, and injecting twice.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from common.errors import MolreError
from common.log import get_logger
from molre.adapters.config import MoLREConfig
from molre.adapters.layers import SUPPORTED_TYPES, MoLREConv, MoLRELayer, MoLRELinear

_log = get_logger("molre.adapters")


def adapted_layers(model: nn.Module) -> dict[str, MoLRELayer]:
    """All adapter layers of `model`, by qualified name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoLRELayer)}


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of every adapter and router parameter of `model` (``lora_A``,
    ``lora_B``, ``router.*`` inside each MoLRE layer), in `named_parameters` order, regardless of
    `requires_grad`.

    The one definition of "adapter parameters": adapter state files, the training loop (what to
    unfreeze) and checkpoints (what to save) all call this instead of filtering names.
    """
    ids = {id(p) for layer in adapted_layers(model).values() for p in layer.adapter_parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def get_config(model: nn.Module) -> MoLREConfig:
    """The `MoLREConfig` the model was injected with (MolreError if it has no adapters)."""
    layers = adapted_layers(model)
    if not layers:
        raise MolreError(
            "the model has no MoLRE adapters; call inject_adapters(model, config) first"
        )
    return next(iter(layers.values())).config


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_adapters(model: nn.Module, config: MoLREConfig) -> list[str]:
    """Wrap every matching leaf layer in a MoLRE layer and freeze the rest of the model.

    Returns the qualified names adapted (in module order). All parameters that existed before
    are frozen (requires_grad=False); only adapter and router parameters are trainable. Mark a
    head trainable yourself *after* injecting. Because the up-projections start at zero, the
    injected model computes exactly what the base did.
    """
    if not isinstance(config, MoLREConfig):
        raise MolreError(f"inject_adapters needs a MoLREConfig, got {type(config).__name__}")
    existing = adapted_layers(model)
    if existing:
        names = sorted(existing)
        raise MolreError(
            f"the model already has MoLRE adapters on {len(names)} layer(s) (e.g. {names[:3]}); "
            "inject into a fresh model, or load_adapters() into this one"
        )
    patterns = [(p, re.compile(p)) for p in config.targets]
    hits: dict[str, list[str]] = {p: [] for p, _ in patterns}
    container_hits: dict[str, list[str]] = {p: [] for p, _ in patterns}
    to_adapt: list[tuple[str, nn.Module]] = []
    unsupported: list[str] = []
    mha_children: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            mha_children.update(f"{name}.{c}" if name else c for c, _ in mod.named_modules() if c)
    for name, mod in model.named_modules():
        if not name:
            continue
        matched = [p for p, rx in patterns if rx.fullmatch(name)]
        if not matched:
            continue
        if next(iter(mod.children()), None) is not None:
            for p in matched:
                container_hits[p].append(name)
            continue
        own_params = next(iter(mod.parameters(recurse=False)), None) is not None
        if isinstance(mod, SUPPORTED_TYPES) and name not in mha_children:
            if isinstance(mod, (nn.Conv2d, nn.Conv3d)) and getattr(mod, "transposed", False):
                unsupported.append(f"{name} ({type(mod).__name__})")
                continue
            to_adapt.append((name, mod))
            for p in matched:
                hits[p].append(name)
        elif name in mha_children:
            unsupported.append(
                f"{name} (Linear inside nn.MultiheadAttention, which bypasses wrappers)"
            )
        elif own_params:
            unsupported.append(f"{name} ({type(mod).__name__})")
    if unsupported:
        raise MolreError(
            "MoLRE target pattern(s) matched layer(s) of unsupported type: "
            + ", ".join(unsupported)
            + "; only nn.Linear, nn.Conv2d and nn.Conv3d can be adapted: narrow MoLREConfig.targets"
        )
    empty = [p for p, names in hits.items() if not names]
    if empty:
        details = []
        for p in empty:
            if container_hits[p]:
                details.append(
                    f"{p!r} (matches only container module(s) {container_hits[p][:3]}; "
                    f"patterns must match leaf layers, e.g. {container_hits[p][0] + chr(92) + '..*'!r})"
                )
            else:
                details.append(f"{p!r}")
        example = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)][:5]
        raise MolreError(
            "MoLRE target pattern(s) matched no nn.Linear/Conv2d/Conv3d layer: "
            + "; ".join(details)
            + f" (patterns use re.fullmatch on module names; adaptable layers look like {example})"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    names: list[str] = []
    for name, mod in to_adapt:
        new: MoLRELayer = (
            MoLRELinear(mod, config) if isinstance(mod, nn.Linear) else MoLREConv(mod, config)
        )
        new.train(mod.training)
        _set_submodule(model, name, new)
        names.append(name)
    _log.debug("adapters_injected", layers=len(names), experts=config.experts, rank=config.rank)
    return names


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold LoRA (experts=1) into the base weights and put the plain layers back.

    Why only experts=1: with a router, the effective ΔW depends on each input's gates, so there
    is no single weight to fold in. Returns `model` (modified in place).
    """
    layers = adapted_layers(model)
    if not layers:
        raise MolreError("merge_adapters: the model has no MoLRE adapters to merge")
    routed = [n for n, l in layers.items() if l.experts > 1]
    if routed:
        raise MolreError(
            f"merge_adapters: layer(s) {routed[:3]} have experts={layers[routed[0]].experts}; "
            "a routed mixture depends on the input and cannot be folded into fixed weights "
            "(only experts=1, plain LoRA, can be merged)"
        )
    grouped = [
        n for n, l in layers.items() if isinstance(l, MoLREConv) and l.base_layer.groups != 1
    ]
    if grouped:
        raise MolreError(
            f"merge_adapters: grouped convolution(s) {grouped[:3]} cannot take a dense ΔW"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            base = layer.base_layer
            delta = layer.delta_weight()
            base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
            _set_submodule(model, name, base)
    return model


def adapter_report(model: nn.Module) -> dict:
    """Parameter counts: base (every non-adapter parameter), adapter, overhead %, per layer."""
    layers = adapted_layers(model)
    names = set(adapter_parameter_names(model))
    base = sum(p.numel() for n, p in model.named_parameters() if n not in names)
    adapter = sum(p.numel() for n, p in model.named_parameters() if n in names)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = [
        {
            "name": n,
            "type": type(l.base_layer).__name__,
            "in": l.in_features,
            "out": l.out_features,
            "experts": l.experts,
            "rank": l.rank,
            "adapter_params": l.num_adapter_params(),
        }
        for n, l in layers.items()
    ]
    return {
        "base_params": int(base),
        "adapter_params": int(adapter),
        "trainable_params": int(trainable),
        "overhead_percent": (100.0 * adapter / base) if base else math.inf,
        "layers": rows,
    }


def expert_usage(model: nn.Module) -> dict[str, dict]:
    """Running router statistics per adapted layer since the last reset.

    mean_gate: average gate actually applied per expert (after top_k); entropy: average entropy
    (nats) of the dense router softmax; samples: routed samples counted (training and eval
    forwards alike; activation checkpointing re-runs forwards and counts them twice). Syncs with
    the device (call it outside the hot loop).
    """
    out: dict[str, dict] = {}
    for name, l in adapted_layers(model).items():
        n = int(l.usage_samples.item())
        if n == 0:
            mean = [0.0] * l.experts
            ent = 0.0
        else:
            mean = (l.usage_gate_sum / n).tolist()
            ent = float(l.usage_entropy_sum.item()) / n
        out[name] = {"mean_gate": [float(v) for v in mean], "entropy": ent, "samples": n}
    return out


def reset_expert_usage(model: nn.Module) -> None:
    """Zero the usage statistics of every adapted layer (e.g. at the start of an epoch)."""
    for l in adapted_layers(model).values():
        l.reset_usage()


def balance_loss(model: nn.Module) -> torch.Tensor:
    """Load-balancing term from the last training forward, times `balance_weight`.

    For each routed layer with mean dense router probability p (over the batch):
    CV²(p) = K · Σ_i p_i² − 1, which is 0 when experts are used equally and K−1 when one expert
    takes everything (Switch-Transformer style, soft version). Averaged over layers and multiplied
    by `balance_weight`. Returns a zero scalar when balance_weight is 0, when all layers are plain
    LoRA, or when no training forward has run since the last reset (probabilities are only kept in
    training mode with balance_weight > 0).
    """
    layers = adapted_layers(model)
    if not layers:
        raise MolreError("balance_loss: the model has no MoLRE adapters")
    first = next(iter(layers.values()))
    device = first.lora_A.weight.device
    weight = float(first.config.balance_weight)
    terms = []
    if weight > 0:
        for l in layers.values():
            if l.experts > 1 and l.last_probs is not None:
                p = l.last_probs.float().mean(dim=0)
                terms.append(l.experts * (p * p).sum() - 1.0)
    if not terms:
        return torch.zeros((), device=device)
    return torch.stack(terms).mean() * weight
