"""MoLRE adapters: LoRA extended to K low-rank experts mixed by a learned per-sample soft router.

Public API (see docs/architecture.md):
    MoLREConfig, inject_adapters, adapter_state_dict, load_adapter_state_dict, save_adapters,
    load_adapters, read_adapter_config, merge_adapters, adapter_report, expert_usage,
    reset_expert_usage, balance_loss, adapted_layers, adapter_parameter_names, get_config,
    MoLRELinear, MoLREConv.
"""

from molre.adapters.config import DEFAULT_TARGETS, MoLREConfig
from molre.adapters.inject import (
    adapted_layers,
    adapter_parameter_names,
    adapter_report,
    balance_loss,
    expert_usage,
    get_config,
    inject_adapters,
    merge_adapters,
    reset_expert_usage,
)
from molre.adapters.layers import SUPPORTED_TYPES, MoLREConv, MoLRELayer, MoLRELinear, Router
from molre.adapters.state import (
    ADAPTER_FILE,
    CONFIG_FILE,
    adapter_state_dict,
    load_adapter_state_dict,
    load_adapters,
    read_adapter_config,
    save_adapters,
)

__all__ = [
    "ADAPTER_FILE",
    "CONFIG_FILE",
    "DEFAULT_TARGETS",
    "SUPPORTED_TYPES",
    "MoLREConfig",
    "MoLREConv",
    "MoLRELayer",
    "MoLRELinear",
    "Router",
    "adapted_layers",
    "adapter_parameter_names",
    "adapter_report",
    "adapter_state_dict",
    "balance_loss",
    "expert_usage",
    "get_config",
    "inject_adapters",
    "load_adapter_state_dict",
    "load_adapters",
    "merge_adapters",
    "read_adapter_config",
    "reset_expert_usage",
    "save_adapters",
]
