"""What the training stages optimise and how they score a batch: the modules DeepSpeed wraps (their forward
takes a packed batch and returns the loss and metrics) and the exports of the trained model.

Stage I-a keeps one model in memory: the frozen teacher plus the new linear mixers (Gated DeltaNet, or GLA /
Mamba2 per `student.linear_mixer`); each mixer is fed the teacher's input to that layer's attention (hooked
during the teacher's forward) and regressed onto that attention's output. The other stages train the student
itself.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from model import InfiniteVLConfig, InfiniteVLForConditionalGeneration, default_layer_types
from model.checkpoint import save_pretrained
from model.convert import convert_from_qwen2_5_vl, init_mixer_from_attention
from model.modeling import LINEAR_MIXER_CLASSES

from .losses import HEAD_CHUNK_ELEMENTS, answer_cross_entropy, answer_positions, chunked_head_loss, layer_mse, topk_kl

MODEL_INPUTS = ("input_ids", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                "second_per_grid_ts", "mm_token_type_ids")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def student_overrides(student, num_layers: int) -> dict:
    """InfiniteVLTextConfig fields from the run config's `student` section (pipeline.config.StudentSection)."""
    out = {"sliding_window": student.sliding_window, "expand_v": student.expand_v,
           "conv_size": student.conv_size, "linear_mixer": student.linear_mixer}
    if student.num_linear_heads:
        out["num_linear_heads"] = out["num_linear_key_value_heads"] = student.num_linear_heads
    if student.linear_head_dim:
        out["linear_head_dim"] = student.linear_head_dim
    # a wrong length fails in InfiniteVLTextConfig, before the first step, naming layer_types
    out["layer_types"] = list(student.layer_types or default_layer_types(num_layers, student.layer_period))
    return out


class LayerwiseAligner(nn.Module):
    """Stage I-a: frozen teacher + one linear mixer per linear layer, trained on the teacher's own
    per-layer inputs and attention outputs (online: nothing is precomputed)."""

    def __init__(self, teacher: Qwen2_5_VLForConditionalGeneration, student_config: InfiniteVLConfig,
                 loss_scale: float):
        super().__init__()
        self.teacher = teacher.requires_grad_(False)
        self.student_config = student_config
        self.loss_scale = loss_scale
        types = student_config.text_config.layer_types
        self.linear_layers = [i for i, t in enumerate(types) if t == "linear_attention"]
        self.mixers = nn.ModuleDict()
        for i in self.linear_layers:
            text = student_config.text_config
            mixer = LINEAR_MIXER_CLASSES[text.linear_mixer](text, i)
            mixer.to(next(teacher.parameters()).dtype)
            init_mixer_from_attention(mixer, teacher.model.language_model.layers[i].self_attn, text)
            self.mixers[str(i)] = mixer
            teacher.model.language_model.layers[i].self_attn.register_forward_hook(self._hook(i), with_kwargs=True)
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
            teacher_forward_packed(self.teacher, batch)
        mse = torch.stack(self._losses).mean()
        return mse * self.loss_scale, {"mse": float(mse.detach()), "tokens": int(batch["input_ids"].numel())}

    def export(self, state: dict, teacher_dir: str, out_dir: str, processor) -> None:
        teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(teacher_dir, use_safetensors=True)
        student = convert_from_qwen2_5_vl(teacher, init="random", **_config_overrides(self.student_config))
        mixers = {f"model.language_model.layers.{k[len('mixers.'):].split('.', 1)[0]}.self_attn."
                  f"{k[len('mixers.'):].split('.', 1)[1]}": v for k, v in state.items() if k.startswith("mixers.")}
        missing = student.load_state_dict(mixers, strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"stage 1a export: unexpected mixer keys {missing.unexpected_keys[:5]}")
        save_pretrained(student, processor, out_dir)


def _config_overrides(config: InfiniteVLConfig) -> dict:
    t = config.text_config
    return {"layer_types": list(t.layer_types), "sliding_window": t.sliding_window, "expand_v": t.expand_v,
            "conv_size": t.conv_size, "num_linear_heads": t.num_linear_heads,
            "num_linear_key_value_heads": t.num_linear_key_value_heads, "linear_head_dim": t.linear_head_dim,
            "linear_mixer": t.linear_mixer}


def teacher_forward_packed(teacher, batch: dict):
    """The teacher's decoder over a packed row, documents kept apart. transformers builds the
    block-diagonal mask from the text-position row only when no KV cache is made, hence use_cache=False."""
    return teacher.model(**model_inputs(batch), position_ids=packed_teacher_positions(batch), use_cache=False)


def packed_teacher_positions(batch: dict) -> torch.Tensor:
    """[4, 1, T]: transformers' packed form for Qwen2.5-VL: text positions restarting per document (from
    which it builds a block-diagonal causal mask) followed by the three M-RoPE rows."""
    cu = batch["cu_seqlens"].long()
    lengths = (cu[1:] - cu[:-1]).tolist()
    text = torch.cat([torch.arange(n) for n in lengths]).view(1, 1, -1).to(batch["input_ids"].device)
    return torch.cat([text, batch["position_ids"].to(text.device)], 0)


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
    """The decoder (vision tower included; it returns hidden states) and the LM head of a Qwen2.5-VL-shaped model,
    through a peft wrapper if there is one (the adapters live inside the modules themselves)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def load_student(path: str, dtype: torch.dtype) -> InfiniteVLForConditionalGeneration:
    model = InfiniteVLForConditionalGeneration.from_pretrained(path, use_safetensors=True, dtype=dtype)
    return model.train()


def export_student(config: InfiniteVLConfig, state: dict, out_dir: str, processor, lora=None) -> None:
    """Writes the trained student in HF format from a full state dict, into a fresh model (so the live,
    possibly ZeRO-3-partitioned module is never touched). LoRA adapters (`lora`: the stage's LoraSection) are
    merged into the weights, or, with `lora.merge` false, saved beside the base weights under `adapter/`."""
    from transformers.initialization import no_init_weights

    weights = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    dtype = next(iter(weights.values())).dtype
    with no_init_weights():
        student = InfiniteVLForConditionalGeneration(config).to(dtype)
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
