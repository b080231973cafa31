"""What the linear mixers share.

Every mixer is a `LinearMixer`: built from the hybrid text config and its layer index, it owns its parameter
init (`init_parameters`, called at construction and by the model's weight init) and its init from a teacher
attention (`init_from_attention`, given an `AttentionWeights`: the teacher's q/k/v/o as plain matrices, whatever
the family's module layout). Its forward is `(x, attention_mask, cu_seqlens, cache) -> y`, where padding is exact
(padded positions write nothing into the state and do not decay it), packed documents restart the convs and the
state, and the cache (`RecurrentStateCache`) holds a constant-size recurrent state plus the conv inputs.

`ShortConvMixer` is the q/k/v-projection-through-a-short-conv front every delta-rule and GLA mixer has (fla's
layout and names). `check_config` refuses dims a mixer cannot run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..cache import RecurrentStateCache
from ..config import ConfigError
from ..ops.conv import fla_short_conv, seq_idx, short_conv
from ..ops.norm import gated_rms_norm


@dataclass
class AttentionWeights:
    """A teacher attention as matrices: q [n_q·d, hidden], k and v [n_kv·d, hidden], o [hidden, n_q·d]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def rows(self, H: int, Dk: int, Dv: int, HV: int | None = None):
        """For a mixer of H query/key heads of dim Dk and HV value heads of dim Dv: the teacher's q rows
        [H·d], its k rows expanded to one head per query head [H·d], its v rows repeated to Dv per head [H·Dv]
        and its o_proj columns laid out for H heads of Dv with zeros past d [hidden, H·Dv], so the layer starts
        as "teacher values, mixed linearly". None where the heads or dims do not match; v and o None where the
        value side does not fit (Dv not a multiple of d, or grouped value heads)."""
        n_q, n_kv, d = self.num_heads, self.num_kv_heads, self.head_dim
        if H != n_q or Dk != d:
            return None
        kv_head = torch.arange(H) // (n_q // n_kv)
        k = self.k.view(n_kv, d, -1)[kv_head].reshape(H * d, -1)
        if Dv % d or (HV or H) != H:
            return self.q, k, None, None
        v = self.v.view(n_kv, d, -1)[kv_head].repeat(1, Dv // d, 1).reshape(H * Dv, -1)
        o = self.o.new_zeros(self.o.shape[0], H, Dv)
        o[:, :, :d] = self.o.view(-1, n_q, d)
        return self.q, k, v, o.view(-1, H * Dv)


def decay_spread(H: int) -> torch.Tensor:
    """Per-head step sizes dt with exp(−dt) spread log-uniformly over [0.90, 0.999] (several time scales)."""
    lo, hi = -math.log(0.999), -math.log(0.90)
    return torch.exp(torch.linspace(math.log(lo), math.log(hi), H))


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def mamba_dt(n: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's step-size init: dt log-uniform in [dt_min, dt_max] (returned as dt_bias = softplus⁻¹ dt)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inverse_softplus(dt.clamp_min(floor))


def identity_conv_(conv: nn.Conv1d) -> None:
    """The current token passes through, earlier taps 0."""
    conv.weight.zero_()
    conv.weight[:, 0, -1] = 1.0
    if conv.bias is not None:
        conv.bias.zero_()


class GatedRMSNorm(nn.Module):
    """RMSNorm(x)·w·act(gate) over each head's channels (fla's FusedRMSNormGated)."""

    def __init__(self, dim: int, eps: float, activation: str = "swish"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.activation = activation

    def forward(self, x: torch.Tensor, gate: torch.Tensor, fused: bool = False) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps, self.activation, fused)


class ShortConv(nn.Conv1d):
    """A mixer's short causal depthwise conv + SiLU (a Conv1d's parameters and init, fla's names). Its forward is
    the mixer's conv, so that whatever hooks modules (accelerate's offloading loads a module's weights when its
    forward runs) sees it used."""

    def forward(self, h: torch.Tensor, state=None, seq_idx_=None, cu_seqlens=None, fused: bool = False,
                keep_state: bool = False):
        """fla's Triton kernel where `fused` (the torch taps cost ~50 GB of memory traffic per layer at 128K: fla's
        is one pass), else `short_conv`. Returns (y, new state or None)."""
        if fused:
            return fla_short_conv(h, self.weight, state, cu_seqlens, output_final_state=keep_state, bias=self.bias)
        return short_conv(h, self.weight, seq_idx_, state, bias=self.bias)


def prepare_inputs(x: torch.Tensor, attention_mask, cu_seqlens, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zeroes padded positions (nothing of them enters a conv) and gives each token its document index for
    the torch conv of a packed row."""
    if attention_mask is not None:
        x = x * attention_mask.unsqueeze(-1).to(x.dtype)
    if cu_seqlens is None:
        return x, None
    if cache is not None:
        raise ValueError("packed sequences (cu_seqlens) cannot be decoded with a cache")
    return x, seq_idx(cu_seqlens, x.shape[1], x.device)


class LinearMixer(nn.Module):
    """The contract of a linear mixer (module docstring)."""

    @classmethod
    def check_config(cls, config) -> None:
        """Raises ConfigError for dims this mixer cannot run."""

    def init_parameters(self) -> None:
        raise NotImplementedError(type(self).__name__)

    def init_from_attention(self, teacher: AttentionWeights) -> None:
        raise NotImplementedError(type(self).__name__)

    def allocate_state(self, state: RecurrentStateCache, batch_size: int, device, dtype) -> None:
        """The cache tensors at their final size (what a CUDA graph needs before capture)."""
        raise NotImplementedError(type(self).__name__)


def same_heads_only(cls, config) -> None:
    if config.num_linear_value_heads != config.num_linear_heads:
        raise ConfigError(f"num_linear_value_heads {config.num_linear_value_heads} != num_linear_heads "
                          f"{config.num_linear_heads}: grouped value heads are not supported by "
                          f"linear_mixer={config.linear_mixer!r} (gated_deltanet and kda support them)")


class ShortConvMixer(LinearMixer):
    """H query/key heads of dim K and HV value heads of dim V sized from the config (fla's num_heads /
    num_v_heads), q/k/v projections each through a short causal conv + SiLU (`add_convs`, called where each
    subclass created its convs, so seeded initialisation draws in the same order), and a recurrent state of
    HV×K×V per sequence."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_linear_heads
        self.num_v_heads = config.num_linear_value_heads
        self.head_k_dim = config.linear_head_dim
        self.head_v_dim = config.head_v_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_size = config.conv_size
        self.backend = config.linear_backend

        self.q_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)

    def add_convs(self) -> None:
        self.q_conv1d = ShortConv(self.key_dim, self.key_dim, self.conv_size, groups=self.key_dim, bias=False)
        self.k_conv1d = ShortConv(self.key_dim, self.key_dim, self.conv_size, groups=self.key_dim, bias=False)
        self.v_conv1d = ShortConv(self.value_dim, self.value_dim, self.conv_size, groups=self.value_dim, bias=False)

    def qkv(self, projected, seq_idx_, cu_seqlens, cache, fused: bool):
        """q, k [B, T, H, K] and v [B, T, HV, V] after their convs (from the q/k/v projections), and the
        convs' new states."""
        q, k, v = projected
        B, T, _ = q.shape
        conv, keep = (cache.conv, True) if cache is not None else ({}, False)
        q, conv_q = self.q_conv1d(q, conv.get("q"), seq_idx_, cu_seqlens, fused, keep)
        k, conv_k = self.k_conv1d(k, conv.get("k"), seq_idx_, cu_seqlens, fused, keep)
        v, conv_v = self.v_conv1d(v, conv.get("v"), seq_idx_, cu_seqlens, fused, keep)
        return (q.view(B, T, self.num_heads, self.head_k_dim), k.view(B, T, self.num_heads, self.head_k_dim),
                v.view(B, T, self.num_v_heads, self.head_v_dim), {"q": conv_q, "k": conv_k, "v": conv_v})

    def copy_attention_(self, teacher: AttentionWeights) -> None:
        """q/k/v/o from the teacher where the shapes allow it (AttentionWeights.rows)."""
        rows = teacher.rows(self.num_heads, self.head_k_dim, self.head_v_dim, self.num_v_heads)
        if rows is None:
            return
        q, k, v, o = rows
        self.q_proj.weight.copy_(q)
        self.k_proj.weight.copy_(k)
        if v is not None:
            self.v_proj.weight.copy_(v)
            self.o_proj.weight.copy_(o)

    def identity_convs_(self) -> None:
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            identity_conv_(conv)

    def allocate_state(self, state: RecurrentStateCache, batch_size: int, device, dtype) -> None:
        width = self.conv_size  # the conv state's layout: see ops.conv.short_conv
        state.conv = {name: torch.zeros(batch_size, dim, width, device=device, dtype=dtype)
                      for name, dim in (("q", self.key_dim), ("k", self.key_dim), ("v", self.value_dim))}
        state.state = torch.zeros(batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim, device=device,
                                  dtype=torch.float32)
