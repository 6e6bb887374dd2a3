"""Backbone registry: one name → architecture, preprocessing recipe, MoLRE targets, weights hint.

Why a registry: training, the checkpoint loader and the node must all rebuild *exactly* the same
backbone from the name stored in a model card, with the preprocessing recipe that matches it.
Each entry therefore carries its ``BackboneSpec`` (what the model card records) next to a builder;
``create_backbone`` (in the spirit of timm's ``create_model``) builds the module at random init,
optionally loads local weights (never downloads), and attaches ``.spec``.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import ConfigError

from .weights import LoadReport, load_weights_into, read_config, resolve_weights


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is, in the terms the rest of the system needs.

    ``recipe`` is ``{"name": <recipe name in molre.data.preprocess>, **params}``;
    ``default_targets`` are regexes over module names *inside the backbone* that MoLRE wraps when
    the adapter config gives no targets: the targets of the default preset (``"paper"``).
    ``target_presets`` names every adapter placement the entry offers (``{"paper": [...],
    "light": [...]}``); see ``preset_targets`` and docs/backbones.md.
    """

    name: str
    dims: int
    feature_dim: int
    recipe: dict[str, Any]
    default_targets: list[str]
    description: str = ""
    weights_hint: str = ""
    target_presets: dict[str, list[str]] = field(default_factory=dict)
    #: a foundation model that is only meaningful with its published weights: training one at
    #: random init needs an explicit opt-in (``molre-node train --random-init``)
    requires_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for model cards and ``molre-node backbones --json``)."""
        d = asdict(self)
        d["recipe"] = copy.deepcopy(self.recipe)
        d["default_targets"] = list(self.default_targets)
        d["target_presets"] = {k: list(v) for k, v in self.target_presets.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneSpec:
        """Inverse of ``to_dict`` (unknown keys ignored so newer cards still load)."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class _Entry:
    spec: BackboneSpec
    builder: Callable[..., nn.Module]
    # the submodule whose state dict matches the published checkpoint
    weights_target: Callable[[nn.Module], nn.Module] = lambda m: m
    # regexes of checkpoint keys that may be dropped (e.g. a text tower)
    weights_ignore: tuple[str, ...] = ()
    # rewrite a foreign checkpoint layout into ours (tried only when a direct match fails)
    weights_convert: Callable[[dict, nn.Module], dict] | None = None
    # builder overrides derived from a weights directory's config.json
    config_from_weights: Callable[[dict], dict] | None = None
    # default MoLRE targets of a *built* module (follows depth overrides); None = spec's list
    targets_for: Callable[[nn.Module], list[str]] | None = None
    # adapter placements of a *built* module by preset name ({"paper": [...], "light": [...]});
    # when given, its DEFAULT_PRESET entry is the default targets
    presets_for: Callable[[nn.Module], dict[str, list[str]]] | None = None


#: The adapter placement used unless one is asked for: the paper's (see docs/backbones.md).
DEFAULT_PRESET = "paper"

_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    spec: BackboneSpec,
    builder: Callable[..., nn.Module],
    *,
    weights_target: Callable[[nn.Module], nn.Module] | None = None,
    weights_ignore: Iterable[str] = (),
    weights_convert: Callable[[dict, nn.Module], dict] | None = None,
    config_from_weights: Callable[[dict], dict] | None = None,
    targets_for: Callable[[nn.Module], list[str]] | None = None,
    presets_for: Callable[[nn.Module], dict[str, list[str]]] | None = None,
) -> None:
    """Add an entry (used by the modules of this package; a site may add its own)."""
    _REGISTRY[spec.name] = _Entry(
        spec=spec,
        builder=builder,
        weights_target=weights_target or (lambda m: m),
        weights_ignore=tuple(weights_ignore),
        weights_convert=weights_convert,
        config_from_weights=config_from_weights,
        targets_for=targets_for,
        presets_for=presets_for,
    )


def list_backbones() -> list[str]:
    """Registered backbone names, in registration order."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown backbone {name!r}; available: {', '.join(list_backbones())} "
            f"(see `molre-node backbones`)"
        ) from None


def get_spec(name: str) -> BackboneSpec:
    """The registered spec (default sizes) of ``name``."""
    return _entry(name).spec


def create_backbone(name: str, weights: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build backbone ``name`` (random init), optionally load local ``weights``, attach ``.spec``.

    ``weights``: a ``.safetensors``/``.pt``/``.bin`` file, a directory in the published layout
    (``config.json`` + ``model.safetensors``), or ``hf://repo_id`` from the offline HF cache.
    ``overrides`` go to the architecture constructor (e.g. ``img_size``, ``depth``) so tests can
    shrink a model; ``.spec.feature_dim``, the recipe size and the default MoLRE targets (e.g.
    "the last blocks") follow the built module.
    The module is returned in eval mode (frozen backbones keep BatchNorm statistics fixed).
    """
    entry = _entry(name)
    path: Path | None = None
    if weights is not None:
        path = resolve_weights(weights, hint=entry.spec.weights_hint)
        if entry.config_from_weights is not None and path.is_dir():
            cfg = read_config(path)
            if cfg:
                overrides = {**entry.config_from_weights(cfg), **overrides}
    module = entry.builder(**overrides)
    recipe = copy.deepcopy(entry.spec.recipe)
    if entry.spec.dims == 2 and getattr(module, "image_size", None):
        recipe["size"] = int(module.image_size)  # slices are resized to what the ViT was built for
    targets = entry.targets_for(module) if entry.targets_for else list(entry.spec.default_targets)
    presets = {k: list(v) for k, v in (entry.spec.target_presets or {}).items()}
    if entry.presets_for is not None:
        presets = {k: list(v) for k, v in entry.presets_for(module).items()}
        targets = list(presets.get(DEFAULT_PRESET, targets))
    presets.setdefault(DEFAULT_PRESET, list(targets))
    spec = replace(
        entry.spec,
        feature_dim=int(module.feature_dim),
        recipe=recipe,
        default_targets=targets,
        target_presets=presets,
    )
    module.spec = spec
    # a builder may have loaded weights shipped with the package (phantom-3d) and said so
    module.weights_source = getattr(module, "weights_source", None)
    if path is not None:
        report: LoadReport = load_weights_into(
            entry.weights_target(module),
            path,
            hint=entry.spec.weights_hint,
            ignore=entry.weights_ignore,
            convert=entry.weights_convert,
        )
        module.weights_source = report.path
    return module.eval()


def preset_targets(spec: BackboneSpec, preset: str | None = None) -> list[str]:
    """The MoLRE target regexes of adapter placement ``preset`` (None = ``DEFAULT_PRESET``).

    Use the ``.spec`` of a built module: its presets follow depth/width overrides.
    """
    name = preset or DEFAULT_PRESET
    presets = dict(spec.target_presets or {})
    presets.setdefault(DEFAULT_PRESET, list(spec.default_targets))
    if name not in presets:
        raise ConfigError(
            f"backbone {spec.name!r} has no adapter preset {name!r}; "
            f"available: {', '.join(presets)}"
        )
    return list(presets[name])


def base_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's own (non-adapter) tensors under their *original* names.

    Adapter tensors (``lora_A``/``lora_B``/``router``) are left out and ``<layer>.base_layer.*``
    inside a MoLRE wrapper is mapped back to ``<layer>.*``, so the result is the same before and
    after ``inject_adapters``.
    """
    state = module.state_dict()
    from molre.adapters import adapted_layers
    from molre.adapters.names import BASE_LAYER

    wrapped = sorted(adapted_layers(module), key=len, reverse=True)
    if not wrapped:
        return dict(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        owner = next((w for w in wrapped if key.startswith(w + ".")), None)
        if owner is None:
            out[key] = value
            continue
        rest = key[len(owner) + 1 :]
        if rest.startswith(BASE_LAYER + "."):
            out[owner + "." + rest[len(BASE_LAYER) + 1 :]] = value
        # anything else inside a wrapper is adapter state: not part of the backbone
    return out


def weights_digest(module: nn.Module) -> str:
    """sha256 over the base (non-adapter) state dict: names, dtypes, shapes and raw bytes.

    Checkpoints store it so that loading adapters onto a *different* backbone (other weights,
    other size) is caught. Stable across processes and before/after adapter injection.
    """
    return state_digest(base_state_dict(module))


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and raw bytes, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach()
        if t.device.type == "meta":
            raise ValueError(
                "weights_digest needs materialised tensors (module is on the meta device)"
            )
        t = t.cpu().contiguous()
        h.update(key.encode())
        h.update(b"\0")
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(b"\0")
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def describe_backbone(name: str, experts: int = 6, rank: int = 8) -> dict[str, Any]:
    """Spec, parameter count and adapter overhead (MoLRE(experts, rank) and LoRA(rank)) of every
    adapter preset.

    ``molre``/``lora`` describe the default preset; ``presets`` holds the same for each preset
    (``{"paper": {"molre": ..., "lora": ...}, "light": ...}``). The architecture is built at random
    init on PyTorch's ``meta`` device: the counts are exact but nothing is allocated, so even the
    300-400 M parameter entries take well under a second. A backbone that cannot be built here
    (e.g. ``medsiglip`` without ``transformers``) gets an ``error`` field instead of counts.
    """
    from common.errors import MolreError
    from molre.adapters import MoLREConfig, adapter_report, inject_adapters

    spec = get_spec(name)
    row: dict[str, Any] = spec.to_dict()
    try:
        with torch.device("meta"):
            built = create_backbone(name).spec
        row["default_targets"] = list(built.default_targets)
        row["target_presets"] = {k: list(v) for k, v in built.target_presets.items()}
        presets: dict[str, dict[str, Any]] = {}
        for preset in built.target_presets:
            targets = preset_targets(built, preset)
            reports = {}
            for label, k in (("molre", experts), ("lora", 1)):
                with torch.device("meta"):
                    module = create_backbone(name)
                    inject_adapters(module, MoLREConfig(experts=k, rank=rank, targets=targets))
                rep = adapter_report(module)
                reports[label] = {
                    "experts": k,
                    "rank": rank,
                    "adapter_params": rep["adapter_params"],
                    "overhead_percent": round(rep["overhead_percent"], 4),
                    "layers": [layer["name"] for layer in rep["layers"]],
                }
                row["params"] = rep["base_params"]
            presets[preset] = reports
        row["presets"] = presets
        row["default_preset"] = DEFAULT_PRESET
        row.update(presets[DEFAULT_PRESET])
        row["error"] = None
    except MolreError as exc:
        row.update(params=None, molre=None, lora=None, presets=None, error=str(exc))
    return row
