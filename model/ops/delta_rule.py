"""The gated delta rule (Gated DeltaNet): an exact chunked torch implementation (CPU path, test reference),
a step-by-step form, and the dispatch to flash-linear-attention's Triton kernels on CUDA.

Recurrence per value head, with the state h as a K×V matrix (q already scaled):

    h_t = exp(g_t) · h_{t-1}
    u_t = β_t · (v_t − h_tᵀ k_t)
    h_t = h_t + k_t u_tᵀ
    o_t = h_tᵀ q_t

Chunked form (chunk of C steps, γ_t = exp(Σ_{s≤t} g_s) inside the chunk, S the state entering it):

    U = (I + A)⁻¹ (β⊙V − (βγ⊙K) S)        A[t,s] = β_t (γ_t/γ_s) k_t·k_s   for s < t
    O = (γ⊙Q) S + ((Q Kᵀ) ⊙ Γ) U           Γ[t,s] = γ_t/γ_s                  for s ≤ t
    S' = γ_C S + Σ_s (γ_C/γ_s) k_s u_sᵀ

Layouts and keywords follow fla's `chunk_gated_delta_rule`: q, k [B, T, H, K]; v [B, T, HV, V]; g, beta
[B, T, HV]; states [N, HV, K, V] in fp32. HV > H is fla's grouped value attention (each q/k head serves HV/H
consecutive value heads; Qwen3.5's layout). Packed sequences pass `cu_seqlens` (B must be 1) and the state
restarts at every boundary.
"""

from __future__ import annotations

import torch

from .common import (GUARDED_BACKWARDS, acc_dtype, chunks, cu_long, decoding, ensure_fla_backward_ok, expand_groups,
                     l2norm, per_document, use_fla)
from .testing import compare_with_reference

CHUNK = 64


def torch_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                 cu_seqlens=None, use_qk_l2norm_in_kernel=False, chunk_size: int = CHUNK):
    """Exact chunked gated delta rule in plain torch (fp32 accumulation); differentiable."""
    if cu_seqlens is not None:
        return per_document(torch_chunk_gated_delta_rule, (q, k, v, g, beta), scale, initial_state,
                            output_final_state, cu_seqlens, use_qk_l2norm_in_kernel, chunk_size=chunk_size)
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
    q, k, v = (chunks(x.to(acc), pad, C) for x in (q * scale, k, v))
    g, beta = (chunks(x.to(acc).unsqueeze(-1), pad, C).squeeze(-1) for x in (g, beta))
    G = g.cumsum(-1)
    causal_incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    causal_strict = causal_incl.tril(-1)
    decay = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal_incl, float("-inf")).exp()  # Γ
    kb = k * beta.unsqueeze(-1)
    A = (kb @ k.transpose(-1, -2)) * decay * causal_strict
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    solve = lambda rhs: torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)  # noqa: E731
    u = solve(v * beta.unsqueeze(-1))
    w = solve(kb * G.exp().unsqueeze(-1))
    qk = (q @ k.transpose(-1, -2)) * decay

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    outs = []
    for n in range(q.shape[2]):
        un = u[:, :, n] - w[:, :, n] @ S
        outs.append((q[:, :, n] * G[:, :, n].exp().unsqueeze(-1)) @ S + qk[:, :, n] @ un)
        g_last = G[:, :, n, -1:]
        S = S * g_last.exp().unsqueeze(-1) + (k[:, :, n] * (g_last - G[:, :, n]).exp().unsqueeze(-1)).transpose(-1, -2) @ un
    o = torch.stack(outs, 2).reshape(B, H, -1, V)[:, :, :T].transpose(1, 2)
    return o.to(dtype), (S if output_final_state else None)


def torch_recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                     cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """Step-by-step form for decoding a few tokens; same contract as the chunked function."""
    if cu_seqlens is not None:
        return per_document(torch_recurrent_gated_delta_rule, (q, k, v, g, beta), scale, initial_state,
                            output_final_state, cu_seqlens, use_qk_l2norm_in_kernel)
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
        S = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, 1).to(dtype), (S if output_final_state else None)


def gdn_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """Per-step log-decay g = −exp(A_log)·softplus(a + dt_bias) in fp32 (or fp64 for fp64 inputs) and
    β = sigmoid(b) in b's dtype."""
    acc = torch.promote_types(a.dtype, torch.float32)
    return -A_log.to(acc).exp() * torch.nn.functional.softplus(a.to(acc) + dt_bias.to(acc)), b.sigmoid()


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     use_qk_l2norm_in_kernel=True, backend: str = "auto", A_log=None, dt_bias=None):
    """Dispatch: fla's chunk kernel (training, prefill) or fused recurrent kernel (≤ 64 new tokens) on CUDA;
    the torch chunked reference on CPU or when `backend="torch"`.

    With `A_log` given, `g` and `beta` are the raw projections a and b of Gated DeltaNet: the gates
    g = −exp(A_log)·softplus(a + dt_bias) and β = sigmoid(b) are applied inside fla's recurrent kernel where it
    runs (a decode step then launches one kernel where the gate arithmetic took eight), else computed here."""
    recurrent = decoding(q)
    fla = use_fla(q, backend, q.shape[-1])
    if A_log is not None and not (fla and recurrent):
        g, beta = gdn_gates(g, beta, A_log, dt_bias)
        A_log = None
    if not fla:
        fn = torch_recurrent_gated_delta_rule if q.shape[1] <= 4 and not torch.is_grad_enabled() else \
            torch_chunk_gated_delta_rule
        return fn(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm_in_kernel)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=cu_long(cu_seqlens, q.device), use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel)
    # keywords: the two kernels take their gates in different positions (fused_recurrent's 5th is gk)
    if recurrent:
        if A_log is not None:
            kwargs.update(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)
        return fused_recurrent_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, **kwargs)
    if torch.is_grad_enabled():
        ensure_fla_backward_ok(q.device, "gated_delta_rule")
    return chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, **kwargs)


def random_inputs(B=2, T=300, H=4, K=64, V=128, HV=None, seed=0) -> dict:
    """Inputs in the range Gated DeltaNet produces: decays exp(g) mostly near 1, β in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    HV = HV or H
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(q=mk(B, T, H, K), k=mk(B, T, H, K), v=mk(B, T, HV, V),
                g=torch.nn.functional.logsigmoid(mk(B, T, HV) + 3), beta=torch.sigmoid(mk(B, T, HV)))


def fla_check(device, head_dim: int, kernel=None, **shape) -> dict:
    """fla's chunk kernel (bf16) against the torch chunked reference (fp32): relative errors."""
    if kernel is None:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as kernel
    shape = {"K": head_dim, "V": 2 * head_dim, **shape}
    cu = shape.pop("cu_seqlens", None)
    return compare_with_reference(kernel, torch_chunk_gated_delta_rule, random_inputs(**shape), device,
                                  use_qk_l2norm_in_kernel=True, cu_seqlens=cu)


GUARDED_BACKWARDS["gated_delta_rule"] = fla_check
