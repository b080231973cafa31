"""Which parameters train: named groups (config, not code) resolved against a model's parameter names.

Groups: linear_attn (the linear mixers: Gated DeltaNet, GLA or Mamba2, every parameter under a linear layer's
self_attn), sliding_attn (sliding-window attention), mlp, norms, embeddings,
lm_head, vision (the ViT blocks and patch embedding), merger, lora (peft adapters), all; or `re:<regex>`.
A group that matches nothing is a config error, raised before the first step.
"""

from __future__ import annotations

import re

from torch import nn

GROUPS = ("linear_attn", "sliding_attn", "mlp", "norms", "embeddings", "lm_head", "vision", "merger", "lora", "all")


def group_of_layer_mixers(layer_types: list[str], kind: str) -> re.Pattern:
    layers = "|".join(str(i) for i, t in enumerate(layer_types) if t == kind) or "-1"
    return re.compile(rf"language_model\.layers\.({layers})\.self_attn\.")


def _matchers(layer_types: list[str]) -> dict[str, callable]:
    linear = group_of_layer_mixers(layer_types, "linear_attention")
    sliding = group_of_layer_mixers(layer_types, "sliding_attention")
    return {
        "linear_attn": lambda n: bool(linear.search(n)) and "lora_" not in n,
        "sliding_attn": lambda n: bool(sliding.search(n)) and "lora_" not in n,
        "mlp": lambda n: "language_model.layers." in n and ".mlp." in n and "lora_" not in n,
        "norms": lambda n: "language_model." in n and ("layernorm" in n or n.endswith("language_model.norm.weight")),
        "embeddings": lambda n: "embed_tokens" in n,
        "lm_head": lambda n: n.endswith("lm_head.weight"),
        "vision": lambda n: ".visual." in n and ".merger." not in n,
        "merger": lambda n: ".visual.merger." in n,
        "lora": lambda n: "lora_" in n,
        "all": lambda n: "lora_" not in n,
    }


def select_trainable(model: nn.Module, groups: list[str], layer_types: list[str]) -> dict[str, int]:
    """Sets requires_grad by group; returns the number of trainable parameters per group."""
    matchers = _matchers(layer_types)
    chosen = {}
    for g in groups:
        if g.startswith("re:"):
            pattern = re.compile(g[3:])
            chosen[g] = lambda n, p=pattern: bool(p.search(n))
        elif g in matchers:
            chosen[g] = matchers[g]
        else:
            raise ValueError(f"trainable: unknown group {g!r}; groups: {', '.join(GROUPS)}, or re:<regex>")
    counts = dict.fromkeys(chosen, 0)
    for name, p in model.named_parameters():
        hit = [g for g, match in chosen.items() if match(name)]
        p.requires_grad_(bool(hit))
        for g in hit:
            counts[g] += p.numel()
    empty = [g for g, c in counts.items() if c == 0]
    if empty:
        raise ValueError(f"trainable: group(s) {', '.join(empty)} match no parameter of this model")
    return counts
