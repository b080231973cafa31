"""The sparse encoding and the fidelity measures, against direct computations on dense distributions."""

from __future__ import annotations

import math
import types

import pytest
import torch

from pipeline.teacher_logits.encoding import SparseEncoding
from pipeline.teacher_logits.fidelity import fidelity, reconstruct_log_probs
from pipeline.teacher_logits.run import BudgetExceeded, check_budget
from pipeline.teacher_logits.teacher import sparse_logits


def dense_to_sparse(log_probs: torch.Tensor, k: int):
    values, idx = log_probs.topk(k, dim=-1)
    rest = log_probs.scatter(1, idx, float("-inf"))
    return idx, values, torch.logsumexp(rest, dim=-1)


@pytest.mark.parametrize("vocab,k", [(151936, 64), (1000, 7), (512, 512), (3, 1), (2, 2)])
def test_indices_round_trip_exactly(vocab, k):
    enc = SparseEncoding(k, vocab, "fp32")
    g = torch.Generator().manual_seed(vocab + k)
    idx = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(33)])
    idx[0] = torch.arange(vocab - k, vocab)  # the largest ids use every bit
    lp = -torch.rand(33, k, generator=g) * 30
    tail = torch.randn(33, generator=g)
    data = enc.encode(idx, lp, tail)
    assert data.dtype == torch.uint8 and data.shape == (33, enc.bytes_per_position)
    i2, lp2, tail2 = enc.decode(data)
    assert torch.equal(i2, idx) and torch.equal(lp2, lp) and torch.equal(tail2, tail)


# vocabularies as tokenizers have them: a power of two, one past it (its one largest id needs the extra bit),
# Qwen2.5's 151,936 and Qwen3.5's 248,320; the id bits written out by hand
@pytest.mark.parametrize("vocab,bits", [(2 ** 17, 17), (2 ** 17 + 1, 18), (151_936, 18), (248_320, 18)])
def test_every_id_of_a_real_vocabulary_round_trips(vocab, bits):
    k = 64
    enc = SparseEncoding(k, vocab, "fp16")
    assert enc.index_bits == bits
    g = torch.Generator().manual_seed(vocab)
    # every id once, shuffled over the rows (the last row filled up with random ids)
    ids = torch.randperm(vocab, generator=g)
    ids = torch.cat([ids, torch.randint(0, vocab, (-vocab % k,), generator=g)]).view(-1, k)
    # and the largest id in every row, at a column that moves from row to row
    largest = torch.randint(0, vocab, (k + 3, k), generator=g)
    largest[torch.arange(k + 3), torch.arange(k + 3) % k] = vocab - 1
    for idx in (ids, largest):
        n = idx.shape[0]
        lp, tail = -torch.rand(n, k, generator=g) * 30, torch.randn(n, generator=g)
        i2, lp2, tail2 = enc.decode(enc.encode(idx, lp, tail))
        wrong = (i2 != idx).nonzero()
        assert not len(wrong), [(int(idx[r, c]), int(i2[r, c])) for r, c in wrong[:5]]
        assert torch.equal(lp2, lp.half().float()) and torch.equal(tail2, tail)


def test_no_positions_encode_to_no_bytes():
    enc = SparseEncoding(8, 512)
    data = enc.encode(torch.zeros(0, 8, dtype=torch.long), torch.zeros(0, 8), torch.zeros(0))
    assert data.shape == (0, enc.bytes_per_position)
    idx, lp, tail = enc.decode(data)
    assert idx.shape == lp.shape == (0, 8) and tail.shape == (0,)


def test_the_default_fits_the_budget_and_bigger_ones_are_refused():
    enc = SparseEncoding(64, 151936, "fp16")
    assert enc.index_bits == 18
    assert enc.bytes_per_position == 64 * 18 // 8 + 64 * 2 + 4 == 276
    check_budget(enc, 300)
    with pytest.raises(BudgetExceeded, match="548 bytes per position, over the budget of 300"):
        check_budget(SparseEncoding(128, 151936, "fp16"), 300)


def test_fp16_values_keep_log_probs_to_half_precision():
    enc = SparseEncoding(16, 5000, "fp16")
    lp = -torch.rand(50, 16) * 40
    _, lp2, _ = enc.decode(enc.encode(torch.zeros(50, 16, dtype=torch.long), lp, torch.zeros(50)))
    assert torch.allclose(lp2, lp, rtol=2 ** -11, atol=0)


def test_with_k_equal_to_vocab_the_reconstruction_is_exact():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(20, 300) * 3, dim=-1)
    enc = SparseEncoding(300, 300, "fp32")
    idx, lp, tail = enc.decode(enc.encode(*dense_to_sparse(logp, 300)))
    assert torch.isinf(tail).all() and (tail < 0).all()
    assert torch.allclose(reconstruct_log_probs(idx, lp, tail, 300), logp)
    report = fidelity(logp, idx, lp, tail)
    assert report["kl_max"] < 1e-12 and abs(report["topk_mass"] - 1) < 1e-6


def test_small_k_mass_and_kl_match_direct_computations():
    torch.manual_seed(1)
    logits = torch.randn(40, 500) * 2.5
    logp = torch.log_softmax(logits, dim=-1)
    k = 8
    enc = SparseEncoding(k, 500, "fp32")
    idx, lp, tail = enc.decode(enc.encode(*dense_to_sparse(logp, k)))
    report = fidelity(logp, idx, lp, tail)
    # direct: mass of the k most probable tokens, from softmax of the logits
    direct_mass = torch.softmax(logits.double(), -1).sort(-1, descending=True).values[:, :k].sum(-1)
    assert report["topk_mass"] == pytest.approx(float(direct_mass.mean()), abs=1e-6)
    assert report["topk_mass_min"] == pytest.approx(float(direct_mass.min()), abs=1e-6)
    # direct: KL to the distribution with the rest spread evenly, by torch's kl_div
    p = torch.softmax(logits.double(), -1)
    top = p.topk(k, -1)
    q = ((1 - top.values.sum(-1, keepdim=True)) / (500 - k)).expand(-1, 500).clone().scatter(1, top.indices, top.values)
    direct_kl = torch.nn.functional.kl_div(q.log(), p, reduction="none").sum(-1)
    assert report["kl_mean"] == pytest.approx(float(direct_kl.mean()), rel=1e-4)
    assert report["kl_mean"] > 0.01  # a flat-ish distribution loses real information at k = 8
    # the stored tail is the mass outside the top-k
    assert torch.allclose(tail.exp(), 1 - top.values.sum(-1).float(), atol=1e-6)


def test_sparse_logits_keeps_a_tail_below_fp32_epsilon_and_chunks_agree():
    """sparse_logits on a stand-in teacher whose LM head yields known logits."""
    logits = torch.zeros(5, 100)
    logits[:, :4] = 40.0  # the other 96 tokens hold 96 e^-40 / 4 ≈ 1e-16 of the mass
    logits[1:] = torch.randn(4, 100) * 3
    head = torch.nn.Linear(100, 100, bias=False)
    head.weight.data = torch.eye(100)
    model = types.SimpleNamespace(model=lambda **kw: types.SimpleNamespace(last_hidden_state=logits[None]),
                                  lm_head=head)
    positions = torch.tensor([0, 2, 4])
    idx, lp, tail = sparse_logits(model, {}, positions, k=4, chunk=2)
    direct = torch.log_softmax(logits[positions].double(), -1)
    assert torch.equal(idx, direct.topk(4).indices)
    assert torch.allclose(lp.double(), direct.topk(4).values, atol=1e-6)
    assert float(tail[0]) == pytest.approx(math.log(96 / 4) - 40, abs=1e-3)
    rest = direct.scatter(1, idx, float("-inf")).logsumexp(-1)
    assert torch.allclose(tail.double(), rest, atol=1e-5)
    none = sparse_logits(model, {}, torch.zeros(0, dtype=torch.long), k=4)
    assert [tuple(t.shape) for t in none] == [(0, 4), (0, 4), (0,)]
