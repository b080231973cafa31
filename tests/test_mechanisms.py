"""The mechanisms suite: answers determined by the frames and pictures, distances and frame counts where
configured (counted with the real processor), character accuracy by hand, the kinds reaching teacher, data and
eval, and bench.mechanisms --tiny end to end."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.eval import mechanisms as mech
from pipeline.eval.synthetic import COLORS, picture_samples

REPO = Path(__file__).resolve().parents[1]


def _colour_of(frame) -> str | None:
    """The named colour a frame shows (the key's shape), read off its pixels; None for grey and white only."""
    pixels = {tuple(p) for p in np.asarray(frame).reshape(-1, 3)}
    found = [name for name, rgb in COLORS.items() if rgb in pixels]
    return found[0] if found else None


def test_recall_stream_key_sits_where_asked_and_determines_the_answer():
    for seed in range(12):
        frames, qa = mech.recall_stream(random.Random(seed), 20, 6)
        assert len(frames) == 20
        white = [t for t, f in enumerate(frames) if f.getpixel((0, 0)) == (255, 255, 255)]
        assert white == [6, 7]  # the key is one temporal patch, exactly where asked
        assert all(_colour_of(f) is None for t, f in enumerate(frames) if t not in (6, 7))  # distractors are grey
        (q1, answer), (q2, detail) = qa
        colour = _colour_of(frames[6])
        if colour is not None:  # a coloured shape: the answer names the colour drawn, the detail is that colour
            assert answer.split()[0] == colour == detail and answer.split()[1] in mech.SHAPES
        else:  # a word: black text on white, the answer a word of the list
            assert answer == detail and answer in mech.WORDS
            assert (np.asarray(frames[6]) < 100).all(axis=2).any()
    with pytest.raises(ValueError, match="even number of frames"):
        mech.recall_stream(random.Random(0), 7, 0)
    with pytest.raises(ValueError, match="temporal patch"):
        mech.recall_stream(random.Random(0), 8, 3)


def test_distances_and_frame_counts_land_where_configured(processor):
    """Counted with the real processor: 2 tokens a frame, and the key's distance grows by exactly that."""
    from model.tiny import build_processor

    proc = build_processor(max_pixels=12544)
    grid = proc(text="<|vision_start|><|video_pad|><|vision_end|>", videos=[mech.recall_sample(8, 0)["frames"]])
    assert grid["video_grid_thw"].tolist() == [[5, 4, 4]]  # 10 frames: 5 temporal patches of 4x4 patches
    assert int((grid["input_ids"] == proc.video_token_id).sum()) == 10 * mech.TOKENS_PER_FRAME
    d2, d8, d24, d504 = (mech.key_distance(proc, mech.recall_sample(d, 0)) for d in (2, 8, 24, 504))
    assert d8 - d2 == 6 * mech.TOKENS_PER_FRAME and d504 - d2 == 502 * mech.TOKENS_PER_FRAME
    prompt = d2 - 2 * mech.TOKENS_PER_FRAME  # the tokens after the last frame
    # the default sweep with a 64-token window: two distances inside it, one just past, the last 16x past
    assert mech.MechanismsConfig().distances[:3] == [2, 8, 24] and mech.MechanismsConfig().distances[-1] == 504
    assert 0 < prompt < d2 < d8 < 64 < d24 < 2 * 64 and d504 > 16 * 64
    assert mech.frames_that_fit(1280) == 592 and mech.PROMPT_TOKENS > prompt
    for n in (32, 1024):
        assert len(mech.recall_sample(0, 3, n_frames=n)["frames"]) == n
    drawn = picture_samples(40, seed=3, images_as="pil", kinds=["recall"], max_frames=64)
    lengths = [len(s["frames"]) for s in drawn]
    assert min(lengths) >= mech.MIN_FRAMES and max(lengths) <= 64 and len(set(lengths)) > 5


def test_teacher_batches_hold_recall_streams_of_one_octave(processor):
    """A batch pads to its longest stream: each training batch's streams (both questions of 3 pictures) come from
    one octave of lengths, and over the batches every octave from MIN_FRAMES to max_frames comes up about equally
    often (log-uniform)."""
    import collections
    import itertools

    from pipeline.teacher_train import PictureBatches

    batches = PictureBatches(processor, batch_size=6, seed=3, kinds=["recall"], max_frames=64)
    for index, batch in enumerate(itertools.islice(iter(batches), 6)):
        low, high = mech.length_octave(index, 3, 64)
        frames = (batch["video_grid_thw"][:, 0] * mech.TEMPORAL_PATCH).tolist()
        assert len(frames) == 6 and all(low <= n <= high for n in frames), (index, low, high, frames)
    octaves = collections.Counter(mech.length_octave(i, 0, 1024) for i in range(8000))
    assert sorted(octaves) == [(4 * 2 ** k, 8 * 2 ** k) for k in range(8)]  # 4-8 frames ... 512-1024
    assert all(800 < n < 1200 for n in octaves.values())
    assert mech.length_octave(5, 0, 4) == (4, 4)  # streams no longer than the shortest: one length


def test_dense_text_needs_processors_that_keep_its_cells_every_one_named_at_once():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config("configs/mechanisms.yaml", ["teacher.train.max_pixels=12544"])
    assert "teacher.train.max_pixels (12544) under the dense_text picture's 336x84 = 28224" in str(e.value)
    small = ["data.distill.max_pixels=12544", "data.long.max_pixels=20000"]
    with pytest.raises(ConfigError) as e:
        load_config("configs/mechanisms.yaml", small)
    # both corpora named at once, the instruct one (at the picture's size) not
    assert "data.distill.max_pixels (12544), data.long.max_pixels (20000) under the dense_text" in str(e.value)
    assert "instruct" not in str(e.value) and "teacher.train.max_pixels" not in str(e.value)
    # the teacher's cap and the corpora's in one error, not one after another fix
    with pytest.raises(ConfigError) as e:
        load_config("configs/mechanisms.yaml", ["teacher.train.max_pixels=12544", *small])
    assert ("teacher.train.max_pixels (12544), data.distill.max_pixels (12544), data.long.max_pixels (20000) "
            "under the dense_text") in str(e.value)
    # no text: any cap; corpora of other sources: theirs
    load_config("configs/mechanisms.yaml", ["teacher.train.pictures=[\"recall\"]", "teacher.train.max_pixels=12544",
                                            *small])
    load_config("configs/mechanisms.yaml", [*small, "data.distill.sources=[\"sample\"]", "data.long.sources=[\"sample\"]"])
    load_config("configs/mechanisms.yaml", [f"teacher.train.max_pixels={mech.TEXT_PIXELS}"])


def test_dense_text_answers_are_the_strings_drawn_on_their_lines():
    for seed in range(10):
        rng = random.Random(seed)
        image, qa = mech.dense_text(random.Random(seed))
        assert image.size == mech.TEXT_SIZE
        for question, answer in qa:
            assert 6 <= len(answer) <= 12 and set(answer) <= set(mech.TEXT_ALPHABET)
        # redraw from the same draws: the question's line holds exactly that string
        n = rng.choice((1, 2, 2, 3, 3))
        lines = ["".join(rng.choice(mech.TEXT_ALPHABET) for _ in range(rng.randint(6, 12))) for _ in range(n)]
        named = {"first": 0, "second": 1, "third": 2}
        for question, answer in qa:
            row = next((i for word, i in named.items() if word in question), 0)
            assert answer == lines[row]
        ink = np.asarray(image).min(axis=2) < 128
        assert {y // mech.TEXT_CELL for y in range(image.size[1]) if ink[y].any()} == set(range(n))
        for row, line in enumerate(lines):
            # a character a cell: the line's inked cells are len(line) neighbours, each inked in its own middle
            band = ink[row * mech.TEXT_CELL:(row + 1) * mech.TEXT_CELL]
            cells = [c for c in range(mech.TEXT_COLUMNS)
                     if band[:, c * mech.TEXT_CELL:(c + 1) * mech.TEXT_CELL].any()]
            assert cells == list(range(cells[0], cells[0] + len(line)))
            assert not band[:, [c * mech.TEXT_CELL for c in cells]].any()  # no glyph crosses a cell's edge


def _text_picture(starts: dict[int, int], question: str, sample_id: str = "dense_text/t") -> dict:
    """A dense-text sample whose picture has ink from column `starts[row]` to the line's end, row by row."""
    from PIL import Image, ImageDraw

    from pipeline.eval.dataset import encode_image, make_sample

    image = Image.new("RGB", mech.TEXT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    for row, start in starts.items():
        for c in range(start, mech.TEXT_COLUMNS):
            x, y = c * mech.TEXT_CELL, row * mech.TEXT_CELL
            draw.rectangle((x + 8, y + 8, x + 20, y + 20), fill="black")
    return make_sample(id=sample_id, suite="mechanisms", image=encode_image(image), question=question,
                       answers=["x"] * 10, metric="vqa", category="dense_text", source="synthetic")


def test_text_distance_counts_back_to_the_asked_lines_first_character():
    from model.tiny import build_processor

    proc = build_processor(max_pixels=mech.TEXT_PIXELS)
    first, third = "what is written on the first line?", "what is written on the third line?"
    # a line starting 7 cells later is 7 tokens nearer the answer
    assert (mech.text_distance(proc, _text_picture({0: 0, 2: 0}, first))
            - mech.text_distance(proc, _text_picture({0: 7, 2: 0}, first))) == 7
    # two rows down is 24 cells nearer, less what the longer question adds after the picture
    words = [len(proc.tokenizer(q)["input_ids"]) for q in (first, third)]
    assert (mech.text_distance(proc, _text_picture({0: 2, 2: 2}, first))
            - mech.text_distance(proc, _text_picture({0: 2, 2: 2}, third))) == 2 * mech.TEXT_COLUMNS + words[0] - words[1]
    # a question naming no line asks for the first
    assert mech.text_distance(proc, _text_picture({0: 3}, "what does the text say?")) > mech.text_distance(
        proc, _text_picture({0: 3, 1: 3}, "what is written on the second line?"))
    with pytest.raises(ValueError, match="dense_text/empty: no character drawn on line 2"):
        mech.text_distance(proc, _text_picture({0: 0}, "what is written on the second line?", "dense_text/empty"))
    with pytest.raises(ValueError, match="not a token a cell"):
        mech.text_distance(build_processor(max_pixels=12544), _text_picture({0: 0}, first))
    # the held-out questions with this prompt: every one further back than the picture's 36 tokens
    held_out = [mech.text_distance(proc, mech.text_sample(i)) for i in range(16)]
    assert all(36 < d < 36 + 64 for d in held_out) and len(set(held_out)) > 3


def test_character_accuracy_by_hand():
    assert mech.char_accuracy("abc123", "abc123") == 1.0
    assert mech.char_accuracy("abd123", "abc123") == pytest.approx(5 / 6)  # one substitution
    assert mech.char_accuracy("abc12", "abc123") == pytest.approx(5 / 6)   # one deletion
    assert mech.char_accuracy("xabc123", "abc123") == pytest.approx(5 / 6)  # one insertion
    assert mech.char_accuracy("", "abcdef") == 0.0
    assert mech.char_accuracy("zzzzzzzzzzzzzzzz", "abcdef") == 0.0  # floored at zero
    assert mech.char_accuracy(" ABC123. ", "abc123") == 1.0  # the VQA normalisation: case, spaces, full stop


def test_text_scores_from_a_suites_samples(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [{"prediction": "abc123", "answers": ["abc123"] * 10, "score": 1.0},
            {"prediction": "abd12", "answers": ["abc123"] * 10, "score": 0.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = mech.text_scores(str(path))
    assert s["n"] == 2 and s["exact"] == 50.0
    assert s["char_accuracy"] == pytest.approx(100 * (1 + 4 / 6) / 2)  # abd12 vs abc123: 1 sub + 1 del


def test_kinds_reach_teacher_batches_and_the_data_stage_corpus(tmp_path, processor):
    from pipeline.data.media import decode_video
    from pipeline.data.synthetic import write_picture_questions
    from pipeline.teacher_train import IGNORE, training_batch

    samples = picture_samples(2, seed=7, images_as="pil", kinds=["recall", "dense_text"], max_frames=16)
    assert [s["category"] for s in samples] == ["recall/what", "recall/detail", "dense_text/line",
                                                "dense_text/other_line"]
    batch = training_batch(processor, samples)
    assert batch["video_grid_thw"].shape[0] == 2 and batch["image_grid_thw"].shape[0] == 2
    answer = [t for t in batch["labels"][0].tolist() if t != IGNORE]
    assert processor.tokenizer.decode(answer[:-1]) == samples[0]["answers"][0]

    records = [json.loads(line) for line in write_picture_questions(tmp_path, 2, seed=7, kinds=["recall"],
                                                                    max_frames=16).open()]
    assert [r["conversations"][0]["value"].startswith("<video>") for r in records] == [True] * 4
    drawn = picture_samples(2, seed=7, images_as="pil", kinds=["recall"], max_frames=16)
    clip = decode_video(str(tmp_path / records[0]["video"]), 2.0, 10_000)
    assert len(clip.frames) == len(drawn[0]["frames"])  # every frame comes back, at the rate written
    diff = max(np.abs(np.asarray(a, int) - np.asarray(b, int)).max() for a, b in zip(clip.frames, drawn[0]["frames"]))
    assert diff <= 2  # lossless but for the colour conversion's rounding
    assert records[0]["conversations"][1]["value"] == drawn[0]["answers"][0]


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_tiny_mechanisms_bench_end_to_end(tmp_path):
    """The tiny recipe (main run through Stage III, the all-linear and all-sliding arms through II, the kernel
    warm-up beside the teacher) on two CPU workers: every scored row has the configured distances and frame counts, the summary is computed from the rows;
    the all-sliding student (no linear layer: Stages I-a and I-b hand on the converted teacher) is scored too."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    sweep = json.dumps({"distances": [2, 18], "frame_counts": [8], "recall_samples": 1, "text_samples": 1})
    cmd = [sys.executable, "-m", "bench.mechanisms", "--tiny", "--runner", "direct", "--root", str(runs),
           "--out", str(out), "--gpus", "0,0", "--sweep", sweep, "--arms", "share=0,share=1",
           "--set", "teacher.train.num_layers=4", "--set", "teacher.train.steps=2", "--warm"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the kernel warm-up ran its own chain to the end (its main run through Stage III, scored) before the students
    assert "kernel warm-up done\n" in done.stdout, done.stdout[-3000:]
    assert done.stdout.index("kernel warm-up done") < done.stdout.index("student runs on")
    assert (runs / "warm" / "main" / "stage3" / "_COMPLETE.json").exists()
    assert (runs / "warm" / "main" / "proof-eval" / "stage3").is_dir()
    report = json.loads((out / "mechanisms.json").read_text())
    assert report["config"]["warm"] is True
    assert {"bench", "device", "date", "commit", "config", "rows", "summary"} <= set(report)
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["teacher", "share=1/4", "share=1/4 + Stage III", "share=1", "share=0"]
    assert not report["failures"], report["failures"]
    for name in ("teacher", "share=1/4", "share=1/4 + Stage III", "share=1", "share=0"):
        assert [d["distractor_frames"] for d in rows[name]["scores"]["recall_by_distance"]] == [2, 18]
    window = report["config"]["sliding_window"]
    teacher = rows["teacher"]
    tokens = [d["tokens"] for d in teacher["scores"]["recall_by_distance"]]
    assert tokens[1] - tokens[0] == 16 * mech.TOKENS_PER_FRAME and tokens[1] > window
    assert teacher["recall_beyond_window"] == pytest.approx(
        sum(d["accuracy"] for d in teacher["scores"]["recall_by_distance"] if d["tokens"] > window)
        / sum(d["tokens"] > window for d in teacher["scores"]["recall_by_distance"]))
    s = report["summary"]
    assert set(s) >= {"teacher_recall", "teacher_text", "hybrid_recall_beyond_window", "hybrid_text",
                      "swa_only_recall_beyond_window", "linear_only_text", "stage3_gain_1024_frames"}
    assert s["linear_only_text"] == rows["share=0"]["scores"]["text"]["exact"]
    assert s["swa_only_recall_beyond_window"] == rows["share=1"]["recall_beyond_window"]
    frames = {n: rows[n]["scores"]["frames"] for n in ("share=1/4", "share=1/4 + Stage III")}
    assert [r["frames"] for r in frames["share=1/4"]] == [8] and rows["share=0"]["scores"]["frames"] == []
    assert s["stage3_gain_1024_frames"] == frames["share=1/4 + Stage III"][0]["accuracy"] - frames["share=1/4"][0]["accuracy"]
    # the text question's reach, counted with the students' processor on the same question for every arm
    reach = teacher["scores"]["text"]["distances"]
    assert reach["n"] == 1 and 36 < reach["min"] == reach["median"] == reach["max"]
    assert reach["past_window"] == 1  # the tiny window (16) is shorter than the picture's 36 tokens
    assert all(rows[n]["scores"]["text"]["distances"] == reach for n in rows)
    md = (out / "mechanisms.md").read_text()
    assert (out / "mechanisms.png").stat().st_size > 0 and "| teacher |" in md
    assert f"sits {reach['min']}-{reach['max']} tokens before the answer" in md and "1 of 1 questions" in md


def test_a_teacher_that_learned_neither_task_stops_the_bench_before_any_student(tmp_path, monkeypatch):
    from bench import mechanisms as bench
    from bench import proof

    root = tmp_path / "runs"
    cfg = bench.base_config("configs/mechanisms.yaml", False, [], str(root))
    assert bench.teacher_gate(cfg, 50.0) is None  # nothing committed yet: nothing to judge
    marker = {"stage": "teacher", "attempt": "attempt-0001", "fingerprint": "f", "digest": "d",
              "metrics": {"score": 9.375, "steps": 790, "heldout/pictures": 9.375, "heldout/dense_text/line": 0.0,
                          "heldout/recall/what": 15.625}}
    (root / "main" / "teacher").mkdir(parents=True)
    (root / "main" / "teacher" / "_COMPLETE.json").write_text(json.dumps(marker))
    why = bench.teacher_gate(cfg, 50.0)
    assert "9.4% held out" in why and "dense_text/line 0%" in why and "recall/what 16%" in why
    assert "790 steps" in why and "--min-teacher 0" in why and "pictures" not in why.split("(")[1].split(")")[0]
    assert bench.teacher_gate(cfg, 9.375) is None and bench.teacher_gate(cfg, 0.0) is None

    # run_jobs: the teacher alone, then the gate; a reason stops it before the data stage and every job
    spawned, ran = [], []
    monkeypatch.setattr(proof, "_spawn", lambda job, *a, **k: spawned.append((job["name"], job["stages"])) or {})
    monkeypatch.setattr(proof, "_run_parallel", lambda jobs, *a: ran.append(jobs) or ({}, {}))
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    out = proof.run_jobs("main.yaml", [{"name": "main"}], "direct", jobs_dir, [None], 0.0,
                         teacher_gate=lambda: "too weak")
    assert out == ({}, {"teacher": "too weak"}, None) and spawned == [("teacher", ["teacher"])] and ran == []
    proof.run_jobs("main.yaml", [{"name": "main"}], "direct", jobs_dir, [None], 0.0, teacher_gate=lambda: None)
    assert spawned[1:] == [("teacher", ["teacher"]), ("shared", list(proof.SHARED))] and len(ran) == 1

    # the bench: the report says why for every row, and the command fails with the reason
    monkeypatch.setattr(proof, "run_jobs", lambda *a, teacher_gate, warm: ({}, {"teacher": teacher_gate()}, None))
    args = bench.parse_args(["--root", str(root), "--out", str(tmp_path / "out"), "--runner", "direct",
                             "--no-variants"])
    with pytest.raises(SystemExit, match="9.4% held out"):
        bench.run(args)
    report = json.loads((tmp_path / "out" / "mechanisms.json").read_text())
    assert all("9.4% held out" in r["error"] for r in report["rows"]) and report["failures"]["teacher"]
    # --min-teacher 0: the same teacher passes the gate and the run goes on
    monkeypatch.setattr(proof, "run_jobs", lambda *a, teacher_gate, warm: ({}, {"main": f"gate: {teacher_gate()}"}, None))
    with pytest.raises(SystemExit, match="gate: None"):
        bench.run(bench.parse_args(["--root", str(root), "--out", str(tmp_path / "out"), "--runner", "direct",
                                    "--no-variants", "--min-teacher", "0"]))


def _arm(name, mixer, share, beyond, chars, exact, frames=None):
    scores = {"text": {"char_accuracy": chars, "exact": exact, "n": 8}, "recall_by_distance": [], "accuracy": 0.0}
    if frames:
        scores["frames"] = [{"frames": n, "accuracy": a} for n, a in frames]
    return {"name": name, "linear_mixer": mixer, "share": share, "scores": scores, "recall_beyond_window": beyond}


def test_readme_block_is_filled_from_the_report(tmp_path):
    from bench import mechanisms as bench

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.README_BEGIN}\nold\n{bench.README_END}\noutro\n")
    summary = {"teacher_recall": 91.25, "teacher_text": 80.0, "teacher_recall_beyond_window": 90.0,
               "hybrid_recall_beyond_window": 85.5, "hybrid_text": 70.0, "swa_only_recall_beyond_window": 30.0,
               "linear_only_text": 12.5, "stage3_gain_1024_frames": 6.25, "stage3_gain_frames": 1024,
               "hybrid_recall_retention": 0.95, "hybrid_text_retention": 0.875, "goal_retention": 0.9}
    rows = [_arm("teacher", None, None, 90.0, 95.0, 80.0),
            _arm("share=1/4", "gated_deltanet", "1/4", 85.5, 90.0, 70.0, [(32, 100.0), (1024, 50.0)]),
            _arm("share=1/4 + Stage III", "gated_deltanet", "1/4", 88.0, 89.0, 68.0, [(32, 100.0), (1024, 56.25)]),
            _arm("share=1", "gated_deltanet", "1", 30.0, 93.0, 75.0),
            _arm("share=0", "gated_deltanet", "0", 95.0, 40.0, 12.5),
            _arm("mixer=gla", "gla", "1/4", 20.0, 60.0, 10.0),
            {"name": "mixer=kda", "linear_mixer": "kda", "share": "1/4", "scores": None, "error": "cut"}]
    rows[0]["scores"]["text"]["distances"] = {"min": 50, "median": 70, "max": 79, "n": 8, "past_window": 6}
    train = {"stage1a": {"steps": 5}, "stage1b": {"steps": 6}, "stage2": {"steps": 7}, "stage3": {"steps": 3}}
    report = {"summary": summary, "device": "NVIDIA H100 80GB HBM3", "date": "2026-12-06", "rows": rows,
              "commit": "abc1234", "config": {"sliding_window": 64, "tiny": False, "run": {"train": train}}}
    bench.update_readme(report, str(readme))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old" not in text
    for figure in ("H100", "abc1234", "recalls 91.2%", "all-sliding student recalls 30.0%", "hybrid (1/4 Gated "
                   "DeltaNet) 85.5%", "reads 12.5%", "retention 0.875", "at 1024 frames by 6.2 points",
                   "trained 5 + 6 + 7 steps (I-a, I-b, II), Stage III 3",
                   # the mixers best first; an arm that failed is left out, not shown as zero
                   "by linear mixer (at 1/4): Gated DeltaNet 85.5%, GLA 20.0%;",
                   # shares from all sliding to all linear, the Stage III row not among them
                   "by sliding share (1, 1/4, 0): text characters read 93.0, 90.0, 40.0% (exact strings 75.0, "
                   "70.0, 12.5%); recall past the window 30.0, 85.5, 95.0%",
                   "without Stage III 100.0% at 32 and 50.0% at 1024; with it 100.0% at 32 and 56.2% at 1024",
                   "the goal: not met: the default hybrid keeps 0.950 of the teacher's recall past the window and "
                   "0.875 of its exact text",
                   "6 of the 8 text questions ask for a line whose first character sits past the 64-token window "
                   "(50-79 tokens back)"):
        assert figure in text, figure

    # a report with the summary alone (no rows) still fills the headline lines
    bench.update_readme({**report, "rows": [], "config": {"sliding_window": 64, "tiny": True}}, str(readme))
    text = readme.read_text()
    assert "smoke test" in text and "by linear mixer" not in text and "trained" not in text
    assert "text questions" not in text
    met = {**summary, "hybrid_text_retention": 0.9}
    assert "the goal: met:" in bench.readme_block({**report, "summary": met})


def test_reports_name_the_commit_they_ran_and_a_node_can_be_told_it(monkeypatch):
    import subprocess

    from bench.common import provenance

    head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    monkeypatch.delenv("INFINITEVL_COMMIT", raising=False)
    assert provenance("cpu")["commit"] == head
    monkeypatch.setenv("INFINITEVL_COMMIT", "1234abc")  # a GPU node sent the tree with a stale .git
    assert provenance("cpu") == {"device": "cpu", "date": provenance("cpu")["date"], "commit": "1234abc"}


def test_warm_up_chain_has_the_students_shapes_in_a_few_steps_and_one_arm_a_mixer(tmp_path):
    from bench import mechanisms as bench
    from model import mixer_names
    from pipeline.config import load_config

    root = str(tmp_path / "runs")
    cfg = bench.base_config("configs/mechanisms.yaml", False, [], root)
    path, jobs, jobs_dir = bench.warm_chain(cfg, bench.arms(cfg), root, "direct")
    others = [m for m in ("gla", "mamba2", "kda") if m in mixer_names()]
    assert [j["name"] for j in jobs] == ["warm-main", *(f"warm-mixer={m}" for m in others)]
    assert jobs_dir == tmp_path / "runs" / "warm" / "jobs" and jobs_dir.is_dir()
    warm = load_config(path)
    assert warm.run.root == f"{root}/warm/main" and warm.teacher.train.steps == 2
    for stage in ("stage1a", "stage1b", "stage2", "stage3"):
        real, short = getattr(cfg.train, stage), getattr(warm.train, stage)
        assert short.steps == 2 and (short.seq_len, short.micro_batch_size, short.precision, short.trainable) == (
            real.seq_len, real.micro_batch_size, real.precision, real.trainable)
    dims = ("hidden", "num_layers", "heads", "kv_heads", "intermediate", "vision_hidden", "vision_depth", "precision",
            "max_pixels", "pictures", "max_frames")
    assert [getattr(warm.teacher.train, d) for d in dims] == [getattr(cfg.teacher.train, d) for d in dims]
    assert warm.student == cfg.student and warm.data.distill.seq_len == cfg.data.distill.seq_len
    gla = load_config(jobs[1]["config"])
    assert gla.student.linear_mixer == "gla" and gla.run.root == f"{root}/warm/mixer-gla"
    assert os.path.realpath(f"{root}/warm/mixer-gla/teacher") == f"{root}/warm/main/teacher"  # the warm teacher
    assert jobs[0]["frames_sweep"] == ["stage3"] and max(jobs[0]["mechanisms"]["frame_counts"]) == 1024


def test_warm_up_runs_beside_the_shared_stages_and_the_students_wait_for_it(tmp_path, monkeypatch):
    import threading
    import time

    from bench import proof

    events, lock = [], threading.Lock()

    def spawn(job, jobs_dir, gpu, workers=1):
        with lock:
            events.append(("start", job["config"], job["name"]))
        time.sleep(0.3 if job["config"] == "warm.yaml" else 0.05)
        with lock:
            events.append(("end", job["config"], job["name"]))
        if job["config"] == "warm.yaml" and job["name"] == "shared" and fail:
            raise RuntimeError("job shared failed (exit 1); log x")
        return {}

    def parallel(jobs, jobs_dir, gpus, started):
        with lock:
            events.append(("parallel", [j["name"] for j in jobs], len(gpus)))
        return {}, {}

    monkeypatch.setattr(proof, "_spawn", spawn)
    monkeypatch.setattr(proof, "_run_parallel", parallel)
    for fail in (False, True):
        events.clear()
        warm = ("warm.yaml", [{"name": "warm-main"}, {"name": "warm-mixer=gla"}], tmp_path)
        proof.run_jobs("main.yaml", [{"name": "main"}], "direct", tmp_path, ["0"] * 8, 0.0, warm=warm)
        order = [e[:3] if e[0] != "parallel" else e for e in events]
        # the warm chain's shared stages start at once, beside the real ones, and its two jobs run on two workers
        assert order[0][:2] in (("start", "warm.yaml"), ("start", "main.yaml")) and len(order) == 6 - fail
        assert ("parallel", ["warm-main", "warm-mixer=gla"], 2) in order or fail
        # the students start last, once the warm-up is over (a failed warm-up only costs its time)
        assert order[-1] == ("parallel", ["main"], 8) and ("end", "warm.yaml", "shared") in order
