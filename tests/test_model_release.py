"""Interop with the released InfiniteVL checkpoint layout (hustvl/InfiniteVL), on a synthetic checkpoint
whose key names and shapes are written here from the release's module definitions."""

import json

import torch
from safetensors.torch import load_file, save_file

from model.release import config_from_release, export_release, load_release_checkpoint

HIDDEN, HEADS, KV, HEAD_DIM, LAYERS, VOCAB = 64, 4, 2, 16, 8, 512
LIN_HEADS, LIN_DIM, EXPAND = 4, 16, 2


def _release_config(teacher):
    """A flat 4.50-style config as the release ships it: no layer_types, no num_linear_* (class defaults),
    here overridden to the tiny shapes."""
    v = teacher.config.vision_config.to_dict()
    return {
        "architectures": ["InfiniteVLQwen2_5_VLForConditionalGeneration"], "model_type": "infinite_vl",
        "hidden_size": HIDDEN, "intermediate_size": 128, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": VOCAB, "rms_norm_eps": 1e-6,
        "rope_scaling": {"mrope_section": [4, 2, 2], "rope_type": "default", "type": "default"},
        "rope_theta": 10000.0, "sliding_window": 8192, "use_sliding_window": True, "tie_word_embeddings": True,
        "num_linear_heads": LIN_HEADS, "num_linear_key_value_heads": LIN_HEADS, "linear_head_dim": LIN_DIM,
        "image_token_id": teacher.config.image_token_id, "video_token_id": teacher.config.video_token_id,
        "vision_start_token_id": teacher.config.vision_start_token_id,
        "vision_end_token_id": teacher.config.vision_end_token_id,
        "vision_config": {**v, "model_type": "infinite_vl"}, "transformers_version": "4.50.0",
    }


def _release_state(teacher):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN), "model.norm.weight": rnd(HIDDEN)}
    kd, vd = LIN_HEADS * LIN_DIM, LIN_HEADS * LIN_DIM * EXPAND
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": rnd(HIDDEN), p + "post_attention_layernorm.weight": rnd(HIDDEN),
                   p + "mlp.gate_proj.weight": rnd(128, HIDDEN), p + "mlp.up_proj.weight": rnd(128, HIDDEN),
                   p + "mlp.down_proj.weight": rnd(HIDDEN, 128)})
        a = p + "self_attn."
        if i % 4 == 0:  # release default: layer i is sliding attention when i % 4 == 0
            sd.update({a + "q_proj.weight": rnd(HEADS * HEAD_DIM, HIDDEN), a + "q_proj.bias": rnd(HEADS * HEAD_DIM),
                       a + "k_proj.weight": rnd(KV * HEAD_DIM, HIDDEN), a + "k_proj.bias": rnd(KV * HEAD_DIM),
                       a + "v_proj.weight": rnd(KV * HEAD_DIM, HIDDEN), a + "v_proj.bias": rnd(KV * HEAD_DIM),
                       a + "o_proj.weight": rnd(HIDDEN, HEADS * HEAD_DIM)})
        else:
            sd.update({a + "q_proj.weight": rnd(kd, HIDDEN), a + "k_proj.weight": rnd(kd, HIDDEN),
                       a + "v_proj.weight": rnd(vd, HIDDEN), a + "a_proj.weight": rnd(LIN_HEADS, HIDDEN),
                       a + "b_proj.weight": rnd(LIN_HEADS, HIDDEN), a + "A_log": rnd(LIN_HEADS),
                       a + "dt_bias": rnd(LIN_HEADS), a + "q_conv1d.weight": rnd(kd, 1, 4),
                       a + "k_conv1d.weight": rnd(kd, 1, 4), a + "v_conv1d.weight": rnd(vd, 1, 4),
                       a + "g_proj.weight": rnd(vd, HIDDEN), a + "o_norm.weight": rnd(LIN_DIM * EXPAND),
                       a + "o_proj.weight": rnd(HIDDEN, vd)})
    for k, v in teacher.state_dict().items():
        if k.startswith("model.visual."):
            sd["visual." + k[len("model.visual."):]] = rnd(*v.shape)
    return sd


def _our_name(release_key: str) -> str:
    """The transformers 4.50 key of the release under this model's (5.x) layout, written out by hand."""
    if release_key.startswith("visual."):
        return "model.visual." + release_key[len("visual."):]
    assert release_key.startswith("model."), release_key
    return "model.language_model." + release_key[len("model."):]


def test_released_layout_loads_every_tensor_and_exports_back(tiny_teacher, tmp_path):
    teacher, processor = tiny_teacher
    release_dir, export_dir = tmp_path / "release", tmp_path / "export"
    release_dir.mkdir()
    (release_dir / "config.json").write_text(json.dumps(_release_config(teacher)))
    state = _release_state(teacher)
    save_file(state, str(release_dir / "model-00001-of-00001.safetensors"))

    model = load_release_checkpoint(str(release_dir))
    cfg = model.config.text_config
    assert cfg.layer_types == ["sliding_attention", "linear_attention", "linear_attention", "linear_attention"] * 2
    assert cfg.norm_eps == 1e-5 and cfg.expand_v == 2 and cfg.conv_size == 4  # the release's class defaults
    # every tensor sits, unchanged, under the name the 4.50 layout maps to (text under model.language_model.,
    # the vision tower under model.visual.), and the tied head is the embedding
    ours = model.state_dict()
    assert set(ours) - {"lm_head.weight"} == {_our_name(k) for k in state}
    for key, tensor in state.items():
        assert torch.equal(ours[_our_name(key)], tensor), key
    assert torch.equal(ours["lm_head.weight"], state["model.embed_tokens.weight"])

    batch = processor([processor.apply_chat_template([{"role": "user", "content": "hello"}], True)])
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()

    export_release(model, str(export_dir))
    back = load_file(str(export_dir / "model.safetensors"))
    assert set(back) == set(state)
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key
    with torch.no_grad():
        again = load_release_checkpoint(str(export_dir))(**batch).logits
    assert torch.equal(again, logits)
    exported = json.loads((export_dir / "config.json").read_text())
    assert exported["model_type"] == "infinite_vl" and exported["num_linear_heads"] == LIN_HEADS
    assert config_from_release(exported).text_config.layer_types == cfg.layer_types
