"""The decoder's RMSNorm and SwiGLU MLP: the teachers' modules (same weights, same names), with fla's fused
Triton kernels on CUDA. Qwen3.5's norms are zero-centred (weight w, scale 1 + w, computed in fp32): `offset=1`.

In eager PyTorch an RMSNorm is ~7 kernels that each read and write the whole activation in fp32 (at 128K
tokens of hidden 2048 that is ~1 GB a pass), the residual add before it one more, and SiLU(gate)·up two
more over the MLP's widest tensor. fla's kernels do the add and the norm in one read, and SiLU·up in one;
a decode step (36 layers, launch-bound) loses ~20 launches per layer with them. Elsewhere (CPU, or no fla)
the modules compute exactly what transformers' do.

Both are called as modules (not through their weights) so DeepSpeed ZeRO-3 gathers their parameters and
peft's LoRA wraps their projections as it would the originals.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import SiLUActivation
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP, Qwen2_5_VLRMSNorm, Qwen2MLP

from .ops.common import fla_available
from .packed import PackedSwiGLU, packed


def use_fused(x: torch.Tensor) -> bool:
    return x.is_cuda and fla_available()


class RMSNorm(Qwen2_5_VLRMSNorm):
    offset = 0.0  # the vision tower's norms become this class in place (fuse_vision_tower): no __init__ ran

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0):
        super().__init__(hidden_size, eps=eps)
        self.offset = offset
        if offset:
            self.weight.data.zero_()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x), or with `residual`: (RMSNorm(x + residual), x + residual)."""
        if use_fused(x):
            from fla.modules.norm.layernorm import rms_norm

            weight = self.weight if not self.offset else (self.weight.float() + self.offset).to(self.weight.dtype)
            return rms_norm(x, weight, None, residual=residual, eps=self.variance_epsilon,
                            prenorm=residual is not None)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offset:
            return super().forward(x)
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (normed * (self.offset + self.weight.float())).type_as(x)


def swiglu_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    pack = packed(mlp)
    if pack is not None:
        return pack(x, lambda gate, up: _activation(mlp, gate, up))
    return mlp.down_proj(_activation(mlp, mlp.gate_proj(x), mlp.up_proj(x)))


def _activation(mlp: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_fused(gate) and isinstance(mlp.act_fn, (nn.SiLU, SiLUActivation)):
        from fla.modules.activations import swiglu

        return swiglu(gate, up)
    return mlp.act_fn(gate) * up


class SwiGLUMLP(Qwen2MLP):
    PACKABLE, PACK = ("gate_proj", "up_proj", "down_proj"), PackedSwiGLU  # for inference: model/packed.py
    forward = swiglu_mlp


class VisionSwiGLUMLP(Qwen2_5_VLMLP):
    PACKABLE, PACK = ("gate_proj", "up_proj", "down_proj"), PackedSwiGLU
    forward = swiglu_mlp


def fuse_vision_tower(visual: nn.Module) -> None:
    """Gives the vision tower's RMSNorms and MLPs the fused forward above (the classes only change: the
    parameters, their names and the arithmetic off CUDA stay transformers')."""
    for module in visual.modules():
        if type(module) is Qwen2_5_VLRMSNorm:
            module.__class__ = RMSNorm
        elif type(module) is Qwen2_5_VLMLP:
            module.__class__ = VisionSwiGLUMLP
