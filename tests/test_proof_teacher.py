"""The proof teacher's training: it learns, it saves as a loadable Hugging Face teacher, the stage records it."""

import json

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from bench.proof_teacher import parse_args, run
from model.processing import InfiniteVLProcessor
from pipeline.eval.synthetic import picture_samples
from pipeline.teacher_train import lr_factor, training_batch


def test_teacher_trains_saves_reloads_and_scores(tmp_path, one_thread):
    report = run(parse_args(["--out", str(tmp_path), "--steps", "30", "--batch-size", "4", "--hidden", "32",
                             "--layers", "2", "--vision-hidden", "32", "--vision-depth", "1", "--eval-pictures", "4",
                             "--set", "intermediate=64", "--set", "warmup_steps=2"]))
    curve = report["loss_curve"]
    assert curve[-1]["step"] == 30 and curve[-1]["loss"] < curve[0]["loss"]
    assert report["train_tokens"] > 0 and 0 <= report["score"] <= 100
    assert set(report) >= {"heldout/pictures", "heldout/text_line/read", "heldout/shapes/count"}
    assert json.loads((tmp_path / "report.json").read_text())["score"] == report["score"]

    teacher = tmp_path / "teacher"
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(teacher).eval()
    processor = InfiniteVLProcessor.from_pretrained(str(teacher))
    batch = training_batch(processor, picture_samples(1, seed=3, images_as="pil"))
    with torch.no_grad():
        assert torch.isfinite(reloaded(**batch).loss)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 100, 10) == 0.1 and lr_factor(9, 100, 10) == 1.0
    assert abs(lr_factor(100, 100, 10) - 0.1) < 1e-9 and lr_factor(50, 100, 10) < 1.0
