"""Kimi Delta Attention (KDA; Kimi Linear, arXiv 2510.26692): the gated delta rule with a decay per key channel.
Parameter names and shapes follow flash-linear-attention 0.6's `KimiDeltaAttention(hidden_size, expand_v,
head_dim=Dk, num_heads=H, num_v_heads=HV, use_short_conv=True, conv_size, conv_bias=False, norm_eps)`:
q_proj k_proj v_proj, q_conv1d k_conv1d v_conv1d, f_proj.0 (hidden → Dv) f_proj.1 (Dv → HV·Dk), b_proj, A_log [HV],
dt_bias [HV·Dk], g_proj.0 (hidden → Dv) g_proj.1 (Dv → HV·Dv, with bias), o_norm, o_proj.

Sized like Gated DeltaNet: H = num_linear_heads, HV = num_linear_value_heads, Dk = linear_head_dim,
Dv = Dk·expand_v, so the state is the same HV×Dk×Dv. A short causal conv + SiLU on q, k and v; q and k
L2-normalised; β = sigmoid(b_proj x); per-step, per-channel log-decay g = −exp(A_log)·softplus(f_proj x + dt_bias);
output RMSNorm(o)·w·sigmoid(g_proj x) per head, then o_proj.

Padding: x = 0 at padded positions (nothing enters the convs), and there β = 0 and g = 0, so the state passes
through untouched.

Init from a teacher attention: q/k/v/o as for Gated DeltaNet (`AttentionWeights.rows`); convs the identity;
b_proj = 0 (β = ½); the decay starts input-independent: f_proj.1 ← 0, A_log ← 0 and dt_bias set so each head's
decay exp(−softplus(dt_bias)) spreads over [0.90, 0.999] (the same on all of its channels); f_proj.0 and g_proj
keep the standard init.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import RecurrentStateCache
from ..ops.common import use_fla
from ..ops.kda import kda, kda_gates
from ..packed import project
from .base import AttentionWeights, GatedRMSNorm, ShortConvMixer, decay_spread, inverse_softplus, mamba_dt, \
    prepare_inputs


class KimiDeltaAttention(ShortConvMixer):
    PACKABLE = ("q_proj", "k_proj", "v_proj", "b_proj")  # one input: see model/packed.py

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.add_convs()
        self.gate_dim = self.num_v_heads * self.head_k_dim
        self.f_proj = nn.Sequential(nn.Linear(self.hidden_size, self.head_v_dim, bias=False),
                                    nn.Linear(self.head_v_dim, self.gate_dim, bias=False))
        self.b_proj = nn.Linear(self.hidden_size, self.num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.gate_dim))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.g_proj = nn.Sequential(nn.Linear(self.hidden_size, self.head_v_dim, bias=False),
                                    nn.Linear(self.head_v_dim, self.value_dim, bias=True))
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps, activation="sigmoid")
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self) -> None:
        """fla's init: A ~ U(1, 16) per value head, per-channel step dt log-uniform in [1e-3, 0.1]."""
        self.A_log.copy_(torch.empty(self.num_v_heads).uniform_(1, 16).log())
        self.dt_bias.copy_(mamba_dt(self.gate_dim))
        self.o_norm.weight.fill_(1.0)

    @torch.no_grad()
    def init_from_attention(self, teacher: AttentionWeights) -> None:
        self.copy_attention_(teacher)
        self.b_proj.weight.zero_()
        self.f_proj[1].weight.zero_()
        self.A_log.zero_()
        self.dt_bias.copy_(inverse_softplus(decay_spread(self.num_v_heads)).repeat_interleave(self.head_k_dim))
        self.identity_convs_()
        self.o_norm.weight.fill_(1.0)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: RecurrentStateCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        x, seq_idx = prepare_inputs(x, attention_mask, cu_seqlens, cache)
        fused = use_fla(x, self.backend, self.head_k_dim)
        q, k, v, b = project(self, x, self.PACKABLE)
        q, k, v, conv_states = self.qkv((q, k, v), seq_idx, cu_seqlens, cache, fused)
        f = self.f_proj(x).view(B, T, self.num_v_heads, self.head_k_dim)
        if attention_mask is None:  # the kernel applies the gates itself
            g, beta, gate_params = f, b, dict(A_log=self.A_log, dt_bias=self.dt_bias)
        else:  # padded steps must not touch the state: β = 0 and g = 0 there
            g, beta = kda_gates(f, b, self.A_log, self.dt_bias)
            m = attention_mask.unsqueeze(-1)
            beta, g, gate_params = beta * m.to(beta.dtype), g * m.unsqueeze(-1).to(g.dtype), {}
        o, state = kda(q, k, v, g, beta, initial_state=cache.state if cache is not None else None,
                       output_final_state=cache is not None, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True,
                       backend=self.backend, **gate_params)
        if cache is not None:
            cache.store(conv_states, state)
        gate = self.g_proj(x).view(B, T, self.num_v_heads, self.head_v_dim)
        o = self.o_norm(o.to(x.dtype), gate, fused).reshape(B, T, self.value_dim)
        return self.o_proj(o)
