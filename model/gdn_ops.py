"""The gated delta rule: a pure-torch chunked implementation (CPU default, test reference) and the
dispatch to flash-linear-attention's Triton kernels on CUDA.

Recurrence per head, with the state h as a K×V matrix (q already scaled):

    h_t = exp(g_t) · h_{t-1}
    u_t = β_t · (v_t − h_tᵀ k_t)
    h_t = h_t + k_t u_tᵀ
    o_t = h_tᵀ q_t

Chunked form (chunk of C steps, γ_t = exp(Σ_{s≤t} g_s) inside the chunk, S the state entering it):

    U = (I + A)⁻¹ (β⊙V − (βγ⊙K) S)        A[t,s] = β_t (γ_t/γ_s) k_t·k_s   for s < t
    O = (γ⊙Q) S + ((Q Kᵀ) ⊙ Γ) U           Γ[t,s] = γ_t/γ_s                  for s ≤ t
    S' = γ_C S + Σ_s (γ_C/γ_s) k_s u_sᵀ

Layouts follow fla: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H]; states [N, H, K, V] in fp32.
Packed sequences pass `cu_seqlens` (B must be 1) and the state restarts at every boundary.
"""

from __future__ import annotations

import os
import time
import warnings

import torch

CHUNK = 64
L2_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (so tests can compare exactly)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def torch_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                 cu_seqlens=None, use_qk_l2norm=False, chunk_size: int = CHUNK):
    """Exact chunked gated delta rule in plain torch (fp32 accumulation); differentiable."""
    if cu_seqlens is not None:
        return per_document(torch_chunk_gated_delta_rule, (q, k, v, g, beta), scale, initial_state, output_final_state,
                            cu_seqlens, use_qk_l2norm, chunk_size=chunk_size)
    dtype, acc = v.dtype, _acc(v)
    if use_qk_l2norm:
        q, k = l2norm(q.to(acc)), l2norm(k.to(acc))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (C - T % C) % C
    # [B, H, N, C, *] in fp32; padded steps have k = 0, β = 0, g = 0 and so leave the state untouched
    q, k, v = (_chunks(x.to(acc), pad, C) for x in (q * scale, k, v))
    g, beta = (_chunks(x.to(acc).unsqueeze(-1), pad, C).squeeze(-1) for x in (g, beta))
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
                                     cu_seqlens=None, use_qk_l2norm=False):
    """Step-by-step form for decoding a few tokens; same contract as the chunked function."""
    if cu_seqlens is not None:
        return per_document(torch_recurrent_gated_delta_rule, (q, k, v, g, beta), scale, initial_state,
                            output_final_state, cu_seqlens, use_qk_l2norm)
    dtype, acc = v.dtype, _acc(v)
    if use_qk_l2norm:
        q, k = l2norm(q.to(acc)), l2norm(k.to(acc))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
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


def _chunks(x: torch.Tensor, pad: int, C: int) -> torch.Tensor:
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))  # [B, T+pad, H, D]
    B, Tp, H, D = x.shape
    return x.reshape(B, Tp // C, C, H, D).permute(0, 3, 1, 2, 4)


def per_document(fn, per_token: tuple, scale, initial_state, output_final_state, cu_seqlens, *rest, **kw):
    """A recurrence over a packed row (batch 1) run document by document, each from its own initial state:
    `fn(*per_token sliced to the document, scale, h0, output_final_state, None, *rest, **kw)`."""
    if per_token[0].shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {per_token[0].shape[0]}")
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[i:i + 1]
        o, h = fn(*(t[:, a:b] for t in per_token), scale, h0, output_final_state, None, *rest, **kw)
        outs.append(o)
        states.append(h)
    return torch.cat(outs, 1), (torch.cat(states) if output_final_state else None)


# --------------------------------------------------------------------------------------------------------------
# CUDA: flash-linear-attention
# --------------------------------------------------------------------------------------------------------------

LIFT_GUARD_ENV = "INFINITEVL_LIFT_FLA_HOPPER_GUARD"
_guard_checked: set[str] = set()  # the ops whose gradient check passed in this process


def fla_available() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def use_fla(x: torch.Tensor, backend: str, head_dim: int) -> bool:
    """One rule for every Gated DeltaNet kernel (delta rule, short conv, gated norm): fla on CUDA, torch on
    CPU or when `backend="torch"`. Head dims under 32 (tiny test models) crashed fla's backward on the H100
    here: they take the torch path."""
    if backend == "fla" and not x.is_cuda:
        raise RuntimeError("linear_backend='fla' needs CUDA tensors: flash-linear-attention's Triton kernels do "
                           "not run on CPU (use linear_backend='auto' or 'torch' there)")
    return backend == "fla" or (backend == "auto" and x.is_cuda and head_dim >= 32 and fla_available())


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     use_qk_l2norm=True, backend: str = "auto", A_log=None, dt_bias=None):
    """Dispatch: fla's chunk kernel (training, prefill) or fused recurrent kernel (≤ 64 new tokens) on CUDA;
    the torch chunked reference on CPU or when `backend="torch"`.

    With `A_log` given, `g` and `beta` are the raw projections a and b of Gated DeltaNet: the gates
    g = −exp(A_log)·softplus(a + dt_bias) and β = sigmoid(b) are applied inside fla's recurrent kernel where it
    runs (a decode step then launches one kernel where the gate arithmetic took eight), else computed here."""
    recurrent = q.shape[1] <= 64 and not (torch.is_grad_enabled() and q.requires_grad)
    fla = use_fla(q, backend, q.shape[-1])
    if A_log is not None and not (fla and recurrent):
        g, beta = gdn_gates(g, beta, A_log, dt_bias)
        A_log = None
    if not fla:
        fn = torch_recurrent_gated_delta_rule if q.shape[1] <= 4 and not torch.is_grad_enabled() else \
            torch_chunk_gated_delta_rule
        return fn(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(q.device, torch.long),
                  use_qk_l2norm_in_kernel=use_qk_l2norm)
    # keywords: the two kernels take their gates in different positions (fused_recurrent's 5th is gk)
    if recurrent:
        if A_log is not None:
            kwargs.update(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)
        return fused_recurrent_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, **kwargs)
    if torch.is_grad_enabled():
        ensure_fla_backward_ok(q.device)
    return chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, **kwargs)


def gdn_gates(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor):
    """Per-step log-decay g = −exp(A_log)·softplus(a + dt_bias) in fp32 (or fp64 for fp64 inputs) and
    β = sigmoid(b) in b's dtype."""
    acc = torch.promote_types(a.dtype, torch.float32)
    return -A_log.to(acc).exp() * torch.nn.functional.softplus(a.to(acc) + dt_bias.to(acc)), b.sigmoid()


def fla_short_conv(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None,
                   cu_seqlens: torch.Tensor | None = None, output_final_state: bool = False,
                   bias: torch.Tensor | None = None):
    """fla's Triton causal conv + SiLU. x [B, T, C], weight [C, 1, K], state [B, C, K] (the last K inputs
    before x, newest last; the oldest is never read: fla's layout). One new token per row with a state:
    fla's update kernel, which writes the new state into `state` itself (nothing to copy back)."""
    from fla.modules.causal_conv1d import causal_conv1d, causal_conv1d_update

    if state is not None and x.shape[1] == 1 and cu_seqlens is None and state.is_contiguous() \
            and state.dtype == x.dtype:
        y, state = causal_conv1d_update(x, state, weight=weight[:, 0, :], bias=bias, activation="silu")
        return y, state
    y, final = causal_conv1d(x, weight[:, 0, :], bias, initial_state=None if state is None else state.to(x.dtype),
                             output_final_state=output_final_state, activation="silu",
                             cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(x.device, torch.long))
    return y, final


def fla_gated_rmsnorm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x)·w·SiLU(gate) in one Triton pass (fp32 inside), fla's fused kernel."""
    from fla.modules.norm.fused_norm_gate import rms_norm_gated

    return rms_norm_gated(x, gate, weight, None, activation="swish", eps=eps)


def hopper_guard_active(device=None) -> bool:
    """fla 0.6 refuses the gated backward on Hopper with Triton in [3.4, 3.7.1) (fla issue #640)."""
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.utils import TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except Exception:
        return False
    return bool(chunk_o.IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


def ensure_fla_backward_ok(device, op: str = "gated_delta_rule", check=None) -> None:
    """Where fla's guard would refuse the backward, lift it only if the user asked for it explicitly
    (env INFINITEVL_LIFT_FLA_HOPPER_GUARD=1) and only after a gradient check of `op` against the torch
    reference on this device passes (`check(device, head_dim)` -> relative errors; Gated DeltaNet's by
    default). Otherwise fail with a message that says what to do."""
    if op in _guard_checked or not hopper_guard_active(device):
        return
    if os.environ.get(LIFT_GUARD_ENV) != "1":
        raise RuntimeError(
            f"flash-linear-attention refuses the {op} backward on Hopper GPUs with Triton in "
            "[3.4, 3.7.1) (fla issue #640). Install Triton >= 3.7.1, or set "
            f"{LIFT_GUARD_ENV}=1 to lift the guard after an automatic gradient check on this GPU."
        )
    _isolated(lambda: lift_hopper_guard_checked(device, op, check))


def _isolated(fn) -> None:
    """Runs `fn` on a thread of its own and re-raises what it raised. The first backward-enabled call can sit
    inside a checkpointed forward, whose saved-tensor hooks (thread-local) would otherwise record the check's
    own tensors and fail recomputation."""
    import threading

    errors = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
            errors.append(e)

    worker = threading.Thread(target=run, name="fla-guard-check")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]


def _gated_delta_rule_check(device, head_dim: int) -> dict:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return compare_with_reference(chunk_gated_delta_rule, device, K=head_dim, V=2 * head_dim)


def lift_hopper_guard_checked(device, op: str = "gated_delta_rule", check=None, rtol: float = 2e-2) -> dict:
    """Runs `op`'s fla kernel forward+backward with the guard lifted at head_dim 64 and 128 against the fp32
    torch reference; keeps the guard lifted only if every relative error is below `rtol`."""
    import fla.ops.common.chunk_o as chunk_o

    check = check or _gated_delta_rule_check
    saved = chunk_o.IS_NVIDIA_HOPPER
    chunk_o.IS_NVIDIA_HOPPER = False
    report, started = {}, time.monotonic()
    try:
        for K in (64, 128):
            report[K] = check(device, K)
            worst = max(report[K].values())
            if worst > rtol:
                raise RuntimeError(f"fla {op} gradient check failed at head_dim {K}: relative errors {report[K]}")
    except Exception:
        chunk_o.IS_NVIDIA_HOPPER = saved
        raise
    # the time says what the check costs each stage process (kernel compilation included, first use)
    warnings.warn(f"fla Hopper/Triton guard lifted after a passing {op} gradient check "
                  f"({time.monotonic() - started:.1f} s): {report}")
    _guard_checked.add(op)
    return report


def compare_with_reference(kernel, device, B=2, T=300, H=4, K=64, V=128, dtype=torch.bfloat16, seed=0,
                           cu_seqlens=None) -> dict:
    """Relative error (max |a-b| / max |b|) of `kernel` against the fp32 torch chunked reference, for the
    output and the gradients of q, k, v, g, beta."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    inputs = dict(q=mk(B, T, H, K), k=mk(B, T, H, K), v=mk(B, T, H, V),
                  g=torch.nn.functional.logsigmoid(mk(B, T, H) + 3), beta=torch.sigmoid(mk(B, T, H)))
    do = mk(B, T, H, V)

    def run(fn, dt, dev):
        xs = {n: x.to(dev, dt).requires_grad_() for n, x in inputs.items()}
        o, _ = fn(**xs, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens) if fn is kernel else \
            fn(**xs, use_qk_l2norm=True, cu_seqlens=cu_seqlens)
        (o.float() * do.to(dev)).sum().backward()
        return {"o": o.detach().float().cpu(), **{f"d{n}": x.grad.float().cpu() for n, x in xs.items()}}

    got = run(kernel, dtype, device)
    ref = run(torch_chunk_gated_delta_rule, torch.float32, device)
    return {n: float((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)) for n in ref}
