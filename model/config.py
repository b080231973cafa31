"""InfiniteVL configuration: Qwen2.5-VL's vision and text configs plus the hybrid decoder's fields.

`layer_types` has one entry per decoder layer, "sliding_attention" (the teacher's GQA attention with a
window of `sliding_window` tokens) or "linear_attention" (a Gated DeltaNet mixer). The Gated DeltaNet
dimensions default to the teacher's attention: as many heads as the teacher has query heads, its
head_dim, and values expanded by `expand_v` (3B teacher: 16 heads × 128, expand_v 2, state 16×128×256).
`linear_mixer` picks the recurrence of every linear layer: "gated_deltanet" (the paper's model), or "gla" /
"mamba2" for the paper's linear-mixer ablation (model/linear_mixers.py, sized from the same fields).
Field names follow the authors' released config (num_linear_heads, linear_head_dim, expand_v, conv_size,
norm_eps) so configs move between the two without renaming.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)

LAYER_TYPES = ("sliding_attention", "linear_attention")
LINEAR_MIXERS = ("gated_deltanet", "gla", "mamba2")


class ConfigError(ValueError):
    """A bad InfiniteVL config; the message names the field."""


def default_layer_types(num_layers: int, period: int = 4) -> list[str]:
    """One sliding-window layer then (period-1) Gated DeltaNet layers, repeated (paper default 1:3)."""
    return ["sliding_attention" if i % period == 0 else "linear_attention" for i in range(num_layers)]


@strict
class InfiniteVLTextConfig(Qwen2_5_VLTextConfig):
    model_type = "infinitevl_text"

    use_sliding_window: bool | None = True
    sliding_window: int | None = 8192
    num_linear_heads: int | None = None
    num_linear_key_value_heads: int | None = None
    linear_head_dim: int | None = None
    expand_v: float = 2.0
    conv_size: int = 4
    linear_mixer: str = "gated_deltanet"
    norm_eps: float = 1e-6
    linear_backend: str = "auto"
    attention_backend: str = "auto"

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        self.use_sliding_window = True
        if self.num_linear_heads is None:
            self.num_linear_heads = self.num_attention_heads
        if self.num_linear_key_value_heads is None:
            self.num_linear_key_value_heads = self.num_linear_heads
        if self.linear_head_dim is None and self.num_attention_heads:
            self.linear_head_dim = self.hidden_size // self.num_attention_heads
        _validate_text(self)
        super().__post_init__(**kwargs)
        self.sliding_window = self.sliding_window  # the parent drops it when use_sliding_window is off

    @property
    def head_v_dim(self) -> int:
        return int(self.linear_head_dim * self.expand_v)


def _validate_text(c: InfiniteVLTextConfig) -> None:
    if not isinstance(c.layer_types, (list, tuple)):
        raise ConfigError(f"layer_types must be a list, got {type(c.layer_types).__name__}")
    if len(c.layer_types) != c.num_hidden_layers:
        raise ConfigError(f"layer_types has {len(c.layer_types)} entries but num_hidden_layers is "
                          f"{c.num_hidden_layers}: give one entry per decoder layer")
    for i, t in enumerate(c.layer_types):
        if t not in LAYER_TYPES:
            raise ConfigError(f"layer_types[{i}] is {t!r}; allowed: {', '.join(LAYER_TYPES)}")
    if c.sliding_window is None or int(c.sliding_window) < 1:
        raise ConfigError(f"sliding_window must be a positive number of tokens, got {c.sliding_window!r}")
    if c.hidden_size % c.num_attention_heads:
        raise ConfigError(f"hidden_size {c.hidden_size} is not divisible by num_attention_heads "
                          f"{c.num_attention_heads}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(f"num_attention_heads {c.num_attention_heads} is not divisible by num_key_value_heads "
                          f"{c.num_key_value_heads}")
    if c.num_linear_heads < 1 or c.num_linear_key_value_heads < 1:
        raise ConfigError("num_linear_heads and num_linear_key_value_heads must be positive")
    if c.num_linear_heads % c.num_linear_key_value_heads:
        raise ConfigError(f"num_linear_heads {c.num_linear_heads} is not divisible by num_linear_key_value_heads "
                          f"{c.num_linear_key_value_heads}")
    if c.num_linear_key_value_heads != c.num_linear_heads:
        raise ConfigError("num_linear_key_value_heads must equal num_linear_heads (grouped Gated DeltaNet heads "
                          "are not supported by the kernels we use)")
    if not c.linear_head_dim or c.linear_head_dim < 1:
        raise ConfigError(f"linear_head_dim must be positive, got {c.linear_head_dim!r}")
    if abs(c.linear_head_dim * c.expand_v - round(c.linear_head_dim * c.expand_v)) > 1e-6:
        raise ConfigError(f"expand_v {c.expand_v} × linear_head_dim {c.linear_head_dim} is not a whole number")
    if c.conv_size < 1:
        raise ConfigError(f"conv_size must be ≥ 1, got {c.conv_size}")
    if c.linear_mixer not in LINEAR_MIXERS:
        raise ConfigError(f"linear_mixer is {c.linear_mixer!r}; allowed: {', '.join(LINEAR_MIXERS)}")
    if c.linear_backend not in ("auto", "torch", "fla"):
        raise ConfigError(f"linear_backend is {c.linear_backend!r}; allowed: auto, torch, fla")
    if c.attention_backend not in ("auto", "sdpa", "flex", "flash"):
        raise ConfigError(f"attention_backend is {c.attention_backend!r}; allowed: auto, sdpa, flex, flash")


@strict
class InfiniteVLConfig(Qwen2_5_VLConfig):
    model_type = "infinitevl"
    sub_configs_defaults = {"vision_config": Qwen2_5_VLVisionConfig, "text_config": InfiniteVLTextConfig}
    sub_configs = {"vision_config": Qwen2_5_VLVisionConfig, "text_config": InfiniteVLTextConfig}

    def __post_init__(self, **kwargs):
        if isinstance(self.text_config, Qwen2_5_VLTextConfig) and not isinstance(self.text_config,
                                                                                 InfiniteVLTextConfig):
            self.text_config = self.text_config.to_dict()
        if isinstance(self.text_config, dict):
            self.text_config = {k: v for k, v in self.text_config.items() if k != "model_type"}
        super().__post_init__(**kwargs)

    @classmethod
    def from_teacher(cls, teacher_config: Qwen2_5_VLConfig, layer_types=None, **text_overrides) -> "InfiniteVLConfig":
        """The student's config: the teacher's, with the hybrid decoder fields (`text_overrides` may set any
        InfiniteVLTextConfig field, e.g. sliding_window, num_linear_heads, expand_v)."""
        text = teacher_config.text_config.to_dict()
        for k in ("model_type", "layer_types", "use_sliding_window", "sliding_window", "max_window_layers",
                  "transformers_version", "architectures"):
            text.pop(k, None)
        text.update(text_overrides)
        if layer_types is not None:
            text["layer_types"] = list(layer_types)
        top = teacher_config.to_dict()
        keep = {k: top[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                    "vision_end_token_id", "tie_word_embeddings") if k in top}
        vision = teacher_config.vision_config.to_dict()
        vision.pop("model_type", None)
        return cls(text_config=text, vision_config=vision, **keep)
