"""Qwen3.5 specifics: its Gated DeltaNet layers are carried over weight for weight (each equals the teacher's
layer on its own, padded and packed), its full attention becomes sliding-window attention with the output gate,
zero-centred q/k norms and partial rotary kept; what cannot be converted is refused by name. The logits oracle
(text, image, video, padded, packed, decoding, generation) is tests/test_families_oracle.py."""

import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5RMSNorm

from model import FAMILIES, ConfigError, convert_teacher
from model.layers import GatedDeltaNet, SlidingWindowAttention
from model.norm_mlp import RMSNorm
from model.tiny import build_tiny_teacher

FAMILY = FAMILIES["qwen3_5"]


@pytest.fixture(scope="module")
def converted():
    teacher, _ = build_tiny_teacher(family="qwen3_5")
    return teacher, convert_teacher(teacher, sliding_window=4096)


def test_default_layout_keeps_the_linear_layers_and_slides_the_attention(converted):
    teacher, student = converted
    theirs = teacher.config.text_config.layer_types
    ours = student.config.text_config.layer_types
    assert ours == ["linear_attention" if t == "linear_attention" else "sliding_attention" for t in theirs]
    assert "full_attention" in theirs and ours.count("sliding_attention") == theirs.count("full_attention")
    text = student.config.text_config
    assert (text.num_linear_heads, text.num_linear_value_heads, text.linear_head_dim, text.expand_v) == (2, 4, 16, 1.0)


def test_gated_deltanet_layers_are_the_teachers_weight_for_weight(converted):
    teacher, student = converted
    i = 0
    mixer = student.model.language_model.layers[i].self_attn
    gdn = teacher.model.language_model.layers[i].linear_attn
    assert isinstance(mixer, GatedDeltaNet) and FAMILY.teacher_mixer(teacher.model.language_model.layers[i]) is gdn
    qkv = torch.cat([mixer.q_proj.weight, mixer.k_proj.weight, mixer.v_proj.weight])
    conv = torch.cat([mixer.q_conv1d.weight, mixer.k_conv1d.weight, mixer.v_conv1d.weight])
    assert torch.equal(qkv, gdn.in_proj_qkv.weight) and torch.equal(conv, gdn.conv1d.weight)
    for ours, theirs in ((mixer.g_proj, gdn.in_proj_z), (mixer.a_proj, gdn.in_proj_a), (mixer.b_proj, gdn.in_proj_b),
                         (mixer.o_proj, gdn.out_proj)):
        assert torch.equal(ours.weight, theirs.weight)
    assert torch.equal(mixer.A_log, gdn.A_log) and torch.equal(mixer.dt_bias, gdn.dt_bias)
    assert torch.equal(mixer.o_norm.weight, gdn.norm.weight)
    # the layer alone, on a left-padded batch: the real tokens of each row equal the teacher's
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 70, 64, generator=g)
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[0, :20] = 0
    with torch.no_grad():
        ours, theirs = mixer(x, attention_mask=mask), gdn(x, attention_mask=mask)
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() < 1e-5


def test_attention_layers_keep_the_output_gate_norms_and_partial_rotary(converted):
    teacher, student = converted
    i = student.config.text_config.layer_types.index("sliding_attention")
    attn = student.model.language_model.layers[i].self_attn
    theirs = teacher.model.language_model.layers[i].self_attn
    assert isinstance(attn, SlidingWindowAttention) and attn.output_gate
    assert attn.q_proj.weight.shape == theirs.q_proj.weight.shape == (2 * 4 * 32, 64)
    assert torch.equal(attn.q_norm.weight, theirs.q_norm.weight) and attn.q_norm.offset == 1.0
    cos, _ = student.model.language_model.rotary_emb(torch.zeros(1, 3, 64), torch.zeros(3, 1, 3, dtype=torch.long))
    assert cos.shape[-1] == 8  # a quarter of the 32-wide heads rotates


def test_zero_centred_norm_equals_qwen3_5s():
    g = torch.Generator().manual_seed(0)
    ours, theirs = RMSNorm(64, eps=1e-6, offset=1.0), Qwen3_5RMSNorm(64, eps=1e-6)
    assert (ours.weight == 0).all()
    with torch.no_grad():
        w = torch.randn(64, generator=g) * 0.1
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    x, r = torch.randn(3, 5, 64, generator=g), torch.randn(3, 5, 64, generator=g)
    assert torch.equal(ours(x), theirs(x))
    normed, summed = ours(x, r)
    assert torch.equal(normed, theirs(x + r)) and torch.equal(summed, x + r)


def test_what_cannot_be_converted_is_refused_by_name(converted):
    teacher, _ = converted
    with pytest.raises(ConfigError, match=r"layers \[0, 1, 2, 4, 5, 6\].*linear layers in the qwen3_5 teacher"):
        convert_teacher(teacher, layer_types=["sliding_attention"] * 8)
    with pytest.raises(ConfigError, match="gated_deltanet' only, not KimiDeltaAttention"):
        convert_teacher(teacher, linear_mixer="kda")
    with pytest.raises(ConfigError, match="differ from the Qwen3.5 teacher's"):
        convert_teacher(teacher, expand_v=2.0)


def test_attention_layers_can_become_linear_too(converted):
    teacher, _ = converted
    student = convert_teacher(teacher, layer_types=["linear_attention"] * 8)
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = student(input_ids=ids).logits
        cache = student.new_cache()
        steps = torch.cat([student(input_ids=ids[:, a:b], cache=cache, use_cache=True).logits
                           for a, b in ((0, 11), (11, 12), (12, 20))], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-4)
    assert cache.nbytes() > 0 and all(cache.is_linear)


def test_stage_1a_builds_each_mixer_from_whatever_the_teachers_layer_was(converted):
    """What Stage I-a needs, family-blind: the teacher module each student mixer regresses onto, and a mixer
    started from it (the teacher's own Gated DeltaNet reproduces its module's output exactly)."""
    from model import init_mixer_from_teacher, teacher_mixer
    from model.layers import MIXERS

    teacher, student = converted
    text = student.config.text_config
    x = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(1))
    for i in (0, 3):
        mixer = MIXERS[text.linear_mixer](text, i)
        init_mixer_from_teacher(mixer, teacher, i)
        source = teacher_mixer(teacher, i)
        assert source is (teacher.model.language_model.layers[i].linear_attn if i == 0
                          else teacher.model.language_model.layers[i].self_attn)
        if i == 0:
            with torch.no_grad():
                assert (mixer(x) - source(x)).abs().max() < 1e-5
