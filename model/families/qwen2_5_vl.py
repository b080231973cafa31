"""Qwen2.5-VL (3B, 7B, 32B, 72B) → InfiniteVL, the paper's conversion; model_type "infinitevl".

The teacher: Qwen2.5-VL's windowed vision tower and merger, a Qwen2 decoder (GQA attention with q/k/v biases,
no q/k norms) and sectioned M-RoPE (head_dim/2 frequencies split into t/h/w blocks), video time in
`second_per_grid_ts`. Every teacher layer is attention: the student keeps it (sliding window) or replaces it with
a linear mixer started from it.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import GenerationMixin, Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLRotaryEmbedding,
)

from ..config import AttentionSpec, HybridConfig, HybridTextFields
from ..modeling import HybridForConditionalGeneration, HybridModel, HybridPreTrainedModel, HybridTextModel
from ..processing import CHAT_TEMPLATE, SPECIAL_TOKENS
from .base import Family


@strict
class InfiniteVLTextConfig(HybridTextFields, Qwen2_5_VLTextConfig):
    model_type = "infinitevl_text"

    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec(head_dim=self.attention_head_dim, qkv_bias=True, o_bias=False)


@strict
class InfiniteVLConfig(HybridConfig, Qwen2_5_VLConfig):
    model_type = "infinitevl"
    sub_configs_defaults = {"vision_config": Qwen2_5_VLVisionConfig, "text_config": InfiniteVLTextConfig}
    sub_configs = {"vision_config": Qwen2_5_VLVisionConfig, "text_config": InfiniteVLTextConfig}


class InfiniteVLPreTrainedModel(HybridPreTrainedModel, Qwen2_5_VLPreTrainedModel):
    config: InfiniteVLConfig
    config_class = InfiniteVLConfig
    _no_split_modules = ["HybridDecoderLayer", "Qwen2_5_VLVisionBlock"]


class InfiniteVLTextModel(HybridTextModel, InfiniteVLPreTrainedModel):
    config: InfiniteVLTextConfig
    config_class = InfiniteVLTextConfig
    rotary_class = Qwen2_5_VLRotaryEmbedding


class InfiniteVLModel(HybridModel, Qwen2_5_VLModel, InfiniteVLPreTrainedModel):
    config_class = InfiniteVLConfig
    vision_class = Qwen2_5_VisionTransformerPretrainedModel
    text_class = InfiniteVLTextModel


class InfiniteVLForConditionalGeneration(HybridForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                                         InfiniteVLPreTrainedModel, GenerationMixin):
    config_class = InfiniteVLConfig
    model_class = InfiniteVLModel


def tiny_config(tokenizer, num_layers: int = 8, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, vision_hidden: int = 32, vision_depth: int = 2) -> Qwen2_5_VLConfig:
    head_dim = hidden // heads
    quarter = head_dim // 2 // 4  # M-RoPE splits head_dim/2 frequencies into t/h/w sections
    sections = [head_dim // 2 - 2 * quarter, quarter, quarter]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "mrope_section": sections}, bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
            out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=56, fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def published(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
              tie: bool) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL-*-Instruct config.json's shapes (every size shares the vision tower)."""
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=128000, rms_norm_eps=1e-6,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1e6,
                         tie_word_embeddings=tie),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
        tie_word_embeddings=tie)


FAMILY = Family(
    name="qwen2_5_vl",
    teacher_model_type="qwen2_5_vl",
    teacher_class=Qwen2_5_VLForConditionalGeneration,
    config_class=InfiniteVLConfig,
    text_config_class=InfiniteVLTextConfig,
    text_model_class=InfiniteVLTextModel,
    base_model_class=InfiniteVLModel,
    model_class=InfiniteVLForConditionalGeneration,
    rope_model_class=Qwen2_5_VLModel,
    chat_template=CHAT_TEMPLATE,
    tiny_config=tiny_config,
    video_layout="qwen2_5_vl",
    image_processor=dict(patch_size=14, merge_size=2, temporal_patch_size=2),
    published={
        "3B": lambda: published(2048, 11008, 36, 16, 2, 151936, True),
        "7B": lambda: published(3584, 18944, 28, 28, 4, 152064, False),
        "32B": lambda: published(5120, 27648, 64, 40, 8, 152064, False),
        "72B": lambda: published(8192, 29568, 80, 64, 8, 152064, False),
    },
)
