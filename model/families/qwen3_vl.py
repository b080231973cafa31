"""Qwen3-VL dense (2B, 4B, 8B, 32B) → hybrid student; model_type "infinitevl_qwen3_vl".

The teacher: a vision tower with learned, interpolated position embeddings and DeepStack (features of some
vision layers, merged like the last one, added to the hidden states of the first decoder layers at the visual
positions), a Qwen3 decoder (no biases, RMSNorm on each head's q and k before the rotation, head_dim 128 whatever
the hidden size) and interleaved M-RoPE (t/h/w frequencies interleaved, not in blocks); video time is text:
each temporal patch is written `<t seconds>` + its own vision-start … vision-end run. The student keeps all of it
exactly; every teacher layer is attention, kept (sliding window) or replaced by a linear mixer started from it.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import GenerationMixin, Qwen3VLConfig
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLPreTrainedModel,
    Qwen3VLTextRotaryEmbedding,
    Qwen3VLVisionModel,
)

from ..config import AttentionSpec, HybridConfig, HybridTextFields
from ..modeling import HybridForConditionalGeneration, HybridModel, HybridPreTrainedModel, HybridTextModel
from ..processing import SPECIAL_TOKENS
from .base import Family

# Qwen3-VL's chat template, tools left out: no default system turn, images and videos as vision-start/pad/end
# triples (the processor writes a video frame by frame).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@strict
class InfiniteVLQwen3VLTextConfig(HybridTextFields, Qwen3VLTextConfig):
    model_type = "infinitevl_qwen3_vl_text"

    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec(head_dim=self.head_dim, qkv_bias=self.attention_bias, o_bias=self.attention_bias,
                             qk_norm=True)


@strict
class InfiniteVLQwen3VLConfig(HybridConfig, Qwen3VLConfig):
    model_type = "infinitevl_qwen3_vl"
    sub_configs_defaults = {"vision_config": Qwen3VLVisionConfig, "text_config": InfiniteVLQwen3VLTextConfig}
    sub_configs = {"vision_config": Qwen3VLVisionConfig, "text_config": InfiniteVLQwen3VLTextConfig}


class InfiniteVLQwen3VLPreTrainedModel(HybridPreTrainedModel, Qwen3VLPreTrainedModel):
    config: InfiniteVLQwen3VLConfig
    config_class = InfiniteVLQwen3VLConfig
    _no_split_modules = ["HybridDecoderLayer", "Qwen3VLVisionBlock"]


class InfiniteVLQwen3VLTextModel(HybridTextModel, InfiniteVLQwen3VLPreTrainedModel):
    config: InfiniteVLQwen3VLTextConfig
    config_class = InfiniteVLQwen3VLTextConfig
    rotary_class = Qwen3VLTextRotaryEmbedding


class InfiniteVLQwen3VLModel(HybridModel, Qwen3VLModel, InfiniteVLQwen3VLPreTrainedModel):
    config_class = InfiniteVLQwen3VLConfig
    vision_class = Qwen3VLVisionModel
    text_class = InfiniteVLQwen3VLTextModel


class InfiniteVLQwen3VLForConditionalGeneration(HybridForConditionalGeneration, Qwen3VLForConditionalGeneration,
                                                InfiniteVLQwen3VLPreTrainedModel, GenerationMixin):
    config_class = InfiniteVLQwen3VLConfig
    model_class = InfiniteVLQwen3VLModel


def mrope_sections(head_dim: int) -> list[int]:
    """t/h/w shares of head_dim/2 frequencies in Qwen3-VL's proportions (24/20/20 of 64 at head_dim 128)."""
    half = head_dim // 2
    h = half * 20 // 64
    return [half - 2 * h, h, h]


def tiny_config(tokenizer, num_layers: int = 8, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                head_dim: int = 16, intermediate: int = 128, vision_hidden: int = 32, vision_depth: int = 3,
                deepstack: tuple[int, ...] = (0, 1)) -> Qwen3VLConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            max_position_embeddings=32768, rms_norm_eps=1e-6, attention_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                             "mrope_section": mrope_sections(head_dim)},
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
            out_hidden_size=hidden, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
            num_position_embeddings=64, deepstack_visual_indexes=list(deepstack),
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def published(hidden: int, intermediate: int, layers: int, heads: int, tie: bool, vision: str) -> Qwen3VLConfig:
    """A Qwen3-VL-*-Instruct config.json's shapes: 8 KV heads of 128, vocabulary 151,936; the small vision tower
    (24 blocks of 1024, DeepStack after blocks 5/11/17) for 2B and 4B, the large one (27 of 1152, 8/16/24) above."""
    depth, width, inner, deepstack = (24, 1024, 4096, [5, 11, 17]) if vision == "small" else \
        (27, 1152, 4304, [8, 16, 24])
    return Qwen3VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=262144, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_interleaved": True,
                                          "mrope_section": [24, 20, 20]}),
        vision_config=dict(depth=depth, hidden_size=width, intermediate_size=inner, num_heads=16, out_hidden_size=hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                           deepstack_visual_indexes=deepstack),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=tie)


FAMILY = Family(
    name="qwen3_vl",
    teacher_model_type="qwen3_vl",
    teacher_class=Qwen3VLForConditionalGeneration,
    config_class=InfiniteVLQwen3VLConfig,
    text_config_class=InfiniteVLQwen3VLTextConfig,
    text_model_class=InfiniteVLQwen3VLTextModel,
    base_model_class=InfiniteVLQwen3VLModel,
    model_class=InfiniteVLQwen3VLForConditionalGeneration,
    rope_model_class=Qwen3VLModel,
    chat_template=CHAT_TEMPLATE,
    tiny_config=tiny_config,
    video_layout="qwen3_vl",
    image_processor=dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5],
                         image_std=[0.5, 0.5, 0.5]),
    published={
        "2B": lambda: published(2048, 6144, 28, 16, True, "small"),
        "4B": lambda: published(2560, 9728, 36, 32, True, "small"),
        "8B": lambda: published(4096, 12288, 36, 32, False, "large"),
        "32B": lambda: published(5120, 25600, 64, 64, False, "large"),
    },
)
