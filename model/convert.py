"""Teacher → student, for every teacher family (model/families/).

Everything but the token mixers that change is the teacher's own weights under the same names (vision tower,
merger, DeepStack mergers, embeddings, LM head, norms, MLPs); sliding layers keep the teacher's attention
(biases, q/k norms, output gate included). Each layer of the student is, by its `layer_types` entry and the
teacher's layer kind:

- sliding_attention ← teacher attention: the teacher's weights, its window now `sliding_window` tokens;
- linear_attention ← teacher attention: a fresh linear mixer (`linear_mixer`), started from the teacher's
  attention with `init="teacher"` (each mixer's `init_from_attention` says how), or its standard init with
  `init="random"`;
- linear_attention ← teacher linear layer (Qwen3.5's Gated DeltaNet): the teacher's weights, carried over weight
  for weight by the family (`Family.carry_linear`), whatever `init` says;
- sliding_attention ← teacher linear layer: refused (there is no attention to keep).

With a window longer than the input, a converted student computes what its teacher computes.
"""

from __future__ import annotations

import os

import torch

from .config import ConfigError
from .families import family_of, load_teacher


def convert_teacher(teacher_or_path, layer_types=None, init: str = "teacher", **overrides):
    """The student of a teacher (a transformers model of a supported family, or a local checkpoint directory).

    `layer_types` defaults to the family's (1 sliding : 3 linear; Qwen3.5 its own 3 linear : 1 attention);
    `overrides` set hybrid text config fields (sliding_window, linear_mixer, num_linear_heads, expand_v, ...)."""
    if init not in ("teacher", "random"):
        raise ValueError(f"init must be 'teacher' or 'random', got {init!r}")
    teacher = load_teacher(teacher_or_path) if isinstance(teacher_or_path, (str, os.PathLike)) else teacher_or_path
    family = family_of(teacher.config)
    config = family.config_class.from_teacher(teacher.config, layer_types=layer_types, **overrides)
    text, teacher_text = config.text_config, teacher.config.text_config
    kinds = [family.teacher_layer_kind(teacher_text, i) for i in range(teacher_text.num_hidden_layers)]
    refused = [i for i, (kind, t) in enumerate(zip(kinds, text.layer_types))
               if kind == "linear_attention" and t == "sliding_attention"]
    if refused:
        raise ConfigError(f"layer_types makes layers {refused} sliding_attention, but they are linear layers in the "
                          f"{family.name} teacher: only its attention layers can keep attention")

    ref = next(teacher.parameters())
    student = family.model_class(config).to(dtype=ref.dtype, device=ref.device)
    missing, unexpected = student.load_state_dict(family.shared_state(teacher.state_dict(), text), strict=False)
    linear = [f"model.language_model.layers.{i}.self_attn." for i, t in enumerate(text.layer_types)
              if t == "linear_attention"]
    not_mixer = [k for k in missing if not any(k.startswith(p) for p in linear)]
    if not_mixer or unexpected:
        raise RuntimeError(f"teacher and student disagree outside the mixers: missing {not_mixer[:5]}, "
                           f"unexpected {unexpected[:5]}")
    for i, t in enumerate(text.layer_types):
        if t == "linear_attention":
            init_mixer_from_teacher(student.model.language_model.layers[i].self_attn, teacher, i, init)
    student.generation_config = teacher.generation_config
    return student.eval() if not teacher.training else student


@torch.no_grad()
def init_mixer_from_teacher(mixer, teacher, layer_idx: int, init: str = "teacher") -> None:
    """Starts the linear mixer of layer `layer_idx` from the teacher's layer: carried over weight for weight where
    the teacher's layer is linear (Qwen3.5), started from its attention with `init="teacher"`, left at its own
    init with `init="random"` (what Stage I-a builds its mixers with, whatever the family)."""
    family = family_of(teacher.config)
    text = teacher.config.text_config
    source = teacher_mixer(teacher, layer_idx)
    if family.teacher_layer_kind(text, layer_idx) == "linear_attention":
        family.carry_linear(mixer, source, text)
    elif init == "teacher":
        mixer.init_from_attention(family.attention_weights(source, text))


def teacher_mixer(teacher, layer_idx: int):
    """The token mixer of the teacher's layer `layer_idx` (attention, or Qwen3.5's linear_attn): the module whose
    input and output Stage I-a regresses each student mixer onto."""
    return family_of(teacher.config).teacher_mixer(teacher.model.language_model.layers[layer_idx])


def exact_student(teacher, max_tokens: int):
    """The teacher as a student: its own layout (attention as windows of `max_tokens`, linear layers kept), which
    computes what the teacher computes on inputs up to `max_tokens` long, and runs packed rows (cu_seqlens)
    exactly, document by document, on every device (transformers' Qwen3.5 does not restart its linear layers at
    document boundaries off CUDA)."""
    family = family_of(teacher.config)
    return convert_teacher(teacher, layer_types=family.teacher_layout(teacher.config.text_config),
                           sliding_window=max_tokens)


def convert_from_qwen2_5_vl(teacher_or_path, layer_types=None, init: str = "teacher", **overrides):
    """`convert_teacher` for a Qwen2.5-VL teacher (the paper's conversion)."""
    teacher = load_teacher(teacher_or_path) if isinstance(teacher_or_path, (str, os.PathLike)) else teacher_or_path
    if family_of(teacher.config).name != "qwen2_5_vl":
        raise ValueError(f"convert_from_qwen2_5_vl got a {teacher.config.model_type} teacher: use convert_teacher")
    return convert_teacher(teacher, layer_types=layer_types, init=init, **overrides)


@torch.no_grad()
def init_mixer_from_attention(mixer, attn, text_config) -> None:
    """Starts a linear mixer from a teacher attention module of its layer (`text_config`: the teacher's or the
    student's text config, which share the attention's dims)."""
    mixer.init_from_attention(family_of(text_config).attention_weights(attn, text_config))
