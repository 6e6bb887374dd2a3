"""The names of an adapter layer's parts, PEFT's vocabulary: the wrapped layer is `base_layer`,
the down-projection `lora_A`, the up-projection `lora_B`, plus MoLRE's `router`.

Checkpoints written before the rename store ``<layer>.base.*``, ``<layer>.lora_down.*`` and
``<layer>.lora_up.*``; :func:`remap_legacy_keys` renames them on load, so they keep working."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

BASE_LAYER = "base_layer"
LORA_A = "lora_A"
LORA_B = "lora_B"
ROUTER = "router"
#: the trainable parts of an adapter layer (the base layer is frozen)
ADAPTER_PARTS = (LORA_A, LORA_B, ROUTER)
#: the names of the parts before the rename
LEGACY_NAMES = {"base": BASE_LAYER, "lora_down": LORA_A, "lora_up": LORA_B}

V = TypeVar("V")


def remap_legacy_keys(state: Mapping[str, V], layers: Iterable[str]) -> dict[str, V]:
    """`state` with ``<layer>.base|lora_down|lora_up.<rest>`` renamed to the current part names,
    for each adapted layer name in `layers` (only there: a backbone may have a module called
    ``base`` of its own). Other keys are unchanged; a state without legacy keys is returned as
    an equal dict."""
    prefixes = {
        f"{layer}.{old}.": f"{layer}.{new}."
        for layer in layers
        for old, new in LEGACY_NAMES.items()
    }
    if not prefixes:
        return dict(state)
    out: dict[str, V] = {}
    for key, value in state.items():
        new_key = key
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i]) + "."
            if prefix in prefixes:
                new_key = prefixes[prefix] + ".".join(parts[i:])
                break
        out[new_key] = value
    return out


__all__ = [
    "ADAPTER_PARTS",
    "BASE_LAYER",
    "LEGACY_NAMES",
    "LORA_A",
    "LORA_B",
    "ROUTER",
    "remap_legacy_keys",
]
