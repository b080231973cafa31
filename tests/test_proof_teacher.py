"""The proof teacher's training: it learns, it saves as a loadable Hugging Face teacher, the stage records it."""

import json
import re

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from bench.proof_teacher import parse_args, run
from model.processing import InfiniteVLProcessor
from pipeline.eval.mechanisms import length_octave
from pipeline.eval.synthetic import picture_samples
from pipeline.teacher_train import lr_factor, training_batch


def test_teacher_trains_saves_reloads_and_scores(tmp_path, one_thread):
    report = run(parse_args(["--out", str(tmp_path), "--steps", "30", "--batch-size", "4", "--hidden", "32",
                             "--layers", "2", "--vision-hidden", "32", "--vision-depth", "1", "--eval-pictures", "4",
                             "--set", "intermediate=64", "--set", "warmup_steps=2", "--set", "min_lr_ratio=0.5", "--mechanisms",
                             json.dumps({"distances": [2], "frame_counts": [8], "recall_samples": 2,
                                         "text_samples": 3, "batch_size": 4})]))
    curve = report["loss_curve"]
    assert curve[-1]["step"] == 30 and curve[-1]["loss"] < curve[0]["loss"]
    assert curve[-1]["lr"] == pytest.approx(0.5 * report["config"]["lr"])  # the cosine ran out at its floor
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


def test_a_dense_text_teacher_whose_processor_shrinks_the_picture_is_refused_before_training(tmp_path):
    with pytest.raises(SystemExit, match=r"teacher.train.max_pixels \(12544\) under the dense_text picture's "
                                         r"336x84 = 28224"):
        small = ["steps=1", "batch_size=2", "hidden=32", "heads=2", "kv_heads=1", "num_layers=1", "intermediate=64",
                 "vision_hidden=32", "vision_depth=1", "max_frames=8", "eval_pictures=2", "loader_workers=0"]
        argv = ["--out", str(tmp_path), "--config", "configs/mechanisms.yaml", "--set", "max_pixels=12544"]
        run(parse_args(argv + [x for item in small for x in ("--set", item)]))  # small: were it not refused, quick
    assert not (tmp_path / "teacher").exists() and not (tmp_path / "report.json").exists()


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 100, 10) == 0.1 and lr_factor(9, 100, 10) == 1.0
    assert abs(lr_factor(100, 100, 10) - 0.1) < 1e-9 and lr_factor(50, 100, 10) < 1.0
    assert lr_factor(100, 100, 10, floor=0.6) == pytest.approx(0.6) and lr_factor(55, 100, 10, floor=0.6) == pytest.approx(0.8)


def test_profile_step_draws_the_stages_first_batch_and_profiles_its_step(tmp_path, one_thread):
    from pipeline.teacher_train import batch_seed

    shrink = ["hidden=32", "num_layers=2", "heads=2", "kv_heads=1", "intermediate=64", "vision_hidden=32",
              "vision_depth=1", "batch_size=4", "max_frames=16", "precision=fp32", "loader_workers=0"]
    report = run(parse_args(["--out", str(tmp_path), "--config", "configs/mechanisms.yaml", "--profile-step",
                             *[a for s in shrink for a in ("--set", s)]]))
    assert report["config"]["pictures"] == ["recall", "dense_text"]  # the run config's kinds, its dims overridden
    # the batch the teacher stage's loader makes first: the same pictures, counted here with the processor
    from model.tiny import build_processor

    low, high = length_octave(0, 0, 16)
    expected = training_batch(build_processor(max_pixels=report["config"]["max_pixels"]),
                              picture_samples(2, batch_seed(0, 0), images_as="pil", kinds=["recall", "dense_text"],
                                              max_frames=high, min_frames=low))
    lengths = expected["attention_mask"].sum(1)
    batch = report["batch"]
    assert (batch["rows"], batch["tokens"], batch["longest"]) == (4, int(lengths.sum()), int(lengths.max()))
    assert batch["video_patches"] == expected["pixel_values_videos"].shape[0] > 0
    assert batch["padding_share"] == round(1 - int(lengths.sum()) / expected["attention_mask"].numel(), 3)
    profile = report["profile"]
    assert profile["profiled"].startswith("CPU") and profile["calls"] == 3 and profile["top"]
    assert json.loads((tmp_path / "profile.json").read_text())["batch"] == batch


class Killed(Exception):
    pass


def test_a_killed_teacher_training_goes_on_from_its_saved_state_exactly(tmp_path, one_thread, monkeypatch):
    from pipeline import teacher_train
    from pipeline.config import TeacherTrainSection

    settings = TeacherTrainSection(steps=6, batch_size=4, lr=1e-3, warmup_steps=2, hidden=32, num_layers=2,
                                   intermediate=64, vision_hidden=32, vision_depth=1, eval_pictures=2, device="cpu",
                                   checkpoint_seconds=0)
    whole, _, whole_metrics = teacher_train.train_teacher(settings, seed=1, log=lambda _: None)

    state = teacher_train.TrainingState(str(tmp_path / "state.pt"))
    real, calls = teacher_train.forward_backward, []

    def killed_at_step_4(model, batch, autocast):
        calls.append(int(batch["attention_mask"].sum()))
        if len(calls) == 4:
            raise Killed()
        return real(model, batch, autocast)

    monkeypatch.setattr(teacher_train, "forward_backward", killed_at_step_4)
    with pytest.raises(Killed):
        teacher_train.train_teacher(settings, seed=1, log=lambda _: None, state=state)
    assert torch.load(state.url, weights_only=False)["step"] == 3

    lines, seen = [], []
    monkeypatch.setattr(teacher_train, "forward_backward",
                        lambda model, batch, autocast: seen.append(int(batch["attention_mask"].sum()))
                        or real(model, batch, autocast))
    resumed, _, metrics = teacher_train.train_teacher(settings, seed=1, log=lines.append, state=state)
    assert any("going on from step 3" in line for line in lines)
    assert calls[3:] + seen[1:] == seen and len(seen) == 3  # steps 4-6 only, on the batches the whole run had
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert metrics["steps"] == 6 and metrics["loss"] == whole_metrics["loss"]
    assert metrics["train_tokens"] == whole_metrics["train_tokens"]

    # finished and saved: a kill after training (while scoring or publishing) trains nothing again
    monkeypatch.setattr(teacher_train, "forward_backward", lambda *a: (_ for _ in ()).throw(Killed()))
    again, _, _ = teacher_train.train_teacher(settings, seed=1, log=lambda _: None, state=state)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in whole.state_dict().items())

    (tmp_path / "state.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(RuntimeError, match="state.pt: the teacher's saved training state cannot be read"):
        teacher_train.train_teacher(settings, seed=1, log=lambda _: None, state=state)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_the_teacher_stage_killed_mid_training_goes_on_from_its_state_and_commits(tmp_path):
    """A real SIGKILL of the stage's process while it trains; the rerun resumes the attempt from its saved state."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from pipeline.config import config_from_dict, load_config
    from pipeline.stages import committed, stage_dir

    repo = Path(__file__).resolve().parents[1]
    cfg = config_from_dict(load_config(str(repo / "configs/tiny.yaml")).model_dump(mode="json"), [
        f"run.root={json.dumps(str(tmp_path / 'run'))}", 'run.stages=["teacher"]', "teacher.train.steps=80",
        "teacher.train.target_accuracy=null", "teacher.train.checkpoint_seconds=0", "teacher.train.eval_pictures=2",
        "teacher.train.hidden=32", "teacher.train.num_layers=2", "teacher.train.vision_hidden=32"])
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "from bench.proof import run_stages; run_stages(sys.argv[1], ['teacher'], 'direct')")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    state = Path(stage_dir(str(tmp_path / "run"), "teacher")) / "attempt-0001" / "_training_state.pt"
    first = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=repo, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 200
    while not (state.exists() and torch.load(state, weights_only=False)["step"] >= 5) and time.time() < deadline:
        assert first.poll() is None, first.stdout.read()[-3000:]
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = torch.load(state, weights_only=False)["step"]
    assert 5 <= killed_at < 80 and committed(stage_dir(str(tmp_path / "run"), "teacher")) is None

    again = subprocess.run([sys.executable, "-c", code, str(path)], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=240)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    went_on = [int(s) for s in re.findall(r"going on from step (\d+)", again.stdout + again.stderr)]
    assert went_on and went_on[0] >= killed_at  # a later save may have landed between the read and the kill
    marker = committed(stage_dir(str(tmp_path / "run"), "teacher"))
    assert marker["metrics"]["steps"] == 80 and marker["output"].endswith("attempt-0001")
    assert not state.exists()  # published and committed: the state is gone, the file list never held it
    assert "_training_state.pt" not in marker["files"]
