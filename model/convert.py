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

The ablation mixers (`linear_mixer`, model/linear_mixers.py) start from the teacher the same way, wherever
their shapes allow it (the default dims: heads = query heads, key dim = head_dim, value dim a multiple of it):

- GLA: q_proj, k_proj, v_proj, o_proj exactly as for GDN; convs the identity; the decay gate's up-projection
  gk_proj.1 ← 0 with its bias set so the per-head decay exp(logsigmoid(b)/16) spreads over [0.90, 0.999] as
  above (gk_proj.0 and g_proj keep the standard init, so the gate becomes input-dependent once trained).
- Mamba2 (C plays q, B plays k, x plays v): in_proj's C rows ← teacher q_proj, B rows ← teacher k_proj
  (expanded to one group per head as for GDN's keys), x rows ← teacher v_proj (repeated as for GDN's values),
  out_proj ← o_proj as for GDN; z rows keep the standard init; dt rows ← 0, A_log ← 0 and dt_bias spread so
  the decay exp(−dt) lies in [0.90, 0.999]; D ← 0 (the layer starts as "teacher values mixed by q·k", not
  as a skip of its own value); conv the identity with zero bias.
"""

from __future__ import annotations

import math

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from .config import InfiniteVLConfig
from .gdn import GatedDeltaNet
from .linear_mixers import GatedLinearAttention, Mamba2Mixer
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
                init_mixer_from_attention(student.model.language_model.layers[i].self_attn,
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


def init_mixer_from_attention(mixer, attn, text_config) -> None:
    """Starts a linear mixer (any `linear_mixer`) from the teacher attention of its layer (module docstring)."""
    if isinstance(mixer, GatedDeltaNet):
        init_gdn_from_attention(mixer, attn, text_config)
    elif isinstance(mixer, GatedLinearAttention):
        init_gla_from_attention(mixer, attn, text_config)
    elif isinstance(mixer, Mamba2Mixer):
        init_mamba2_from_attention(mixer, attn, text_config)
    else:
        raise TypeError(f"no teacher initialisation for {type(mixer).__name__}")


def _teacher_rows(attn, text_config, H: int, Dk: int, Dv: int):
    """The teacher's q rows [H·d], k rows expanded to one head per query head [H·d], v rows repeated to Dv per
    head [H·Dv] and o_proj columns laid out for H heads of Dv with zeros past d [hidden, H·Dv]; None for the
    parts whose shapes do not fit."""
    n_q, n_kv = text_config.num_attention_heads, text_config.num_key_value_heads
    d = text_config.hidden_size // n_q
    if H != n_q or Dk != d:
        return None
    kv_head = torch.arange(H) // (n_q // n_kv)
    q = attn.q_proj.weight
    k = attn.k_proj.weight.view(n_kv, d, -1)[kv_head].reshape(H * d, -1)
    if Dv % d:
        return q, k, None, None
    v = attn.v_proj.weight.view(n_kv, d, -1)[kv_head].repeat(1, Dv // d, 1).reshape(H * Dv, -1)
    o = attn.o_proj.weight.new_zeros(attn.o_proj.weight.shape[0], H, Dv)
    o[:, :, :d] = attn.o_proj.weight.view(-1, n_q, d)
    return q, k, v, o.view(-1, H * Dv)


def _decay_spread(H: int) -> torch.Tensor:
    """Per-head step sizes dt with exp(−dt) spread log-uniformly over [0.90, 0.999] (several time scales)."""
    lo, hi = -math.log(0.999), -math.log(0.90)
    return torch.exp(torch.linspace(math.log(lo), math.log(hi), H))


def _identity_conv_(conv) -> None:
    conv.weight.zero_()
    conv.weight[:, 0, -1] = 1.0
    if conv.bias is not None:
        conv.bias.zero_()


@torch.no_grad()
def init_gla_from_attention(gla, attn, text_config) -> None:
    rows = _teacher_rows(attn, text_config, gla.num_heads, gla.head_k_dim, gla.head_v_dim)
    if rows is not None:
        q, k, v, o = rows
        gla.q_proj.weight.copy_(q)
        gla.k_proj.weight.copy_(k)
        if v is not None:
            gla.v_proj.weight.copy_(v)
            gla.o_proj.weight.copy_(o)
    # exp(logsigmoid(b) / 16) = decay  ⇔  sigmoid(b) = decay^16
    decay = torch.exp(-_decay_spread(gla.num_heads))
    p = decay.double() ** gla.GATE_LOGIT_NORMALIZER
    bias = torch.log(p) - torch.log1p(-p)
    gla.gk_proj[1].weight.zero_()
    gla.gk_proj[1].bias.copy_(bias.float().repeat_interleave(gla.head_k_dim))
    for conv in (gla.q_conv1d, gla.k_conv1d, gla.v_conv1d):
        _identity_conv_(conv)
    gla.g_norm_swish_gate.weight.fill_(1.0)


@torch.no_grad()
def init_mamba2_from_attention(m, attn, text_config) -> None:
    H, N, P, G = m.num_heads, m.ssm_state_size, m.head_dim, m.n_groups
    inner = m.intermediate_size
    w = m.in_proj.weight  # rows: z [inner] | x [inner] | B [G·N] | C [G·N] | dt [H]
    rows = _teacher_rows(attn, text_config, H, N, P) if G == H else None
    if rows is not None:
        q, k, v, o = rows
        w[2 * inner + G * N:2 * inner + 2 * G * N].copy_(q)
        w[2 * inner:2 * inner + G * N].copy_(k)
        if v is not None:
            w[inner:2 * inner].copy_(v)
            m.out_proj.weight.copy_(o)
    w[2 * inner + 2 * G * N:].zero_()
    m.A_log.zero_()
    dt = _decay_spread(H)
    m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    m.D.zero_()
    _identity_conv_(m.conv1d)
    m.norm.weight.fill_(1.0)


@torch.no_grad()
def init_gdn_from_attention(gdn, attn, text_config) -> None:
    rows = _teacher_rows(attn, text_config, gdn.num_heads, gdn.head_k_dim, gdn.head_v_dim)
    if rows is not None:
        q, k, v, o = rows
        gdn.q_proj.weight.copy_(q)
        gdn.k_proj.weight.copy_(k)
        if v is not None:
            gdn.v_proj.weight.copy_(v)
            gdn.o_proj.weight.copy_(o)
    gdn.b_proj.weight.zero_()
    gdn.a_proj.weight.zero_()
    gdn.A_log.zero_()
    dt = _decay_spread(gdn.num_heads)  # decay exp(-softplus(dt_bias)) = exp(-dt)
    gdn.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
    for conv in (gdn.q_conv1d, gdn.k_conv1d, gdn.v_conv1d):
        _identity_conv_(conv)
    gdn.o_norm.weight.fill_(1.0)
