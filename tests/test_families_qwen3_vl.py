"""Qwen3-VL specifics: the video placeholders our processor writes are transformers' Qwen3VLProcessor's (its
timestamps, frame by frame); conversion keeps the DeepStack mergers, the q/k norms and the interleaved M-RoPE
(the logits oracle is tests/test_families_oracle.py)."""

import types

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata

from model import convert_teacher
from model.tiny import build_tiny_teacher


def _theirs(n_frames, fps, grid):
    """Qwen3VLProcessor.replace_video_token on an instance holding only what the method reads (the processor
    itself needs a torchvision video processor, which does not import on CPU machines)."""
    proc = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    proc.video_processor = types.SimpleNamespace(merge_size=2, temporal_patch_size=2)
    proc.video_token, proc.vision_start_token, proc.vision_end_token = "<|video_pad|>", "<|vision_start|>", \
        "<|vision_end|>"
    metadata = VideoMetadata(total_num_frames=n_frames, fps=fps, frames_indices=list(range(n_frames)))
    return proc.replace_video_token({"video_grid_thw": torch.tensor([grid]), "video_metadata": [metadata]}, 0)


def test_video_placeholders_equal_transformers_qwen3_vl_processor():
    _, processor = build_tiny_teacher(family="qwen3_vl")
    rs = np.random.RandomState(0)
    for n_frames, fps in ((4, 2.0), (5, 3.0)):  # 5 frames: the last temporal patch repeats the last frame
        frames = [Image.fromarray((rs.rand(64, 64, 3) * 255).astype("uint8")) for _ in range(n_frames)]
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], True)
        batch = processor([text], videos=[frames], video_fps=fps)
        grid = batch["video_grid_thw"][0].tolist()
        expected = text.replace("<|vision_start|><|video_pad|><|vision_end|>", _theirs(n_frames, fps, grid))
        assert batch["input_ids"][0].tolist() == processor.tokenizer(expected)["input_ids"]
        assert "second_per_grid_ts" not in batch  # the time is in the text


def test_conversion_keeps_deepstack_qk_norms_and_interleaved_rope():
    teacher, _ = build_tiny_teacher(family="qwen3_vl")
    student = convert_teacher(teacher)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    deepstack = [k for k in t_sd if "deepstack_merger_list" in k]
    assert deepstack and all(torch.equal(s_sd[k], t_sd[k]) for k in deepstack)
    assert torch.equal(s_sd["model.language_model.layers.0.self_attn.q_norm.weight"],
                       t_sd["model.language_model.layers.0.self_attn.q_norm.weight"])
    text = student.config.text_config
    assert text.head_dim == 16 and text.linear_head_dim == 16 and text.rope_parameters["mrope_interleaved"]
    mixer = student.model.language_model.layers[1].self_attn
    assert torch.equal(mixer.q_proj.weight, teacher.model.language_model.layers[1].self_attn.q_proj.weight)


def test_a_teacher_directory_without_a_tokenizer_template_takes_its_processor_template(tmp_path):
    """Qwen3-VL checkpoints keep the chat template beside the tokenizer (chat_template.json): the processor
    loaded from the directory uses it, not another family's."""
    import json

    from model.processing import InfiniteVLProcessor

    teacher, processor = build_tiny_teacher(family="qwen3_vl")
    teacher.config.save_pretrained(tmp_path)
    processor.tokenizer.chat_template = None
    processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()  # no template in the tokenizer's own files
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    loaded = InfiniteVLProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == template and loaded.video_layout == "qwen3_vl"
    (tmp_path / "chat_template.json").unlink()
    assert InfiniteVLProcessor.from_pretrained(tmp_path).chat_template == processor.chat_template
