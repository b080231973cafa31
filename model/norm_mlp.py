"""The decoder's RMSNorm and SwiGLU MLP: Qwen2.5-VL's modules (same weights, same names), with fla's fused
Triton kernels on CUDA.

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

from .gdn_ops import fla_available
from .packed import PackedSwiGLU, packed


def use_fused(x: torch.Tensor) -> bool:
    return x.is_cuda and fla_available()


class RMSNorm(Qwen2_5_VLRMSNorm):
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x), or with `residual`: (RMSNorm(x + residual), x + residual)."""
        if use_fused(x):
            from fla.modules.norm.layernorm import rms_norm

            return rms_norm(x, self.weight, None, residual=residual, eps=self.variance_epsilon,
                            prenorm=residual is not None)
        if residual is None:
            return super().forward(x)
        x = x + residual
        return super().forward(x), x


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
