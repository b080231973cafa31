"""The linear mixers of the paper's ablation besides Gated DeltaNet: Gated Linear Attention (GLA) and Mamba2.
Both keep `GatedDeltaNet.forward(x, attention_mask, cu_seqlens, cache)`'s contract: padding is exact
(padded positions write nothing into the state and do not decay it), packed documents restart the short
conv and the state, and the cache holds a constant-size recurrent state plus the conv inputs it needs.

Parameter names and shapes follow flash-linear-attention's layers, so their checkpoints load:

GatedLinearAttention = fla `layers/gla.py` `GatedLinearAttention(hidden_size, num_heads=H, expand_k=H·Dk/hidden,
expand_v=H·Dv/hidden, use_short_conv=True, conv_size, conv_bias=False, gate_low_rank_dim=16,
gate_logit_normalizer=16, fuse_norm=True, norm_eps)`: q_proj k_proj v_proj g_proj, q_conv1d k_conv1d
v_conv1d, gk_proj.0 (hidden → 16) gk_proj.1 (16 → H·Dk, with bias), g_norm_swish_gate, o_proj.
Sized like Gated DeltaNet: H = num_linear_heads, Dk = linear_head_dim, Dv = linear_head_dim·expand_v, so the
state is the same H×Dk×Dv (3B teacher: 16×128×256). The decay is per key channel:
g = logsigmoid(gk_proj x)/16; output RMSNorm(o)·w·SiLU(g_proj x) per head, then o_proj. (fla's default has no
short conv; we keep it so the ablation changes only the recurrence.)

Mamba2Mixer = fla `layers/mamba2.py` `Mamba2(hidden_size, num_heads=H, head_dim=P, state_size=N, expand=H·P/hidden,
n_groups=H, conv_kernel=conv_size, use_conv_bias=True, use_bias=False, rmsnorm=True, norm_before_gate=False,
D_has_hdim=False, norm_eps)`: in_proj (→ [z | x B C | dt]), conv1d (depthwise over x B C, with bias), dt_bias,
A_log, D, norm (RMSNorm over each head's P channels after the SiLU(z) gate), out_proj.
Sized from the same fields: H = num_linear_heads, N = linear_head_dim (the key side), P = N·expand_v (the
value side), one B/C group per head (n_groups = H, as GDN has one key per head), so the state H×N×P is
GDN's size again. The decay is one scalar per head and step, exp(−exp(A_log)·dt) with
dt = softplus(dt_raw + dt_bias); the recurrence is the SSD (scalar-decay) form h_t = e^{A dt} h + dt·B xᵀ,
y = hᵀC + D·x, run by `linear_ops.simple_gla` with q = C, k = B, v = dt·x, scale 1.

Padding (2-D mask): x = 0 at padded positions (nothing enters the convs), and there the gate's log-decay is 0
and the written key (GLA) / dt (Mamba2) is 0, so the state passes through untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import RecurrentStateCache
from .gdn import GatedRMSNorm, ShortConvMixer, conv_silu, prepare_inputs
from .gdn_ops import use_fla
from .linear_ops import gla, simple_gla
from .packed import project


class GatedLinearAttention(ShortConvMixer):
    GATE_LOW_RANK_DIM = 16
    GATE_LOGIT_NORMALIZER = 16
    PACKABLE = ("q_proj", "k_proj", "v_proj", "g_proj")  # one input: see model/packed.py

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.g_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.add_convs()
        self.gk_proj = nn.Sequential(nn.Linear(self.hidden_size, self.GATE_LOW_RANK_DIM, bias=False),
                                     nn.Linear(self.GATE_LOW_RANK_DIM, self.key_dim, bias=True))
        self.g_norm_swish_gate = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: RecurrentStateCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        x, seq_idx = prepare_inputs(x, attention_mask, cu_seqlens, cache)
        fused = use_fla(x, self.backend, self.head_k_dim)
        q, k, v, g_in = project(self, x, self.PACKABLE)
        q, k, v, conv_states = self.qkv((q, k, v), seq_idx, cu_seqlens, cache, fused)
        acc = torch.promote_types(x.dtype, torch.float32)
        gk = (F.logsigmoid(self.gk_proj(x).to(acc)) / self.GATE_LOGIT_NORMALIZER).view(B, T, self.num_heads, -1)
        if attention_mask is not None:
            # the conv output at a right-padded position still sees real tokens: nothing may be written there
            m = attention_mask[:, :, None, None]
            k = k * m.to(k.dtype)
            gk = gk * m.to(gk.dtype)
        o, state = gla(q, k, v, gk, initial_state=cache.state if cache is not None else None,
                       output_final_state=cache is not None, cu_seqlens=cu_seqlens, backend=self.backend)
        if cache is not None:
            cache.store(conv_states, state)
        gate = g_in.view(B, T, self.num_heads, self.head_v_dim)
        o = self.g_norm_swish_gate(o.to(x.dtype), gate, fused).reshape(B, T, self.value_dim)
        return self.o_proj(o)


class GroupGatedRMSNorm(nn.Module):
    """Mamba2's gated norm (fla `RMSNormGated`, norm_before_gate=False): RMSNorm(x·SiLU(z)) over groups of
    `group_size` channels, times a weight over all channels."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype, acc = x.dtype, torch.promote_types(x.dtype, torch.float32)
        x = x.to(acc) * F.silu(z.to(acc))
        xg = x.unflatten(-1, (-1, self.group_size))
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xg.flatten(-2) * self.weight.to(acc)).to(dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_linear_heads
        self.ssm_state_size = config.linear_head_dim
        self.head_dim = config.head_v_dim
        self.n_groups = self.num_heads
        self.intermediate_size = self.num_heads * self.head_dim
        self.conv_size = config.conv_size
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.backend = config.linear_backend

        self.in_proj = nn.Linear(self.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.conv_size, groups=self.conv_dim,
                                padding=self.conv_size - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GroupGatedRMSNorm(self.intermediate_size, self.intermediate_size // self.n_groups,
                                      eps=config.norm_eps)
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.reset_ssm()

    @torch.no_grad()
    def reset_ssm(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> None:
        """Mamba2's own init: A ~ U(1, 16), dt log-uniform in [dt_min, dt_max] (dt_bias = softplus⁻¹ dt), D = 1."""
        self.A_log.copy_(torch.empty(self.num_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp_min(dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: RecurrentStateCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, N, P = self.num_heads, self.ssm_state_size, self.head_dim
        x, seq_idx = prepare_inputs(x, attention_mask, cu_seqlens, cache)
        fused = use_fla(x, self.backend, self.ssm_state_size)
        z, xbc, dt = self.in_proj(x).split([self.intermediate_size, self.conv_dim, H], dim=-1)
        xbc, conv_state = conv_silu(xbc.contiguous(), self.conv1d, cache.conv.get("xBC") if cache is not None else None,
                                    seq_idx, cu_seqlens, fused, cache is not None)
        xs, b, c = xbc.split([self.intermediate_size, self.n_groups * N, self.n_groups * N], dim=-1)
        acc = torch.promote_types(x.dtype, torch.float32)
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # [B, T, H]
        if attention_mask is not None:
            dt = dt * attention_mask.unsqueeze(-1).to(dt.dtype)  # no write, no decay at padded positions
        g = -self.A_log.to(acc).exp() * dt
        xs = xs.view(B, T, H, P)
        per_group = H // self.n_groups
        # head h reads B/C group h // (H / n_groups), as in mamba_ssm's kernels
        b = b.view(B, T, self.n_groups, N).repeat_interleave(per_group, dim=2)
        c = c.view(B, T, self.n_groups, N).repeat_interleave(per_group, dim=2)
        v = (xs.to(acc) * dt.unsqueeze(-1)).to(x.dtype)
        y, state = simple_gla(c, b, v, g, scale=1.0, initial_state=cache.state if cache is not None else None,
                              output_final_state=cache is not None, cu_seqlens=cu_seqlens, backend=self.backend)
        if cache is not None:
            cache.store({"xBC": conv_state}, state)
        y = y.to(acc) + xs.to(acc) * self.D.to(acc)[:, None]
        y = self.norm(y.reshape(B, T, self.intermediate_size).to(x.dtype), z)
        return self.out_proj(y)

    def allocate_state(self, state: RecurrentStateCache, batch_size: int, device, dtype) -> None:
        """The cache tensors at their final size (what a CUDA graph needs before capture)."""
        state.conv = {"xBC": torch.zeros(batch_size, self.conv_dim, self.conv_size, device=device, dtype=dtype)}
        state.state = torch.zeros(batch_size, self.num_heads, self.ssm_state_size, self.head_dim, device=device,
                                  dtype=torch.float32)

