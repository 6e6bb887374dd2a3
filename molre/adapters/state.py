"""Adapter state: what is saved is only what training changed.

`adapter_state_dict` holds (1) every adapter and router tensor, and (2) every other parameter
the caller marked trainable (requires_grad=True outside the frozen bases, e.g. a classification
head). Keys are the model's own `named_parameters()` names. The frozen backbone is never
saved: it comes from the backbone's own weights.

Files written by `save_adapters(model, path)`:
- `path` is a directory (or has no `.safetensors` suffix): ``<path>/adapter.safetensors`` and
  ``<path>/adapter_config.json``;
- `path` ends in ``.safetensors``: that file and ``<stem>_config.json`` beside it.
The config JSON is also embedded in the safetensors metadata (key ``molre_config``), so a lone
safetensors file still loads. `load_adapters` accepts the same directory or file path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import CheckpointError, MolreError
from molre.adapters.config import MoLREConfig
from molre.adapters.inject import adapted_layers, adapter_parameter_names, get_config
from molre.adapters.names import remap_legacy_keys

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "molre-adapters/1"


def _base_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for l in adapted_layers(model).values() for p in l.base_layer.parameters()}


def _expected_keys(model: nn.Module) -> list[str]:
    """Adapter/router parameter names plus trainable parameters outside the frozen bases."""
    base_ids = _base_param_ids(model)
    adapter = set(adapter_parameter_names(model))
    return [
        n
        for n, p in model.named_parameters()
        if n in adapter or (p.requires_grad and id(p) not in base_ids)
    ]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors of the adapter + router + caller-trainable parameters."""
    if not adapted_layers(model):
        raise MolreError("adapter_state_dict: the model has no MoLRE adapters; inject them first")
    params = dict(model.named_parameters())
    return {k: params[k].detach().contiguous() for k in _expected_keys(model)}


def load_adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True
) -> dict[str, list[str]]:
    """Copy `state` into the model's adapter (and other non-base) parameters.

    Any parameter outside the frozen bases may be loaded (so a head saved as trainable loads
    even if the target model froze it). strict=True: every adapter/router/trainable parameter
    must be present and no unknown key may appear. Shape mismatches are always an error.
    Returns {"missing": [...], "unexpected": [...]} (both empty when strict succeeded).
    """
    if not adapted_layers(model):
        raise MolreError(
            "load_adapter_state_dict: the model has no MoLRE adapters; inject them first"
        )
    state = remap_legacy_keys(state, adapted_layers(model))  # saved before the PEFT names
    base_ids = _base_param_ids(model)
    loadable = {n: p for n, p in model.named_parameters() if id(p) not in base_ids}
    base_names = {n for n, p in model.named_parameters() if id(p) in base_ids}
    expected = _expected_keys(model)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in loadable]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(
                f"missing key(s) {missing[:10]}"
                + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            )
        if unexpected:
            frozen = [k for k in unexpected if k in base_names]
            parts.append(
                f"unexpected key(s) {unexpected[:10]}"
                + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else "")
                + (
                    f"; {frozen[:3]} are frozen base weights, which adapter state never holds"
                    if frozen
                    else ""
                )
            )
        raise CheckpointError(
            "adapter state does not match the model: "
            + "; ".join(parts)
            + ". Build the model with the same backbone, MoLREConfig and head as when it was saved"
        )
    shapes = [
        f"{k}: saved {tuple(v.shape)} vs model {tuple(loadable[k].shape)}"
        for k, v in state.items()
        if k in loadable and tuple(v.shape) != tuple(loadable[k].shape)
    ]
    if shapes:
        raise CheckpointError("adapter state has shape mismatches: " + "; ".join(shapes[:10]))
    with torch.no_grad():
        for k, v in state.items():
            if k in loadable:
                loadable[k].copy_(v.to(device=loadable[k].device, dtype=loadable[k].dtype))
    return {"missing": missing, "unexpected": unexpected}


def _resolve(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".safetensors":
        return p, p.with_name(p.stem + "_config.json")
    return p / ADAPTER_FILE, p / CONFIG_FILE


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write adapter state (safetensors) + MoLREConfig (JSON); returns the safetensors path."""
    config = get_config(model)
    tensor_path, config_path = _resolve(path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
    layers = list(adapted_layers(model))
    meta = {"format": FORMAT, "molre_config": config.to_json(), "adapted": json.dumps(layers)}
    save_file(state, str(tensor_path), metadata=meta)
    payload = {"format": FORMAT, "config": config.to_dict(), "adapted": layers}
    config_path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return tensor_path


def read_adapter_config(path: str | Path) -> MoLREConfig:
    """The MoLREConfig stored with saved adapters (to build a matching model before loading)."""
    return _read(path)[0]


def _read(path: str | Path) -> tuple[MoLREConfig, list[str] | None, Path]:
    tensor_path, config_path = _resolve(path)
    if not tensor_path.is_file():
        raise CheckpointError(
            f"no adapter file at {tensor_path}: pass the directory written by save_adapters "
            f"(holding {ADAPTER_FILE}) or the .safetensors file itself"
        )
    if config_path.is_file():
        try:
            payload = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read adapter config {config_path}: {exc}") from None
        if not isinstance(payload, dict) or "config" not in payload:
            raise CheckpointError(
                f"{config_path} has no 'config' key; it was not written by save_adapters"
            )
        return MoLREConfig.from_dict(payload["config"]), payload.get("adapted"), tensor_path
    try:
        from safetensors import safe_open

        with safe_open(str(tensor_path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{tensor_path} is not a readable safetensors file: {exc}") from None
    if "molre_config" not in meta:
        raise CheckpointError(
            f"no adapter config: neither {config_path} exists nor does {tensor_path} carry "
            "'molre_config' metadata; save adapters with save_adapters()"
        )
    adapted = json.loads(meta["adapted"]) if "adapted" in meta else None
    return MoLREConfig.from_json(meta["molre_config"]), adapted, tensor_path


def load_adapters(model: nn.Module, path: str | Path, strict: bool = True) -> MoLREConfig:
    """Load adapters saved by `save_adapters` into a model injected with the same config.

    Raises CheckpointError naming the differing config fields, or the layers adapted in one and
    not the other, before touching any weight. Returns the stored config.
    """
    stored, adapted, tensor_path = _read(path)
    current = get_config(model)
    diff = stored.diff(current)
    if diff:
        detail = ", ".join(
            f"{k}: saved {stored.to_dict()[k]!r} vs model {current.to_dict()[k]!r}" for k in diff
        )
        raise CheckpointError(
            f"adapter config in {tensor_path} does not match the model ({detail}); "
            "inject the model with read_adapter_config(path) before loading"
        )
    if adapted is not None:
        here = list(adapted_layers(model))
        only_saved = sorted(set(adapted) - set(here))
        only_model = sorted(set(here) - set(adapted))
        if only_saved or only_model:
            raise CheckpointError(
                f"adapted layers differ from {tensor_path}: only in file {only_saved[:5]}, "
                f"only in model {only_model[:5]}; use the same backbone as when saving"
            )
    try:
        state = load_file(str(tensor_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{tensor_path} is not a readable safetensors file: {exc}") from None
    load_adapter_state_dict(model, state, strict=strict)
    return stored
