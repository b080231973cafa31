"""Packed input projections (model/packed.py): the same outputs as the linears one by one, the same
parameters (names, objects, values), and a fall-back wherever the pack no longer holds the weights."""

import copy

import pytest
import torch
from torch import nn

from model.packed import pack_projections, project


@pytest.fixture
def student(tiny_student):
    return copy.deepcopy(tiny_student)


def _is_packed(module) -> bool:
    return getattr(module, "packed", None) is not None and module.packed.current()


def _prompt(model, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.text_config.vocab_size, (2, n), generator=g)


@torch.no_grad()
def _logits_with_decode(model, ids, steps=4):
    """Prefill logits, then greedy decode steps through the cache: every packed group runs on both paths."""
    cache = model.new_cache()
    out = [model(input_ids=ids, cache=cache, use_cache=True).logits]
    token = out[0][:, -1:].argmax(-1)
    for _ in range(steps):
        out.append(model(input_ids=token, cache=cache, use_cache=True).logits)
        token = out[-1][:, -1:].argmax(-1)
    return torch.cat(out, 1)


def test_packed_student_gives_the_unpacked_logits_and_keeps_its_parameters(student, one_thread):
    ids = _prompt(student)
    reference = _logits_with_decode(student, ids)
    before = {name: (p, p.detach().clone()) for name, p in student.named_parameters()}

    groups = pack_projections(student)
    text = student.config.text_config
    vision_blocks = student.config.vision_config.depth
    assert groups == text.num_hidden_layers * 2 + vision_blocks  # a mixer and an MLP per layer, a vision MLP each
    layer = student.model.language_model.layers[1]
    assert layer.self_attn.packed.weight.data_ptr() == layer.self_attn.q_proj.weight.data_ptr()

    after = dict(student.named_parameters())
    assert list(after) == list(before)
    for name, (param, value) in before.items():
        assert after[name] is param, name  # the same objects: an optimizer holding them still holds them
        torch.testing.assert_close(param.detach(), value, atol=0, rtol=0)
    torch.testing.assert_close(_logits_with_decode(student, ids), reference, atol=1e-5, rtol=1e-5)
    assert pack_projections(student) == groups  # packing twice changes nothing


def test_in_place_updates_reach_the_pack_and_autograd_takes_the_linears(student):
    pack_projections(student)
    mixer = student.model.language_model.layers[1].self_attn
    x = torch.randn(1, 3, mixer.hidden_size)
    with torch.no_grad():
        mixer.q_proj.weight.add_(0.5)  # what an optimizer step does
        q = project(mixer, x, mixer.PACKABLE)[0]
    torch.testing.assert_close(q, x @ mixer.q_proj.weight.T, atol=1e-5, rtol=1e-5)

    q = project(mixer, x, mixer.PACKABLE)[0]  # gradients on: one linear at a time, gradients reach each weight
    q.sum().backward()
    torch.testing.assert_close(mixer.q_proj.weight.grad, x.sum((0, 1)).expand_as(mixer.q_proj.weight))


def test_a_moved_model_falls_back_to_its_linears(student, one_thread):
    pack_projections(student)
    student.to(torch.float64)  # new storage for every parameter: the packs no longer hold the weights
    mlp = student.model.language_model.layers[0].mlp
    assert not mlp.packed.current()
    ids = _prompt(student)
    fresh = copy.deepcopy(student)
    assert all(getattr(m, "packed", None) is None for m in fresh.modules())  # a copy starts unpacked
    torch.testing.assert_close(_logits_with_decode(student, ids), _logits_with_decode(fresh, ids), atol=0, rtol=0)


def test_save_after_packing_round_trips(student, tmp_path):
    from model.checkpoint import load_pretrained, save_pretrained

    pack_projections(student)
    save_pretrained(student, None, tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    theirs = loaded.state_dict()
    for name, value in student.state_dict().items():
        torch.testing.assert_close(theirs[name], value, atol=0, rtol=0, msg=name)


def test_groups_with_an_adapter_stay_unpacked(student):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(student, LoraConfig(r=2, target_modules=["q_proj"]))
    pack_projections(peft_model)
    layers = student.model.language_model.layers
    assert not any(_is_packed(layer.self_attn) for layer in layers)  # q_proj carries LoRA
    assert all(_is_packed(layer.mlp) for layer in layers)
    assert isinstance(layers[0].mlp.gate_proj, nn.Linear)


def test_a_misaligned_mlp_is_padded_and_gives_transformers_output(student, tmp_path):
    """Qwen2.5-VL's vision MLP is 3420 wide: packed, its hidden width is padded to a multiple of 8 with zero
    channels. Outputs and saved weights stay transformers' (the down weight is now a strided view)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLMLP

    from model.checkpoint import load_pretrained, save_pretrained
    from model.norm_mlp import VisionSwiGLUMLP

    vision = student.config.vision_config
    vision.intermediate_size = 20
    torch.manual_seed(0)
    references = []
    for block in student.model.visual.blocks:
        references.append(Qwen2_5_VLMLP(vision, bias=True))
        block.mlp = copy.deepcopy(references[-1])
        block.mlp.__class__ = VisionSwiGLUMLP
    pack_projections(student)
    mlp = student.model.visual.blocks[0].mlp
    assert mlp.packed.width == 24 and mlp.packed.down.shape == (vision.hidden_size, 24)
    assert not mlp.down_proj.weight.is_contiguous()
    x = torch.randn(3, vision.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), references[0](x), atol=1e-6, rtol=1e-6)

    save_pretrained(student, None, tmp_path)
    loaded, _ = load_pretrained(tmp_path)
    for block, ref in zip(loaded.model.visual.blocks, references):
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(block.mlp.state_dict()[name], value, atol=0, rtol=0, msg=name)


@pytest.mark.gpu
def test_packed_student_on_gpu_gives_the_unpacked_logits():
    """fla's kernels read the packed outputs as strided views (conv, gates, gated norm, SwiGLU)."""
    from model import convert_from_qwen2_5_vl
    from model.tiny import build_tiny_teacher

    teacher, _ = build_tiny_teacher(seed=0, hidden=256, heads=4, kv_heads=2, intermediate=512, num_layers=4,
                                    vision_hidden=64)  # head_dim 64: the fla kernels run
    torch.manual_seed(0)
    model = convert_from_qwen2_5_vl(teacher, sliding_window=16, init="random").eval().cuda().to(torch.bfloat16)
    ids = _prompt(model, n=40).cuda()
    reference = _logits_with_decode(model, ids, steps=6).float()
    assert pack_projections(model) == 4 * 2 + model.config.vision_config.depth
    ours = _logits_with_decode(model, ids, steps=6).float()
    err = ((ours - reference).abs().max() / reference.abs().max()).item()
    assert err < 2e-2, err
