"""Gated DeltaNet (the paper's mixer). Parameter names and shapes follow flash-linear-attention's
`GatedDeltaNet` layer (and so the released InfiniteVL checkpoints): q_proj k_proj v_proj g_proj a_proj b_proj
A_log dt_bias q_conv1d k_conv1d v_conv1d o_norm o_proj; with num_linear_value_heads > num_linear_heads, fla's
grouped value heads (Qwen3.5's linear layers).

No positional encoding, no bias; a short causal depthwise conv + SiLU on q, k and v; q and k L2-normalised;
β = sigmoid(b_proj x); per-step log-decay g = −exp(A_log)·softplus(a_proj x + dt_bias); output through a
gated RMSNorm (RMSNorm(o)·w·SiLU(g_proj x)) and o_proj.

Padding (2-D mask): padded positions get x = 0 (so nothing enters the conv), β = 0 and g = 0, so the state
passes through them untouched: each row's real tokens see exactly what they would see alone.

Init from a teacher attention (`init="teacher"`): q/k/v/o from the teacher's (`AttentionWeights.rows`: GQA key
head h // G for query head h, values repeated to expand_v × head_dim with o_proj columns past head_dim zero);
gates b_proj = 0 (β = ½), a_proj = 0, A_log = 0 and dt_bias spread so the per-head decay exp(g) lies in
[0.90, 0.999]; convs the identity. g_proj keeps the standard init.
"""

from __future__ import annotations

import torch
from torch import nn

from ..cache import RecurrentStateCache
from ..ops.common import fla_runs, use_fla
from ..ops.delta_rule import gated_delta_rule, gdn_gates
from ..packed import project
from .base import AttentionWeights, GatedRMSNorm, ShortConvMixer, decay_spread, inverse_softplus, mamba_dt, \
    prepare_inputs


class GatedDeltaNet(ShortConvMixer):
    PACKABLE = ("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj")  # one input: see model/packed.py

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.a_proj = nn.Linear(self.hidden_size, self.num_v_heads, bias=False)
        self.b_proj = nn.Linear(self.hidden_size, self.num_v_heads, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.num_v_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.add_convs()
        self.g_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self) -> None:
        """Mamba-style gates: A ~ U(1, 16), per-head step dt log-uniform in [1e-3, 0.1]."""
        self.A_log.copy_(torch.empty(self.num_v_heads).uniform_(1, 16).log())
        self.dt_bias.copy_(mamba_dt(self.num_v_heads))
        self.o_norm.weight.fill_(1.0)

    @torch.no_grad()
    def init_from_attention(self, teacher: AttentionWeights) -> None:
        self.copy_attention_(teacher)
        self.b_proj.weight.zero_()
        self.a_proj.weight.zero_()
        self.A_log.zero_()
        self.dt_bias.copy_(inverse_softplus(decay_spread(self.num_v_heads)))  # decay exp(-softplus(dt_bias))
        self.identity_convs_()
        self.o_norm.weight.fill_(1.0)

    def guarded_backward(self, device) -> str | None:
        """The fla op of its recurrence whose backward fla's Hopper guard refuses, where this layer runs it on
        `device` (model.ops.common.check_guarded_backwards checks it before training)."""
        return "gated_delta_rule" if fla_runs(device, self.backend, self.head_k_dim) else None

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
            output_final_state=cache is not None, cu_seqlens=cu_seqlens, use_qk_l2norm_in_kernel=True,
            backend=self.backend, **gate_params)
        if cache is not None:
            cache.store(conv_states, state)
        gate = g_in.view(B, T, self.num_v_heads, self.head_v_dim)
        o = self.o_norm(o, gate, fused).reshape(B, T, self.value_dim)
        return self.o_proj(o)
