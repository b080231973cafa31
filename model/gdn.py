"""The Gated DeltaNet mixer. Parameter names and shapes follow flash-linear-attention's `GatedDeltaNet`
layer (and so the released InfiniteVL checkpoints): q_proj k_proj v_proj g_proj a_proj b_proj A_log dt_bias
q_conv1d k_conv1d v_conv1d o_norm o_proj.

No positional encoding, no bias; a short causal depthwise conv + SiLU on q, k and v; q and k L2-normalised;
β = sigmoid(b_proj x); per-step log-decay g = −exp(A_log)·softplus(a_proj x + dt_bias); output through a
gated RMSNorm (RMSNorm(o)·w·SiLU(g_proj x)) and o_proj.

Padding (2-D mask): padded positions get x = 0 (so nothing enters the conv), β = 0 and g = 0, so the state
passes through them untouched: each row's real tokens see exactly what they would see alone.
Packing (cu_seqlens): the conv and the recurrent state both restart at every document boundary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import RecurrentStateCache
from .gdn_ops import fla_gated_rmsnorm, fla_short_conv, gated_delta_rule, gdn_gates, use_fla
from .packed import project


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor, fused: bool = False) -> torch.Tensor:
        if fused:  # one pass instead of the ~10 fp32 passes below: ~7 ms per layer at 128K on the H100
            return fla_gated_rmsnorm(x, gate, self.weight, self.eps)
        dtype, acc = x.dtype, torch.promote_types(x.dtype, torch.float32)
        x = x.to(acc)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(acc)
        return (x * F.silu(gate.to(acc))).to(dtype)


def short_conv(x: torch.Tensor, weight: torch.Tensor, seq_idx: torch.Tensor | None = None,
               state: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    """Causal depthwise conv (+ channel bias) + SiLU. x [B, T, C]; weight [C, 1, K]; seq_idx [B, T] (document
    of each token, taps that reach into another document are dropped); state [B, C, K]: the last K inputs
    before x, newest last, of which the oldest is never read (fla's layout, so its update kernel can write
    the state in place). Returns (y [B, T, C], new state [B, C, K])."""
    B, T, C = x.shape
    K = weight.shape[-1]
    prev = x.new_zeros(B, K - 1, C) if state is None else state[..., 1:].transpose(1, 2).to(x.dtype)
    xs = torch.cat([prev, x], 1)  # [B, T+K-1, C]
    w = weight[:, 0, :].to(x.dtype)  # [C, K]; tap K-1 multiplies the current token
    y = x * w[:, K - 1]
    for j in range(1, K):
        tap = xs[:, K - 1 - j:K - 1 - j + T] * w[:, K - 1 - j]
        if seq_idx is not None:
            same = torch.zeros_like(seq_idx, dtype=torch.bool)
            same[:, j:] = seq_idx[:, j:] == seq_idx[:, :-j]
            tap = tap * same.unsqueeze(-1)
        y = y + tap
    if bias is not None:
        y = y + bias.to(x.dtype)
    return F.silu(y), xs[:, -K:].transpose(1, 2)


def conv_silu(h: torch.Tensor, conv: nn.Conv1d, state, seq_idx, cu_seqlens, fused: bool, keep_state: bool):
    """A mixer's short conv: fla's Triton kernel where `fused` (the torch taps cost ~50 GB of memory traffic
    per layer at 128K: fla's is one pass), else `short_conv`. Returns (y, new state or None)."""
    if fused:
        return fla_short_conv(h, conv.weight, state, cu_seqlens, output_final_state=keep_state, bias=conv.bias)
    return short_conv(h, conv.weight, seq_idx, state, bias=conv.bias)


def prepare_inputs(x: torch.Tensor, attention_mask, cu_seqlens, cache) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zeroes padded positions (nothing of them enters a conv) and gives each token its document index for
    the torch conv of a packed row."""
    if attention_mask is not None:
        x = x * attention_mask.unsqueeze(-1).to(x.dtype)
    if cu_seqlens is None:
        return x, None
    if cache is not None:
        raise ValueError("packed sequences (cu_seqlens) cannot be decoded with a cache")
    return x, _seq_idx(cu_seqlens, x.shape[1], x.device)


class ShortConvMixer(nn.Module):
    """What Gated DeltaNet and GLA share: H heads of key dim K and value dim V sized from the config, q/k/v
    projections each through a short causal conv + SiLU (`add_convs`, called where each subclass created its
    convs, so seeded initialisation draws in the same order), and a recurrent state of H×K×V per sequence."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_linear_heads
        self.head_k_dim = config.linear_head_dim
        self.head_v_dim = config.head_v_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_heads * self.head_v_dim
        self.conv_size = config.conv_size
        self.backend = config.linear_backend

        self.q_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.key_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)

    def add_convs(self) -> None:
        self.q_conv1d = nn.Conv1d(self.key_dim, self.key_dim, self.conv_size, groups=self.key_dim, bias=False)
        self.k_conv1d = nn.Conv1d(self.key_dim, self.key_dim, self.conv_size, groups=self.key_dim, bias=False)
        self.v_conv1d = nn.Conv1d(self.value_dim, self.value_dim, self.conv_size, groups=self.value_dim, bias=False)

    def qkv(self, projected, seq_idx, cu_seqlens, cache, fused: bool):
        """q, k [B, T, H, K] and v [B, T, H, V] after their convs (from the q/k/v projections), and the
        convs' new states."""
        q, k, v = projected
        B, T, _ = q.shape
        conv, keep = (cache.conv, True) if cache is not None else ({}, False)
        q, conv_q = conv_silu(q, self.q_conv1d, conv.get("q"), seq_idx, cu_seqlens, fused, keep)
        k, conv_k = conv_silu(k, self.k_conv1d, conv.get("k"), seq_idx, cu_seqlens, fused, keep)
        v, conv_v = conv_silu(v, self.v_conv1d, conv.get("v"), seq_idx, cu_seqlens, fused, keep)
        heads = (B, T, self.num_heads)
        return (q.view(*heads, self.head_k_dim), k.view(*heads, self.head_k_dim), v.view(*heads, self.head_v_dim),
                {"q": conv_q, "k": conv_k, "v": conv_v})

    def allocate_state(self, state, batch_size: int, device, dtype) -> None:
        """The cache tensors at their final size (what a CUDA graph needs before capture)."""
        width = self.conv_size  # the conv state's layout: see short_conv
        state.conv = {name: torch.zeros(batch_size, dim, width, device=device, dtype=dtype)
                      for name, dim in (("q", self.key_dim), ("k", self.key_dim), ("v", self.value_dim))}
        state.state = torch.zeros(batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device,
                                  dtype=torch.float32)


class GatedDeltaNet(ShortConvMixer):
    PACKABLE = ("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj")  # one input: see model/packed.py

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.a_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
        self.b_proj = nn.Linear(self.hidden_size, self.num_heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.add_convs()
        self.g_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)

    @torch.no_grad()
    def reset_gates(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba-style gate init: A ~ U(1, 16), per-head step dt log-uniform in [dt_min, dt_max]."""
        self.A_log.copy_(torch.empty(self.num_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt.clamp_min(1e-4))))  # inverse softplus

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: RecurrentStateCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        x, seq_idx = prepare_inputs(x, attention_mask, cu_seqlens, cache)
        fused = use_fla(x, self.backend, self.head_k_dim)
        q, k, v, g_in, a, b = project(self, x, self.PACKABLE)
        q, k, v, conv_states = self.qkv((q, k, v), seq_idx, cu_seqlens, cache, fused)
        if attention_mask is None:  # the kernel may apply the gates itself
            g, beta, gate_params = a, b, dict(A_log=self.A_log, dt_bias=self.dt_bias)
        else:  # padded steps must not touch the state: β = 0 and g = 0 there
            g, beta = gdn_gates(a, b, self.A_log, self.dt_bias)
            beta = beta * attention_mask.unsqueeze(-1).to(beta.dtype)
            g, gate_params = g * attention_mask.unsqueeze(-1).to(g.dtype), {}

        o, state = gated_delta_rule(
            q, k, v, g, beta, initial_state=cache.state if cache is not None else None,
            output_final_state=cache is not None, cu_seqlens=cu_seqlens, use_qk_l2norm=True, backend=self.backend,
            **gate_params)
        if cache is not None:
            cache.store(conv_states, state)
        gate = g_in.view(B, T, self.num_heads, self.head_v_dim)
        o = self.o_norm(o, gate, fused).reshape(B, T, self.value_dim)
        return self.o_proj(o)


def _seq_idx(cu_seqlens: torch.Tensor, T: int, device) -> torch.Tensor:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    if int(cu_seqlens[-1]) != T:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the packed sequence has {T} tokens")
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths).unsqueeze(0)
