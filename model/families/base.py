"""What a teacher family is, as the rest of model/ asks it (model/families/__init__.py finds the families).

A family module defines its student's classes (config, text config, text model, multimodal model,
ForConditionalGeneration: the generic hybrid mixins of model/config.py and model/modeling.py bound to its
teacher's transformers classes, under a model_type of its own) and one `Family` instance, `FAMILY`, that says:

- which transformers classes the teacher is (`teacher_class`, `teacher_model_type`);
- how the teacher's text config becomes the student's (the student config's `text_fields_from_teacher` and
  `default_layer_types`);
- its position rule (`rope_model_class`: the transformers Model whose `get_rope_index` lays out M-RoPE
  positions; `video_runs`: how many runs of video tokens one video grid row becomes in the text);
- its processor: chat template, special tokens, image processor settings, video placeholder layout;
- which of its layers are attention and how each becomes a student layer (`teacher_layer_kind`,
  `teacher_mixer`, `attention_weights`, `shared_state`, `carry_linear`);
- its tiny in-code teacher (`tiny_config`) and its published sizes (`published`, shapes only);
- whether its own forward keeps the documents of a packed row apart (`packs_rows`).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from ..layers.base import AttentionWeights

# How every checkpoint is loaded. use_kernels=False: transformers 5 otherwise swaps layers for kernels downloaded
# from the Hub whenever the `kernels` package is installed (air-gapped nodes have no Hub; our numerics are tested
# against our own kernels), and refuses to load at all where that package is missing, as on GPU images.
LOAD_KWARGS = {"use_safetensors": True, "use_kernels": False}


@dataclass
class Family:
    name: str
    teacher_model_type: str
    teacher_class: type
    config_class: type
    text_config_class: type
    text_model_class: type
    base_model_class: type
    model_class: type
    rope_model_class: type
    chat_template: str
    tiny_config: Callable  # (tokenizer, **dims) -> the teacher's config with tiny dims
    video_layout: str = "qwen2_5_vl"  # "qwen2_5_vl": one placeholder run per video; "qwen3_vl": one per frame, timed
    image_processor: dict = field(default_factory=dict)  # Qwen2VLImageProcessorPil settings beyond the pixel bounds
    extra_special_tokens: tuple[str, ...] = ()
    published: dict[str, Callable] = field(default_factory=dict)  # size -> () -> teacher config
    # Whether the teacher's own transformers forward keeps the documents of a packed row apart, given text
    # positions that restart in every document (position_ids row 0) and no KV cache. Where it does not (Qwen3.5:
    # transformers restarts its linear layers only where the caller passes flash-attention's `cu_seq_lens_q`),
    # packed rows run through `exact_student`, which takes the documents' boundaries.
    packs_rows: bool = True

    @property
    def student_model_type(self) -> str:
        return self.config_class.model_type

    def register(self) -> None:
        for config in (self.config_class, self.text_config_class):
            try:
                AutoConfig.register(config.model_type, config)
            except ValueError:
                pass  # already registered
        for auto, model in ((AutoModelForImageTextToText, self.model_class), (AutoModel, self.base_model_class)):
            try:
                auto.register(self.config_class, model)
            except ValueError:
                pass

    # -- conversion -------------------------------------------------------------------------------------------
    def teacher_layer_kind(self, teacher_text_config, i: int) -> str:
        """"attention" or "linear_attention": what layer i of the teacher is."""
        return "attention"

    def teacher_layout(self, teacher_text_config) -> list[str]:
        """The student layer_types that keep the teacher as it is: attention as sliding windows, linear layers
        linear."""
        return ["sliding_attention" if self.teacher_layer_kind(teacher_text_config, i) == "attention"
                else "linear_attention" for i in range(teacher_text_config.num_hidden_layers)]

    def teacher_mixer(self, teacher_layer):
        """The token mixer module of a teacher decoder layer (what Stage I-a regresses onto)."""
        return teacher_layer.self_attn

    def attention_weights(self, attn, text_config) -> AttentionWeights:
        """A teacher attention as plain q/k/v/o matrices (for `LinearMixer.init_from_attention`)."""
        n_q, n_kv = text_config.num_attention_heads, text_config.num_key_value_heads
        d = getattr(text_config, "head_dim", None) or text_config.hidden_size // n_q
        return AttentionWeights(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                                n_q, n_kv, d)

    def shared_state(self, teacher_state: dict, student_text_config) -> dict:
        """The teacher's tensors that load into the student under the same name: all but the mixers of layers
        whose kind changes (attention that becomes linear, and the teacher's own linear layers, whose
        parameters `carry_linear` moves)."""
        out = {}
        for k, v in teacher_state.items():
            if "language_model.layers." in k:
                layer = int(k.split("language_model.layers.")[1].split(".")[0])
                mixer = k.split(f"layers.{layer}.")[1].split(".")[0]
                if mixer in ("self_attn", "linear_attn") and (
                        mixer == "linear_attn" or student_text_config.layer_types[layer] != "sliding_attention"):
                    continue
            out[k] = v
        return out

    def carry_linear(self, mixer, teacher_mixer, text_config) -> None:
        raise NotImplementedError(f"{self.name} teachers have no linear layers")

    # -- positions --------------------------------------------------------------------------------------------
    def rope_index(self, config, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                   second_per_grid_ts=None, attention_mask=None):
        """The teacher's own `get_rope_index` on a [B, T] batch, without a model instance: ([3, B, T] positions,
        [B, 1] rope deltas)."""
        model = self.rope_model_class
        shim = types.SimpleNamespace(config=config,
                                     get_vision_position_ids=functools.partial(model.get_vision_position_ids, None))
        return model.get_rope_index(shim, input_ids, mm_token_type_ids=mm_token_type_ids,
                                    image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                                    second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask)

    def video_runs(self, grid_row) -> int:
        """How many separate runs of video tokens one row of video_grid_thw becomes in the text."""
        return int(grid_row[0]) if self.video_layout == "qwen3_vl" else 1

    # -- checkpoints ------------------------------------------------------------------------------------------
    def load_teacher(self, path, dtype: torch.dtype | None = None, **kwargs):
        kw = {"dtype": dtype} if dtype is not None else {}
        return self.teacher_class.from_pretrained(path, **LOAD_KWARGS, **kw, **kwargs)
