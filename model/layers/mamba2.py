"""Mamba2, for the paper's linear-mixer ablation. Parameter names and shapes follow flash-linear-attention's
`layers/mamba2.py` `Mamba2(hidden_size, num_heads=H, head_dim=P, state_size=N, expand=H·P/hidden, n_groups=H,
conv_kernel=conv_size, use_conv_bias=True, use_bias=False, rmsnorm=True, norm_before_gate=False,
D_has_hdim=False, norm_eps)`: in_proj (→ [z | x B C | dt]), conv1d (depthwise over x B C, with bias), dt_bias,
A_log, D, norm (RMSNorm over each head's P channels after the SiLU(z) gate), out_proj.

Sized from the same fields as Gated DeltaNet: H = num_linear_heads, N = linear_head_dim (the key side),
P = N·expand_v (the value side), one B/C group per head (n_groups = H, as GDN has one key per head), so the
state H×N×P is GDN's size again. The decay is one scalar per head and step, exp(−exp(A_log)·dt) with
dt = softplus(dt_raw + dt_bias); the recurrence is the SSD (scalar-decay) form h_t = e^{A dt} h + dt·B xᵀ,
y = hᵀC + D·x, run by `ops.gla.simple_gla` with q = C, k = B, v = dt·x, scale 1.

Padding: x = 0 at padded positions (nothing enters the conv), and there dt = 0: no write, no decay.

Init from a teacher attention (C plays q, B plays k, x plays v): in_proj's C rows ← teacher q_proj, B rows ←
teacher k_proj (one group per head as for GDN's keys), x rows ← teacher v_proj (repeated as for GDN's values),
out_proj ← o_proj as for GDN; z rows keep the standard init; dt rows ← 0, A_log ← 0 and dt_bias spread so the
decay exp(−dt) lies in [0.90, 0.999]; D ← 0 (the layer starts as "teacher values mixed by q·k", not as a skip
of its own value); conv the identity with zero bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import RecurrentStateCache
from ..ops.common import fla_runs, use_fla
from ..ops.gla import simple_gla
from .base import AttentionWeights, LinearMixer, ShortConv, decay_spread, identity_conv_, inverse_softplus, \
    mamba_dt, prepare_inputs, same_heads_only


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


class Mamba2Mixer(LinearMixer):
    check_config = classmethod(same_heads_only)

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
        self.conv1d = ShortConv(self.conv_dim, self.conv_dim, self.conv_size, groups=self.conv_dim,
                                 padding=self.conv_size - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(self.num_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GroupGatedRMSNorm(self.intermediate_size, self.intermediate_size // self.n_groups,
                                      eps=config.norm_eps)
        self.out_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self) -> None:
        """Mamba2's own init: A ~ U(1, 16), dt log-uniform in [1e-3, 0.1] (dt_bias = softplus⁻¹ dt), D = 1."""
        self.A_log.copy_(torch.empty(self.num_heads).uniform_(1, 16).log())
        self.dt_bias.copy_(mamba_dt(self.num_heads))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    @torch.no_grad()
    def init_from_attention(self, teacher: AttentionWeights) -> None:
        H, N, P, G = self.num_heads, self.ssm_state_size, self.head_dim, self.n_groups
        inner = self.intermediate_size
        w = self.in_proj.weight  # rows: z [inner] | x [inner] | B [G·N] | C [G·N] | dt [H]
        rows = teacher.rows(H, N, P) if G == H else None
        if rows is not None:
            q, k, v, o = rows
            w[2 * inner + G * N:2 * inner + 2 * G * N].copy_(q)
            w[2 * inner:2 * inner + G * N].copy_(k)
            if v is not None:
                w[inner:2 * inner].copy_(v)
                self.out_proj.weight.copy_(o)
        w[2 * inner + 2 * G * N:].zero_()
        self.A_log.zero_()
        self.dt_bias.copy_(inverse_softplus(decay_spread(H)))
        self.D.zero_()
        identity_conv_(self.conv1d)
        self.norm.weight.fill_(1.0)

    def guarded_backward(self, device) -> str | None:
        """The fla op of its recurrence whose backward fla's Hopper guard refuses, where this layer runs it on
        `device` (model.ops.common.check_guarded_backwards checks it before training)."""
        return "simple_gla" if fla_runs(device, self.backend, self.ssm_state_size) else None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: RecurrentStateCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, N, P = self.num_heads, self.ssm_state_size, self.head_dim
        x, seq_idx = prepare_inputs(x, attention_mask, cu_seqlens, cache)
        fused = use_fla(x, self.backend, self.ssm_state_size)
        z, xbc, dt = self.in_proj(x).split([self.intermediate_size, self.conv_dim, H], dim=-1)
        xbc, conv_state = self.conv1d(xbc.contiguous(), cache.conv.get("xBC") if cache is not None else None,
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
        state.conv = {"xBC": torch.zeros(batch_size, self.conv_dim, self.conv_size, device=device, dtype=dtype)}
        state.state = torch.zeros(batch_size, self.num_heads, self.ssm_state_size, self.head_dim, device=device,
                                  dtype=torch.float32)
