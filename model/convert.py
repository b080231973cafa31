"""Qwen2.5-VL → InfiniteVL.

Everything but the token mixers is the teacher's own weights (vision tower, merger, embeddings, LM head,
norms, MLPs); sliding layers keep the teacher's q/k/v/o. Gated DeltaNet layers start from the teacher's
attention with `init="teacher"`:

- q_proj ← teacher q_proj (both have num_heads × head_dim rows when the GDN dims are the default ones).
- k_proj: GDN has one key head per query head; GQA key head j serves query heads j·G … (j+1)·G−1
  (G = num_heads / num_kv_heads), so GDN key head h ← teacher key head h // G.
- v_proj: GDN value head h has expand_v × head_dim rows; each block of head_dim rows ← teacher value head
  h // G (the copies differ once training starts because o_proj sees them differently, below).
- o_proj: GDN value head h's first head_dim columns ← the teacher's o_proj columns of query head h, the
  other (expand_v − 1) × head_dim columns ← 0, so the layer starts as "teacher values, mixed linearly".
- teacher q/k/v biases are dropped (GDN has none); g_proj keeps the standard init.
- gates: b_proj = 0 (β = ½: half update), a_proj = 0, A_log = 0 and dt_bias spread so that the per-head
  decay exp(g) lies in [0.90, 0.999] (keep memory, at several time scales); convs start as the identity
  (the current token passes through, earlier taps 0).
Where shapes do not allow a copy (GDN dims overridden), those projections keep the standard init.
`init="random"` keeps the standard init for every mixer parameter.
"""

from __future__ import annotations

import math

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from .config import InfiniteVLConfig
from .modeling import InfiniteVLForConditionalGeneration


def convert_from_qwen2_5_vl(teacher_or_path, layer_types=None, init: str = "teacher", **overrides):
    """Returns the InfiniteVL student of a Qwen2.5-VL teacher (a model or a local checkpoint path).

    `overrides` set InfiniteVLTextConfig fields (sliding_window, num_linear_heads, expand_v, ...)."""
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    teacher = teacher_or_path
    if isinstance(teacher_or_path, str):
        teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(teacher_or_path, use_safetensors=True)
    config = InfiniteVLConfig.from_teacher(teacher.config, layer_types=layer_types, **overrides)
    ref = next(teacher.parameters())
    student = InfiniteVLForConditionalGeneration(config).to(dtype=ref.dtype, device=ref.device)

    missing, unexpected = student.load_state_dict(_shared_weights(teacher, student), strict=False)
    gdn_prefixes = [f"model.language_model.layers.{i}.self_attn." for i, t in
                    enumerate(config.text_config.layer_types) if t == "linear_attention"]
    not_mixer = [k for k in missing if not any(k.startswith(p) for p in gdn_prefixes)]
    if not_mixer or unexpected:
        raise RuntimeError(f"teacher and student disagree outside the mixers: missing {not_mixer[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if init == "teacher":
        for i, t in enumerate(config.text_config.layer_types):
            if t == "linear_attention":
                init_gdn_from_attention(student.model.language_model.layers[i].self_attn,
                                        teacher.model.language_model.layers[i].self_attn, config.text_config)
    student.generation_config = teacher.generation_config
    return student.eval() if not teacher.training else student


def _shared_weights(teacher, student) -> dict:
    """The teacher's state dict minus the attention of layers that become Gated DeltaNet."""
    types = student.config.text_config.layer_types
    out = {}
    for k, v in teacher.state_dict().items():
        if ".self_attn." in k and "language_model.layers." in k:
            layer = int(k.split("language_model.layers.")[1].split(".")[0])
            if types[layer] != "sliding_attention":
                continue
        out[k] = v
    return out


@torch.no_grad()
def init_gdn_from_attention(gdn, attn, text_config) -> None:
    H, Dk, Dv = gdn.num_heads, gdn.head_k_dim, gdn.head_v_dim
    n_q, n_kv = text_config.num_attention_heads, text_config.num_key_value_heads
    d = text_config.hidden_size // n_q
    group = n_q // n_kv
    if H == n_q and Dk == d:
        gdn.q_proj.weight.copy_(attn.q_proj.weight)
        kv_head = torch.arange(H) // group
        k_t = attn.k_proj.weight.view(n_kv, d, -1)
        gdn.k_proj.weight.copy_(k_t[kv_head].reshape(H * d, -1))
        if Dv % d == 0:
            v_t = attn.v_proj.weight.view(n_kv, d, -1)[kv_head]  # [H, d, hidden]
            gdn.v_proj.weight.copy_(v_t.repeat(1, Dv // d, 1).reshape(H * Dv, -1))
            o = torch.zeros_like(gdn.o_proj.weight).view(-1, H, Dv)
            o[:, :, :d] = attn.o_proj.weight.view(-1, n_q, d)
            gdn.o_proj.weight.copy_(o.view_as(gdn.o_proj.weight))
    gdn.b_proj.weight.zero_()
    gdn.a_proj.weight.zero_()
    gdn.A_log.zero_()
    # decay exp(-softplus(dt_bias)) spread log-uniformly over the heads in [0.90, 0.999]
    lo, hi = -math.log(0.999), -math.log(0.90)
    dt = torch.exp(torch.linspace(math.log(lo), math.log(hi), H))
    gdn.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    for conv in (gdn.q_conv1d, gdn.k_conv1d, gdn.v_conv1d):
        conv.weight.zero_()
        conv.weight[:, 0, -1] = 1.0
    gdn.o_norm.weight.fill_(1.0)
