"""Packed input projections for inference: the linears that read one input run as one GEMM.

A decode step reads every decoder weight once, and at batch ≤ 8 each projection is a thin GEMM bound by
that read; a weight of a few MB is too little work to reach the card's bandwidth (bench/projection_gemms.py:
on the H200, Gated DeltaNet's six input GEMMs take 2.3× as long as one over the six weights packed). Gated
DeltaNet reads six weights from one input (q k v g a b, two of them 16 rows), sliding attention three
(q k v) and each MLP two (gate, up): packed, each group is one GEMM whose output is split.

An MLP's hidden width is also padded to a multiple of 8 with zero weights: Qwen2.5-VL's vision MLP is 3420
wide, and cuBLAS serves GEMMs with such a leading dimension only from slow 2-byte-aligned kernels (a
streamed frame spent 5.5 ms in them on the H200). A zero channel adds exactly zero, so outputs are unchanged.

Packing moves each linear's weight (and bias) into the packed tensor: the parameters stay the same objects
with the same names, shapes and values (only their storage is shared), so state dicts, saving, LoRA and an
optimizer that holds them see no change. Forward passes without autograd take the packed GEMMs; with
autograd the linears run one by one as before. Whatever gives a parameter new storage (`model.to(...)`,
DeepSpeed's flat buffers) leaves the pack stale: every call checks, and falls back to the linears.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ALIGN = 8  # elements: 16 bytes in bf16, what cuBLAS's fast kernels want of every leading dimension


class _Pack:
    """Parameters moved into a pack; `current()` says whether they still live there."""

    def _settle(self, params: list[nn.Parameter]) -> None:
        self._params = params
        self._homes = [p.data_ptr() for p in params]

    def current(self) -> bool:
        return [p.data_ptr() for p in self._params] == self._homes

    def __deepcopy__(self, memo):
        return None  # a copied model's parameters have storage of their own: the copy starts unpacked


def _stack_rows(parts: list[torch.Tensor | None], rows: list[int], padded: list[int], like: torch.Tensor):
    """One tensor holding `parts` one after another along dim 0, each padded with zeros to its `padded`
    rows (a missing part is all zeros), and the views of it where each part now lives."""
    shape = (sum(padded), *like.shape[1:])
    out = like.new_zeros(shape)
    views, start = [], 0
    for part, n, p in zip(parts, rows, padded):
        view = out[start:start + n]
        if part is not None:
            view.copy_(part.detach())
        views.append(view)
        start += p
    return out, views


def _move(params: list[nn.Parameter | None], views: list[torch.Tensor]) -> list[nn.Parameter]:
    moved = []
    for p, view in zip(params, views):
        if p is not None:
            p.data = view
            moved.append(p)
    return moved


class PackedLinears(_Pack):
    """Linears over one input as one GEMM; the call returns each linear's output (views of one tensor)."""

    @staticmethod
    def fits(linears: list[nn.Linear]) -> bool:
        return len({lin.in_features for lin in linears}) == 1

    def __init__(self, linears: list[nn.Linear]):
        self.sizes = [lin.out_features for lin in linears]
        weights, biases = [lin.weight for lin in linears], [lin.bias for lin in linears]
        with torch.no_grad():
            self.weight, w_views = _stack_rows(weights, self.sizes, self.sizes, weights[0])
            self.bias, b_views = None, []
            if any(b is not None for b in biases):
                self.bias, b_views = _stack_rows(biases, self.sizes, self.sizes, weights[0][0])
        self._settle(_move(weights, w_views) + _move(biases, b_views))

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))


class PackedSwiGLU(_Pack):
    """An MLP's gate and up as one GEMM, then its down projection, the hidden width padded to a multiple of
    `ALIGN`; built from [gate, up, down], called with the activation (gate, up) → hidden."""

    @staticmethod
    def fits(linears: list[nn.Linear]) -> bool:
        gate, up, down = linears
        return gate.in_features == up.in_features and gate.out_features == up.out_features == down.in_features

    def __init__(self, linears: list[nn.Linear]):
        gate, up, down = linears
        width = gate.out_features
        self.width = -(-width // ALIGN) * ALIGN
        rows, padded = [width, width], [self.width, self.width]
        with torch.no_grad():
            self.gate_up, w_views = _stack_rows([gate.weight, up.weight], rows, padded, gate.weight)
            self.gate_up_bias, b_views = None, []
            if gate.bias is not None or up.bias is not None:
                self.gate_up_bias, b_views = _stack_rows([gate.bias, up.bias], rows, padded, gate.weight[0])
            self.down = down.weight.new_zeros(down.out_features, self.width)  # zero columns past `width`
            self.down[:, :width].copy_(down.weight.detach())
        self.down_bias = down.bias
        moved = _move([gate.weight, up.weight], w_views) + _move([gate.bias, up.bias], b_views)
        self._settle(moved + _move([down.weight], [self.down[:, :width]]))

    def __call__(self, x: torch.Tensor, activation) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up, self.gate_up_bias).split(self.width, dim=-1)
        return F.linear(activation(gate, up), self.down, self.down_bias)


def packed(module: nn.Module):
    """The module's pack where it has one that is current and no gradient is wanted, else None."""
    pack = getattr(module, "packed", None)
    return pack if pack is not None and not torch.is_grad_enabled() and pack.current() else None


def project(module: nn.Module, x: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
    """The outputs of `module`'s linears `names` on `x`: one packed GEMM where that is possible, else one
    linear at a time."""
    pack = packed(module)
    return pack(x) if pack is not None else [getattr(module, name)(x) for name in names]


def pack_projections(model: nn.Module) -> int:
    """Packs every module's `PACKABLE` linears into its `PACK` class (default PackedLinears; call it once the model is on its device, for inference).
    Groups already packed, or whose linears are not plain `nn.Linear` (a LoRA adapter kept unmerged), hold
    ZeRO-3 shards, or differ in dtype or device, are left as they are. Returns how many groups are
    packed now."""
    count = 0
    for module in model.modules():
        names = getattr(module, "PACKABLE", None)
        if not names:
            continue
        if getattr(module, "packed", None) is not None and module.packed.current():
            count += 1
            continue
        linears = [getattr(module, name) for name in names]
        pack = getattr(module, "PACK", PackedLinears)
        if not (_plain(linears) and pack.fits(linears)):
            continue
        module.packed = pack(linears)
        count += 1
    return count


def _plain(linears: list[nn.Module]) -> bool:
    """Plain linears of one dtype on one device, holding their whole weights."""
    if not all(type(lin) is nn.Linear for lin in linears):
        return False
    like = (linears[0].weight.dtype, linears[0].weight.device)
    return all((lin.weight.dtype, lin.weight.device) == like
               and lin.weight.shape == (lin.out_features, lin.in_features) for lin in linears)
