"""The whole student: oracle against the teacher, cached decoding, constant memory, save/load, generate."""

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from model import ConfigError, InfiniteVLCache, InfiniteVLConfig, InfiniteVLForConditionalGeneration, \
    InfiniteVLProcessor, convert_from_qwen2_5_vl
from model.checkpoint import load_pretrained, save_pretrained
from model.positions import packed_rope_index, rope_index
from tests.helpers import random_image


_image = random_image


def _batch(processor, questions, seeds):
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": q}]}], True)
             for q in questions]
    return processor(texts, images=[_image(s) for s in seeds])


def test_all_sliding_with_long_window_equals_teacher(tiny_teacher):
    teacher, processor = tiny_teacher
    student = convert_from_qwen2_5_vl(teacher, layer_types=["sliding_attention"] * 8, sliding_window=4096)
    batch = _batch(processor, ["how many circles are there?"], [0])
    with torch.no_grad():
        torch.testing.assert_close(student(**batch).logits, teacher(**batch).logits, atol=1e-5, rtol=1e-5)


def test_conversion_copies_everything_but_the_linear_mixers(tiny_teacher):
    teacher, _ = tiny_teacher
    student = convert_from_qwen2_5_vl(teacher)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    gdn = [i for i, t in enumerate(student.config.text_config.layer_types) if t == "linear_attention"]
    assert gdn == [1, 2, 3, 5, 6, 7]
    for k, v in t_sd.items():
        if any(f"layers.{i}.self_attn." in k for i in gdn):
            continue
        assert torch.equal(s_sd[k], v), k
    layer = student.model.language_model.layers[1].self_attn
    attn = teacher.model.language_model.layers[1].self_attn
    assert torch.equal(layer.q_proj.weight, attn.q_proj.weight)
    # GQA: 4 query heads share 2 kv heads → GDN key heads 0,1 ← kv head 0; 2,3 ← kv head 1 (head_dim 16)
    k_t = attn.k_proj.weight.view(2, 16, -1)
    assert torch.equal(layer.k_proj.weight.view(4, 16, -1)[1], k_t[0])
    assert torch.equal(layer.k_proj.weight.view(4, 16, -1)[2], k_t[1])
    v = layer.v_proj.weight.view(4, 32, -1)
    assert torch.equal(v[3, :16], attn.v_proj.weight.view(2, 16, -1)[1]) and torch.equal(v[3, 16:], v[3, :16])
    o = layer.o_proj.weight.view(-1, 4, 32)
    assert torch.equal(o[:, 2, :16], attn.o_proj.weight.view(-1, 4, 16)[:, 2]) and (o[:, :, 16:] == 0).all()
    assert (layer.b_proj.weight == 0).all()
    decay = torch.exp(-torch.nn.functional.softplus(layer.dt_bias))
    assert decay.min() > 0.899 and decay.max() < 0.9991


def test_random_init_differs_from_teacher_init(tiny_teacher):
    teacher, _ = tiny_teacher
    s = convert_from_qwen2_5_vl(teacher, init="random")
    assert not torch.equal(s.model.language_model.layers[1].self_attn.q_proj.weight,
                           teacher.model.language_model.layers[1].self_attn.q_proj.weight)


def _hybrid(teacher, window=8):
    torch.manual_seed(0)
    s = convert_from_qwen2_5_vl(teacher, sliding_window=window, init="random")
    return s.eval()


def test_incremental_decoding_equals_one_full_forward(tiny_teacher):
    teacher, processor = tiny_teacher
    student = _hybrid(teacher)
    batch = _batch(processor, ["which object appeared at the first second of the video and where is it?"], [1])
    ids = batch["input_ids"]
    pos, _ = rope_index(student.config, ids, batch["image_grid_thw"])
    cut = int((ids[0] == student.config.image_token_id).nonzero().max()) + 3
    with torch.no_grad():
        full = student(**batch).logits
        cache = InfiniteVLCache(student.config)
        parts = [student(input_ids=ids[:, :cut], pixel_values=batch["pixel_values"],
                         image_grid_thw=batch["image_grid_thw"], position_ids=pos[:, :, :cut], cache=cache,
                         use_cache=True).logits]
        for i in range(cut, ids.shape[1], 3):  # chunks of 3 tokens: ring-buffer wrap-around inside a chunk
            parts.append(student(input_ids=ids[:, i:i + 3], position_ids=pos[:, :, i:i + 3], cache=cache,
                                 use_cache=True).logits)
    # fp32 throughout; the only difference is summation order (chunked vs recurrent forms)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    assert ids.shape[1] - cut > 8  # the window (8) was crossed while decoding


def test_cache_bytes_do_not_grow_with_length(tiny_teacher):
    teacher, _ = tiny_teacher
    W = 8
    student = _hybrid(teacher, window=W)
    cache = InfiniteVLCache(student.config)
    sizes = {}
    with torch.no_grad():
        for step in range(10 * W):
            student(input_ids=torch.tensor([[5 + step % 50]]), cache=cache, use_cache=True)
            if step + 1 in (2 * W, 10 * W):
                sizes[step + 1] = cache.nbytes()
    assert sizes[2 * W] == sizes[10 * W] > 0


def test_packed_forward_equals_documents_alone(tiny_teacher):
    teacher, processor = tiny_teacher
    student = _hybrid(teacher, window=16)
    b1 = _batch(processor, ["how many?"], [2])
    b2 = _batch(processor, ["what is the highest bar in the chart?"], [3])
    ids = torch.cat([b1["input_ids"], b2["input_ids"]], 1)
    cu = torch.tensor([0, b1["input_ids"].shape[1], ids.shape[1]], dtype=torch.int32)
    grids = torch.cat([b1["image_grid_thw"], b2["image_grid_thw"]])
    with torch.no_grad():
        packed = student(input_ids=ids, pixel_values=torch.cat([b1["pixel_values"], b2["pixel_values"]]),
                         image_grid_thw=grids, cu_seqlens=cu).logits
        alone = [student(**b).logits for b in (b1, b2)]
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=1e-5, rtol=1e-4)
    pos = packed_rope_index(student.config, ids, cu, grids)
    assert pos.shape == (3, 1, ids.shape[1]) and int(pos[0, 0, cu[1]]) == 0


def test_batched_generation_with_left_padding_equals_one_by_one(tiny_teacher):
    teacher, processor = tiny_teacher
    student = _hybrid(teacher, window=8)
    questions, seeds = ["how many?", "what is the color of the biggest shape in the picture?"], [4, 5]
    batch = _batch(processor, questions, seeds)
    assert (batch["attention_mask"][0] == 0).any()
    out = student.generate(**batch, max_new_tokens=6, do_sample=False)
    new = out[:, batch["input_ids"].shape[1]:]
    for i in range(2):
        one = _batch(processor, questions[i:i + 1], seeds[i:i + 1])
        ref = student.generate(**one, max_new_tokens=6, do_sample=False)[:, one["input_ids"].shape[1]:]
        assert torch.equal(new[i:i + 1], ref)


def test_save_load_round_trip_is_identical_and_never_unpickles(tiny_teacher, tmp_path):
    teacher, processor = tiny_teacher
    student = _hybrid(teacher)
    save_pretrained(student, processor, tmp_path)
    files = os.listdir(tmp_path)
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "infinitevl"
    batch = _batch(processor, ["how many circles?"], [6])
    loaded, proc2 = load_pretrained(tmp_path)
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), InfiniteVLConfig)
    assert isinstance(auto, InfiniteVLForConditionalGeneration) and isinstance(proc2, InfiniteVLProcessor)
    with torch.no_grad():
        ref = student(**batch).logits
        assert torch.equal(loaded(**batch).logits, ref)
        assert torch.equal(auto(**batch).logits, ref)
    # the reloaded tokenizer is the same pipeline, not just the same vocabulary (padding and truncation are call
    # state: the shared processor's depend on the calls before)
    pipeline = lambda p: {k: v for k, v in json.loads(p.tokenizer.backend_tokenizer.to_str()).items()  # noqa: E731
                          if k not in ("padding", "truncation")}
    assert pipeline(proc2) == pipeline(processor)
    text = "<|im_start|>user\nHow many Circles? 42 shapes!<|im_end|>"
    assert proc2([text])["input_ids"].tolist() == processor([text])["input_ids"].tolist()
    (tmp_path / "evil.bin").write_bytes(b"not a pickle")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(Exception):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("overrides,words", [
    (dict(layer_types=["sliding_attention", "mamba"] + ["linear_attention"] * 6), r"layer_types\[1\]"),
    (dict(layer_types=["linear_attention"] * 3), "num_hidden_layers"),
    (dict(num_linear_heads=4, num_linear_key_value_heads=3), "num_linear_heads"),
    (dict(expand_v=1.01), "expand_v"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(linear_backend="cuda"), "linear_backend"),
])
def test_bad_config_fails_at_construction_naming_the_field(tiny_teacher, overrides, words):
    teacher, _ = tiny_teacher
    with pytest.raises(ConfigError, match=words):
        InfiniteVLConfig.from_teacher(teacher.config, **overrides)


@pytest.mark.gpu
def test_hybrid_on_gpu_matches_cpu_reference_and_trains():
    """fla kernels + flex attention in bf16 on the GPU against the fp32 torch path on the CPU."""
    from model.ops.common import ensure_fla_backward_ok
    from model.tiny import build_tiny_teacher

    ensure_fla_backward_ok(torch.device("cuda"), "gated_delta_rule")
    # head_dim 64 (GDN value head 128): the kernel shapes of real checkpoints, unlike the tiny default's 16
    teacher, processor = build_tiny_teacher(seed=0, hidden=256, heads=4, kv_heads=2, intermediate=512,
                                            num_layers=4, vision_hidden=64)
    student = convert_from_qwen2_5_vl(teacher, sliding_window=16, init="random")
    batch = _batch(processor, ["how many circles are there in the picture? count them all"], [7])
    with torch.no_grad():
        ref = student(**batch).logits
    gpu = student.cuda().to(torch.bfloat16).train()
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    out = gpu(**cuda_batch, labels=cuda_batch["input_ids"])
    out.loss.backward()
    err = (out.logits.float().cpu() - ref).abs().max().item() / ref.abs().max().item()
    print(f"hybrid bf16 GPU vs fp32 CPU: max rel err {err:.3e}, loss {out.loss.item():.4f}")
    assert err < 5e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters() if p.requires_grad)


def test_every_loader_works_without_the_kernels_package_and_never_swaps_in_hub_kernels(tiny_teacher, tmp_path,
                                                                                       monkeypatch):
    """transformers 5 loads with use_kernels on by default: it refuses to load where `kernels` is missing (the GPU
    image) and kernelizes layers with Hub downloads where it is present. Our loaders turn it off."""
    import transformers.modeling_utils as modeling_utils

    import model as models
    from pipeline.eval.api import load_checkpoint
    from pipeline.train.objectives import load_student

    teacher, processor = tiny_teacher
    teacher.save_pretrained(tmp_path / "teacher")
    processor.save_pretrained(tmp_path / "teacher")
    save_pretrained(_hybrid(teacher), processor, tmp_path / "student")
    monkeypatch.setattr(modeling_utils, "is_kernels_available", lambda *a, **k: False)
    with pytest.raises(ValueError, match="Kernels are not available"):  # what a default load does on such a node
        AutoModelForImageTextToText.from_pretrained(tmp_path / "student")
    loaded = [models.load_teacher(tmp_path / "teacher"), load_pretrained(tmp_path / "student")[0],
              load_student(str(tmp_path / "student"), torch.float32),
              load_checkpoint(str(tmp_path / "student"))[0], load_checkpoint(str(tmp_path / "teacher"))[0]]
    assert [m.use_kernels for m in loaded] == [False] * 5
