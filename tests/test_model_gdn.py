"""The Gated DeltaNet path against flash-linear-attention's naive recurrent reference."""

import pytest
import torch
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

from model.config import InfiniteVLTextConfig
from model.layers import GatedDeltaNet
from model.ops.common import l2norm
from model.ops.conv import short_conv
from model.ops.delta_rule import fla_check, torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule


def _inputs(B, T, H=2, K=8, V=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    xs = dict(q=l2norm(torch.randn(B, T, H, K, generator=g)), k=l2norm(torch.randn(B, T, H, K, generator=g)),
              v=torch.randn(B, T, H, V, generator=g),
              g=torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g) + 2),
              beta=torch.rand(B, T, H, generator=g))
    return {n: x.double().requires_grad_(requires_grad) for n, x in xs.items()}


def _naive(x, h0=None):
    return naive_recurrent_gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=h0,
                                            output_final_state=True)


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 130])
def test_chunked_forward_and_gradients_equal_naive_recurrent(T):
    x = _inputs(2, T, requires_grad=True)
    h0 = torch.randn(2, 2, 8, 16, dtype=torch.float64)
    o_ref, s_ref = _naive(x, h0)
    grads_ref = torch.autograd.grad((o_ref.sum() + s_ref.sum()), list(x.values()))
    o, s = torch_chunk_gated_delta_rule(**x, initial_state=h0, output_final_state=True)
    grads = torch.autograd.grad((o.sum() + s.sum()), list(x.values()))
    # both compute in fp32 internally; tolerance is fp32 round-off over T steps
    torch.testing.assert_close(o.double(), o_ref.double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref.double(), atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_packed_sequences_reset_state_at_every_boundary():
    lengths = [5, 64, 1, 70]
    x = _inputs(1, sum(lengths), requires_grad=True)
    cu = torch.tensor([0, 5, 69, 70, 140])
    o, s = torch_chunk_gated_delta_rule(**x, cu_seqlens=cu, output_final_state=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_ref, s_ref = _naive({n: t[:, a:b] for n, t in x.items()})
        torch.testing.assert_close(o[:, a:b].double(), o_ref.double(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s[i:i + 1].double(), s_ref.double(), atol=1e-5, rtol=1e-4)
    (o.sum()).backward()
    g_packed = x["k"].grad.clone()
    x2 = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    total = sum(_naive({n: t[:, a:b] for n, t in x2.items()})[0].sum()
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()))
    total.backward()
    torch.testing.assert_close(g_packed, x2["k"].grad, atol=1e-4, rtol=1e-4)


def test_grouped_value_heads_equal_transformers_qwen3_5_reference():
    """fla's grouped value heads (Qwen3.5: 2 value heads per query/key head) against transformers' own torch
    gated delta rule of Qwen3.5, forward and gradients; the step-by-step form agrees too."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule as qwen3_5_rule

    g = torch.Generator().manual_seed(3)
    B, T, H, HV, K, V = 2, 70, 2, 4, 8, 16
    x = dict(q=torch.randn(B, T, H, K, generator=g), k=torch.randn(B, T, H, K, generator=g),
             v=torch.randn(B, T, HV, V, generator=g),
             g=torch.nn.functional.logsigmoid(torch.randn(B, T, HV, generator=g) + 2),
             beta=torch.rand(B, T, HV, generator=g))
    x = {n: t.double().requires_grad_() for n, t in x.items()}
    h0 = torch.randn(B, HV, K, V, generator=g, dtype=torch.float64)
    o_ref, s_ref = qwen3_5_rule(x["q"], x["k"], x["v"], g=x["g"], beta=x["beta"], initial_state=h0,
                                output_final_state=True, use_qk_l2norm_in_kernel=True)
    grads_ref = torch.autograd.grad(o_ref.sum() + s_ref.sum(), list(x.values()))
    o, s = torch_chunk_gated_delta_rule(**x, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    grads = torch.autograd.grad(o.sum() + s.sum(), list(x.values()))
    torch.testing.assert_close(o.double(), o_ref.double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref.double(), atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        o2, _ = torch_recurrent_gated_delta_rule(**x, initial_state=h0, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(o2, o.detach(), atol=1e-10, rtol=1e-9)


def test_short_conv_restarts_at_document_boundaries():
    x = torch.randn(1, 12, 6)
    w = torch.randn(6, 1, 4)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    y, _ = short_conv(x, w, seq_idx)
    ref = torch.cat([torch.nn.functional.silu(torch.nn.functional.conv1d(
        torch.nn.functional.pad(x[:, a:b].transpose(1, 2), (3, 0)), w, groups=6)).transpose(1, 2)
        for a, b in ((0, 5), (5, 12))], 1)
    torch.testing.assert_close(y, ref)


def _mixer(seed=0):
    cfg = InfiniteVLTextConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=4,
                               intermediate_size=64, vocab_size=64)
    torch.manual_seed(seed)
    m = GatedDeltaNet(cfg, 1).double()
    for conv in (m.q_conv1d, m.k_conv1d, m.v_conv1d):
        torch.nn.init.normal_(conv.weight, std=0.5)
    return m


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone_forward_and_gradient(side):
    m = _mixer()
    lengths = [9, 70]
    T = max(lengths)
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, T - n:] = 1 if side == "left" else 0
        if side == "right":
            mask[i, :n] = 1
    y = m(x, attention_mask=mask)
    (y * mask[..., None]).sum().backward()
    for i, n in enumerate(lengths):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        xi = x[i:i + 1, sl].detach().clone().requires_grad_()
        yi = m(xi)
        torch.testing.assert_close(y[i:i + 1, sl], yi, atol=1e-10, rtol=1e-8)
        yi.sum().backward()
        torch.testing.assert_close(x.grad[i:i + 1, sl], xi.grad, atol=1e-10, rtol=1e-8)
        pad = torch.ones(T, dtype=torch.bool)
        pad[sl] = False
        assert x.grad[i, pad].abs().max() == 0 if pad.any() else True


def test_packed_mixer_equals_documents_alone():
    m = _mixer(1)
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    cu = torch.tensor([0, 3, 40])
    y = m(x, cu_seqlens=cu)
    for a, b in ((0, 3), (3, 40)):
        torch.testing.assert_close(y[:, a:b], m(x[:, a:b]), atol=1e-10, rtol=1e-8)


@pytest.mark.gpu
@pytest.mark.parametrize("K,packed", [(64, False), (128, False), (64, True)])
def test_fla_kernel_matches_torch_reference_on_gpu(K, packed):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from model.ops.common import ensure_fla_backward_ok

    ensure_fla_backward_ok(torch.device("cuda"), "gated_delta_rule")
    cu = torch.tensor([0, 100, 357, 600]) if packed else None
    errs = fla_check("cuda", K, chunk_gated_delta_rule, B=1 if packed else 2, T=600, H=4, cu_seqlens=cu)
    print(f"fla vs torch (bf16 vs fp32), K={K}, packed={packed}: {errs}")
    assert max(errs.values()) < 2e-2, errs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_mixer_on_gpu_matches_torch_path():
    """The whole mixer on CUDA (fla's conv, chunk/recurrent kernels and gated norm, bf16) against the same
    weights on the torch path in fp32: packed forward and gradients, then a prefill with a cache followed by
    decode steps (conv and recurrent states carried by fla's kernels)."""
    from model.cache import RecurrentStateCache

    cfg = InfiniteVLTextConfig(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
                               intermediate_size=64, vocab_size=64)  # head_dim 64: the fla path
    torch.manual_seed(0)
    ref = GatedDeltaNet(cfg, 1)
    for conv in (ref.q_conv1d, ref.k_conv1d, ref.v_conv1d):
        torch.nn.init.normal_(conv.weight, std=0.5)
    ref.o_norm.weight.data.normal_(1.0, 0.2)
    ref = ref.cuda()
    fused = GatedDeltaNet(cfg, 1).cuda().to(torch.bfloat16)
    fused.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    ref.backend = "torch"

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    x = torch.randn(1, 700, 512, device="cuda")
    cu = torch.tensor([0, 150, 151, 500, 700], device="cuda")
    xr, xf = x.clone().requires_grad_(), x.to(torch.bfloat16).requires_grad_()
    yr, yf = ref(xr, cu_seqlens=cu), fused(xf, cu_seqlens=cu)
    dy = torch.randn_like(yr)
    (yr * dy).sum().backward()
    (yf.float() * dy).sum().backward()
    errors = {"out": rel(yf, yr), "dx": rel(xf.grad, xr.grad),
              **{f"d{n}": rel(p.grad, dict(ref.named_parameters())[n].grad) for n, p in fused.named_parameters()}}
    print("fused vs torch (packed):", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 3e-2

    with torch.no_grad():
        cr, cf = RecurrentStateCache(), RecurrentStateCache()
        outs = []
        for a, b in ((0, 300), (300, 301), (301, 302), (302, 340)):  # prefill, two decode steps, a chunk
            outs.append((ref(x[:, a:b], cache=cr), fused(x[:, a:b].to(torch.bfloat16), cache=cf)))
        full = ref(x[:, :340])
    steps = {f"step{i}": rel(f, r) for i, (r, f) in enumerate(outs)}
    steps["torch chunks vs full"] = rel(torch.cat([r for r, _ in outs], 1), full)
    print("fused vs torch (cached):", {k: f"{v:.1e}" for k, v in steps.items()})
    assert steps["torch chunks vs full"] < 1e-5
    assert max(steps.values()) < 3e-2


def test_hopper_guard_check_inside_checkpointed_forward_leaves_recomputation_alone(monkeypatch):
    """The guard's gradient check runs on the first backward-enabled call, which under gradient checkpointing
    is inside a checkpointed forward; its own tensors must not join that forward's saved tensors (seen on the
    H200: recomputation failed with different metadata at 32K). A stand-in check with its own backward."""
    from torch.utils.checkpoint import checkpoint

    import model.ops.common as ops

    def stand_in_check(device, op, check, rtol=2e-2):
        a = torch.randn(2, 300, 4, requires_grad=True)
        (a.sin() * a).sum().backward()
        ops._guard_checked.add(op)

    monkeypatch.setattr(ops, "_guard_checked", set())
    monkeypatch.setattr(ops, "hopper_guard_active", lambda device=None: True)
    monkeypatch.setattr(ops, "lift_hopper_guard_checked", stand_in_check)
    monkeypatch.setenv(ops.LIFT_GUARD_ENV, "1")

    def block(x):
        ops.ensure_fla_backward_ok(x.device, "gated_delta_rule")
        return (x.exp() * x).sum(-1)

    x = torch.randn(3, 5, requires_grad=True)
    checkpoint(block, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(x.grad, (x.exp() * (1 + x)).detach())
    assert ops._guard_checked == {"gated_delta_rule"}


def test_failing_hopper_guard_check_raises_in_the_callers_thread(monkeypatch):
    import model.ops.common as ops

    def failing_check(device, op, check, rtol=2e-2):
        raise RuntimeError("fla gradient check failed at head_dim 64")

    monkeypatch.setattr(ops, "_guard_checked", set())
    monkeypatch.setattr(ops, "hopper_guard_active", lambda device=None: True)
    monkeypatch.setattr(ops, "lift_hopper_guard_checked", failing_check)
    monkeypatch.setenv(ops.LIFT_GUARD_ENV, "1")
    with pytest.raises(RuntimeError, match="gradient check failed"):
        ops.ensure_fla_backward_ok("cpu", "gated_delta_rule")
    assert not ops._guard_checked


def test_guarded_backwards_are_checked_before_training_for_the_mixers_the_model_has(monkeypatch):
    """A training process checks each guarded op its mixers run once, before its first step (the worker calls
    this after building the model), instead of inside the first forward after torch.compile has started."""
    from torch import nn

    import model.ops.common as ops
    from model.layers import MIXERS

    config = InfiniteVLTextConfig(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                                  intermediate_size=128, vocab_size=100, sliding_window=8,
                                  layer_types=["sliding_attention", "linear_attention", "linear_attention"])
    model = nn.ModuleList([MIXERS["gated_deltanet"](config, 1), MIXERS["gated_deltanet"](config, 2),
                           MIXERS["mamba2"](config, 2), MIXERS["gla"](config, 2)])
    model.append(MIXERS["gated_deltanet"](InfiniteVLTextConfig(**{**config.to_dict(), "linear_head_dim": 16}), 1))
    seen = []
    monkeypatch.setattr(ops, "fla_available", lambda: True)  # fla's CUDA path, on this CPU-only machine
    monkeypatch.setattr(ops, "_guard_checked", set())
    monkeypatch.setattr(ops, "hopper_guard_active", lambda device=None: True)
    monkeypatch.setattr(ops, "lift_hopper_guard_checked",
                        lambda device, op, check: seen.append((device.type, op, check)) or ops._guard_checked.add(op))
    monkeypatch.delenv(ops.LIFT_GUARD_ENV, raising=False)
    with pytest.raises(RuntimeError, match=ops.LIFT_GUARD_ENV):  # not asked for: refused before any step
        ops.check_guarded_backwards(model, "cuda")
    monkeypatch.setenv(ops.LIFT_GUARD_ENV, "1")
    assert ops.check_guarded_backwards(model, "cuda") == ["gated_delta_rule", "simple_gla"]
    assert seen == [("cuda", "gated_delta_rule", fla_check),
                    ("cuda", "simple_gla", ops.GUARDED_BACKWARDS["simple_gla"])]
    assert ops.check_guarded_backwards(model, "cpu") == [] and len(seen) == 2  # the CPU path has no guard
    ops.check_guarded_backwards(model, "cuda")
    assert len(seen) == 2  # once per process
    # a model whose mixers all take the torch path (head dims under 32: the tiny configs) checks nothing, and
    # needs no lifted guard
    monkeypatch.setattr(ops, "_guard_checked", set())
    monkeypatch.delenv(ops.LIFT_GUARD_ENV)
    assert ops.check_guarded_backwards(nn.ModuleList([model[-1]]), "cuda") == [] and len(seen) == 2
