"""What the training stages optimise and how they score a batch: the modules DeepSpeed wraps (their forward
takes a packed batch and returns the loss and metrics) and the exports of the trained model, for a teacher of any
family (model/families/).

Stage I-a keeps one model in memory: the frozen teacher (run on packed rows as pipeline/packed_teacher.py says)
plus the new linear mixers (`student.linear_mixer`, one of model.layers.MIXERS); each mixer is fed the teacher's
input to its layer's token mixer (hooked during the teacher's forward: attention, or the teacher's own linear
layer) and regressed onto that mixer's output. The other stages train the student itself.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from model.checkpoint import save_pretrained
from model.cuda_graphs import grouped_vision

from .losses import HEAD_CHUNK_ELEMENTS, answer_cross_entropy, answer_positions, chunked_head_loss, layer_mse, topk_kl

MODEL_INPUTS = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                "second_per_grid_ts", "mm_token_type_ids")
LINEAR_FIELDS = ("expand_v", "conv_size", "num_linear_heads", "num_linear_key_value_heads", "num_linear_value_heads",
                 "linear_head_dim")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def student_overrides(student, num_layers: int) -> dict:
    """Hybrid text config fields from the run config's `student` section (pipeline.config.StudentSection): only
    those it sets, so the rest take the teacher family's defaults (Qwen3.5 keeps its own layout and its linear
    layers' dims). `layer_types` is given by the section's list or its `layer_period` pattern, or not at all."""
    out = {"sliding_window": student.sliding_window, "linear_mixer": student.linear_mixer}
    for field in ("expand_v", "conv_size", "linear_head_dim"):
        if getattr(student, field) is not None:
            out[field] = getattr(student, field)
    if student.num_linear_heads:
        out["num_linear_heads"] = out["num_linear_key_value_heads"] = student.num_linear_heads
    # a wrong length fails in the student's text config, before the first step, naming layer_types
    if student.layer_types:
        out["layer_types"] = list(student.layer_types)
    elif student.layer_period:
        from model import default_layer_types

        out["layer_types"] = default_layer_types(num_layers, student.layer_period)
    return out


def student_config(teacher_config, student):
    """The student's config for a teacher config of any family and the run config's `student` section."""
    from model import family_of

    overrides = student_overrides(student, teacher_config.text_config.num_hidden_layers)
    return family_of(teacher_config).config_class.from_teacher(teacher_config, **overrides)


class LayerwiseAligner(nn.Module):
    """Stage I-a: frozen teacher + one linear mixer per linear layer of the student, trained on the teacher's own
    per-layer mixer inputs and outputs (online: nothing is precomputed). Each mixer starts as the conversion
    starts it (`model.init_mixer_from_teacher`: from the teacher's attention, or carried over from the teacher's
    own linear layer)."""

    def __init__(self, teacher, student_config, loss_scale: float):
        from model import init_mixer_from_teacher
        from model.layers import MIXERS
        from pipeline.packed_teacher import PackedTeacher

        super().__init__()
        self.student_config = student_config
        self.loss_scale = loss_scale
        text = student_config.text_config
        self.linear_layers = [i for i, t in enumerate(text.layer_types) if t == "linear_attention"]
        self.mixers = nn.ModuleDict()
        dtype = next(teacher.parameters()).dtype
        for i in self.linear_layers:
            mixer = MIXERS[text.linear_mixer](text, i).to(dtype)
            init_mixer_from_teacher(mixer, teacher, i)
            self.mixers[str(i)] = mixer
        self.packed = PackedTeacher(teacher)
        self.teacher = self.packed.model  # registered, so it moves with the module
        for i in self.linear_layers:
            self.packed.mixer(i).register_forward_hook(self._hook(i), with_kwargs=True)
        self._losses: list[torch.Tensor] = []
        self._cu_seqlens = None

    def _hook(self, i: int):
        def hook(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None)
            target = output[0] if isinstance(output, tuple) else output
            with torch.enable_grad():
                y = self.mixers[str(i)](x.detach(), cu_seqlens=self._cu_seqlens)
                self._losses.append(layer_mse(y, target.detach(), None))
        return hook

    def forward(self, batch: dict):
        self._losses, self._cu_seqlens = [], batch["cu_seqlens"]
        with torch.no_grad():
            self.packed.hidden_states(batch)
        mse = torch.stack(self._losses).mean()
        return mse * self.loss_scale, {"mse": float(mse.detach()), "tokens": int(batch["input_ids"].numel())}

    def export(self, state: dict, teacher_dir: str, out_dir: str, processor) -> None:
        from model import convert_teacher, load_teacher

        student = convert_teacher(load_teacher(teacher_dir), init="random", **_config_overrides(self.student_config))
        mixers = {f"model.language_model.layers.{k[len('mixers.'):].split('.', 1)[0]}.self_attn."
                  f"{k[len('mixers.'):].split('.', 1)[1]}": v for k, v in state.items() if k.startswith("mixers.")}
        missing = student.load_state_dict(mixers, strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"stage 1a export: unexpected mixer keys {missing.unexpected_keys[:5]}")
        save_pretrained(student, processor, out_dir)


def converted_student(teacher_dir: str, student):
    """The teacher converted to the student the run's `student` section describes, untrained."""
    from model import convert_teacher, load_teacher

    teacher = load_teacher(teacher_dir)
    return convert_teacher(teacher, **_config_overrides(student_config(teacher.config, student)))


def _config_overrides(config) -> dict:
    """The hybrid fields of a student config, as `convert_teacher` takes them."""
    t = config.text_config
    return {"layer_types": list(t.layer_types), "sliding_window": t.sliding_window, "linear_mixer": t.linear_mixer,
            **{k: getattr(t, k) for k in LINEAR_FIELDS}}


class StudentObjective(nn.Module):
    """Stages I-b, II, III: the student itself, scored by KL to the stored teacher logits or by
    cross-entropy on answer tokens."""

    def __init__(self, student: nn.Module, kind: str, temperature: float = 1.0):
        super().__init__()
        self.student = student
        self.kind = kind
        self.temperature = temperature
        self.head_chunk_elements = HEAD_CHUNK_ELEMENTS

    def forward(self, batch: dict):
        # the LM head only where the loss reads it (over every position it would cost a 151,936-wide matmul and
        # its fp32 softmax per token, for a loss on a few percent of them), and in chunks (chunked_head_loss)
        keep = batch["logit_positions"] if self.kind == "kl" else answer_positions(batch["labels"])
        body, head = decoder_and_head(self.student)
        with grouped_vision(body):
            hidden = body(**model_inputs(batch), position_ids=batch["position_ids"],
                          cu_seqlens=batch["cu_seqlens"]).last_hidden_state[0]
        hidden = hidden[keep.to(hidden.device)]
        n = int(keep.numel())
        if self.kind == "kl":
            lse = batch.get("logit_lse")
            top_i, top_v = batch["topk_index"].to(hidden.device), batch["topk_logit"].to(hidden.device)
            lse = None if lse is None else lse.to(hidden.device)

            def kl_sum(logits, c):
                if c.stop == c.start:
                    return logits.sum() * 0.0
                return topk_kl(logits, top_i[c], top_v[c], None if lse is None else lse[c],
                               self.temperature) * (c.stop - c.start)

            loss = chunked_head_loss(hidden, head, kl_sum, self.head_chunk_elements) / max(n, 1)
            return loss, {"kl": float(loss.detach()), "tokens": int(batch["input_ids"].numel()),
                          "supervised_tokens": n}
        targets = batch["labels"][0, keep + 1].to(hidden.device)
        loss, n = answer_cross_entropy(hidden, targets, head, self.head_chunk_elements)
        return loss, {"ce": float(loss.detach()), "tokens": int(batch["input_ids"].numel()), "supervised_tokens": n}


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder (vision tower included; it returns hidden states) and the LM head of a student of any family,
    through a peft wrapper if there is one (the adapters live inside the modules themselves)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def load_student(path: str, dtype: torch.dtype):
    """A student checkpoint of any family (its config.json's model_type says which), for training."""
    from model import family_of_checkpoint
    from model.families.base import LOAD_KWARGS

    family = family_of_checkpoint(path)
    if family is None:
        raise FileNotFoundError(f"no config.json in {path}: not a student checkpoint")
    return family.model_class.from_pretrained(path, **LOAD_KWARGS, dtype=dtype).train()


def export_student(config, state: dict, out_dir: str, processor, lora=None) -> None:
    """Writes the trained student in HF format from a full state dict, into a fresh model (so the live,
    possibly ZeRO-3-partitioned module is never touched). LoRA adapters (`lora`: the stage's LoraSection) are
    merged into the weights, or, with `lora.merge` false, saved beside the base weights under `adapter/`."""
    from transformers.initialization import no_init_weights

    from model import family_of

    weights = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    dtype = next(iter(weights.values())).dtype
    with no_init_weights():
        student = family_of(config).model_class(config).to(dtype)
    if lora is not None:
        from peft import get_peft_model

        from .lora import lora_config

        student = get_peft_model(student, lora_config(lora))
    result = student.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("lm_head.weight")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"export: state dict does not fit the student: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    student.tie_weights()
    if lora is not None:
        if lora.merge:
            student = student.merge_and_unload()
        else:
            student.save_pretrained(os.path.join(out_dir, "adapter"), safe_serialization=True)
            student = student.get_base_model()
    save_pretrained(student, processor, out_dir)
