"""The hybrid student's configuration, shared by every teacher family.

Each family's student text config (model/families/*.py) is its teacher's text config plus the fields below
(`HybridTextFields`); its top-level config is the teacher's, with that text config (`HybridConfig`).

`layer_types` has one entry per decoder layer, "sliding_attention" (the teacher's attention with a window of
`sliding_window` tokens) or "linear_attention" (a linear mixer, `linear_mixer`: one of `model.layers.MIXERS`,
each of which may refuse dims it cannot run). The linear mixers' dims default to the teacher's attention: as many
heads as the teacher has query heads, its head_dim, values expanded by `expand_v` (3B teacher: 16 heads × 128,
expand_v 2, state 16×128×256); `num_linear_value_heads` > `num_linear_heads` is fla's grouped value attention
(Qwen3.5's own Gated DeltaNet: 16 query/key heads, 32 or 48 value heads).
Field names follow the authors' released config (num_linear_heads, linear_head_dim, expand_v, conv_size,
norm_eps) so configs move between the two without renaming.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict

LAYER_TYPES = ("sliding_attention", "linear_attention")
TOP_LEVEL_IDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
                 "tie_word_embeddings")


class ConfigError(ValueError):
    """A bad InfiniteVL config; the message names the field."""


def default_layer_types(num_layers: int, period: int = 4) -> list[str]:
    """One sliding-window layer then (period-1) linear layers, repeated (paper default 1:3)."""
    return ["sliding_attention" if i % period == 0 else "linear_attention" for i in range(num_layers)]


@dataclass(frozen=True)
class AttentionSpec:
    """How a family's attention is laid out (read by model.layers.attention)."""

    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    output_gate: bool = False


@strict
@dataclasses.dataclass(kw_only=True)
class HybridTextFields:
    """The fields a family's student text config adds to its teacher's (module docstring)."""

    layer_types: list[str] | None = None
    use_sliding_window: bool | None = True
    sliding_window: int | None = 8192
    num_linear_heads: int | None = None
    num_linear_key_value_heads: int | None = None
    num_linear_value_heads: int | None = None
    linear_head_dim: int | None = None
    expand_v: float = 2.0
    conv_size: int = 4
    linear_mixer: str = "gated_deltanet"
    norm_eps: float = 1e-6
    linear_backend: str = "auto"
    attention_backend: str = "auto"

    norm_offset = 0.0  # 1.0 where the family's RMSNorms scale by 1 + w (Qwen3.5); a class attribute, not a field

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers)
        self.use_sliding_window = True
        if self.num_linear_heads is None:
            self.num_linear_heads = self.num_attention_heads
        if self.num_linear_key_value_heads is None:
            self.num_linear_key_value_heads = self.num_linear_heads
        if self.num_linear_value_heads is None:
            self.num_linear_value_heads = self.num_linear_heads
        if self.linear_head_dim is None and self.num_attention_heads:
            self.linear_head_dim = self.attention_head_dim
        _validate_text(self)
        super().__post_init__(**kwargs)
        self.sliding_window = self.sliding_window  # Qwen2.5-VL's parent drops it when use_sliding_window is off

    @property
    def attention_head_dim(self) -> int:
        return getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads

    @property
    def head_v_dim(self) -> int:
        return int(round(self.linear_head_dim * self.expand_v))

    def attention_spec(self) -> AttentionSpec:
        raise NotImplementedError(f"{type(self).__name__} must say how its family's attention is laid out")


def _validate_text(c) -> None:
    from .layers import MIXERS

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
    if getattr(c, "head_dim", None) is None and c.hidden_size % c.num_attention_heads:
        raise ConfigError(f"hidden_size {c.hidden_size} is not divisible by num_attention_heads "
                          f"{c.num_attention_heads}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(f"num_attention_heads {c.num_attention_heads} is not divisible by num_key_value_heads "
                          f"{c.num_key_value_heads}")
    if c.num_linear_heads < 1 or c.num_linear_key_value_heads < 1 or c.num_linear_value_heads < 1:
        raise ConfigError("num_linear_heads, num_linear_key_value_heads and num_linear_value_heads must be positive")
    if c.num_linear_heads % c.num_linear_key_value_heads:
        raise ConfigError(f"num_linear_heads {c.num_linear_heads} is not divisible by num_linear_key_value_heads "
                          f"{c.num_linear_key_value_heads}")
    if c.num_linear_key_value_heads != c.num_linear_heads:
        raise ConfigError("num_linear_key_value_heads must equal num_linear_heads (grouped key heads are not "
                          "supported by the kernels we use; grouped value heads are: num_linear_value_heads)")
    if c.num_linear_value_heads % c.num_linear_heads:
        raise ConfigError(f"num_linear_value_heads {c.num_linear_value_heads} is not a multiple of "
                          f"num_linear_heads {c.num_linear_heads}")
    if not c.linear_head_dim or c.linear_head_dim < 1:
        raise ConfigError(f"linear_head_dim must be positive, got {c.linear_head_dim!r}")
    if abs(c.linear_head_dim * c.expand_v - round(c.linear_head_dim * c.expand_v)) > 1e-6:
        raise ConfigError(f"expand_v {c.expand_v} × linear_head_dim {c.linear_head_dim} is not a whole number")
    if c.conv_size < 1:
        raise ConfigError(f"conv_size must be ≥ 1, got {c.conv_size}")
    if c.linear_mixer not in MIXERS:
        raise ConfigError(f"linear_mixer is {c.linear_mixer!r}; allowed: {', '.join(MIXERS)}")
    if "linear_attention" in c.layer_types:
        MIXERS[c.linear_mixer].check_config(c)
    if c.linear_backend not in ("auto", "torch", "fla"):
        raise ConfigError(f"linear_backend is {c.linear_backend!r}; allowed: auto, torch, fla")
    if c.attention_backend not in ("auto", "sdpa", "flex", "flash"):
        raise ConfigError(f"attention_backend is {c.attention_backend!r}; allowed: auto, sdpa, flex, flash")


class HybridConfig:
    """Mixed into a family's student config (before the teacher's config class): accepts the teacher's text
    config (object or dict) for its own, and builds itself from a teacher config (`from_teacher`)."""

    def __post_init__(self, **kwargs):
        text_cls = self.sub_configs["text_config"]
        if self.text_config is not None and not isinstance(self.text_config, (dict, text_cls)):
            self.text_config = self.text_config.to_dict()
        if isinstance(self.text_config, dict):
            self.text_config = {k: v for k, v in self.text_config.items() if k != "model_type"}
        super().__post_init__(**kwargs)

    @classmethod
    def text_fields_from_teacher(cls, teacher_text) -> dict:
        """The student text config's fields from the teacher's text config (a family may add the dims of its
        own linear layers)."""
        text = teacher_text.to_dict()
        for k in ("model_type", "layer_types", "use_sliding_window", "sliding_window", "max_window_layers",
                  "transformers_version", "architectures"):
            text.pop(k, None)
        return text

    @classmethod
    def default_layer_types(cls, teacher_config, period: int = 4) -> list[str]:
        return default_layer_types(teacher_config.text_config.num_hidden_layers, period)

    @classmethod
    def from_teacher(cls, teacher_config, layer_types=None, **text_overrides):
        """The student's config: the teacher's, with the hybrid decoder fields (`text_overrides` may set any
        hybrid text field, e.g. sliding_window, num_linear_heads, expand_v, linear_mixer)."""
        text = cls.text_fields_from_teacher(teacher_config.text_config)
        text.update(text_overrides)
        text["layer_types"] = list(layer_types) if layer_types is not None else \
            text.get("layer_types") or cls.default_layer_types(teacher_config)
        top = teacher_config.to_dict()
        keep = {k: top[k] for k in TOP_LEVEL_IDS if k in top}
        vision = teacher_config.vision_config.to_dict()
        vision.pop("model_type", None)
        return cls(text_config=text, vision_config=vision, **keep)


def __getattr__(name):
    # the Qwen2.5-VL student's classes under their historical home (model/families/qwen2_5_vl.py defines them)
    if name in ("InfiniteVLConfig", "InfiniteVLTextConfig"):
        from .families import qwen2_5_vl

        return getattr(qwen2_5_vl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
