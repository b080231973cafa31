"""Sliding-window attention: the teacher's GQA attention (same weights under the same names, M-RoPE), where a
query at token index i sees keys at indices j with 0 ≤ i − j < W (window counted in tokens, itself included),
never across documents of a packed batch and never padding.

What differs between teacher families is read off the config's `attention_spec()`: q/k/v (and o) biases
(Qwen2.5-VL), per-head RMSNorms on q and k before the rotation (Qwen3-VL, Qwen3.5: q_norm, k_norm), an explicit
head_dim, partial rotary (Qwen3.5 rotates the first quarter of each head), and an output gate (Qwen3.5: q_proj
also yields a per-channel gate, the output is o_proj(attention · sigmoid(gate))).

Backends: flash-attn varlen with a window when it is installed; torch flex_attention on CUDA; SDPA with an
explicit boolean mask otherwise (the CPU path, and cached decoding everywhere). Asked for its attention weights
(`output_attentions=True`), the layer computes softmax(q·kᵀ/√d) explicitly under the same mask and returns them
with its output.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from ..cache import SlidingWindowCache
from ..norm_mlp import RMSNorm
from ..packed import project


def flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k [B, heads, T, D] rotated by cos/sin [B, T, R] on their first R channels (R < D: partial rotary)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    R = cos.shape[-1]

    def rot(x):
        x_rot = x[..., :R] * cos + rotate_half(x[..., :R]) * sin
        return x_rot if R == x.shape[-1] else torch.cat([x_rot, x[..., R:]], dim=-1)

    return rot(q), rot(k)


class SlidingWindowAttention(nn.Module):
    PACKABLE = ("q_proj", "k_proj", "v_proj")  # one input: see model/packed.py

    def __init__(self, config, layer_idx: int):
        super().__init__()
        spec = config.attention_spec()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = spec.head_dim
        self.output_gate = spec.output_gate
        self.window = int(config.sliding_window)
        self.backend = config.attention_backend
        q_rows = self.num_heads * self.head_dim * (2 if self.output_gate else 1)
        self.q_proj = nn.Linear(config.hidden_size, q_rows, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, offset=config.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, offset=config.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, position_embeddings, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, cache: SlidingWindowCache | None = None,
                offset: int = 0, output_attentions: bool = False):
        """The attention output [B, T, hidden]; with `output_attentions`, (output, weights [B, heads, T, keys]),
        the keys in position order (the cached window, then the new tokens)."""
        B, T, _ = x.shape
        q, k, v, gate = self.project(x, position_embeddings)
        pos = torch.arange(T, device=x.device) + offset  # offset may be a device tensor (CUDA graphs)
        valid = attention_mask.bool() if attention_mask is not None else \
            torch.ones(B, T, dtype=torch.bool, device=x.device)
        backend = "sdpa" if output_attentions else self._pick_backend(x, cache)
        if backend in ("flash", "flex"):  # a fresh window over the new tokens alone
            o = (_flash if backend == "flash" else _flex)(q, k, v, self.window, attention_mask, cu_seqlens)
            if cache is not None:
                cache.extend(k, v, pos, valid)
            return self.output(o, gate)
        k_ctx, v_ctx, kpos, kvalid = (k, v, pos, valid) if cache is None else cache.extend(k, v, pos, valid)
        mask = window_mask(pos, kpos, self.window, kvalid, _doc_ids(cu_seqlens, T, x.device))
        if output_attentions:  # keys by position, never-written ring slots left out
            order = (kpos >= 0).nonzero().squeeze(-1)
            order = order[kpos[order].argsort()]
            o, weights = attention_with_weights(q, k_ctx[:, :, order].to(q.dtype), v_ctx[:, :, order].to(q.dtype),
                                                mask[..., order])
            return self.output(o, gate), weights
        o = F.scaled_dot_product_attention(q, k_ctx.to(q.dtype), v_ctx.to(q.dtype), attn_mask=mask,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.output(o, gate)

    def project(self, x: torch.Tensor, position_embeddings):
        """Queries, keys (both normed where the family norms them, then rotated) and values, [B, heads, T,
        head_dim], and the output gate [B, T, heads·head_dim] (None without one)."""
        B, T, _ = x.shape
        q, k, v = project(self, x, self.PACKABLE)
        if T > 1:  # a packed v is strided: the compiled flex kernel read it 40% slower (128K prefill, H200)
            v = v.contiguous()
        gate = None
        if self.output_gate:  # per head: [query | gate], as the teacher lays them out
            q, gate = q.view(B, T, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
            gate = gate.reshape(B, T, -1)
        q = q.reshape(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, k, cos, sin)
        return q, k, v, gate

    def output(self, o: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """o [B, heads, T, head_dim] → o_proj(o), gated where the family gates it."""
        B, _, T, _ = o.shape
        o = o.transpose(1, 2).reshape(B, T, -1)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o)

    def _pick_backend(self, x, cache) -> str:
        """Cached steps attend over the ring buffer with SDPA (a short, explicit mask); a fresh prefill or a
        training step uses the fastest kernel for a window over the new tokens alone."""
        if cache is not None and cache.seen_any:
            return "sdpa"
        if self.backend != "auto":
            return self.backend
        if not x.is_cuda or x.shape[1] == 1 or self.head_dim < 32:  # tiny heads: flex needs ≥ 16, 16 crashed
            return "sdpa"
        return "flash" if flash_attn_available() else "flex"


def attention_with_weights(q, k, v, mask):
    """Attention with its weights, as SDPA computes it under a boolean mask: q [B, H, T, D], k and v [B, Hkv, K, D]
    (grouped heads shared), mask [B, 1, T, K]. Returns (output [B, H, T, D], weights [B, H, T, K])."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).to(q.dtype)
    return weights @ v, weights


def window_mask(qpos, kpos, window: int, kvalid, doc_ids=None) -> torch.Tensor:
    """[B, 1, Tq, Tk] boolean: causal, inside the window, same document, key not padding. Every query also
    sees itself so that rows of pure padding stay finite."""
    d = qpos[:, None] - kpos[None, :]
    allowed = (d >= 0) & (d < window) & (kpos[None, :] >= 0)
    mask = allowed[None] & kvalid[:, None, :]
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])
    mask = mask | (d == 0)[None]
    return mask[:, None]


def _doc_ids(cu_seqlens, T, device):
    if cu_seqlens is None:
        return None
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths).unsqueeze(0)


# -- CUDA backends ---------------------------------------------------------------------------------------------

def _flash(q, k, v, window, attention_mask, cu_seqlens):
    from flash_attn import flash_attn_varlen_func

    B, H, T, D = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, T, H, D]
    if cu_seqlens is None and attention_mask is None:
        cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
        idx = None
    elif cu_seqlens is not None:
        cu, idx = cu_seqlens.to(q.device, torch.int32), None
    else:
        idx = attention_mask.flatten().nonzero().squeeze(-1)
        cu = F.pad(attention_mask.sum(-1).cumsum(0), (1, 0)).to(torch.int32)
    flat = lambda t: t.reshape(B * T, *t.shape[2:]) if idx is None else t.reshape(B * T, *t.shape[2:])[idx]  # noqa
    maxlen = int((cu[1:] - cu[:-1]).max())
    o = flash_attn_varlen_func(flat(q), flat(k), flat(v), cu, cu, maxlen, maxlen, causal=True,
                               window_size=(window - 1, 0))
    if idx is not None:
        full = o.new_zeros(B * T, H, D)
        full[idx] = o
        o = full
    return o.view(B, T, H, D).transpose(1, 2)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic shapes after the first length: packed training rows and prefills vary in length every call, and
    # a static compile per length hits dynamo's recompile limit after 8, then falls back to the unfused flex that
    # materialises the T×T scores (seen on the H200: Stage I-b steps of 0.5-1 s instead of ~0.4 s)
    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=1)
def _import_before_compiling() -> None:
    """fla's package registers its model-output classes as pytree nodes when first imported, and dynamo guards
    every compiled graph on the number of registered nodes: imported after the first compile (by the first
    Gated DeltaNet layer after a sliding one), it made every stage and eval process on the H200 compile
    flex_attention and create_block_mask a second time."""
    from ..ops.common import fla_available

    fla_available()


def _flex(q, k, v, window, attention_mask, cu_seqlens):
    from torch.nn.attention.flex_attention import create_block_mask

    _import_before_compiling()
    B, H, T, D = q.shape
    doc = _doc_ids(cu_seqlens, T, q.device)
    valid = attention_mask.bool() if attention_mask is not None else None

    def mask_mod(b, h, qi, ki):
        ok = (qi >= ki) & (qi - ki < window)
        if doc is not None:
            ok = ok & (doc[0, qi] == doc[0, ki])
        if valid is not None:
            ok = ok & (valid[b, ki] | (qi == ki))
        return ok

    if valid is None:
        block = sliding_block_mask(T, window, doc, mask_mod, q.device)
        if doc is not None:
            _vary_lengths(q, k, v, block)
    else:  # padding is per row: let torch classify the blocks (compiled: no dense T×T mask, 137 GB at 128K)
        block = create_block_mask(mask_mod, B, None, T, T, device=q.device, _compile=True)
    # the main Triton kernel always: for a row under 128 tokens AUTO picks flex's decoding kernel, which has no
    # configuration for a dynamic-length, head-strided key (a 93-token packed Qwen3.5 row on the H100 failed to
    # compile with NoValidChoicesError); decode steps never come here (they attend over the ring with SDPA)
    options = {"BACKEND": "TRITON"} if q.is_cuda else None
    return _compiled_flex()(q, k, v, block_mask=block, enable_gqa=k.shape[1] != H, kernel_options=options)


def _vary_lengths(q, k, v, block) -> None:
    """Packed rows change length every step: the sequence and block-count dims are marked dynamic up front.
    Left to dynamo's automatic dynamic shapes, the second length recompiled with T dynamic and the first
    change of block count recompiled once more (three compiles per process in the H200 stage logs; two now)."""
    for t in (q, k, v):
        torch._dynamo.maybe_mark_dynamic(t, 2)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                 "full_q_num_blocks", "full_q_indices"):
        t = getattr(block, name, None)
        if t is not None:
            for dim in range(2, t.dim()):
                torch._dynamo.maybe_mark_dynamic(t, dim)


def sliding_block_mask(T: int, window: int, doc: torch.Tensor | None, mask_mod, device, block: int = 128):
    """flex_attention's BlockMask for a causal sliding window over packed documents, classified on the block
    grid from each block's first and last token (positions and document ids only grow along the sequence):
    (T/128)² block pairs instead of the T² token pairs torch's create_block_mask evaluates, which cost more
    than the attention itself at 128K. A block pair is skipped when no query can see any key in it, full when
    every query sees every key, partial (mask_mod decides per token) otherwise."""
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-T // block)
    first = torch.arange(n, device=device) * block
    last = (first + block).clamp(max=T) - 1
    qf, ql, kf, kl = first[:, None], last[:, None], first[None, :], last[None, :]
    # query minus key distance over a block pair spans [qf - kl, ql - kf]; allowed distances are [0, W-1]
    some = (ql - kf >= 0) & (qf - kl <= window - 1)
    full = (qf - kl >= 0) & (ql - kf <= window - 1)
    if doc is not None:
        d0, d1 = doc[0, first], doc[0, last]
        some &= (d0[:, None] <= d1[None, :]) & (d0[None, :] <= d1[:, None])
        full &= (d0 == d1)[:, None] & (d0 == d1)[None, :] & (d0[:, None] == d0[None, :])
    if T % block:  # a block cut short by the end of the sequence is never called full
        full[-1, :] = False
        full[:, -1] = False
    partial = some & ~full

    def lists(m):  # per query block: how many key blocks, and their indices first
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    kv_num, kv_idx = lists(partial)
    full_num, full_idx = lists(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(T, T))
