"""Kimi Delta Attention (KDA): the gated delta rule with one decay per key channel. An exact chunked torch
implementation (CPU path, test reference), a step-by-step form, and the dispatch to flash-linear-attention's
`chunk_kda` / `fused_recurrent_kda` on CUDA.

Recurrence per value head, with the state h a K×V matrix (q already scaled):

    h_t = diag(exp(g_t)) · h_{t-1}
    u_t = β_t · (v_t − h_tᵀ k_t)
    h_t = h_t + k_t u_tᵀ
    o_t = h_tᵀ q_t

Chunked form (chunk of C steps, G_t = Σ_{s≤t} g_s per channel inside the chunk, S the state entering it,
E_ts = exp(G_t − G_s) per channel, every exponent ≤ 0):

    U = (I + A)⁻¹ (β⊙V − (β⊙K⊙exp(G)) S)   A[t,s] = β_t Σ_k k_tk k_sk E_tsk   for s < t
    O = (Q⊙exp(G)) S + P U                   P[t,s] = Σ_k q_tk k_sk E_tsk       for s ≤ t
    S' = exp(G_C) ⊙ S + (K ⊙ exp(G_C − G))ᵀ U

The per-channel decays need a [C, C, K] tensor per chunk, hence a chunk of 16 by default.

Layouts and keywords follow fla's `chunk_kda`: q, k [B, T, H, K]; v [B, T, HV, V]; g [B, T, HV, K]; beta
[B, T, HV]; states [N, HV, K, V] in fp32; HV > H groups value heads as in the delta rule. With
`use_gate_in_kernel`, g is the raw gate projection and the decay is g = −exp(A_log)·softplus(g + dt_bias)
(A_log [HV], dt_bias [HV·K]); with `use_beta_sigmoid_in_kernel`, β = sigmoid(beta).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import acc_dtype, chunks, cu_long, decoding, expand_groups, l2norm, per_document, use_fla
from .testing import compare_with_reference

CHUNK = 16


def kda_gates(g: torch.Tensor, beta: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None):
    """Per-step, per-channel log-decay −exp(A_log)·softplus(g + dt_bias) (fp32, or fp64 for fp64 inputs) from the
    raw gate projection g [.., HV, K], and β = sigmoid(beta) in beta's dtype."""
    acc = torch.promote_types(g.dtype, torch.float32)
    HV, K = g.shape[-2:]
    x = g.to(acc) if dt_bias is None else g.to(acc) + dt_bias.to(acc).view(HV, K)
    return -A_log.to(acc).view(HV, 1).exp() * F.softplus(x), beta.sigmoid()


def _gates(g, beta, A_log, dt_bias, use_gate_in_kernel, use_beta_sigmoid_in_kernel):
    if use_gate_in_kernel:
        g = kda_gates(g, beta, A_log, dt_bias)[0]
    return g, (beta.sigmoid() if use_beta_sigmoid_in_kernel else beta)


def torch_chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                    use_qk_l2norm_in_kernel=False, chunk_size: int = CHUNK, A_log=None, dt_bias=None,
                    use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False):
    """Exact chunked KDA in plain torch (fp32 accumulation); differentiable."""
    g, beta = _gates(g, beta, A_log, dt_bias, use_gate_in_kernel, use_beta_sigmoid_in_kernel)
    if cu_seqlens is not None:
        return per_document(torch_chunk_kda, (q, k, v, g, beta), scale, initial_state, output_final_state,
                            cu_seqlens, use_qk_l2norm_in_kernel, chunk_size)
    dtype, acc = v.dtype, acc_dtype(v)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.to(acc)), l2norm(k.to(acc))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = expand_groups(q, k, v.shape[2])
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (C - T % C) % C
    # [B, H, N, C, *]; padded steps have k = 0, β = 0, g = 0 and so leave the state untouched
    q, k, v, g = (chunks(x.to(acc), pad, C) for x in (q * scale, k, v, g))
    beta = chunks(beta.to(acc).unsqueeze(-1), pad, C)  # [B, H, N, C, 1]
    G = g.cumsum(-2)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = causal.tril(-1)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outs = []
    for n in range(q.shape[2]):
        qn, kn, vn, Gn, bn = q[:, :, n], k[:, :, n], v[:, :, n], G[:, :, n], beta[:, :, n]
        E = (Gn.unsqueeze(-2) - Gn.unsqueeze(-3)).masked_fill(~causal.unsqueeze(-1), float("-inf")).exp()
        A = torch.einsum("bhtk,bhsk,bhtsk->bhts", kn, kn, E) * strict * bn
        P = torch.einsum("bhtk,bhsk,bhtsk->bhts", qn, kn, E)
        rhs = torch.cat([vn * bn, kn * bn * Gn.exp()], -1)  # one solve for βV and β K exp(G)
        uw = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        u = uw[..., :V] - uw[..., V:] @ S
        outs.append((qn * Gn.exp()) @ S + P @ u)
        last = Gn[..., -1:, :]  # [B, H, 1, K]
        S = S * last.transpose(-1, -2).exp() + (kn * (last - Gn).exp()).transpose(-1, -2) @ u
    o = torch.stack(outs, 2).reshape(B, H, -1, V)[:, :, :T].transpose(1, 2)
    return o.to(dtype), (S if output_final_state else None)


def torch_recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None, use_qk_l2norm_in_kernel=False, A_log=None, dt_bias=None,
                        use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False):
    """Step-by-step form for decoding a few tokens; same contract as the chunked function."""
    g, beta = _gates(g, beta, A_log, dt_bias, use_gate_in_kernel, use_beta_sigmoid_in_kernel)
    if cu_seqlens is not None:
        return per_document(torch_recurrent_kda, (q, k, v, g, beta), scale, initial_state, output_final_state,
                            cu_seqlens, use_qk_l2norm_in_kernel)
    dtype, acc = v.dtype, acc_dtype(v)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.to(acc)), l2norm(k.to(acc))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k = expand_groups(q, k, v.shape[2])
    B, T, H, K = k.shape
    S = q.new_zeros(B, H, K, v.shape[-1], dtype=acc) if initial_state is None else initial_state.to(acc)
    q, k, v, g, beta = (x.to(acc) for x in (q * scale, k, v, g, beta))
    outs = []
    for t in range(T):
        S = S * g[:, t].exp().unsqueeze(-1)
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, 1).to(dtype), (S if output_final_state else None)


def kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
        use_qk_l2norm_in_kernel=True, backend: str = "auto", A_log=None, dt_bias=None):
    """Dispatch: fla's chunk kernel (training, prefill) or fused recurrent kernel (≤ 64 new tokens) on CUDA;
    the torch chunked form on CPU or when `backend="torch"`. With `A_log` given, `g` and `beta` are KDA's raw
    gate projections, and the gates are applied inside fla's kernels (no [T, HV, K] fp32 decay tensor in
    memory) or computed here for the torch path."""
    gate = dict(A_log=A_log, dt_bias=dt_bias, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True) \
        if A_log is not None else {}
    if not use_fla(q, backend, q.shape[-1]):
        fn = torch_recurrent_kda if q.shape[1] <= 4 and not torch.is_grad_enabled() else torch_chunk_kda
        return fn(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel,
                  **gate)
    from fla.ops.kda import chunk_kda, fused_recurrent_kda

    kwargs = dict(scale=scale, initial_state=None if initial_state is None else initial_state.float(),
                  output_final_state=output_final_state, cu_seqlens=cu_long(cu_seqlens, q.device),
                  use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **gate)
    if decoding(q):
        return fused_recurrent_kda(q=q, k=k, v=v, g=g, beta=beta, **kwargs)
    return chunk_kda(q=q, k=k, v=v, g=g, beta=beta, **kwargs)


def random_inputs(B=2, T=300, H=4, K=64, V=128, HV=None, raw_gates=False, seed=0) -> dict:
    """Inputs in KDA's range. Decayed form: g = logsigmoid(·) per channel, β in (0, 1). With `raw_gates`, the
    projections and parameters fla's in-kernel gate takes: g, beta raw, A_log [HV], dt_bias [HV·K]."""
    gen = torch.Generator().manual_seed(seed)
    HV = HV or H
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x = dict(q=mk(B, T, H, K), k=mk(B, T, H, K), v=mk(B, T, HV, V))
    if raw_gates:
        return {**x, "g": mk(B, T, HV, K), "beta": mk(B, T, HV),
                "A_log": torch.empty(HV).uniform_(1, 16, generator=gen).log(), "dt_bias": mk(HV * K) * 0.5}
    return {**x, "g": F.logsigmoid(mk(B, T, HV, K) + 3), "beta": torch.sigmoid(mk(B, T, HV))}


def fla_check(kernel, device, raw_gates: bool = False, backward: bool = True, **shape) -> dict:
    """An fla KDA kernel (bf16) against the torch chunked form (fp32) from an initial state: relative errors of
    output, final state and (with `backward`) every input's gradient."""
    cu = shape.pop("cu_seqlens", None)
    inputs = random_inputs(raw_gates=raw_gates, **shape)
    B, _, _, K = inputs["q"].shape
    HV, V = inputs["v"].shape[2:]
    N = B if cu is None else len(cu) - 1
    h0 = torch.randn(N, HV, K, V, generator=torch.Generator().manual_seed(1))
    gate = dict(use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True) if raw_gates else {}
    return compare_with_reference(kernel, torch_chunk_kda, inputs, device, fp32=("g", "A_log", "dt_bias"),
                                  backward=backward, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                  use_qk_l2norm_in_kernel=True, **gate)
