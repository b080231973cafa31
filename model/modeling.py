"""InfiniteVL: Qwen2.5-VL's vision tower, merger, embeddings, LM head, norms and MLPs around a hybrid
decoder whose token mixers are sliding-window attention or a linear mixer, per `config.layer_types`; the
linear mixer is Gated DeltaNet, or GLA / Mamba2 for the paper's ablation (`config.linear_mixer`).

Module names equal Qwen2.5-VL's (`model.visual.*`, `model.language_model.layers.{i}.self_attn.*`,
`.mlp.*`, `lm_head`), so every non-mixer weight loads from the teacher unchanged and sliding layers keep
the teacher's q/k/v/o under the same keys.

Inputs beyond Qwen2.5-VL's: `cu_seqlens` (1-D document boundaries of a packed batch of size 1), with
`position_ids` [3, 1, T] computed per document (or left out: the model computes them per document).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLRotaryEmbedding,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    MultimodalBaseModelOutputWithPast,
)

from .cache import InfiniteVLCache
from .config import InfiniteVLConfig, InfiniteVLTextConfig
from .gdn import GatedDeltaNet
from .linear_mixers import GatedLinearAttention, Mamba2Mixer
from .norm_mlp import RMSNorm, SwiGLUMLP, fuse_vision_tower
from .positions import packed_rope_index, token_types
from .swa import SlidingWindowAttention


class InfiniteVLPreTrainedModel(Qwen2_5_VLPreTrainedModel):
    config: InfiniteVLConfig
    config_class = InfiniteVLConfig
    _no_split_modules = ["InfiniteVLDecoderLayer", "Qwen2_5_VLVisionBlock"]
    _can_compile_fullgraph = False
    _supports_flash_attn = False
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, GatedDeltaNet):
            module.reset_gates()
            module.o_norm.weight.fill_(1.0)
        elif isinstance(module, Mamba2Mixer):
            module.reset_ssm()
            module.norm.weight.fill_(1.0)
        elif isinstance(module, GatedLinearAttention):
            module.g_norm_swish_gate.weight.fill_(1.0)


LINEAR_MIXER_CLASSES = {"gated_deltanet": GatedDeltaNet, "gla": GatedLinearAttention, "mamba2": Mamba2Mixer}


class InfiniteVLDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: InfiniteVLTextConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "sliding_attention":
            self.self_attn = SlidingWindowAttention(config, layer_idx)
        else:
            self.self_attn = LINEAR_MIXER_CLASSES[config.linear_mixer](config, layer_idx)
        self.mlp = SwiGLUMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cu_seqlens=None,
                cache=None, offset: int = 0):
        h = self.input_layernorm(hidden_states)
        if self.layer_type == "sliding_attention":
            h = self.self_attn(h, position_embeddings, attention_mask, cu_seqlens, cache, offset)
        else:
            h = self.self_attn(h, attention_mask, cu_seqlens, cache)
        return self.feed_forward(h, hidden_states)

    def feed_forward(self, mixed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The mixer's residual add, the post-mixer norm and the MLP with its residual (the add and the norm
        are one kernel on CUDA)."""
        normed, hidden_states = self.post_attention_layernorm(mixed, residual)
        return hidden_states + self.mlp(normed)


class InfiniteVLTextModel(InfiniteVLPreTrainedModel):
    config: InfiniteVLTextConfig
    config_class = InfiniteVLTextConfig
    input_modalities = ("text",)

    def __init__(self, config: InfiniteVLTextConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([InfiniteVLDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2_5_VLRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: InfiniteVLCache | None = None,
                inputs_embeds=None, use_cache=None, cu_seqlens=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        if use_cache and cache is None:
            cache = InfiniteVLCache(self.config)
        offset = cache.get_seq_length() if cache is not None else 0

        if position_ids is None:
            position_ids = torch.arange(offset, offset + T, device=inputs_embeds.device).view(1, 1, -1)
            position_ids = position_ids.expand(3, B, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        elif position_ids.shape[0] == 4:  # generate() prepends text positions; only the M-RoPE rows matter here
            position_ids = position_ids[1:]
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        mask = _new_token_mask(attention_mask, T)
        if cu_seqlens is not None and B != 1:
            raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {B}")
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            h = layer(h, position_embeddings, mask, cu_seqlens, cache.layers[i] if cache is not None else None, offset)
        if cache is not None:
            cache.advance(T)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), cache=cache)


def _new_token_mask(attention_mask, T):
    """The 2-D padding mask of the new tokens (generate() passes the mask of the whole sequence so far).
    A prefill with nothing padded gets None (the fast unmasked kernels); a single decode step keeps the
    mask as it is, to avoid a host sync per token."""
    if attention_mask is None or attention_mask.ndim != 2:
        return None
    m = attention_mask[:, -T:]
    if T == 1:
        return m
    return None if bool(m.all()) else m


class InfiniteVLModel(Qwen2_5_VLModel, InfiniteVLPreTrainedModel):
    config_class = InfiniteVLConfig

    def __init__(self, config: InfiniteVLConfig):
        InfiniteVLPreTrainedModel.__init__(self, config)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        fuse_vision_tower(self.visual)
        self.language_model = InfiniteVLTextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None,
                video_grid_thw=None, mm_token_type_ids=None, second_per_grid_ts=None, cu_seqlens=None,
                mm_encoder_outputs=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        # generate() encodes images/videos once itself and passes them as mm_encoder_outputs
        encoded = mm_encoder_outputs or {}
        image_outputs, video_outputs = encoded.get("image"), encoded.get("video")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        if video_outputs is None and pixel_values_videos is not None:
            video_outputs = self.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
        if image_outputs is not None:
            embeds = torch.cat(image_outputs.pooler_output).to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask, _ = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=embeds)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, embeds)
        if video_outputs is not None:
            embeds = torch.cat(video_outputs.pooler_output).to(inputs_embeds.device, inputs_embeds.dtype)
            _, video_mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, video_features=embeds)
            inputs_embeds = inputs_embeds.masked_scatter(video_mask, embeds)

        if position_ids is None and cu_seqlens is not None and input_ids is not None:
            position_ids = packed_rope_index(self.config, input_ids, cu_seqlens, image_grid_thw, video_grid_thw,
                                             second_per_grid_ts)
        elif position_ids is None:
            if mm_token_type_ids is None and input_ids is not None:
                mm_token_type_ids = token_types(self.config, input_ids)
            position_ids = self.compute_3d_position_ids(
                input_ids=input_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                second_per_grid_ts=second_per_grid_ts, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                cache=cache, mm_token_type_ids=mm_token_type_ids)

        out = self.language_model(position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                                  inputs_embeds=inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens)
        return MultimodalBaseModelOutputWithPast(last_hidden_state=out.last_hidden_state, cache=out.cache,
                                                 image_outputs=image_outputs, video_outputs=video_outputs)


class InfiniteVLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration, InfiniteVLPreTrainedModel,
                                         GenerationMixin):
    config_class = InfiniteVLConfig

    def __init__(self, config: InfiniteVLConfig):
        InfiniteVLPreTrainedModel.__init__(self, config)
        self.model = InfiniteVLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = InfiniteVLCache(self.config)

    def new_cache(self) -> InfiniteVLCache:
        return InfiniteVLCache(self.config)


def register_auto_classes() -> None:
    """With the project installed, AutoConfig / AutoModelForImageTextToText.from_pretrained(dir) load us."""
    for name, cls in (("infinitevl", InfiniteVLConfig), ("infinitevl_text", InfiniteVLTextConfig)):
        try:
            AutoConfig.register(name, cls)
        except ValueError:
            pass  # already registered
    for auto, model_cls in ((AutoModelForImageTextToText, InfiniteVLForConditionalGeneration),
                            (AutoModel, InfiniteVLModel)):
        try:
            auto.register(InfiniteVLConfig, model_cls)
        except ValueError:
            pass
