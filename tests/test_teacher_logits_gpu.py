"""The packed teacher forward on a GPU in bf16 (SDPA with the block-diagonal mask transformers builds from
[4, 1, T] position ids): each document as if alone, and the top-k path reading the same distribution.

    pytest -m gpu tests/test_teacher_logits_gpu.py
"""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.teacher_logits.teacher import full_log_probs, sparse_logits


@pytest.mark.gpu
def test_packed_rows_equal_each_document_alone_on_gpu_in_bf16(tiny_teacher):
    model = copy.deepcopy(tiny_teacher[0]).to("cuda", torch.bfloat16)
    model.set_attn_implementation("sdpa")
    torch.manual_seed(0)
    lens = [300, 57, 1000, 2]
    docs = [torch.randint(0, 500, (1, n), device="cuda") for n in lens]
    text = torch.cat([torch.arange(n) for n in lens]).view(1, 1, -1).cuda()
    inputs = {"input_ids": torch.cat(docs, 1), "position_ids": text.expand(4, 1, -1)}
    everywhere = torch.arange(sum(lens), device="cuda")
    packed = full_log_probs(model, inputs, everywhere)
    with torch.no_grad():
        alone = torch.cat([torch.log_softmax(model(input_ids=d, use_cache=False).logits[0].float(), -1)
                           for d in docs])
    err = (packed - alone).abs().max().item()
    print(f"packed vs alone, bf16 sdpa: max abs log-prob err {err:.3g}")
    assert err < 5e-2
    # without the text-position row documents attend across: the check above can fail
    with torch.no_grad():
        leaked = torch.log_softmax(model(input_ids=inputs["input_ids"], position_ids=text.expand(3, 1, -1),
                                         use_cache=False).logits[0].float(), -1)
    assert (leaked[lens[0]:] - alone[lens[0]:]).abs().max().item() > 10 * err
    idx, lp, tail = sparse_logits(model, inputs, everywhere, k=16, chunk=512)
    assert torch.allclose(lp, packed.gather(1, idx), atol=2e-2)
    assert torch.allclose(lp[:, 0], packed.max(-1).values, atol=2e-2)
    assert torch.isfinite(tail).all()
