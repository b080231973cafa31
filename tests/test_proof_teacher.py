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
                             "--set", "intermediate=64", "--set", "warmup_steps=2", "--mechanisms",
                             json.dumps({"distances": [2], "frame_counts": [8], "recall_samples": 2,
                                         "text_samples": 3, "batch_size": 4})]))
    curve = report["loss_curve"]
    assert curve[-1]["step"] == 30 and curve[-1]["loss"] < curve[0]["loss"]
    assert report["train_tokens"] > 0 and 0 <= report["score"] <= 100
    assert set(report) >= {"heldout/pictures", "heldout/text_line/read", "heldout/shapes/count"}
    assert json.loads((tmp_path / "report.json").read_text())["score"] == report["score"]
    assert report["device"].startswith("cpu") and report["date"] and report["commit"]
    # scored by the mechanisms bench's own sweeps, on the sweep asked for, into <out>/mechanisms
    sweep = report["mechanisms"]
    assert [r["distractor_frames"] for r in sweep["recall_by_distance"]] == [2]
    assert [r["frames"] for r in sweep["frames"]] == [8] and sweep["text"]["n"] == 3
    assert 0 <= sweep["text"]["char_accuracy"] <= 100
    assert len((tmp_path / "mechanisms" / "dense_text" / "samples.jsonl").read_text().splitlines()) == 3

    teacher = tmp_path / "teacher"
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(teacher).eval()
    processor = InfiniteVLProcessor.from_pretrained(str(teacher))
    batch = training_batch(processor, picture_samples(1, seed=3, images_as="pil"))
    with torch.no_grad():
        assert torch.isfinite(reloaded(**batch).loss)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 100, 10) == 0.1 and lr_factor(9, 100, 10) == 1.0
    assert abs(lr_factor(100, 100, 10) - 0.1) < 1e-9 and lr_factor(50, 100, 10) < 1.0


def test_profile_step_draws_the_stages_first_batch_and_profiles_its_step(tmp_path, one_thread):
    from pipeline.teacher_train import batch_seed

    shrink = ["hidden=32", "num_layers=2", "heads=2", "kv_heads=1", "intermediate=64", "vision_hidden=32",
              "vision_depth=1", "batch_size=4", "max_frames=16", "precision=fp32", "loader_workers=0"]
    report = run(parse_args(["--out", str(tmp_path), "--config", "configs/mechanisms.yaml", "--profile-step",
                             *[a for s in shrink for a in ("--set", s)]]))
    assert report["config"]["pictures"] == ["recall", "dense_text"]  # the run config's kinds, its dims overridden
    # the batch the teacher stage's loader makes first: the same pictures, counted here with the processor
    from model.tiny import build_processor

    expected = training_batch(build_processor(max_pixels=report["config"]["max_pixels"]),
                              picture_samples(2, batch_seed(0, 0), images_as="pil", kinds=["recall", "dense_text"],
                                              max_frames=16))
    lengths = expected["attention_mask"].sum(1)
    batch = report["batch"]
    assert (batch["rows"], batch["tokens"], batch["longest"]) == (4, int(lengths.sum()), int(lengths.max()))
    assert batch["video_patches"] == expected["pixel_values_videos"].shape[0] > 0
    assert batch["padding_share"] == round(1 - int(lengths.sum()) / expected["attention_mask"].numel(), 3)
    profile = report["profile"]
    assert profile["profiled"].startswith("CPU") and profile["calls"] == 3 and profile["top"]
    assert json.loads((tmp_path / "profile.json").read_text())["batch"] == batch
