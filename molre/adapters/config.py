"""`MoLREConfig`: the one description of how a backbone is adapted.

The config travels with every saved adapter (JSON beside the safetensors file, and in the
safetensors metadata) so a checkpoint can always be matched against the model it is loaded into.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError

#: Default targets: attention projections of timm ViTs and every Conv3d of a CT-FM style encoder.
#: Backbones normally pass their own `BackboneSpec.default_targets`.
DEFAULT_TARGETS: tuple[str, ...] = (r".*attn\.qkv", r".*attn\.proj")


@dataclass
class MoLREConfig:
    """How adapters are built. `experts=1` is plain LoRA (no router, gate fixed to 1).

    `targets` are regular expressions matched with `re.fullmatch` against the qualified module
    name (`model.named_modules()` names, e.g. ``blocks.3.attn.qkv``). Full match, not search, so
    ``attn.qkv`` does not silently also adapt ``attn.qkv_extra``; write ``.*attn\\.qkv`` to match at
    any depth.
    """

    experts: int = 6
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    router_hidden: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    balance_weight: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    # -- validation --------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `ConfigError` (a `MolreError`) naming the key and the allowed values."""

        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"MoLREConfig.{key}={getattr(self, key)!r}: {why}")

        for key in ("experts", "rank", "router_hidden"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, "must be an integer >= 1")
        for key in ("alpha", "dropout", "temperature", "balance_weight"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(key, "must be a finite number")
        if self.alpha <= 0:
            raise bad("alpha", "must be > 0 (scaling is alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if self.temperature <= 0:
            raise bad(
                "temperature", "must be > 0 (router softmax is softmax(logits / temperature))"
            )
        if self.balance_weight < 0:
            raise bad("balance_weight", "must be >= 0 (0 disables the load-balancing loss)")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
                raise bad("top_k", "must be None (dense routing) or an integer")
            if not 1 <= self.top_k <= self.experts:
                raise bad("top_k", f"must be between 1 and experts={self.experts}, or None")
        if isinstance(self.targets, str):
            raise bad("targets", "must be a list of regular expressions, not a single string")
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise bad("targets", "must be a non-empty list of regular expressions")
        self.targets = list(self.targets)
        for pat in self.targets:
            if not isinstance(pat, str) or not pat:
                raise bad("targets", f"entry {pat!r} is not a non-empty string")
            try:
                re.compile(pat)
            except re.error as exc:
                raise bad(
                    "targets", f"entry {pat!r} is not a valid regular expression ({exc})"
                ) from None

    # -- derived -----------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """LoRA scaling alpha / rank, applied to every expert."""
        return float(self.alpha) / float(self.rank)

    @property
    def is_lora(self) -> bool:
        """True when this is plain LoRA (one expert, no router)."""
        return self.experts == 1

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; `from_dict(to_dict())` round-trips exactly."""
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["alpha"] = float(self.alpha)
        d["dropout"] = float(self.dropout)
        d["temperature"] = float(self.temperature)
        d["balance_weight"] = float(self.balance_weight)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoLREConfig":
        """Build from a dict (e.g. parsed JSON/TOML); unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise ConfigError(f"MoLRE adapter config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown MoLRE adapter config key(s) {unknown}; allowed keys: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MoLREConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"MoLRE adapter config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def diff(self, other: "MoLREConfig") -> list[str]:
        """Names of the fields whose values differ (used for clear mismatch errors)."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if a[k] != b[k]]
