"""MoLRE layers: a frozen base layer plus K low-rank experts mixed by a per-sample soft router.

    y = base(x) + (alpha / r) * Σ_i g_i(x) · B_i A_i dropout(x),   g = softmax(router(pool(x)) / T)

The K experts are computed as ONE stacked low-rank path (why: a Python loop over experts costs K
small matmuls and K kernel launches; the stacked form costs about one LoRA of rank K·r):

    h = A_stack(dropout(x))          # K·r channels, one matmul / one conv
    h = h * gate_per_channel         # each group of r channels times its expert's gate (broadcast)
    y = base(x) + B_stack(h)         # one up-projection from K·r channels

where gate_per_channel (batch, K·r) = repeat_interleave(g * alpha/r, r). With experts=1 there is
no router and the layer is exactly PEFT's LoRA (same A/B shapes, same scaling, same order).

Routing is per sample: the router reads the layer input pooled over every dimension between batch
and features (Linear: tokens; Conv: space). A 2D backbone that sees slices as its batch therefore
routes per slice, a 3D backbone per volume. Unbatched Linear input (1-D) is one sample.

Usage statistics (mean gate per expert, router entropy, sample count) are accumulated in
non-persistent buffers with in-place, detached tensor ops: no `.item()`, no host sync, so the
forward stays `torch.compile`-able and cheap.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from molre.adapters.config import MoLREConfig
from molre.adapters.names import LORA_A, LORA_B, ROUTER

SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.Conv3d)


class Router(nn.Module):
    """Two-layer MLP router: Linear(in, hidden) -> GELU -> Linear(hidden, K)."""

    def __init__(self, in_features: int, hidden: int, experts: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, experts)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, K) logits
        return self.fc2(self.act(self.fc1(pooled)))


class MoLRELayer(nn.Module):
    """Common part of `MoLRELinear` / `MoLREConv`; `base_layer` is the original (frozen)
    layer, `lora_A` / `lora_B` the stacked down- / up-projections (PEFT's names)."""

    base_layer: nn.Module
    lora_A: nn.Module
    lora_B: nn.Module

    def __init__(
        self, base: nn.Module, config: MoLREConfig, in_features: int, out_features: int
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.config = config
        self.experts = int(config.experts)
        self.rank = int(config.rank)
        self.scaling = float(config.scaling)
        self.temperature = float(config.temperature)
        self.top_k = config.top_k
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.dropout: nn.Module = (
            nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        )
        dev, dt = base.weight.device, base.weight.dtype
        self.router: Router | None = (
            Router(in_features, config.router_hidden, self.experts).to(device=dev, dtype=dt)
            if self.experts > 1
            else None
        )
        # Running usage statistics: detached, not part of any state dict (they are diagnostics).
        k = self.experts
        self.register_buffer(
            "usage_gate_sum", torch.zeros(k, dtype=torch.float32, device=dev), persistent=False
        )
        self.register_buffer(
            "usage_entropy_sum", torch.zeros((), dtype=torch.float32, device=dev), persistent=False
        )
        self.register_buffer(
            "usage_samples", torch.zeros((), dtype=torch.int64, device=dev), persistent=False
        )
        # Dense router probabilities of the last training forward (kept only when a balance loss
        # is requested, because keeping them holds on to the autograd graph).
        self.last_probs: torch.Tensor | None = None
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Keep usage accumulators float32 when the model is cast (e.g. `.to(torch.bfloat16)`):
        bf16 sums stop growing after a few hundred samples."""
        super()._apply(fn, recurse)
        for name in ("usage_gate_sum", "usage_entropy_sum"):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    # -- the wrapped layer's tensors, read-only ----------------------------------------------
    # Why: some model code reads a layer's weight directly, e.g. transformers' SigLIP casts its
    # input to ``patch_embedding.weight.dtype``. Exposing the base tensors keeps such code working
    # when the layer is wrapped (they are not registered again: state dicts are unchanged).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # -- parameters --------------------------------------------------------------------------
    def _init_adapter(self) -> None:
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B zero -> the layer starts as its base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {LORA_A: self.lora_A, LORA_B: self.lora_B}
        if self.router is not None:
            mods[ROUTER] = self.router
        return mods

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.adapter_modules().values() for p in m.parameters()]

    def num_adapter_params(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    # -- routing -----------------------------------------------------------------------------
    def pool(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _probs_and_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.router is not None
        pooled = self.pool(x)
        logits = self.router(pooled.to(self.router.fc1.weight.dtype)).float()
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_k is None or self.top_k >= self.experts:
            return probs, probs
        top_vals, top_idx = probs.topk(self.top_k, dim=-1)
        kept = torch.zeros_like(probs).scatter(-1, top_idx, top_vals)
        return probs, kept / kept.sum(dim=-1, keepdim=True)

    def num_samples(self, x: torch.Tensor) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Gates (batch, K), float32, rows sum to 1, for a layer input `x`. K=1: all ones."""
        if self.router is None:
            return torch.ones(self.num_samples(x), 1, device=x.device, dtype=torch.float32)
        return self._probs_and_gates(x)[1]

    @torch.no_grad()
    def _record(self, probs: torch.Tensor | None, gates: torch.Tensor | None, n: int) -> None:
        self.usage_samples.add_(n)
        if gates is None or probs is None:
            self.usage_gate_sum.add_(float(n))
            return
        g = gates.detach().float()
        p = probs.detach().float()
        self.usage_gate_sum.add_(g.sum(dim=0))
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1)
        self.usage_entropy_sum.add_(ent.sum())

    def reset_usage(self) -> None:
        self.usage_gate_sum.zero_()
        self.usage_entropy_sum.zero_()
        self.usage_samples.zero_()
        self.last_probs = None

    # -- forward -----------------------------------------------------------------------------
    def _gate_shape(self, h: torch.Tensor) -> tuple[int, ...]:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        h = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))
        if self.router is None:
            self._record(None, None, self.num_samples(x))
            # scale the rank-r activations, not the (larger) output: same result, less work
            return self._up_add(result, h * self.scaling)
        probs, gates = self._probs_and_gates(x)
        self._record(probs, gates, gates.shape[0])
        if self.training and self.config.balance_weight > 0:
            self.last_probs = probs
        # (B, K) -> (B, K*r): gate of expert i on its r channels, scaling folded in.
        per_channel = (gates * self.scaling).repeat_interleave(self.rank, dim=-1).to(h.dtype)
        h = h * per_channel.reshape(self._gate_shape(h))
        return self._up_add(result, h)

    def _up_add(self, result: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """result + up(h)."""
        return result + self.lora_B(h).to(result.dtype)

    def extra_repr(self) -> str:
        return (
            f"experts={self.experts}, rank={self.rank}, scaling={self.scaling:g}, "
            f"top_k={self.top_k}, temperature={self.temperature:g}"
        )


class MoLRELinear(MoLRELayer):
    """MoLRE around an `nn.Linear`; lora_A = Linear(in, K·r), lora_B = Linear(K·r, out), no biases."""

    def __init__(self, base: nn.Linear, config: MoLREConfig) -> None:
        super().__init__(base, config, base.in_features, base.out_features)
        kr = self.experts * self.rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, kr, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(kr, base.out_features, bias=False, device=dev, dtype=dt)
        self._init_adapter()

    def num_samples(self, x: torch.Tensor) -> int:
        return 1 if x.dim() == 1 else x.shape[0]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 1:
            return x.unsqueeze(0)
        if x.dim() == 2:
            return x
        return x.mean(dim=tuple(range(1, x.dim() - 1)))

    def _up_add(self, result: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """result + h @ B^T fused into one GEMM (addmm), saving a pass over the output."""
        w = self.lora_B.weight
        if h.dim() >= 2 and result.dtype == h.dtype == w.dtype:
            out = torch.addmm(
                result.reshape(-1, self.out_features), h.reshape(-1, h.shape[-1]), w.t()
            )
            return out.view(result.shape)
        return result + self.lora_B(h).to(result.dtype)

    def _gate_shape(self, h: torch.Tensor) -> tuple[int, ...]:
        if h.dim() == 1:
            return (h.shape[-1],)
        return (h.shape[0],) + (1,) * (h.dim() - 2) + (h.shape[-1],)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = B·A·scale (out, in); defined for experts=1 only."""
        a = self.lora_A.weight.float()
        b = self.lora_B.weight.float()
        return (b @ a) * self.scaling


class MoLREConv(MoLRELayer):
    """MoLRE around `nn.Conv2d`/`nn.Conv3d`.

    lora_A = Conv(in, K·r) with the base's kernel, stride, padding, dilation and padding mode
    (groups=1), so it sees the same receptive field; lora_B = 1×1 Conv(K·r, out).
    """

    def __init__(self, base: nn.Conv2d | nn.Conv3d, config: MoLREConfig) -> None:
        super().__init__(base, config, base.in_channels, base.out_channels)
        kr = self.experts * self.rank
        conv = type(base)
        nd = 2 if isinstance(base, nn.Conv2d) else 3
        self.spatial_dims = nd
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = conv(
            base.in_channels,
            kr,
            base.kernel_size,
            stride=base.stride,
            padding=base.padding,
            dilation=base.dilation,
            groups=1,
            bias=False,
            padding_mode=base.padding_mode,
            device=dev,
            dtype=dt,
        )
        self.lora_B = conv(kr, base.out_channels, (1,) * nd, bias=False, device=dev, dtype=dt)
        self._init_adapter()

    def num_samples(self, x: torch.Tensor) -> int:
        return 1 if x.dim() == self.spatial_dims + 1 else x.shape[0]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        nd = self.spatial_dims
        if x.dim() == nd + 1:  # unbatched (C, *spatial)
            return x.mean(dim=tuple(range(1, x.dim()))).unsqueeze(0)
        return x.mean(dim=tuple(range(2, x.dim())))

    def _gate_shape(self, h: torch.Tensor) -> tuple[int, ...]:
        nd = self.spatial_dims
        if h.dim() == nd + 1:
            return (h.shape[0],) + (1,) * nd
        return (h.shape[0], h.shape[1]) + (1,) * nd

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out, in, *k) = einsum(B (out, r), A (r, in, *k)) · scale; experts=1 only."""
        a = self.lora_A.weight.float()
        b = self.lora_B.weight.float().flatten(1)
        return torch.einsum("or,r...->o...", b, a) * self.scaling
