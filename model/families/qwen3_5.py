"""Qwen3.5 (natively multimodal; 0.8B, 9B, 27B dense) → hybrid student; model_type "infinitevl_qwen3_5".

The teacher already mixes three Gated DeltaNet layers with one full-attention layer; that quarter still grows a KV
cache with the input. The student keeps the Gated DeltaNet layers weight for weight (the default `layer_types`
keeps them linear: Qwen3.5's fused in_proj_qkv and conv1d are split into fla's q/k/v projections and convs, a
depthwise conv being per channel, and its grouped value heads kept) and makes each full-attention layer
sliding-window attention with the teacher's weights: its output gate (q_proj also yields a per-channel gate,
the output is o_proj(attention · sigmoid(gate))), zero-centred q/k norms (scale 1 + w) and partial rotary (the
first quarter of each 256-wide head), interleaved M-RoPE. All its RMSNorms are zero-centred. Vision: Qwen3-VL's
tower without DeepStack; video time in the text, as Qwen3-VL.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from transformers import GenerationMixin, Qwen3_5Config
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig, Qwen3_5VisionConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import (
    Qwen3_5ForConditionalGeneration,
    Qwen3_5Model,
    Qwen3_5PreTrainedModel,
    Qwen3_5TextRotaryEmbedding,
    Qwen3_5VisionModel,
)

from ..config import AttentionSpec, ConfigError, HybridConfig, HybridTextFields
from ..layers import AttentionWeights, GatedDeltaNet
from ..modeling import HybridForConditionalGeneration, HybridModel, HybridPreTrainedModel, HybridTextModel
from ..processing import SPECIAL_TOKENS
from .base import Family
from .qwen3_vl import CHAT_TEMPLATE as QWEN3_VL_TEMPLATE

# Qwen3-VL's template, every assistant turn opened with an empty thinking block (Qwen3.5 answering directly): the
# generation prompt ends where a written answer starts, so a conversation renders as a prefix of itself with one
# more turn (the data stage finds the answers that way) and training sees what generation does
_THINK = "<think>\n\n</think>\n\n"
CHAT_TEMPLATE = QWEN3_VL_TEMPLATE.replace(
    "<|im_start|>{{ message['role'] }}\n",
    "<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}" + _THINK + "{% endif %}").replace(
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{% if add_generation_prompt %}<|im_start|>assistant\n" + _THINK + "{% endif %}")


@strict
class InfiniteVLQwen3_5TextConfig(HybridTextFields, Qwen3_5TextConfig):
    model_type = "infinitevl_qwen3_5_text"
    norm_offset = 1.0

    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec(head_dim=self.head_dim, qkv_bias=self.attention_bias, o_bias=self.attention_bias,
                             qk_norm=True, output_gate=True)


@strict
class InfiniteVLQwen3_5Config(HybridConfig, Qwen3_5Config):
    model_type = "infinitevl_qwen3_5"
    sub_configs_defaults = {"vision_config": Qwen3_5VisionConfig, "text_config": InfiniteVLQwen3_5TextConfig}
    sub_configs = {"vision_config": Qwen3_5VisionConfig, "text_config": InfiniteVLQwen3_5TextConfig}

    @classmethod
    def text_fields_from_teacher(cls, teacher_text) -> dict:
        """The linear layers' dims are the teacher's own Gated DeltaNet's."""
        text = super().text_fields_from_teacher(teacher_text)
        text.update(num_linear_heads=teacher_text.linear_num_key_heads,
                    num_linear_value_heads=teacher_text.linear_num_value_heads,
                    linear_head_dim=teacher_text.linear_key_head_dim,
                    expand_v=teacher_text.linear_value_head_dim / teacher_text.linear_key_head_dim,
                    conv_size=teacher_text.linear_conv_kernel_dim, norm_eps=teacher_text.rms_norm_eps)
        return text

    @classmethod
    def default_layer_types(cls, teacher_config, period: int = 4) -> list[str]:
        """The teacher's own layout: its linear layers stay linear, its full attention becomes sliding."""
        return ["linear_attention" if t == "linear_attention" else "sliding_attention"
                for t in teacher_config.text_config.layer_types]


class InfiniteVLQwen3_5PreTrainedModel(HybridPreTrainedModel, Qwen3_5PreTrainedModel):
    config: InfiniteVLQwen3_5Config
    config_class = InfiniteVLQwen3_5Config
    _no_split_modules = ["HybridDecoderLayer", "Qwen3_5VisionBlock"]


class InfiniteVLQwen3_5TextModel(HybridTextModel, InfiniteVLQwen3_5PreTrainedModel):
    config: InfiniteVLQwen3_5TextConfig
    config_class = InfiniteVLQwen3_5TextConfig
    rotary_class = Qwen3_5TextRotaryEmbedding


class InfiniteVLQwen3_5Model(HybridModel, Qwen3_5Model, InfiniteVLQwen3_5PreTrainedModel):
    config_class = InfiniteVLQwen3_5Config
    vision_class = Qwen3_5VisionModel
    text_class = InfiniteVLQwen3_5TextModel


class InfiniteVLQwen3_5ForConditionalGeneration(HybridForConditionalGeneration, Qwen3_5ForConditionalGeneration,
                                                InfiniteVLQwen3_5PreTrainedModel, GenerationMixin):
    config_class = InfiniteVLQwen3_5Config
    model_class = InfiniteVLQwen3_5Model


class Qwen3_5Family(Family):
    def teacher_layer_kind(self, teacher_text_config, i: int) -> str:
        return "linear_attention" if teacher_text_config.layer_types[i] == "linear_attention" else "attention"

    def teacher_mixer(self, teacher_layer):
        return teacher_layer.linear_attn if hasattr(teacher_layer, "linear_attn") else teacher_layer.self_attn

    def attention_weights(self, attn, text_config) -> AttentionWeights:
        """The query rows of q_proj, which holds [query | gate] per head."""
        n_q, n_kv, d = text_config.num_attention_heads, text_config.num_key_value_heads, text_config.head_dim
        q = attn.q_proj.weight.view(n_q, 2 * d, -1)[:, :d].reshape(n_q * d, -1)
        return AttentionWeights(q, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight, n_q, n_kv, d)

    @torch.no_grad()
    def carry_linear(self, mixer, teacher, text_config) -> None:
        """Qwen3.5's Gated DeltaNet into ours, weight for weight: in_proj_qkv and the depthwise conv1d split
        by channel into q/k/v, in_proj_z/a/b → g/a/b_proj, norm → o_norm, out_proj → o_proj."""
        if not isinstance(mixer, GatedDeltaNet):
            raise ConfigError(f"Qwen3.5's Gated DeltaNet layers carry over into linear_mixer='gated_deltanet' only, "
                              f"not {type(mixer).__name__}: keep linear_mixer='gated_deltanet' for this teacher")
        ours = (mixer.num_heads, mixer.num_v_heads, mixer.head_k_dim, mixer.head_v_dim, mixer.conv_size)
        theirs = (teacher.num_k_heads, teacher.num_v_heads, teacher.head_k_dim, teacher.head_v_dim,
                  teacher.conv_kernel_size)
        if ours != theirs:
            raise ConfigError(f"the linear layers' dims (num_linear_heads, num_linear_value_heads, linear_head_dim, "
                              f"head_v_dim, conv_size) = {ours} differ from the Qwen3.5 teacher's {theirs}: leave "
                              "them at the teacher's")
        if teacher.activation not in ("silu", "swish"):
            raise ConfigError(f"the teacher's Gated DeltaNet conv activation is {teacher.activation!r}; ours is SiLU")
        kd = mixer.key_dim
        for proj, rows in ((mixer.q_proj, slice(0, kd)), (mixer.k_proj, slice(kd, 2 * kd)),
                           (mixer.v_proj, slice(2 * kd, None))):
            proj.weight.copy_(teacher.in_proj_qkv.weight[rows])
        for conv, rows in ((mixer.q_conv1d, slice(0, kd)), (mixer.k_conv1d, slice(kd, 2 * kd)),
                           (mixer.v_conv1d, slice(2 * kd, None))):
            conv.weight.copy_(teacher.conv1d.weight[rows])
        for ours_, theirs_ in ((mixer.a_proj.weight, teacher.in_proj_a.weight),
                               (mixer.b_proj.weight, teacher.in_proj_b.weight),
                               (mixer.g_proj.weight, teacher.in_proj_z.weight), (mixer.A_log, teacher.A_log),
                               (mixer.dt_bias, teacher.dt_bias), (mixer.o_norm.weight, teacher.norm.weight),
                               (mixer.o_proj.weight, teacher.out_proj.weight)):
            ours_.copy_(theirs_)


def tiny_config(tokenizer, num_layers: int = 8, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 32, intermediate: int = 128, linear_heads: int = 2, linear_value_heads: int = 4,
                linear_head_dim: int = 16, vision_hidden: int = 32, vision_depth: int = 2) -> Qwen3_5Config:
    """Qwen3.5's proportions in small: full attention every 4th layer, head_dim twice hidden/heads, a quarter of
    it rotated, grouped value heads in the linear layers, untied embeddings."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    rotary_half = head_dim // 4 // 2
    return Qwen3_5Config(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            max_position_embeddings=32768, rms_norm_eps=1e-6, linear_conv_kernel_dim=4,
            linear_key_head_dim=linear_head_dim, linear_value_head_dim=linear_head_dim,
            linear_num_key_heads=linear_heads, linear_num_value_heads=linear_value_heads,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                             "mrope_section": [rotary_half - 2 * (rotary_half // 4), rotary_half // 4,
                                               rotary_half // 4], "partial_rotary_factor": 0.25},
            pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
            out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
            num_position_embeddings=64,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def published(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, value_heads: int,
              vision: tuple[int, int, int, int], tie: bool) -> Qwen3_5Config:
    """A Qwen3.5 config.json's shapes: vocabulary 248,320, attention heads of 256 (a quarter rotated) every 4th
    layer, Gated DeltaNet with 16 query/key heads of 128 and `value_heads` value heads of 128 elsewhere."""
    depth, width, inner, vision_heads = vision
    return Qwen3_5Config(
        text_config=dict(vocab_size=248320, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=256, max_position_embeddings=262144, rms_norm_eps=1e-6, linear_conv_kernel_dim=4,
                         linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
                         linear_num_value_heads=value_heads, tie_word_embeddings=tie,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e7, "mrope_interleaved": True,
                                          "mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25}),
        vision_config=dict(depth=depth, hidden_size=width, intermediate_size=inner, num_heads=vision_heads,
                           out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=2304),
        image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054,
        tie_word_embeddings=tie)


FAMILY = Qwen3_5Family(
    name="qwen3_5",
    teacher_model_type="qwen3_5",
    teacher_class=Qwen3_5ForConditionalGeneration,
    config_class=InfiniteVLQwen3_5Config,
    text_config_class=InfiniteVLQwen3_5TextConfig,
    text_model_class=InfiniteVLQwen3_5TextModel,
    base_model_class=InfiniteVLQwen3_5Model,
    model_class=InfiniteVLQwen3_5ForConditionalGeneration,
    rope_model_class=Qwen3_5Model,
    chat_template=CHAT_TEMPLATE,
    tiny_config=tiny_config,
    video_layout="qwen3_vl",
    image_processor=dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5],
                         image_std=[0.5, 0.5, 0.5]),
    extra_special_tokens=("<think>", "</think>"),
    packs_rows=False,
    published={
        "0.8B": lambda: published(1024, 3584, 24, 8, 2, 16, (12, 768, 3072, 12), True),
        "9B": lambda: published(4096, 12288, 32, 16, 4, 32, (27, 1152, 4304, 16), False),
        "27B": lambda: published(5120, 17408, 64, 24, 4, 48, (27, 1152, 4304, 16), False),
    },
)
