"""PEFT's names for the parts of an adapter layer, and checkpoints saved under the old ones."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from molre.adapters import (
    MoLREConfig,
    adapted_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapter_state_dict,
)
from molre.adapters.names import LEGACY_NAMES, remap_legacy_keys
from molre.checkpoint import Predictor, default_checkpoint_path

_TO_LEGACY = {new: old for old, new in LEGACY_NAMES.items()}


def _rename(state: dict, layers: list[str], table: dict[str, str]) -> dict:
    """Independent of remap_legacy_keys: rename `<layer>.<part>.` by plain string surgery."""
    out = {}
    for k, v in state.items():
        for layer in layers:
            for a, b in table.items():
                if k.startswith(f"{layer}.{a}."):
                    k = f"{layer}.{b}." + k[len(f"{layer}.{a}.") :]
        out[k] = v
    return out


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4)  # a backbone module that happens to be called "base"
        self.proj = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.base(x))


def test_parts_have_peft_names_and_legacy_state_loads() -> None:
    torch.manual_seed(0)
    model = _Net()
    inject_adapters(model, MoLREConfig(experts=2, rank=2, targets=[r"proj"]))
    layer = model.proj
    assert {"base_layer", "lora_A", "lora_B", "router"} <= {n for n, _ in layer.named_children()}
    with torch.no_grad():
        for p in layer.lora_B.parameters():
            p.normal_()
    state = adapter_state_dict(model)
    assert set(state) == {
        "proj.lora_A.weight",
        "proj.lora_B.weight",
        "proj.router.fc1.weight",
        "proj.router.fc1.bias",
        "proj.router.fc2.weight",
        "proj.router.fc2.bias",
    }
    legacy = _rename(state, ["proj"], _TO_LEGACY)
    assert "proj.lora_down.weight" in legacy and "proj.lora_up.weight" in legacy

    torch.manual_seed(1)
    fresh = _Net()
    fresh.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k.startswith("base.")}, strict=False
    )
    inject_adapters(fresh, MoLREConfig(experts=2, rank=2, targets=[r"proj"]))
    fresh.proj.base_layer.load_state_dict(model.proj.base_layer.state_dict())
    load_adapter_state_dict(fresh, legacy)  # strict: every key found under its new name
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), model(x))
    # the backbone's own module "base" is not an adapter part: left alone
    assert remap_legacy_keys({"base.weight": 1, "proj.base.weight": 2}, adapted_layers(model)) == {
        "base.weight": 1,
        "proj.base_layer.weight": 2,
    }


def _copy_with_keys(src: Path, dest: Path, table: dict[str, str], layers: list[str]) -> Path:
    shutil.copytree(src, dest)
    tensors = load_file(str(src / "adapter.safetensors"))
    save_file(
        _rename(tensors, layers, table),
        str(dest / "adapter.safetensors"),
        metadata={"format": "pt"},
    )
    return dest


def test_demo_checkpoint_loads_under_old_and_new_names_with_the_same_predictions(
    tmp_path: Path,
) -> None:
    demo = default_checkpoint_path()
    p = Predictor.from_checkpoint(None)
    layers = list(adapted_layers(p.model))
    x = torch.randn((2, *p.recipe.output_shape()), generator=torch.Generator().manual_seed(0))
    reference = p.predict_tensor(x)
    for name, table in (("legacy", _TO_LEGACY), ("peft", LEGACY_NAMES)):
        d = _copy_with_keys(demo, tmp_path / name, table, layers)
        keys = set(load_file(str(d / "adapter.safetensors")))
        part = "lora_down" if name == "legacy" else "lora_A"
        assert any(f".{part}." in k for k in keys), name
        probs = Predictor.from_checkpoint(d).predict_tensor(x)
        assert np.array_equal(probs, reference), name
