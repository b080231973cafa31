"""Interop with the authors' released checkpoints (github hustvl/InfiniteVL, HF "InfiniteVL" 4B).

Their config.json is a flat Qwen2.5-VL config as transformers 4.50 wrote it (text fields at the top level,
`vision_config` nested, model_type "infinite_vl") plus the hybrid fields `layer_types`, `sliding_window`,
`num_linear_heads`, `num_linear_key_value_heads`, `linear_head_dim`, `expand_v`, `conv_size`, `norm_eps`,
`use_gate`, `use_short_conv` (missing fields take their class defaults: 16 heads × 128, expand_v 2, conv 4,
norm_eps 1e-5, one sliding layer in four). Their weights use the 4.50 key layout: `model.layers.*`,
`model.embed_tokens.*`, `model.norm.*`, `visual.*`, `lm_head.*`, with each layer's mixer, attention or
Gated DeltaNet, under `self_attn.` and the same parameter names and shapes as ours.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError, default_layer_types
from .families.qwen2_5_vl import InfiniteVLConfig, InfiniteVLForConditionalGeneration

RELEASE_MODEL_TYPE = "infinite_vl"
RELEASE_ARCH = "InfiniteVLQwen2_5_VLForConditionalGeneration"
_RELEASE_DEFAULTS = dict(num_linear_heads=16, num_linear_key_value_heads=16, linear_head_dim=128, expand_v=2,
                         conv_size=4, norm_eps=1e-5)
_TOP_LEVEL = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
              "tie_word_embeddings")
_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
         "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "sliding_window", "layer_types",
         *_RELEASE_DEFAULTS)
# ours ← theirs, in order: the first prefix that matches wins
_PREFIXES = (("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."),
             ("model.language_model.", "model."), ("model.visual.", "visual."), ("lm_head.", "lm_head."))


def config_from_release(release: dict) -> InfiniteVLConfig:
    if release.get("model_type") not in (RELEASE_MODEL_TYPE, None):
        raise ConfigError(f"model_type is {release.get('model_type')!r}, expected {RELEASE_MODEL_TYPE!r}")
    for flag in ("use_gate", "use_short_conv"):
        if release.get(flag, True) is not True:
            raise ConfigError(f"{flag}=false is not supported: InfiniteVL's Gated DeltaNet has both")
    text = {**_RELEASE_DEFAULTS, **{k: release[k] for k in _TEXT if k in release}}
    if text.get("layer_types") is None:
        text["layer_types"] = default_layer_types(text["num_hidden_layers"])
    rope = dict(release.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope["rope_theta"] = release.get("rope_theta", 1e6)
    text["rope_parameters"] = {k: v for k, v in rope.items() if k != "type"}
    vision = {k: v for k, v in release["vision_config"].items() if k not in ("model_type", "torch_dtype")}
    return InfiniteVLConfig(text_config=text, vision_config=vision,
                            **{k: release[k] for k in _TOP_LEVEL if k in release})


def config_to_release(config: InfiniteVLConfig) -> dict:
    t = config.text_config
    if t.linear_mixer != "gated_deltanet":
        # the released code builds Gated DeltaNet for every linear layer: a GLA/Mamba2 student would load wrong
        raise ConfigError(f"linear_mixer is {t.linear_mixer!r}: the released layout holds Gated DeltaNet only; "
                          "save GLA/Mamba2 students with model.checkpoint.save_pretrained")
    out = {"architectures": [RELEASE_ARCH], "model_type": RELEASE_MODEL_TYPE, "use_sliding_window": True,
           "use_gate": True, "use_short_conv": True, "mode": "chunk"}
    out.update({k: getattr(t, k) for k in _TEXT})
    out["layer_types"] = list(t.layer_types)
    rope = dict(t.rope_parameters)
    out["rope_theta"] = rope.pop("rope_theta")
    out["rope_scaling"] = {**rope, "type": rope.get("rope_type", "default")}
    out.update({k: getattr(config, k) for k in _TOP_LEVEL})
    vision = config.vision_config.to_dict()
    vision.pop("transformers_version", None)
    out["vision_config"] = {**vision, "model_type": RELEASE_MODEL_TYPE}
    return out


def state_dict_from_release(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for ours, theirs in _PREFIXES:
            if key.startswith(theirs):
                out[ours + key[len(theirs):]] = value
                break
        else:
            raise KeyError(f"unexpected key in the released state dict: {key}")
    return out


def state_dict_to_release(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if key.startswith("model.language_model."):
            out["model." + key[len("model.language_model."):]] = value
        elif key.startswith("model.visual."):
            out["visual." + key[len("model.visual."):]] = value
        else:
            out[key] = value
    return out


def load_release_checkpoint(path: str, dtype: torch.dtype | None = None) -> InfiniteVLForConditionalGeneration:
    """A released checkpoint directory (config.json + *.safetensors shards) as our model."""
    with open(os.path.join(path, "config.json")) as f:
        config = config_from_release(json.load(f))
    state = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(path, name)))
    model = InfiniteVLForConditionalGeneration(config)
    ours = state_dict_from_release(state)
    if config.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"released checkpoint does not match its config: missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype) if dtype is not None else model


def export_release(model: InfiniteVLForConditionalGeneration, path: str) -> None:
    """Writes our model in the released layout (config.json + model.safetensors)."""
    config = config_to_release(model.config)  # refuses what the layout cannot hold before anything is written
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state_dict_to_release(state), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
