"""Sliding-window attention: the window in tokens, documents of a packed batch, padding."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from model.config import InfiniteVLTextConfig
from model.layers.attention import SlidingWindowAttention
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

W = 6


def _layer(window=W, hidden=32):
    sections = [hidden // 16, hidden // 32, hidden // 32]  # head_dim/2 frequencies split t/h/w
    cfg = InfiniteVLTextConfig(hidden_size=hidden, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                               intermediate_size=64, vocab_size=64, sliding_window=window,
                               rope_scaling={"type": "mrope", "mrope_section": sections})
    torch.manual_seed(0)
    return SlidingWindowAttention(cfg, 0).double(), Qwen2_5_VLRotaryEmbedding(cfg)


def _rope(rot, x, start=0, B=1):
    T = x.shape[1]
    pos = torch.arange(start, start + T).view(1, 1, T).expand(3, B, T)
    return rot(x, pos)


def test_key_W_or_more_back_has_zero_influence_and_inside_has_some():
    attn, rot = _layer()
    T = 20
    x = torch.randn(1, T, 32, dtype=torch.float64, requires_grad=True)
    y = attn(x, _rope(rot, x))
    q = 15
    (grad,) = torch.autograd.grad(y[0, q].sum(), x)
    influence = grad[0].abs().sum(-1)
    assert influence[q - W] == 0 and influence[: q - W + 1].sum() == 0
    assert (influence[q - W + 1: q + 1] > 0).all()
    assert influence[q + 1:].sum() == 0  # causal


def test_packed_batch_equals_each_document_alone():
    attn, rot = _layer()
    lengths = [4, 9, 1, 7]
    x = torch.randn(1, sum(lengths), 32, dtype=torch.float64)
    cu = torch.tensor([0, 4, 13, 14, 21])
    # M-RoPE positions restart in each document
    pos = torch.cat([torch.arange(n) for n in lengths]).view(1, 1, -1).expand(3, 1, -1)
    y = attn(x, rot(x, pos), cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        xd = x[:, a:b]
        torch.testing.assert_close(y[:, a:b], attn(xd, _rope(rot, xd)), atol=1e-12, rtol=1e-10)


def test_left_padded_batch_equals_rows_alone():
    attn, rot = _layer()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)[None].expand(3, -1, -1)
    y = attn(x, rot(x, pos), attention_mask=mask)
    torch.testing.assert_close(y[0:1, 3:], attn(x[0:1, 3:], _rope(rot, x[0:1, 3:])), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(y[1:2], attn(x[1:2], _rope(rot, x[1:2])), atol=1e-12, rtol=1e-10)
    assert torch.isfinite(y).all()


@pytest.mark.gpu
def test_flex_backend_matches_sdpa_on_gpu():
    attn, rot = _layer(window=64, hidden=256)  # head_dim 64: flex needs at least 16
    attn = attn.cuda().to(torch.bfloat16)
    x = torch.randn(1, 512, 256, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, 100, 300, 512], device="cuda")
    pos = torch.cat([torch.arange(n) for n in (100, 200, 212)]).view(1, 1, -1).expand(3, 1, -1).cuda()
    pe = rot.cuda()(x, pos)
    attn.backend = "flex"
    a = attn(x, pe, cu_seqlens=cu)
    attn.backend = "sdpa"
    b = attn(x, pe, cu_seqlens=cu)
    err = (a.float() - b.float()).abs().max().item()
    print(f"flex vs sdpa max abs err {err}")
    assert err < 2e-2


@pytest.mark.parametrize("T,window,bounds", [
    (1024, 600, None),            # whole blocks, window not a block multiple
    (1000, 500, None),            # last block cut short
    (777, 300, [0, 130, 131, 500, 777]),  # documents of every size, one a single token
])
def test_sliding_block_mask_classifies_blocks_like_torch(T, window, bounds):
    """Our block-grid classification against torch's create_block_mask evaluated on every token pair: the
    same blocks are visited, and whatever we call full torch calls full too."""
    from torch.nn.attention.flex_attention import create_block_mask

    from model.layers.attention import _doc_ids, sliding_block_mask

    doc = _doc_ids(torch.tensor(bounds), T, "cpu") if bounds else None

    def mask_mod(b, h, qi, ki):
        ok = (qi >= ki) & (qi - ki < window)
        return ok & (doc[0, qi] == doc[0, ki]) if doc is not None else ok

    ours = sliding_block_mask(T, window, doc, mask_mod, "cpu", block=128)
    ref = create_block_mask(mask_mod, None, None, T, T, device="cpu")

    def blocks(num, idx):
        return [set(idx[0, 0, i, :num[0, 0, i]].tolist()) for i in range(num.shape[-1])]

    our_full, ref_full = blocks(ours.full_kv_num_blocks, ours.full_kv_indices), \
        blocks(ref.full_kv_num_blocks, ref.full_kv_indices)
    our_any = [p | f for p, f in zip(blocks(ours.kv_num_blocks, ours.kv_indices), our_full)]
    ref_any = [p | f for p, f in zip(blocks(ref.kv_num_blocks, ref.kv_indices), ref_full)]
    assert our_any == ref_any
    assert all(o <= r for o, r in zip(our_full, ref_full))
    if T % 128 == 0:
        assert our_full == ref_full
    assert sum(map(len, our_full)) > 0  # the cases are chosen so that some blocks are full


def test_flex_with_our_block_mask_equals_sdpa_window():
    """flex_attention (unfused, CPU) over the block mask = SDPA with the explicit token mask, packed."""
    from torch.nn.attention.flex_attention import flex_attention

    from model.layers.attention import _doc_ids, sliding_block_mask, window_mask

    T, window, H, D = 400, 150, 2, 16
    cu = torch.tensor([0, 90, 330, 400])
    doc = _doc_ids(cu, T, "cpu")
    q, k, v = (torch.randn(1, H, T, D, dtype=torch.float64) for _ in range(3))

    def mask_mod(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < window) & (doc[0, qi] == doc[0, ki])

    block = sliding_block_mask(T, window, doc, mask_mod, "cpu", block=128)
    got = flex_attention(q, k, v, block_mask=block)
    pos = torch.arange(T)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=window_mask(pos, pos, window, torch.ones(1, T, dtype=torch.bool), doc))
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-8)


def test_compiled_flex_compiles_once_more_for_new_lengths_and_matches_sdpa():
    """Packed rows differ in length (and block count) every step: the compiled flex must not recompile per
    length (dynamo stops after 8 and falls back to the unfused kernel that materialises T×T scores), nor once
    more when the block count first changes. CPU compile of flex (forward:
    torch has no CPU flex backward)."""
    from torch._dynamo.utils import counters

    from model.layers.attention import _doc_ids, _flex, window_mask

    torch._dynamo.reset()
    counters.clear()
    window, Hq, Hkv, D = 64, 4, 2, 32
    for T in (300, 317, 420, 450, 600):  # 3, 3, 4, 4 and 5 blocks of 128
        q = torch.randn(1, Hq, T, D)
        k, v = (torch.randn(1, Hkv, T, D) for _ in range(2))
        cu = torch.tensor([0, T // 3, T])
        got = _flex(q, k, v, window, None, cu)
        pos = torch.arange(T)
        mask = window_mask(pos, pos, window, torch.ones(1, T, dtype=torch.bool), _doc_ids(cu, T, "cpu"))
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_importing_fla_after_the_first_compile_costs_no_recompile():
    """In a fresh interpreter, as in a stage process: the compiled flex runs, then fla gets imported (the first
    Gated DeltaNet layer does that), then the flex runs again at the same shapes; one graph in all. (Importing
    `model` now imports fla itself, through transformers' Qwen3.5 modeling, so fla's pytree nodes are registered
    before any compile; `_flex` still imports it first for the interpreters where that is not so.)"""
    pytest.importorskip("fla")
    code = textwrap.dedent("""
        import sys, torch
        from torch._dynamo.utils import counters
        from model.layers.attention import _flex
        q, k, v = (torch.randn(1, 2, 300, 32) for _ in range(3))
        cu = torch.tensor([0, 100, 300])
        _flex(q, k, v, 64, None, cu)
        import fla  # noqa: F401
        _flex(q, k, v, 64, None, cu)
        print("graphs", counters["stats"]["unique_graphs"])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == "1", done.stdout
