"""Kimi Delta Attention: our torch recurrences against flash-linear-attention's naive reference (forward and
gradients, grouped value heads, the in-kernel gate form, packed), the mixer against fla's naive ops assembled as
fla's `KimiDeltaAttention` layer runs them, fla's layer for parameter names; padding, packing and cached decoding
exact; the student with linear_mixer="kda". On the GPU: fla's kernels (bf16) against the torch path (fp32)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from fla.ops.kda.gate import naive_kda_gate
from fla.ops.kda.naive import naive_recurrent_kda

from model.cache import RecurrentStateCache
from model.config import InfiniteVLTextConfig
from model.layers import KimiDeltaAttention
from model.ops.common import l2norm
from model.ops.kda import fla_check, torch_chunk_kda, torch_recurrent_kda


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def _inputs(B, T, H=2, HV=None, K=8, V=16, seed=0):
    """l2-normalised q, k (what the mixer feeds the recurrence), per-channel decays, β in (0, 1), fp64 leaves."""
    g = torch.Generator().manual_seed(seed)
    HV = HV or H
    xs = dict(q=l2norm(torch.randn(B, T, H, K, generator=g)), k=l2norm(torch.randn(B, T, H, K, generator=g)),
              v=torch.randn(B, T, HV, V, generator=g),
              g=F.logsigmoid(torch.randn(B, T, HV, K, generator=g) + 2), beta=torch.rand(B, T, HV, generator=g))
    return {n: x.double().requires_grad_() for n, x in xs.items()}


def _naive(x, h0=None):
    return naive_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=h0, output_final_state=True)


@pytest.mark.parametrize("HV", [2, 4], ids=["heads", "grouped_values"])
@pytest.mark.parametrize("T", [1, 7, 16, 17, 70])
def test_chunked_forward_and_gradients_equal_fla_naive(T, HV):
    x = _inputs(2, T, HV=HV)
    h0 = torch.randn(2, HV, 8, 16, dtype=torch.float64)
    o_ref, s_ref = _naive(x, h0)
    grads_ref = torch.autograd.grad(o_ref.sum() + s_ref.sum(), list(x.values()))
    o, s = torch_chunk_kda(**x, initial_state=h0, output_final_state=True)
    grads = torch.autograd.grad(o.sum() + s.sum(), list(x.values()))
    # fla's naive loop runs in fp32: the tolerance is fp32 round-off over T steps
    torch.testing.assert_close(o.double(), o_ref.double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref.double(), atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)
    o2, s2 = torch_recurrent_kda(**{n: t.detach() for n, t in x.items()}, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o2, o.detach(), atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(s2, s.detach(), atol=1e-10, rtol=1e-9)


def test_in_kernel_gates_equal_fla_naive_gate():
    """use_gate_in_kernel / use_beta_sigmoid_in_kernel: the raw projections through fla's reference gate."""
    g = torch.Generator().manual_seed(1)
    x = _inputs(1, 40, HV=4)
    raw, b = torch.randn(1, 40, 4, 8, generator=g).double(), torch.randn(1, 40, 4, generator=g).double()
    A_log, dt_bias = torch.rand(4, generator=g).double(), torch.randn(32, generator=g).double()
    gates = {**x, "g": naive_kda_gate(raw, A_log, dt_bias, output_dtype=torch.float64), "beta": b.sigmoid()}
    o_ref, s_ref = _naive(gates)
    o, s = torch_chunk_kda(x["q"], x["k"], x["v"], raw, b, A_log=A_log, dt_bias=dt_bias, use_gate_in_kernel=True,
                           use_beta_sigmoid_in_kernel=True, output_final_state=True)
    torch.testing.assert_close(o.double(), o_ref.double(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(s.double(), s_ref.double(), atol=1e-5, rtol=1e-4)


def test_strong_decays_do_not_overflow():
    x = {n: t.detach() for n, t in _inputs(1, 40).items()}
    x["g"] = x["g"] * 500  # per-channel decays of e^-500: the chunked form only exponentiates exponents ≤ 0
    o, s = torch_chunk_kda(**x, output_final_state=True)
    o_ref, s_ref = torch_recurrent_kda(**x, output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-9)


def test_packed_sequences_restart_the_state_forward_and_gradients():
    cu = torch.tensor([0, 5, 37, 38, 90])
    x = _inputs(1, 90, HV=4)
    o, s = torch_chunk_kda(**x, cu_seqlens=cu, output_final_state=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_ref, s_ref = _naive({n: t[:, a:b] for n, t in x.items()})
        torch.testing.assert_close(o[:, a:b].double(), o_ref.double(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(s[i:i + 1].double(), s_ref.double(), atol=1e-5, rtol=1e-4)
    o.sum().backward()
    x2 = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    sum(_naive({n: t[:, a:b] for n, t in x2.items()})[0].sum()
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())).backward()
    for n in x:
        torch.testing.assert_close(x[n].grad, x2[n].grad, atol=1e-4, rtol=1e-4)


# -- the mixer ----------------------------------------------------------------------------------------------------

def _config(**kw):
    return InfiniteVLTextConfig(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=4,
                                intermediate_size=64, vocab_size=64, linear_mixer="kda", **kw)


def _mixer(seed=0, **kw):
    torch.manual_seed(seed)
    m = KimiDeltaAttention(_config(**kw), 1).double()
    for p in m.parameters():  # lively weights: every path carries signal
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=0.3)
    torch.nn.init.normal_(m.g_proj[1].bias, std=1.0)
    m.o_norm.weight.data.normal_(1.0, 0.2)
    return m


def _layer_by_fla_naive(m: KimiDeltaAttention, x: torch.Tensor) -> torch.Tensor:
    """fla's KimiDeltaAttention forward written out with fla's naive gate and recurrence and plain torch for the
    rest: nothing shared with our implementation."""
    B, T, _ = x.shape

    def conv(w, h):
        return F.silu(F.conv1d(F.pad(h.transpose(1, 2), (w.shape[-1] - 1, 0)), w, groups=w.shape[0]).transpose(1, 2))

    q = conv(m.q_conv1d.weight, x @ m.q_proj.weight.T).view(B, T, m.num_heads, -1)
    k = conv(m.k_conv1d.weight, x @ m.k_proj.weight.T).view(B, T, m.num_heads, -1)
    v = conv(m.v_conv1d.weight, x @ m.v_proj.weight.T).view(B, T, m.num_v_heads, -1)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    g = naive_kda_gate((x @ m.f_proj[0].weight.T @ m.f_proj[1].weight.T).view(B, T, m.num_v_heads, -1), m.A_log,
                       m.dt_bias, output_dtype=torch.float64)
    beta = torch.sigmoid(x @ m.b_proj.weight.T)
    o, _ = naive_recurrent_kda(q, k, v, g, beta)
    gate = (x @ m.g_proj[0].weight.T @ m.g_proj[1].weight.T + m.g_proj[1].bias).view(B, T, m.num_v_heads, -1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + m.o_norm.eps) * m.o_norm.weight * torch.sigmoid(gate)
    return o.reshape(B, T, -1) @ m.o_proj.weight.T


@pytest.mark.parametrize("value_heads", [2, 4])
def test_mixer_equals_flas_layer_written_with_its_naive_ops(value_heads):
    m = _mixer(num_linear_value_heads=value_heads)
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    # fla's naive recurrence runs in fp32; F.normalize (x / max(|x|, eps)) vs x·rsqrt(|x|² + 1e-6): ~1e-6 apart
    torch.testing.assert_close(m(x), _layer_by_fla_naive(m, x), atol=2e-5, rtol=1e-4)


def test_parameter_names_and_shapes_equal_flas_layer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fla.layers.kda import KimiDeltaAttention as FlaKDA

    c = _config(num_linear_value_heads=4)
    theirs = FlaKDA(hidden_size=32, expand_v=c.expand_v, head_dim=c.linear_head_dim, num_heads=c.num_linear_heads,
                    num_v_heads=c.num_linear_value_heads, conv_size=c.conv_size, norm_eps=c.norm_eps)
    ours = KimiDeltaAttention(c, 1)
    shapes = lambda mod: {n: tuple(t.shape) for n, t in mod.state_dict().items()}  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    ours.load_state_dict(theirs.state_dict())


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone_forward_and_gradient(side):
    m = _mixer(num_linear_value_heads=4)
    lengths, T = [9, 40], 40
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        (mask[i, T - n:] if side == "left" else mask[i, :n]).fill_(1)
    y = m(x, attention_mask=mask)
    (y * mask[..., None]).sum().backward()
    for i, n in enumerate(lengths):
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        xi = x[i:i + 1, sl].detach().clone().requires_grad_()
        yi = m(xi)
        torch.testing.assert_close(y[i:i + 1, sl], yi, atol=1e-10, rtol=1e-8)
        yi.sum().backward()
        torch.testing.assert_close(x.grad[i:i + 1, sl], xi.grad, atol=1e-10, rtol=1e-8)


def test_packed_mixer_equals_documents_alone():
    m = _mixer(1)
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    cu = torch.tensor([0, 3, 40])
    y = m(x, cu_seqlens=cu)
    for a, b in ((0, 3), (3, 40)):
        torch.testing.assert_close(y[:, a:b], m(x[:, a:b]), atol=1e-10, rtol=1e-8)


def test_cached_chunks_equal_the_full_forward():
    m = _mixer(2, num_linear_value_heads=4)
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    with torch.no_grad():
        full = m(x)
        cache, outs = RecurrentStateCache(), []
        for a, b in ((0, 7), (7, 8), (8, 20), (20, 21), (21, 30)):  # prefill, decode steps, chunks
            outs.append(m(x[:, a:b], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=1e-8)
    assert cache.state.shape == (2, 4, 16, 32)


# -- the student ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kda_student(tiny_teacher):
    from model import convert_teacher

    torch.manual_seed(0)
    return convert_teacher(tiny_teacher[0], sliding_window=8, linear_mixer="kda").eval()


def test_teacher_init_reaches_the_kda_layers(kda_student, tiny_teacher):
    types = kda_student.config.text_config.layer_types
    i = types.index("linear_attention")
    mixer = kda_student.model.language_model.layers[i].self_attn
    attn = tiny_teacher[0].model.language_model.layers[i].self_attn
    assert isinstance(mixer, KimiDeltaAttention)
    torch.testing.assert_close(mixer.q_proj.weight, attn.q_proj.weight)
    assert (mixer.f_proj[1].weight == 0).all() and (mixer.b_proj.weight == 0).all()
    decay = torch.exp(-F.softplus(mixer.dt_bias))
    assert decay.min() > 0.899 and decay.max() < 0.9991


def test_student_cached_decoding_save_load_and_generate(kda_student, processor, tmp_path):
    from model.checkpoint import load_pretrained, save_pretrained

    s = kda_student
    ids = torch.randint(3, 100, (2, 25), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = s(input_ids=ids).logits
        cache, outs = s.new_cache(), []
        for a, b in ((0, 9), (9, 10), (10, 25)):
            outs.append(s(input_ids=ids[:, a:b], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-4)
    save_pretrained(s, processor, tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    assert loaded.config.text_config.linear_mixer == "kda"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, full)
        out = loaded.generate(input_ids=ids[:1, :5], max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert out.shape == (1, 9)


# -- GPU: fla's kernels against the torch path -----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("raw_gates", [False, True], ids=["gates", "gates_in_kernel"])
@pytest.mark.parametrize("packed", [False, True])
def test_chunk_kda_matches_the_torch_path_on_gpu(raw_gates, packed):
    from fla.ops.kda import chunk_kda

    cu = torch.tensor([0, 100, 357, 600]) if packed else None
    errs = fla_check(chunk_kda, "cuda", raw_gates=raw_gates, B=1 if packed else 2, T=600, H=4, HV=8, K=128, V=128,
                     cu_seqlens=cu)
    print(f"chunk_kda (bf16) vs torch (fp32), raw_gates={raw_gates}, packed={packed}: {errs}")
    assert max(errs.values()) < 2e-2, errs


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_fused_recurrent_kda_matches_the_torch_path_on_gpu(packed):
    from fla.ops.kda import fused_recurrent_kda

    cu = torch.tensor([0, 10, 40, 64]) if packed else None
    errs = fla_check(fused_recurrent_kda, "cuda", raw_gates=True, backward=False, B=1 if packed else 2, T=64, H=4,
                     HV=8, K=128, V=128, cu_seqlens=cu)
    print(f"fused_recurrent_kda (bf16) vs torch (fp32), packed={packed}: {errs}")
    assert max(errs.values()) < 2e-2, errs


@pytest.mark.gpu
def test_kda_mixer_on_gpu_in_bf16_matches_the_torch_path():
    """The whole mixer (fla's conv, kernels and gated norm, bf16) against itself on the torch path (fp32):
    packed forward and gradients, then a prefill with a cache followed by decode steps."""
    cfg = InfiniteVLTextConfig(hidden_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                               intermediate_size=64, vocab_size=64, linear_head_dim=128, num_linear_value_heads=8,
                               linear_mixer="kda")
    torch.manual_seed(0)
    ref = KimiDeltaAttention(cfg, 1).cuda()
    fused = KimiDeltaAttention(cfg, 1).cuda().to(torch.bfloat16)
    fused.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    ref.backend, fused.backend = "torch", "fla"

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
    print("KDA fused vs torch (packed):", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 3e-2, errors

    with torch.no_grad():
        cr, cf = RecurrentStateCache(), RecurrentStateCache()
        outs = [(ref(x[:, a:b], cache=cr), fused(x[:, a:b].to(torch.bfloat16), cache=cf))
                for a, b in ((0, 300), (300, 301), (301, 302), (302, 340))]
    steps = {f"step{i}": rel(f, r) for i, (r, f) in enumerate(outs)}
    print("KDA fused vs torch (cached):", {k: f"{v:.1e}" for k, v in steps.items()})
    assert max(steps.values()) < 3e-2, steps
