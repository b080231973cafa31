"""Stage III's LoRA adapters: peft's, whose linears add the adapter's product inside the GEMM that computes it.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`: two more passes over the layer's whole output forward
(scale, add) and one backward (scale the gradient). At 32K tokens that output is [32768, up to 4096] per
adapted projection, five per layer: ~1 GB of memory traffic per layer and pass.
`FusedLoraLinear` computes the same sum as `base(x)` followed by an in-place `addmm_(A x, Bᵀ, alpha=scaling)`:
cuBLAS reads the base output in its epilogue, and autograd's addmm backward folds the scale into the GEMMs
of the adapter gradients. Anything that path does not cover (several or merged adapters, DoRA or
other variants, mixed dtypes, ZeRO-3 shards, mixed-adapter batches) takes peft's own forward. Dropout
(on the adapter's input, as peft applies it) is kept.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear
from torch import nn


def add_lora(student, lora):
    """`student` wrapped by peft with the stage's adapters (`lora`: the stage's LoraSection, or a dict of its
    fields), their linears fused."""
    config = lora_config(lora)
    try:
        # adapters in the model's dtype: peft's default fp32 adapters turn every LoRA matmul into an fp32 (non tensor
        # core) GEMM plus casts of its input and output (~15% of a 32K step on the H200)
        model = get_peft_model(student, config, autocast_adapter_dtype=False)
    except ValueError as e:
        raise ValueError(f"train.stage3.lora.target_modules {config.target_modules} match no module of the "
                         f"student: {e}") from None
    fuse_lora_linears(model)
    return model


def lora_config(lora) -> LoraConfig:
    """peft's config for the stage's `lora` section (training and export build the same adapters)."""
    from pipeline.config import LoraSection

    lora = LoraSection.model_validate(lora) if isinstance(lora, dict) else lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), bias="none")


def fuse_lora_linears(model: nn.Module) -> int:
    """Gives every peft LoRA linear of `model` the fused forward (the class changes, nothing else: merging,
    saving and unloading see a subclass of peft's). Returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count


class FusedLoraLinear(Linear):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._fusable_adapter(x, args, kwargs)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        out = self.base_layer(flat)  # a fresh [N, out] tensor, not a view: addmm_ on it copies nothing
        low = self.lora_A[adapter](self.lora_dropout[adapter](flat))
        out.addmm_(low, self.lora_B[adapter].weight.t(), alpha=self.scaling[adapter])
        return out.view(*x.shape[:-1], out.shape[-1])

    def _fusable_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
        """The one active plain adapter, when the fused path computes what peft would; else None."""
        if args or any(v is not None for v in kwargs.values()) or self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant or x.dim() < 2:
            return None
        lora_A, lora_B = self.lora_A[active[0]], self.lora_B[active[0]]
        if type(self.base_layer) is not nn.Linear or lora_B.bias is not None:
            return None
        weights = (self.base_layer.weight, lora_A.weight, lora_B.weight)
        if any(hasattr(w, "ds_id") or w.dtype != x.dtype for w in weights):  # ZeRO-3 shards, casts
            return None
        return active[0]
