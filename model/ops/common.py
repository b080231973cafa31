"""What every recurrence shares: accumulation dtype, chunking, packed rows run document by document, grouped
value heads, L2 normalisation, and the one rule that picks flash-linear-attention's Triton kernels or the torch
references (with fla's Hopper guard)."""

from __future__ import annotations

import os
import threading
import time
import warnings

import torch

L2_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (so tests can compare exactly)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def chunks(x: torch.Tensor, pad: int, C: int) -> torch.Tensor:
    """[B, T, H, D] → [B, H, N, C, D], zero-padded at the end to N·C steps."""
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
    B, Tp, H, D = x.shape
    return x.reshape(B, Tp // C, C, H, D).permute(0, 3, 1, 2, 4)


def expand_groups(q: torch.Tensor, k: torch.Tensor, value_heads: int):
    """Grouped value attention (fla's GVA): q/k head h serves value heads h·G … (h+1)·G − 1."""
    heads = q.shape[2]
    if value_heads == heads:
        return q, k
    if value_heads % heads:
        raise ValueError(f"{value_heads} value heads cannot share {heads} query/key heads evenly")
    group = value_heads // heads
    return q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)


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


def decoding(q: torch.Tensor) -> bool:
    """A few new tokens and no gradient: fla's fused recurrent kernels (one launch per step)."""
    return q.shape[1] <= 64 and not (torch.is_grad_enabled() and q.requires_grad)


def cu_long(cu_seqlens, device):
    return None if cu_seqlens is None else cu_seqlens.to(device, torch.long)


# --------------------------------------------------------------------------------------------------------------
# CUDA: flash-linear-attention
# --------------------------------------------------------------------------------------------------------------

LIFT_GUARD_ENV = "INFINITEVL_LIFT_FLA_HOPPER_GUARD"
_guard_checked: set[str] = set()  # the ops whose gradient check passed in this process
GUARDED_BACKWARDS: dict = {}  # op -> its gradient check, for the ops whose backward fla's Hopper guard refuses


def fla_available() -> bool:
    try:
        import fla.ops.gated_delta_rule  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def use_fla(x: torch.Tensor, backend: str, head_dim: int) -> bool:
    """One rule for every linear-mixer kernel (recurrence, short conv, gated norm): fla on CUDA, torch on CPU
    or when `backend="torch"`. Head dims under 32 (tiny test models) crashed fla's backward on the H100 here:
    they take the torch path."""
    if backend == "fla" and not x.is_cuda:
        raise RuntimeError("linear_backend='fla' needs CUDA tensors: flash-linear-attention's Triton kernels do "
                           "not run on CPU (use linear_backend='auto' or 'torch' there)")
    return fla_runs(x.device, backend, head_dim)


def fla_runs(device, backend: str, head_dim: int) -> bool:
    """`use_fla`'s rule for tensors on `device`."""
    cuda = torch.device(device).type == "cuda"
    return (backend == "fla" and cuda) or (backend == "auto" and cuda and head_dim >= 32 and fla_available())


def hopper_guard_active(device=None) -> bool:
    """fla 0.6 refuses the gated backward on Hopper with Triton in [3.4, 3.7.1) (fla issue #640)."""
    try:
        import fla.ops.common.chunk_o as chunk_o
        from fla.utils import TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except Exception:
        return False
    return bool(chunk_o.IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


def ensure_fla_backward_ok(device, op: str) -> None:
    """Where fla's guard would refuse the backward of `op`, lift it only if the user asked for it explicitly
    (env INFINITEVL_LIFT_FLA_HOPPER_GUARD=1) and only after a gradient check against the torch reference on
    this device passes (`GUARDED_BACKWARDS[op](device, head_dim)` -> relative errors). Otherwise fail with a
    message that says what to do."""
    if op in _guard_checked or not hopper_guard_active(device):
        return
    if os.environ.get(LIFT_GUARD_ENV) != "1":
        raise RuntimeError(
            f"flash-linear-attention refuses the {op} backward on Hopper GPUs with Triton in "
            "[3.4, 3.7.1) (fla issue #640). Install Triton >= 3.7.1, or set "
            f"{LIFT_GUARD_ENV}=1 to lift the guard after an automatic gradient check on this GPU."
        )
    _isolated(lambda: lift_hopper_guard_checked(device, op, GUARDED_BACKWARDS[op]))


def check_guarded_backwards(model, device) -> list[str]:
    """Before a training process's first step: the gradient check of every guarded op that the model's linear
    mixers run through fla on `device` (their `guarded_backward(device)`), where the guard applies. At the first
    backward-enabled call the check would compile fla's kernels in the middle of the first forward, on a thread of
    its own, while torch.compile's work on the layers before it is live; here it runs before anything compiles,
    once, and a failure stops the stage before it has spent anything. Returns the ops checked."""
    device = torch.device(device)
    if device.type != "cuda" or not hopper_guard_active(device):
        return []
    ops = sorted({op for m in model.modules()
                  if hasattr(m, "guarded_backward") and (op := m.guarded_backward(device))})
    for op in ops:
        ensure_fla_backward_ok(device, op)
    return ops


def _isolated(fn) -> None:
    """Runs `fn` on a thread of its own and re-raises what it raised. The first backward-enabled call can sit
    inside a checkpointed forward, whose saved-tensor hooks (thread-local) would otherwise record the check's
    own tensors and fail recomputation."""
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


def lift_hopper_guard_checked(device, op: str, check, rtol: float = 2e-2) -> dict:
    """Runs `op`'s fla kernel forward+backward with the guard lifted at head_dim 64 and 128 against the fp32
    torch reference; keeps the guard lifted only if every relative error is below `rtol`."""
    import fla.ops.common.chunk_o as chunk_o

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
