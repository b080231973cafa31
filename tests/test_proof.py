"""The transfer proof: the held-out scorer, retention, and the tiny recipe end to end with a well-formed report."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bench import proof

REPO = Path(__file__).resolve().parents[1]
from pipeline.eval.metrics import score_sample
from pipeline.eval.runner import build_prompt
from pipeline.eval.metrics import retention as stage_retention
from pipeline.eval.synthetic import DEFAULT_KINDS, HELD_OUT_SEED, PICTURE_KINDS, picture_samples
from pipeline.teacher_train import IGNORE, batch_seed, teacher_forced_exact, training_batch


def test_heldout_questions_are_scored_by_exact_match_after_normalisation():
    samples = picture_samples(4)
    assert [s["category"] for s in samples] == [k for kind in DEFAULT_KINDS for k in PICTURE_KINDS[kind]]
    assert samples == picture_samples(4) and samples != picture_samples(4, seed=HELD_OUT_SEED + 7)
    # hand-computed: the answer given ten times makes the VQA soft accuracy an exact match
    answers = ["three"] * 10
    assert score_sample("vqa", "Three.", answers)[0] == 1.0
    assert score_sample("vqa", "3", answers)[0] == 1.0  # number words normalise to digits
    assert score_sample("vqa", "four", answers)[0] == 0.0
    assert score_sample("vqa", "three circles", answers)[0] == 0.0
    words = ["red chart value"] * 10
    assert score_sample("vqa", "red chart value", words)[0] == 1.0
    assert score_sample("vqa", "red chart", words)[0] == 0.0
    assert build_prompt(samples[0]).startswith(samples[0]["question"] + "\n")


def test_a_runs_picture_kinds_reach_teacher_data_and_eval(tmp_path):
    """teacher.train.pictures is the one place a run names its picture kinds: the held-out suite, the
    sample-pictures corpora and the runner settings built from the run config all keep to it."""
    from pipeline.config import load_config
    from pipeline.data.synthetic import write_picture_questions
    from pipeline.eval.api import _settings

    shapes = picture_samples(6, kinds=["shapes"])
    assert {s["category"] for s in shapes} == {"shapes/count", "shapes/color"} and len(shapes) == 12
    with pytest.raises(ValueError, match="unknown picture kinds \\['maps'\\]"):
        picture_samples(2, kinds=["maps"])
    records = [json.loads(line) for line in write_picture_questions(tmp_path, 3, seed=1, kinds=["line_chart"]).open()]
    assert [r["id"].split("/")[0] for r in records] == ["line_chart"] * 6

    cfg = load_config("configs/tiny.yaml", ["teacher.train.pictures=[shapes, line_chart]"])
    assert cfg.picture_kinds == ["shapes", "line_chart"] and _settings(cfg, None)[1].pictures == ["shapes", "line_chart"]
    assert load_config("configs/tiny.yaml", ["teacher.train.pictures=null"]).picture_kinds is None  # unset: every kind


def test_training_seeds_never_draw_held_out_pictures():
    assert all(batch_seed(seed, i) < HELD_OUT_SEED for seed in (0, 5, 10**9) for i in (0, 1, 10**7))


def test_teacher_forced_exact_match_is_greedy_exact_match(one_thread):
    from types import SimpleNamespace

    from model.tiny import build_tiny_teacher

    model, processor = build_tiny_teacher(0, hidden=32, intermediate=64, num_layers=2, vision_hidden=32,
                                          vision_depth=1)
    batch = training_batch(processor, picture_samples(2, seed=3, images_as="pil"))
    labels = batch["labels"]
    assert (labels != IGNORE).sum(1).min() >= 2  # answer tokens and the end of turn
    # the logit at position t predicts the token at t + 1: a huge bias on exactly those logits makes greedy
    # decoding produce the answer. Row 0 gets it on every answer token; row 1 on all but its last answer token
    # (the end of turn), which is pushed to a wrong token instead: one token wrong makes the whole row wrong.
    # The other rows keep the random model's logits.
    vocab = model.config.get_text_config().vocab_size
    bias = torch.zeros(*labels.shape, vocab)
    for row in (0, 1):
        positions = (labels[row, 1:] != IGNORE).nonzero().flatten().tolist()
        for t in positions:
            token = int(labels[row, t + 1])
            if row == 1 and t == positions[-1]:
                token = (token + 1) % vocab
            bias[row, t, token] = 1e4

    class Biased(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **inputs):
            return SimpleNamespace(logits=self.inner(**inputs).logits + bias)

    rows = labels.shape[0]
    assert rows >= 3
    assert teacher_forced_exact(model, batch).tolist() == [0.0] * rows  # a random model answers nothing right
    assert teacher_forced_exact(Biased(), batch).tolist() == [1.0] + [0.0] * (rows - 1)


def test_retention():
    assert proof.retention(45.0, 90.0) == 0.5
    assert proof.retention(90.0, 90.0) == 1.0
    assert proof.retention(50.0, 0.0) is None and proof.retention(None, 80.0) is None
    assert stage_retention(30.0, 40.0) == 0.75 and stage_retention(1.0, 0.0) is None


def test_scores_run_in_order_beside_the_caller_and_the_first_error_surfaces():
    started, release, seen = threading.Event(), threading.Event(), []

    def slow():
        started.set()
        release.wait(10)
        seen.append("a")

    scorer = proof.InOrder()
    scorer.submit(slow)
    scorer.submit(lambda: seen.append("b"))
    assert started.wait(10) and seen == []  # submit returned while the first call still runs
    release.set()
    scorer.wait()
    assert seen == ["a", "b"]

    failing = proof.InOrder()
    failing.submit(lambda: 1 / 0)
    failing.submit(lambda: seen.append("after the error"))
    with pytest.raises(ZeroDivisionError):
        failing.wait()
    assert seen == ["a", "b"]


def test_a_resumed_run_reuses_the_scores_of_the_same_checkpoint_and_settings(tmp_path):
    calls = []

    def scorer(value):
        return lambda: calls.append(value) or {"accuracy": value}

    job = {"name": "main", "config": "a.yaml", "runner": "direct", "mechanisms": {"recall_samples": 4}}
    marker = {"digest": "d1", "output": "somewhere"}
    where = str(tmp_path / "proof-eval" / "stage2")
    assert proof.cached_score(where, marker, job, scorer(10.0)) == {"accuracy": 10.0}
    assert proof.cached_score(where, marker, {**job, "config": "b.yaml"}, scorer(11.0)) == {"accuracy": 10.0}
    assert calls == [10.0]  # the same checkpoint, scored the same way: read back, not scored again
    assert proof.cached_score(where, {**marker, "digest": "d2"}, job, scorer(12.0)) == {"accuracy": 12.0}
    changed = {**job, "mechanisms": {"recall_samples": 8}}
    assert proof.cached_score(where, {**marker, "digest": "d2"}, changed, scorer(13.0)) == {"accuracy": 13.0}
    assert proof.cached_score(where, {"output": "x"}, changed, scorer(14.0)) == {"accuracy": 14.0}  # no digest
    assert calls == [10.0, 12.0, 13.0, 14.0]


def test_ablation_rows_and_bad_shares_fail_clearly():
    cfg = proof.base_config("configs/proof.yaml", False, [], "/tmp/x")
    rows = {r["name"]: r for r in proof.variants(cfg)}
    assert set(rows) == {"mixer=gated_deltanet", "mixer=gla", "mixer=mamba2", "share=0", "share=1/8", "share=1/4",
                         "share=1/2"}
    L, S = "linear_attention", "sliding_attention"
    assert rows["share=0"]["student"]["layer_types"] == [L] * 8
    assert rows["share=1/8"]["student"]["layer_types"] == [S] + [L] * 7
    assert rows["share=1/2"]["student"]["layer_types"] == [S, L] * 4
    assert not any("error" in r for r in rows.values())
    assert proof.is_main_variant(rows["mixer=gated_deltanet"], cfg) and proof.is_main_variant(rows["share=1/4"], cfg)
    assert not proof.is_main_variant(rows["mixer=gla"], cfg) and not proof.is_main_variant(rows["share=1/2"], cfg)
    with pytest.raises(ValueError, match="does not divide"):
        proof.layer_types(proof.Fraction(1, 8), 4)
    # share 0 has no sliding layers: its stages do not ask to train them (a stage refuses an empty group)
    none = proof.variant_config(cfg, rows["share=0"], "/tmp/x")
    half = proof.variant_config(cfg, rows["share=1/2"], "/tmp/x")
    assert "sliding_attn" in half.train.stage2.trainable and "sliding_attn" not in none.train.stage2.trainable
    assert none.train.stage2.trainable == [g for g in half.train.stage2.trainable if g != "sliding_attn"]


@pytest.mark.timeout(600)
def test_tiny_proof_end_to_end_and_cut_short_by_sigterm(tmp_path):
    """The tiny recipe through the direct runner (no Prefect), as a separate process that is sent SIGTERM (what
    `timeout` sends) while Stage III runs: the report still holds the teacher and Stages I-a to II, scored as
    each finished, says it was cut short, and the stage processes are stopped."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    # Stage I-a runs 2 steps with a checkpoint every step: the direct runner announces a checkpoint
    overrides = ["teacher.train.steps=4", "teacher.train.num_layers=4", "teacher.train.hidden=32",
                 "teacher.train.intermediate=64", "teacher.train.vision_hidden=32", "teacher.train.vision_depth=1",
                 "data.distill.max_samples=8", "data.instruct.max_samples=8", "data.long.max_samples=2",
                 "train.stage1a.steps=2", "train.stage1b.steps=1", "train.stage2.steps=1",
                 "train.stage3.steps=100000", "train.stage1a.checkpoint_every=1", "train.stage1b.checkpoint_every=1",
                 "train.stage2.checkpoint_every=1", "train.stage3.checkpoint_every=100000", "student.sliding_window=16"]
    cmd = [sys.executable, "-m", "bench.proof", "--tiny", "--runner", "direct", "--root", str(runs), "--out", str(out),
           "--eval-pictures", "2", "--no-ablations", *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "proof.log", "w") as log:
        parent = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            result = runs / "jobs" / "main.result.json"
            deadline = time.time() + 540
            while time.time() < deadline and parent.poll() is None:
                if result.exists() and "stage2" in json.loads(result.read_text())["stages"]:
                    break
                time.sleep(1)
            assert parent.poll() is None, (tmp_path / "proof.log").read_text()[-3000:]
            assert result.exists(), "Stage II was not scored in time"
            # the evidence that Stage III runs: its worker's first training step, relayed into the job's log
            main_log, first_step = runs / "jobs" / "main.log", "stage3 step 1/"
            deadline = time.time() + 180
            while time.time() < deadline and parent.poll() is None and first_step not in main_log.read_text():
                time.sleep(0.5)
            assert first_step in main_log.read_text(), ("Stage III did not train a step in time",
                                                        main_log.read_text()[-3000:])
            parent.send_signal(signal.SIGTERM)
            assert parent.wait(timeout=60) == 0, (tmp_path / "proof.log").read_text()[-3000:]
        finally:  # a failed wait must not leave the proof and its stage workers running
            if parent.poll() is None:
                parent.send_signal(signal.SIGTERM)
                try:
                    parent.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    parent.kill()

    report = json.loads((out / "proof.json").read_text())
    assert {"bench", "device", "date", "commit", "config", "rows", "summary"} <= set(report)
    assert "cut short" in report["interrupted"]
    assert [r["stage"] for r in report["rows"]] == ["teacher", "stage1a", "stage1b", "stage2"]
    teacher = report["rows"][0]["accuracy"]
    assert report["summary"]["teacher_acc"] == teacher
    for r in report["rows"][1:]:
        assert 0 <= r["accuracy"] <= 100 and r["tokens"] > 0
        assert r["retention"] == (round(r["accuracy"] / teacher, 4) if teacher else None)
    s = report["summary"]
    assert s["retention_stage2"] == proof.retention(s["student_acc_stage2"], teacher)
    assert s["student_acc_final"] is None and s["retention_final"] is None
    assert report["rows"][0]["tokens"] > 0
    md = (out / "proof.md").read_text()
    assert "| stage2 |" in md and "Incomplete" in md
    # no process outlives the proof: neither the job's nor the Stage III worker it launched
    launched = [line.rsplit(" ", 1)[-1] for line in (runs / "jobs" / "main.log").read_text().splitlines()
                if "launching:" in line]
    assert launched and "stage2: done" in (runs / "jobs" / "main.log").read_text()
    for pattern in (str(runs / "jobs" / "main.json"), launched[-1]):
        alive = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        assert not alive, (pattern, alive)
