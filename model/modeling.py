"""The hybrid student, whatever the teacher family: the teacher's vision tower, merger, embeddings, LM head,
norms and MLPs around a decoder whose token mixers are sliding-window attention or a linear mixer, per
`config.layer_types` (`config.linear_mixer` picks the linear one from model.layers.MIXERS).

A family (model/families/*.py) binds these mixins to its teacher's transformers classes: its PreTrainedModel,
its multimodal Model (image/video features, placeholder masks, M-RoPE index) and its ForConditionalGeneration
(generation's position handling), and names its rotary embedding and vision tower. Module names equal the
teacher's (`model.visual.*`, `model.language_model.layers.{i}.self_attn.*`, `.mlp.*`, `lm_head`), so every
non-mixer weight loads from the teacher unchanged and sliding layers keep the teacher's attention weights under
the same keys. DeepStack (Qwen3-VL: features from intermediate vision layers added to the hidden states of the
first decoder layers at the visual positions) is kept exactly.

Inputs beyond the teachers': `cu_seqlens` (1-D document boundaries of a packed batch of size 1), with
`position_ids` [3, 1, T] computed per document (or left out: the model computes them per document).

Outputs as transformers gives them: `output_hidden_states=True` returns the embeddings and every decoder layer's
output (num_hidden_layers + 1 tensors, the last one after the final norm; an int or list selects some of them, the
others are None); `output_attentions=True` returns the attention weights of the sliding layers, in layer order,
[B, heads, T, keys] each (its keys in position order: the cached window, then the new tokens): a linear layer has
no attention matrix and no entry, as in transformers' own hybrids (Qwen3-Next, Qwen3.5), so that code walking the
tuple (assisted decoding splits it per token) meets only tensors. `return_dict=False` returns the same outputs as
a tuple.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, MultimodalBaseModelOutputWithPast, \
    MultimodalCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import selected_hidden_states

from .cache import InfiniteVLCache
from .layers import LinearMixer, SlidingWindowAttention, mixer_class
from .norm_mlp import RMSNorm, SwiGLUMLP, fuse_vision_tower
from .positions import packed_rope_index, rope_index


class HybridPreTrainedModel:
    """Mixed in before the family's PreTrainedModel: every linear mixer initialises its own parameters, and
    zero-centred norms (Qwen3.5) start at zero."""

    _can_compile_fullgraph = False
    _supports_flash_attn = False
    _supports_flex_attn = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LinearMixer):
            module.init_parameters()
        elif isinstance(module, RMSNorm) and module.offset:
            module.weight.zero_()


class HybridDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == "sliding_attention":
            self.self_attn = SlidingWindowAttention(config, layer_idx)
        else:
            self.self_attn = mixer_class(config.linear_mixer)(config, layer_idx)
        self.mlp = SwiGLUMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=config.norm_offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=config.norm_offset)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cu_seqlens=None,
                cache=None, offset: int = 0, output_attentions: bool = False):
        """(the layer's output, its attention weights: None unless asked for, and always None for a linear layer)."""
        h = self.input_layernorm(hidden_states)
        weights = None
        if self.layer_type == "sliding_attention":
            h = self.self_attn(h, position_embeddings, attention_mask, cu_seqlens, cache, offset,
                               output_attentions=output_attentions)
            if output_attentions:
                h, weights = h
        elif cache is None:
            h = self.self_attn(h, attention_mask, cu_seqlens, None)
        else:  # the cache runs the mixer, so that it can keep a way back while recording (speculative decoding)
            h = cache.run(lambda x, mask, state: self.self_attn(x, mask, cu_seqlens, state), h, attention_mask)
        return self.feed_forward(h, hidden_states), weights

    def feed_forward(self, mixed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The mixer's residual add, the post-mixer norm and the MLP with its residual (the add and the norm
        are one kernel on CUDA)."""
        normed, hidden_states = self.post_attention_layernorm(mixed, residual)
        return hidden_states + self.mlp(normed)


def add_deepstack(h: torch.Tensor, deepstack, layer: int) -> torch.Tensor:
    """DeepStack: after decoder layer `layer`, its level of visual features is added at the visual positions.
    `deepstack` is (mask [B, T] bool, [levels × [visual tokens, hidden]]), or (None, [levels × [B, T, hidden]])
    with zeros off the visual positions (the capturable form: no data-dependent shapes), or None."""
    if deepstack is None or layer >= len(deepstack[1]):
        return h
    mask, levels = deepstack
    if mask is None:
        return h + levels[layer].to(h.dtype)
    mask = mask.to(h.device)
    added = h[mask] + levels[layer].to(h.device, h.dtype)
    return h.masked_scatter(mask.unsqueeze(-1), added)


class HybridTextModel:
    """Mixed in before the family's PreTrainedModel; the family sets `rotary_class` (its M-RoPE variant)."""

    rotary_class: type
    input_modalities = ("text",)

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=config.norm_offset)
        self.rotary_emb = self.rotary_class(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: InfiniteVLCache | None = None,
                inputs_embeds=None, use_cache=None, cu_seqlens=None, deepstack=None, output_hidden_states=None,
                output_attentions=None, **kwargs) -> BaseModelOutputWithPast:
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
        hidden_flag = _flag(output_hidden_states, self.config, "output_hidden_states")
        want_attentions = bool(_flag(output_attentions, self.config, "output_attentions"))
        hidden = [inputs_embeds] if hidden_flag else None
        attentions = [] if want_attentions else None
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            h, weights = layer(h, position_embeddings, mask, cu_seqlens, cache.layers[i] if cache is not None else None,
                               offset, want_attentions)
            if hidden is not None:  # the layer's own output: DeepStack features join the next layer's input
                hidden.append(h)
            if attentions is not None and self.config.layer_types[i] != "linear_attention":
                attentions.append(weights)
            h = add_deepstack(h, deepstack, i)
        if cache is not None:
            cache.advance(T)
        h = self.norm(h)
        return BaseModelOutputWithPast(last_hidden_state=h, cache=cache,
                                       hidden_states=_hidden_outputs(hidden, hidden_flag, h),
                                       attentions=None if attentions is None else tuple(attentions))


def _flag(value, config, name):
    """An output_* argument, or the config's default where it was not given."""
    return value if value is not None else getattr(config, name, False)


def _hidden_outputs(hidden, flag, last):
    """transformers' hidden_states: the embeddings and each layer's output, the last one replaced by the normed
    final output; an int or list in `flag` keeps those indices (negative ones count from the end), None elsewhere."""
    if hidden is None:
        return None
    hidden[-1] = last
    selected = selected_hidden_states(flag)
    if selected is None:
        return tuple(hidden)
    n = len(hidden)
    keep = {i % n for i in selected if -n <= i < n}
    return tuple(h if i in keep else None for i, h in enumerate(hidden))


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


def _deepstack_inputs(image_outputs, video_outputs, image_mask, video_mask):
    """The DeepStack levels of the images and videos, interleaved in sequence order (Qwen3-VL's rule), with
    the mask of all visual positions; None where the vision tower has no DeepStack features."""
    image_levels = getattr(image_outputs, "deepstack_features", None) if image_outputs is not None else None
    video_levels = getattr(video_outputs, "deepstack_features", None) if video_outputs is not None else None
    if not image_levels and not video_levels:
        return None
    if image_levels and video_levels:
        visual = image_mask | video_mask
        levels = []
        for img, vid in zip(image_levels, video_levels):
            img, vid = torch.cat(img), torch.cat(vid)
            joint = img.new_zeros(int(visual.sum()), img.shape[-1])
            joint[image_mask[visual]] = img
            joint[video_mask[visual]] = vid
            levels.append(joint)
        return visual, levels
    if image_levels:
        return image_mask, [torch.cat(level) for level in image_levels]
    return video_mask, [torch.cat(level) for level in video_levels]


class HybridModel:
    """Mixed in before the family's multimodal Model class (whose get_image_features, get_video_features and
    get_placeholder_mask it uses); the family sets `vision_class` and `text_class`."""

    vision_class: type
    text_class: type
    # the teacher's Model class names the teacher's decoder layer; post_init collects the vision tower's and the
    # student text model's lists instead (device_map="auto" never splits a HybridDecoderLayer)
    _no_split_modules = None

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        self.visual = self.vision_class._from_config(config.vision_config)
        fuse_vision_tower(self.visual)
        self.language_model = self.text_class._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None,
                video_grid_thw=None, mm_token_type_ids=None, second_per_grid_ts=None, cu_seqlens=None,
                mm_encoder_outputs=None, output_hidden_states=None, output_attentions=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        # generate() encodes images/videos once itself and passes them as mm_encoder_outputs
        encoded = mm_encoder_outputs or {}
        image_outputs, video_outputs = encoded.get("image"), encoded.get("video")
        if image_outputs is None and pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        if video_outputs is None and pixel_values_videos is not None:
            video_outputs = self.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
        image_mask = video_mask = None
        if image_outputs is not None:
            embeds = torch.cat(image_outputs.pooler_output).to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask, _ = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=embeds)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, embeds)
            image_mask = image_mask[..., 0]
        if video_outputs is not None:
            embeds = torch.cat(video_outputs.pooler_output).to(inputs_embeds.device, inputs_embeds.dtype)
            _, video_mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, video_features=embeds)
            inputs_embeds = inputs_embeds.masked_scatter(video_mask, embeds)
            video_mask = video_mask[..., 0]
        deepstack = _deepstack_inputs(image_outputs, video_outputs, image_mask, video_mask)

        if position_ids is None and input_ids is not None:
            position_ids = self._positions(input_ids, attention_mask, cache, cu_seqlens, image_grid_thw,
                                           video_grid_thw, second_per_grid_ts)
        out = self.language_model(position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                                  inputs_embeds=inputs_embeds, use_cache=use_cache, cu_seqlens=cu_seqlens,
                                  deepstack=deepstack, return_dict=True,
                                  output_hidden_states=_flag(output_hidden_states, self.config, "output_hidden_states"),
                                  output_attentions=_flag(output_attentions, self.config, "output_attentions"))
        return MultimodalBaseModelOutputWithPast(last_hidden_state=out.last_hidden_state, cache=out.cache,
                                                 hidden_states=out.hidden_states, attentions=out.attentions,
                                                 image_outputs=image_outputs, video_outputs=video_outputs)

    def _positions(self, input_ids, attention_mask, cache, cu_seqlens, image_grid_thw, video_grid_thw,
                   second_per_grid_ts):
        """M-RoPE positions where the caller gave none: per document for a packed row; the family's layout for
        a prompt with images or video (as its teacher computes them); otherwise None (text counts up from the
        tokens already cached)."""
        if cu_seqlens is not None:
            return packed_rope_index(self.config, input_ids, cu_seqlens, image_grid_thw, video_grid_thw,
                                     second_per_grid_ts)
        if image_grid_thw is None and video_grid_thw is None:
            return None
        if cache is not None and cache.get_seq_length():
            raise ValueError("images or video after cached tokens need explicit position_ids "
                             "(model.positions.rope_index over the whole sequence gives them)")
        positions, _ = rope_index(self.config, input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                  attention_mask=attention_mask)
        return positions


class HybridForConditionalGeneration:
    """Mixed in before the family's ForConditionalGeneration (whose generation-time position handling it keeps);
    the family sets `model_class`."""

    model_class: type

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        self.model = self.model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None,
                video_grid_thw=None, mm_token_type_ids=None, second_per_grid_ts=None, logits_to_keep=0,
                cu_seqlens=None, mm_encoder_outputs=None, output_hidden_states=None, output_attentions=None,
                **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, pixel_values=pixel_values,
                         pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw,
                         video_grid_thw=video_grid_thw, mm_token_type_ids=mm_token_type_ids,
                         second_per_grid_ts=second_per_grid_ts, cu_seqlens=cu_seqlens,
                         mm_encoder_outputs=mm_encoder_outputs, return_dict=True,
                         output_hidden_states=_flag(output_hidden_states, self.config, "output_hidden_states"),
                         output_attentions=_flag(output_attentions, self.config, "output_attentions"))
        logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
                                      **kwargs)
        return MultimodalCausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache,
                                                hidden_states=out.hidden_states, attentions=out.attentions,
                                                image_outputs=out.image_outputs, video_outputs=out.video_outputs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate()'s cache: the constant-size one. As the draft model of assisted decoding it records its past
        from the start, so that its rejected drafts can be taken back."""
        if model_kwargs.get("cache") is not None:
            model_kwargs["cache"]._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        cache = InfiniteVLCache(self.config)
        if generation_config.is_assistant:
            cache.activate_past_recording(recurrent_states_to_keep=generation_config.num_assistant_tokens)
        model_kwargs["cache"] = cache

    def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
        """As the draft model of assisted decoding, each round's generate() gets the whole sequence and should feed
        only what its cache has not seen. transformers 5.25 tells the two apart by the attention mask's length, and
        when the caller gave no mask it has none to read: the draft then re-fed every token into its cache each
        round (its own models do the same). The draft's input_ids are always the whole sequence, so their length
        is the mask's."""
        if generation_config.is_assistant and model_kwargs.get("attention_mask") is None:
            generation_config._mask_length = input_ids.shape[1]
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

    def new_cache(self) -> InfiniteVLCache:
        return InfiniteVLCache(self.config)


def register_auto_classes() -> None:
    """With the project installed, AutoConfig / AutoModelForImageTextToText.from_pretrained(dir) load every
    family's student (`import model` registers them)."""
    from .families import FAMILIES

    for family in FAMILIES.values():
        family.register()


def __getattr__(name):
    # the Qwen2.5-VL student's classes and the mixer table under their historical names
    if name == "LINEAR_MIXER_CLASSES":
        from .layers import MIXERS

        return MIXERS
    if name in ("InfiniteVLForConditionalGeneration", "InfiniteVLModel", "InfiniteVLTextModel",
                "InfiniteVLPreTrainedModel"):
        from .families import qwen2_5_vl

        return getattr(qwen2_5_vl, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
