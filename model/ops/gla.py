"""Gated linear attention recurrences (GLA: one decay per key channel; Mamba2's SSD form: one per head): exact
chunked and step-by-step torch implementations (CPU path, test reference) and the dispatch to
flash-linear-attention's Triton kernels on CUDA.

Per head, with the state h a K×V matrix (q already scaled):

    h_t = diag(exp(g_t)) · h_{t-1} + k_t v_tᵀ
    o_t = h_tᵀ q_t

GLA gates every key channel (g [B, T, H, K], fla's `chunk_gla`); the scalar form has g [B, T, H] (fla's
`chunk_simple_gla`). Chunked form (chunk of C steps, G = Σ_{s≤t} g_s inside the chunk, S the state entering it):

    O  = (Q ⊙ exp(G)) S + A V              A[t,s] = Σ_k q_tk k_sk exp(G_tk − G_sk)   for s ≤ t
    S' = exp(G_C) ⊙ S + (K ⊙ exp(G_C − G))ᵀ V

Every exponent above is ≤ 0 (decays only), so nothing overflows however strong the gates. With per-channel
gates A needs a [C, C, K] tensor per chunk, hence a smaller chunk (16) than for the scalar form (64).

Layouts follow fla: q, k [B, T, H, K]; v [B, T, H, V]; states [N, H, K, V] in fp32. Packed sequences pass
`cu_seqlens` (B must be 1) and the state restarts at every boundary.
"""

from __future__ import annotations

import torch

from .common import (GUARDED_BACKWARDS, acc_dtype, chunks, cu_long, decoding, ensure_fla_backward_ok, per_document,
                     use_fla)
from .testing import compare_with_reference

CHUNK_SCALAR = 64
CHUNK_CHANNEL = 16


def torch_chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                    chunk_size: int | None = None):
    """Exact chunked gated linear attention in plain torch (fp32 accumulation); differentiable. `g` is the
    log-decay, [B, T, H, K] (per key channel) or [B, T, H] (per head)."""
    if cu_seqlens is not None:
        return per_document(torch_chunk_gla, (q, k, v, g), scale, initial_state, output_final_state, cu_seqlens,
                            chunk_size=chunk_size)
    dtype, acc = v.dtype, acc_dtype(v)
    scalar = g.ndim == 3
    C = chunk_size or (CHUNK_SCALAR if scalar else CHUNK_CHANNEL)
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    pad = (C - T % C) % C
    # [B, H, N, C, *]; padded steps have k = 0 and g = 0, so they leave the state untouched
    q, k, v = (chunks(x.to(acc), pad, C) for x in (q * scale, k, v))
    g = chunks((g.unsqueeze(-1) if scalar else g).to(acc), pad, C)  # [B, H, N, C, 1 or K]
    G = g.cumsum(-2)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outs = []
    for n in range(q.shape[2]):
        qn, kn, vn, Gn = q[:, :, n], k[:, :, n], v[:, :, n], G[:, :, n]
        if scalar:
            decay = (Gn - Gn.transpose(-1, -2)).masked_fill(~causal, float("-inf")).exp()  # [B, H, C, C]
            A = (qn @ kn.transpose(-1, -2)) * decay
        else:
            diff = Gn.unsqueeze(-2) - Gn.unsqueeze(-3)  # [B, H, C(t), C(s), K]
            decay = diff.masked_fill(~causal.unsqueeze(-1), float("-inf")).exp()
            A = torch.einsum("bhtk,bhsk,bhtsk->bhts", qn, kn, decay)
        outs.append((qn * Gn.exp()) @ S + A @ vn)
        last = Gn[..., -1:, :]  # [B, H, 1, 1 or K]
        S = S * last.transpose(-1, -2).exp() + (kn * (last - Gn).exp()).transpose(-1, -2) @ vn
    o = torch.stack(outs, 2).reshape(B, H, -1, V)[:, :, :T].transpose(1, 2)
    return o.to(dtype), (S if output_final_state else None)


def torch_recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Step-by-step form (decoding a few tokens, and an independent check of the chunked form)."""
    if cu_seqlens is not None:
        return per_document(torch_recurrent_gla, (q, k, v, g), scale, initial_state, output_final_state, cu_seqlens)
    dtype, acc = v.dtype, acc_dtype(v)
    B, T, H, K = k.shape
    scale = K ** -0.5 if scale is None else scale
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=acc) if initial_state is None else initial_state.to(acc)
    q, k, v, g = (x.to(acc) for x in (q * scale, k, v, g))
    if g.ndim == 3:
        g = g.unsqueeze(-1)  # one decay per head acts on every key channel
    outs = []
    for t in range(T):
        S = S * g[:, t].exp().unsqueeze(-1) + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, 1).to(dtype), (S if output_final_state else None)


def _torch_path(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens):
    fn = torch_recurrent_gla if q.shape[1] <= 4 and not torch.is_grad_enabled() else torch_chunk_gla
    return fn(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)


def _fla_kwargs(q, scale, initial_state, output_final_state, cu_seqlens):
    return dict(scale=scale, initial_state=None if initial_state is None else initial_state.float(),
                output_final_state=output_final_state, cu_seqlens=cu_long(cu_seqlens, q.device))


def gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
        backend: str = "auto"):
    """Per-channel gates (GLA): fla's chunk kernel (training, prefill) or fused recurrent kernel (≤ 64 new
    tokens) on CUDA; the torch chunked form on CPU or with `backend="torch"`."""
    if not use_fla(q, backend, q.shape[-1]):
        return _torch_path(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    kwargs = _fla_kwargs(q, scale, initial_state, output_final_state, cu_seqlens)
    # keywords throughout: fused_recurrent_gla calls the gate `gk`, chunk_gla calls it `g`
    if decoding(q):
        return fused_recurrent_gla(q=q, k=k, v=v, gk=g, **kwargs)
    return chunk_gla(q=q, k=k, v=v, g=g, **kwargs)


def simple_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
               backend: str = "auto"):
    """One scalar gate per head (Mamba2's SSD form): fla's `chunk_simple_gla` / `fused_recurrent_simple_gla`
    on CUDA; the torch chunked form on CPU or with `backend="torch"`."""
    if not use_fla(q, backend, q.shape[-1]):
        return _torch_path(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    kwargs = _fla_kwargs(q, scale, initial_state, output_final_state, cu_seqlens)
    if decoding(q):
        return fused_recurrent_simple_gla(q=q, k=k, v=v, g=g, **kwargs)
    if torch.is_grad_enabled():
        ensure_fla_backward_ok(q.device, "simple_gla")
    return chunk_simple_gla(q=q, k=k, v=v, g=g, **kwargs)


def random_inputs(B=2, T=300, H=4, K=64, V=128, scalar=False, seed=0) -> dict:
    """Inputs in GLA's own gate range: logsigmoid(·)/16 per channel (scalar form: logsigmoid(·))."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    g_shape = (B, T, H) if scalar else (B, T, H, K)
    return dict(q=mk(B, T, H, K), k=mk(B, T, H, K), v=mk(B, T, H, V),
                g=torch.nn.functional.logsigmoid(mk(*g_shape) + 2) / (1 if scalar else 16))


def fla_check(kernel, device, scalar: bool, **shape) -> dict:
    """An fla GLA kernel (chunk or fused recurrent, per channel or scalar; bf16) against the torch chunked form
    (fp32) from an initial state: relative errors of output, final state and gradients."""
    cu = shape.pop("cu_seqlens", None)
    inputs = random_inputs(scalar=scalar, **shape)
    B, _, H, K = inputs["q"].shape
    N = B if cu is None else len(cu) - 1
    h0 = torch.randn(N, H, K, inputs["v"].shape[-1], generator=torch.Generator().manual_seed(1))
    names = {"g": "gk"} if getattr(kernel, "__name__", "") == "fused_recurrent_gla" else None
    return compare_with_reference(kernel, torch_chunk_gla, inputs, device, kernel_names=names, initial_state=h0,
                                  output_final_state=True, cu_seqlens=cu)


def simple_gla_check(device, head_dim: int) -> dict:
    """chunk_simple_gla's backward goes through the gated kernel fla refuses on Hopper (fla issue #640)."""
    from fla.ops.simple_gla import chunk_simple_gla

    return fla_check(chunk_simple_gla, device, scalar=True, K=head_dim, V=2 * head_dim)


GUARDED_BACKWARDS["simple_gla"] = simple_gla_check
