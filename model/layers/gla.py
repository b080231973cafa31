"""Gated Linear Attention, for the paper's linear-mixer ablation. Parameter names and shapes follow
flash-linear-attention's `layers/gla.py` `GatedLinearAttention(hidden_size, num_heads=H, expand_k=H·Dk/hidden,
expand_v=H·Dv/hidden, use_short_conv=True, conv_size, conv_bias=False, gate_low_rank_dim=16,
gate_logit_normalizer=16, fuse_norm=True, norm_eps)`: q_proj k_proj v_proj g_proj, q_conv1d k_conv1d v_conv1d,
gk_proj.0 (hidden → 16) gk_proj.1 (16 → H·Dk, with bias), g_norm_swish_gate, o_proj.

Sized like Gated DeltaNet: H = num_linear_heads, Dk = linear_head_dim, Dv = linear_head_dim·expand_v, so the
state is the same H×Dk×Dv (3B teacher: 16×128×256). The decay is per key channel: g = logsigmoid(gk_proj x)/16;
output RMSNorm(o)·w·SiLU(g_proj x) per head, then o_proj. (fla's default has no short conv; we keep it so the
ablation changes only the recurrence.)

Padding: x = 0 at padded positions, and there the written key and the gate's log-decay are 0, so the state
passes through untouched.

Init from a teacher attention: q/k/v/o as for Gated DeltaNet; convs the identity; the decay gate's
up-projection gk_proj.1 ← 0 with its bias set so the per-head decay exp(logsigmoid(b)/16) spreads over
[0.90, 0.999] (gk_proj.0 and g_proj keep the standard init, so the gate becomes input-dependent once trained).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import RecurrentStateCache
from ..ops.common import use_fla
from ..ops.gla import gla
from ..packed import project
from .base import AttentionWeights, GatedRMSNorm, ShortConvMixer, decay_spread, prepare_inputs, same_heads_only


class GatedLinearAttention(ShortConvMixer):
    GATE_LOW_RANK_DIM = 16
    GATE_LOGIT_NORMALIZER = 16
    PACKABLE = ("q_proj", "k_proj", "v_proj", "g_proj")  # one input: see model/packed.py
    check_config = classmethod(same_heads_only)

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.g_proj = nn.Linear(self.hidden_size, self.value_dim, bias=False)
        self.add_convs()
        self.gk_proj = nn.Sequential(nn.Linear(self.hidden_size, self.GATE_LOW_RANK_DIM, bias=False),
                                     nn.Linear(self.GATE_LOW_RANK_DIM, self.key_dim, bias=True))
        self.g_norm_swish_gate = GatedRMSNorm(self.head_v_dim, eps=config.norm_eps)
        self.o_proj = nn.Linear(self.value_dim, self.hidden_size, bias=False)
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self) -> None:
        self.g_norm_swish_gate.weight.fill_(1.0)

    @torch.no_grad()
    def init_from_attention(self, teacher: AttentionWeights) -> None:
        self.copy_attention_(teacher)
        # exp(logsigmoid(b) / 16) = decay  ⇔  sigmoid(b) = decay^16
        decay = torch.exp(-decay_spread(self.num_heads))
        p = decay.double() ** self.GATE_LOGIT_NORMALIZER
        bias = torch.log(p) - torch.log1p(-p)
        self.gk_proj[1].weight.zero_()
        self.gk_proj[1].bias.copy_(bias.float().repeat_interleave(self.head_k_dim))
        self.identity_convs_()
        self.g_norm_swish_gate.weight.fill_(1.0)

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
