"""Every teacher family against its own transformers model (a tiny random config, CPU, fp32): with a window longer
than the input, the converted student's logits equal the teacher's on text, image and video inputs, batched with
left padding and packed (the teacher runs each document alone); incremental decoding equals the full forward
across the window; save/load is exact and the Auto classes load the student; generation gives the teacher's tokens.
A new family in model/families/ is tested here without a line added."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

from model import FAMILIES, convert_teacher, family_of, load_teacher
from model.convert import exact_student
from model.checkpoint import load_pretrained, save_pretrained
from model.generation import generate
from model.positions import rope_index
from model.processing import InfiniteVLProcessor
from model.tiny import build_tiny_teacher
from tests.helpers import random_image

ATOL = 1e-4  # fp32, max abs over logits


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def family_case(request):
    """One tiny teacher per family, its processor, the oracle student (the teacher's own layout: its attention
    as sliding windows longer than any input, its linear layers kept) and a hybrid student (window 8)."""
    family = FAMILIES[request.param]
    teacher, processor = build_tiny_teacher(seed=0, family=family.name)
    oracle = exact_student(teacher, 4096)
    torch.manual_seed(0)
    hybrid = convert_teacher(teacher, sliding_window=8)
    return family, teacher, processor, oracle, hybrid


def _frames(n, seed, size=64):
    rs = np.random.RandomState(seed)
    return [Image.fromarray((rs.rand(size, size, 3) * 255).astype("uint8")) for _ in range(n)]


def _prompt(processor, kind, question):
    content = ([{"type": kind}] if kind != "text" else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


DOCS = (("text", "how many words are in the title?"), ("image", "how many circles are there in the picture?"),
        ("video", "which object appeared at the first second of the video?"))


def _batch(processor, docs, seed=0):
    texts = [_prompt(processor, kind, q) for kind, q in docs]
    images = [random_image(seed + i) for i, (kind, _) in enumerate(docs) if kind == "image"]
    videos = [_frames(4, seed + i) for i, (kind, _) in enumerate(docs) if kind == "video"]
    return processor(texts, images=images or None, videos=videos or None, video_fps=2.0)


def test_student_equals_teacher_on_text_image_and_video_left_padded(family_case):
    family, teacher, processor, oracle, _ = family_case
    batch = _batch(processor, DOCS)
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # rows of different lengths: left padding in play
    with torch.no_grad():
        ours, theirs = oracle(**batch).logits, teacher(**batch).logits
    assert (ours[mask] - theirs[mask]).abs().max() < ATOL
    for i, doc in enumerate(DOCS):  # and each row equals itself alone
        alone = _batch(processor, [doc], seed=i)
        with torch.no_grad():
            row = oracle(**alone).logits[0]
        assert (row - ours[i][mask[i]]).abs().max() < ATOL, doc[0]


def test_packed_student_equals_teacher_on_each_document_alone(family_case):
    family, teacher, processor, oracle, _ = family_case
    parts = [_batch(processor, [doc], seed=i) for i, doc in enumerate(DOCS)]
    ids = torch.cat([p["input_ids"] for p in parts], 1)
    cu = torch.tensor([0] + [p["input_ids"].shape[1] for p in parts]).cumsum(0)
    packed = {"input_ids": ids, "cu_seqlens": cu}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        present = [p[key] for p in parts if key in p]
        if present:
            packed[key] = torch.cat(present)
    with torch.no_grad():
        ours = oracle(**packed).logits
        theirs = torch.cat([teacher(**p).logits for p in parts], 1)
    assert (ours - theirs).abs().max() < ATOL


def test_incremental_decoding_equals_one_full_forward_across_the_window(family_case):
    family, _, processor, _, student = family_case
    batch = _batch(processor, [DOCS[2]])  # a video: vision tokens, then text that crosses the window of 8
    ids = batch["input_ids"]
    grids = {k: batch.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    pos, _ = rope_index(student.config, ids, grids["image_grid_thw"], grids["video_grid_thw"],
                        grids["second_per_grid_ts"])
    cut = int((ids[0] == student.config.video_token_id).nonzero().max()) + 3
    vision = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with torch.no_grad():
        full = student(**batch).logits
        cache = student.new_cache()
        parts = [student(input_ids=ids[:, :cut], position_ids=pos[:, :, :cut], cache=cache, use_cache=True,
                         **vision).logits]
        for i in range(cut, ids.shape[1], 3):  # chunks of 3 tokens: ring-buffer wrap-around inside a chunk
            parts.append(student(input_ids=ids[:, i:i + 3], position_ids=pos[:, :, i:i + 3], cache=cache,
                                 use_cache=True).logits)
    # fp32 throughout; the only difference is summation order (chunked vs recurrent forms)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    assert ids.shape[1] - cut > 8


def test_save_load_round_trip_is_exact_and_auto_classes_load_the_student(family_case, tmp_path):
    family, _, processor, _, student = family_case
    save_pretrained(student, processor, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family.student_model_type
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in tmp_path.iterdir())
    loaded, proc2 = load_pretrained(tmp_path)
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), family.config_class)
    assert type(auto) is type(loaded) is family.model_class
    batch = _batch(processor, DOCS[1:])
    assert proc2.video_layout == processor.video_layout
    assert _batch(proc2, DOCS[1:])["input_ids"].tolist() == batch["input_ids"].tolist()
    with torch.no_grad():
        ref = student(**batch).logits
        assert torch.equal(loaded(**batch).logits, ref)
        assert torch.equal(auto(**batch).logits, ref)


def test_generation_gives_the_teachers_tokens(family_case):
    family, teacher, processor, oracle, _ = family_case
    batch = _batch(processor, [DOCS[1]])
    n = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        theirs = teacher.generate(**batch, **kw)[:, n:]
        hf = oracle.generate(**batch, **kw)[:, n:]
    ours = generate(oracle, batch, max_new_tokens=6, eos_token_id=[])
    assert ours.tolist() == theirs.tolist() == hf.tolist()


def test_a_teacher_directory_is_recognised_and_converted(family_case, tmp_path):
    family, teacher, processor, oracle, _ = family_case
    teacher.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    loaded = load_teacher(tmp_path)
    assert type(loaded) is family.teacher_class and family_of(loaded.config) is family
    assert InfiniteVLProcessor.from_pretrained(tmp_path).video_layout == family.video_layout
    student = convert_teacher(str(tmp_path), layer_types=oracle.config.text_config.layer_types, sliding_window=4096)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, oracle(input_ids=ids).logits)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hybrid_student_on_gpu_matches_the_cpu_reference_and_trains(name):
    """fla's kernels and flex attention in bf16 on the GPU against the fp32 torch path on the CPU, per family, at
    head dims of 64 (the kernels' shapes; the tiny defaults of 16 take the torch path everywhere)."""
    import inspect

    from model.ops.common import ensure_fla_backward_ok

    ensure_fla_backward_ok(torch.device("cuda"), "gated_delta_rule")
    family = FAMILIES[name]
    accepted = inspect.signature(family.tiny_config).parameters
    dims = {k: v for k, v in dict(hidden=256, heads=4, kv_heads=2, head_dim=64, linear_head_dim=64,
                                   intermediate=512, num_layers=4, vision_hidden=64).items() if k in accepted}
    teacher, processor = build_tiny_teacher(seed=0, family=name, **dims)
    student = convert_teacher(teacher, sliding_window=16)
    batch = _batch(processor, [DOCS[1]])
    with torch.no_grad():
        ref = student(**batch).logits
    gpu = student.cuda().to(torch.bfloat16).train()
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    out = gpu(**cuda_batch, labels=cuda_batch["input_ids"])
    out.loss.backward()
    err = (out.logits.float().cpu() - ref).abs().max().item() / ref.abs().max().item()
    print(f"{name} hybrid bf16 GPU vs fp32 CPU: max rel err {err:.3e}, loss {out.loss.item():.4f}")
    assert err < 5e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters() if p.requires_grad)


def test_load_teacher_refuses_what_is_not_a_teacher_by_name(tmp_path):
    with pytest.raises(ValueError, match="s3://bucket/teacher is a URL"):
        load_teacher("s3://bucket/teacher")
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_teacher(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="no teacher family for model_type 'llava'; supported: qwen2_5_vl"):
        load_teacher(tmp_path)
