"""`MoLREConfig`: the one description of how a backbone is adapted.

The config travels with every saved adapter (JSON beside the safetensors file, and in the
safetensors metadata) so a checkpoint can always be matched against the model it is loaded into.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.errors import ConfigError
from common.validation import RuleError, config_error, show

#: Default targets: attention projections of timm ViTs and every Conv3d of a CT-FM style encoder.
#: Backbones normally pass their own `BackboneSpec.default_targets`.
DEFAULT_TARGETS: tuple[str, ...] = (r".*attn\.qkv", r".*attn\.proj")


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {show(value)}: {exc}") from None
    return value


Pattern = Annotated[str, Field(min_length=1), AfterValidator(_regex)]


class MoLREConfig(BaseModel):
    """How adapters are built. `experts=1` is plain LoRA (no router, gate fixed to 1).

    `targets` are regular expressions matched with `re.fullmatch` against the qualified module
    name (`model.named_modules()` names, e.g. ``blocks.3.attn.qkv``). Full match, not search, so
    ``attn.qkv`` does not silently also adapt ``attn.qkv_extra``; write ``.*attn\\.qkv`` to match at
    any depth.

    Validated on construction (unknown keys refused, no conversions but int -> float); a bad value
    raises `ConfigError` naming the field ("MoLREConfig.rank: expected an integer >= 1, got 0").
    """

    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True
    )

    experts: Annotated[int, Field(ge=1)] = 6
    """experts per adapted layer (1 = plain LoRA)"""
    rank: Annotated[int, Field(ge=1)] = 8
    """rank of every expert's low-rank update"""
    alpha: Annotated[float, Field(gt=0)] = 16.0
    """LoRA scaling numerator: scaling = alpha / rank"""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """dropout on the adapter input"""
    # strict=False: a tuple of patterns (BackboneSpec.default_targets) is taken as a list
    targets: Annotated[list[Pattern], Field(min_length=1, strict=False)] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS)
    )
    """regular expressions (re.fullmatch) over qualified module names"""
    router_hidden: Annotated[int, Field(ge=1)] = 64
    """hidden width of the router MLP"""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """router softmax is softmax(logits / temperature)"""
    top_k: int | None = None
    """experts kept per sample (1..experts); None = dense routing"""
    balance_weight: Annotated[float, Field(ge=0)] = 0.0
    """weight of the load-balancing loss (0 = off)"""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, type(self), "MoLREConfig.") from None

    @model_validator(mode="after")
    def _top_k_within_experts(self) -> MoLREConfig:
        if self.top_k is not None and not 1 <= self.top_k <= self.experts:
            raise RuleError(
                "top_k",
                f"expected 1..experts={self.experts} or None (dense routing), got {self.top_k}",
            )
        return self

    # -- derived -----------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """LoRA scaling alpha / rank, applied to every expert."""
        return self.alpha / float(self.rank)

    @property
    def is_lora(self) -> bool:
        """True when this is plain LoRA (one expert, no router)."""
        return self.experts == 1

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict in field order; `from_dict(to_dict())` round-trips exactly."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoLREConfig:
        """Build from a dict (e.g. parsed JSON/TOML); unknown keys are an error, not ignored."""
        if not isinstance(data, dict):
            raise ConfigError(f"MoLRE adapter config must be a mapping, got {type(data).__name__}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MoLREConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"MoLRE adapter config is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> MoLREConfig:
        """A validated copy with `changes` applied (what `dataclasses.replace` did)."""
        return type(self)(**{**self.to_dict(), **changes})

    def diff(self, other: MoLREConfig) -> list[str]:
        """Names of the fields whose values differ (used for clear mismatch errors)."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if a[k] != b[k]]
