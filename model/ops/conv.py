"""The short causal depthwise convolution (+ SiLU) every short-conv mixer runs on its projections: torch taps
(CPU path, reference) and fla's Triton kernels (CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import cu_long


def short_conv(x: torch.Tensor, weight: torch.Tensor, seq_idx: torch.Tensor | None = None,
               state: torch.Tensor | None = None, bias: torch.Tensor | None = None):
    """Causal depthwise conv (+ channel bias) + SiLU. x [B, T, C]; weight [C, 1, K]; seq_idx [B, T] (document
    of each token, taps that reach into another document are dropped); state [B, C, K]: the last K inputs
    before x, newest last, of which the oldest is never read (fla's layout, so its update kernel can write
    the state in place). Returns (y [B, T, C], new state [B, C, K])."""
    B, T, C = x.shape
    K = weight.shape[-1]
    prev = x.new_zeros(B, K - 1, C) if state is None else state[..., 1:].transpose(1, 2).to(x.dtype)
    xs = torch.cat([prev, x], 1)  # [B, T+K-1, C]
    w = weight[:, 0, :].to(x.dtype)  # [C, K]; tap K-1 multiplies the current token
    y = x * w[:, K - 1]
    for j in range(1, K):
        tap = xs[:, K - 1 - j:K - 1 - j + T] * w[:, K - 1 - j]
        if seq_idx is not None:
            same = torch.zeros_like(seq_idx, dtype=torch.bool)
            same[:, j:] = seq_idx[:, j:] == seq_idx[:, :-j]
            tap = tap * same.unsqueeze(-1)
        y = y + tap
    if bias is not None:
        y = y + bias.to(x.dtype)
    return F.silu(y), xs[:, -K:].transpose(1, 2)


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
                             cu_seqlens=cu_long(cu_seqlens, x.device))
    return y, final


def seq_idx(cu_seqlens: torch.Tensor, T: int, device) -> torch.Tensor:
    """[1, T]: the document of every token of a packed row."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    if int(cu_seqlens[-1]) != T:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the packed sequence has {T} tokens")
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths).unsqueeze(0)
