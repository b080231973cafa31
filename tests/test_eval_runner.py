"""The runner end to end on CPU with the tiny random Qwen2.5-VL teacher: plumbing, not quality."""

import json

import pytest
import s3fs

from pipeline.eval.dataset import read_samples, write_samples
from pipeline.eval.runner import EvalConfig, build_prompt, generate_batch, markdown_table, rescore, run_suite
from pipeline.eval.synthetic import tiny_samples
from tests.helpers import lively_tiny_teacher


@pytest.fixture(scope="module")
def lively_teacher():
    return lively_tiny_teacher()


def test_multiple_choice_prompt_lists_hint_options_and_instruction():
    sample = {"question": "Which shape?", "hint": "Look.", "options": ["circle", "square"], "metric": "mc"}
    assert build_prompt(sample) == ("Hint: Look.\nWhich shape?\nOptions:\nA. circle\nB. square\n"
                                    "Answer with the option's letter from the given choices directly.")
    assert build_prompt(sample, {"mc": "Pick one."}).endswith("B. square\nPick one.")


def test_vqa_and_ocrbench_prompts():
    assert build_prompt({"question": "What?", "metric": "vqa"}) == (
        "What?\nAnswer the question using a single word or phrase.")
    assert build_prompt({"question": "what is written in the image?", "metric": "ocrbench"}) == (
        "what is written in the image?")


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown eval config keys"):
        EvalConfig.from_dict({"batch": 4})


def test_tiny_suite_is_deterministic_and_covers_every_metric():
    a, b = tiny_samples(per_kind=2, seed=3), tiny_samples(per_kind=2, seed=3)
    assert a == b and len(a) == 10
    assert sorted(s["metric"] for s in a[:5]) == ["anls", "mc", "ocrbench", "relaxed", "vqa"]


def test_run_suite_writes_reports_that_rescore_to_the_same_numbers(tiny_teacher, tmp_path):
    model, processor = tiny_teacher
    data = str(tmp_path / "tiny.arrow")
    write_samples(tiny_samples(per_kind=2), data)
    config = EvalConfig(batch_size=4, max_new_tokens=6, limit=9)
    results = run_suite(model, processor, read_samples(data), "tiny", str(tmp_path / "out"), config, "tiny-teacher")

    suite_dir = tmp_path / "out" / "tiny"
    on_disk = json.loads((suite_dir / "results.json").read_text())
    assert on_disk == results
    assert results["n"] == 9 and results["model"] == "tiny-teacher"
    assert results["config"]["batch_size"] == 4
    lines = [json.loads(line) for line in (suite_dir / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [s["id"] for s in tiny_samples(per_kind=2)[:9]]
    assert all(isinstance(r["prediction"], str) for r in lines)
    again = rescore(str(suite_dir / "samples.jsonl"))
    assert again["score"] == pytest.approx(results["score"])
    assert again["categories"] == results["categories"]
    assert (suite_dir / "results.md").read_text() == markdown_table([results])


@pytest.mark.usefixtures("s3_env")
def test_a_suite_reads_its_samples_from_and_writes_its_reports_to_s3(tiny_teacher, s3):
    model, processor = tiny_teacher
    root = s3.fresh("eval")
    data = f"{root}/benchmarks/tiny.arrow"
    assert write_samples(tiny_samples(per_kind=1), data) == 5
    results = run_suite(model, processor, read_samples(data), "tiny", f"{root}/out",
                        EvalConfig(batch_size=5, max_new_tokens=4), "tiny-teacher")
    fs = s3fs.S3FileSystem(**s3.storage_options)
    assert json.loads(fs.cat_file(f"{root}/out/tiny/results.json".removeprefix("s3://"))) == results
    assert rescore(f"{root}/out/tiny/samples.jsonl")["score"] == pytest.approx(results["score"])
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/out/tiny".removeprefix("s3://"))) == [
        "results.json", "results.md", "samples.jsonl"]

    # a benchmark whose samples fail half-way leaves no file behind that would read as the whole benchmark
    def broken():
        yield from tiny_samples(per_kind=1)
        raise RuntimeError("the source ran out")

    with pytest.raises(RuntimeError, match="ran out"):
        write_samples(broken(), f"{root}/benchmarks/broken.arrow")
    assert not fs.exists(f"{root}/benchmarks/broken.arrow".removeprefix("s3://"))


def test_batched_left_padded_generation_matches_one_by_one(lively_teacher):
    model, processor = lively_teacher
    samples = tiny_samples(per_kind=1)  # prompts of different lengths, so the batch is padded
    config = EvalConfig(max_new_tokens=5)
    batched = generate_batch(model, processor, samples, config)
    alone = [generate_batch(model, processor, [s], config)[0] for s in samples]
    assert len(set(alone)) > 2  # the outputs differ, so a mix-up between samples would show
    assert batched == alone


def test_reported_score_counts_the_samples_whose_answer_the_model_gives(lively_teacher, tmp_path):
    # Three of eight samples get the model's own greedy output as their answer, the rest an answer no
    # output of six tokens can come within ANLS 0.5 of: the suite must score exactly 3/8.
    model, processor = lively_teacher
    samples = tiny_samples(per_kind=2)[:8]
    config = EvalConfig(batch_size=3, max_new_tokens=6)
    for sample in samples:
        sample["metric"] = "anls"  # before generating: the metric picks the prompt
    own = generate_batch(model, processor, samples, config)
    for i, sample in enumerate(samples):
        sample["answers"] = [own[i]] if i in (0, 3, 7) else ["~" * 60]
    results = run_suite(model, processor, samples, "known", str(tmp_path), config)
    assert results["score"] == pytest.approx(100 * 3 / 8)
    lines = [json.loads(line) for line in (tmp_path / "known" / "samples.jsonl").read_text().splitlines()]
    assert [r["score"] for r in lines] == [1.0, 0, 0, 1.0, 0, 0, 0, 1.0]
    assert rescore(str(tmp_path / "known" / "samples.jsonl"))["score"] == pytest.approx(results["score"])


def test_markdown_table_lists_categories_and_ocrbench_count():
    results = {"suite": "ocrbench", "n": 3, "score": 200 / 3, "final_score": 2.0,
               "categories": {"Digit String Recognition": {"n": 1, "score": 0.0},
                              "Regular Text Recognition": {"n": 2, "score": 100.0}}}
    assert markdown_table([results]).splitlines() == [
        "| suite | category | n | score |", "|---|---|---:|---:|",
        "| ocrbench | all | 3 | 66.67 (2 correct) |",
        "| ocrbench | Digit String Recognition | 1 | 0.00 |",
        "| ocrbench | Regular Text Recognition | 2 | 100.00 |",
    ]


def test_tiny_suite_answers_match_what_is_drawn():
    from pipeline.eval.dataset import decode_image
    from pipeline.eval.synthetic import COLORS

    green = COLORS["green"]
    for s in tiny_samples(per_kind=6, seed=2):
        image = decode_image(s["image"])
        if s["category"] == "colour":
            assert image.getpixel((28, 28)) == COLORS[s["answers"][0]]
        elif s["category"] == "count":
            blue_slots = [image.getpixel((14 + (k % 2) * 26, 14 + (k // 2) * 26)) == COLORS["blue"] for k in range(4)]
            assert sum(blue_slots) == int(s["answers"][0]) and blue_slots == sorted(blue_slots, reverse=True)
        elif s["category"] == "shape":
            shape = s["options"]["ABC".index(s["answers"][0])]
            corners = (image.getpixel((12, 12)) == green, image.getpixel((12, 45)) == green)
            assert corners == {"square": (True, True), "triangle": (False, True), "circle": (False, False)}[shape]


def test_generation_runs_the_vision_tower_grouped_and_answers_as_transformers_does(lively_teacher, monkeypatch):
    """Pictures and frame streams: the answers equal those of transformers' own per-window vision attention, and
    the tower ran with the grouped one (model.cuda_graphs.grouped_vision)."""
    import contextlib

    import pipeline.eval.runner as runner
    from model.cuda_graphs import VISION_ATTENTION
    from pipeline.eval.synthetic import picture_samples

    model, processor = lively_teacher
    samples = picture_samples(3, kinds=["recall", "shapes"], max_frames=40)
    assert any(s.get("frames") for s in samples) and any(s.get("image") is not None for s in samples)
    config = EvalConfig(max_new_tokens=5)
    used = []
    hook = model.model.visual.blocks[0].attn.register_forward_pre_hook(
        lambda m, *_: used.append(m.config._attn_implementation))
    try:
        grouped = [runner.generate_batch(model, processor, [s], config)[0] for s in samples]
        seen, used[:] = list(used), []
        monkeypatch.setattr(runner, "grouped_vision", lambda model: contextlib.nullcontext())
        plain = [runner.generate_batch(model, processor, [s], config)[0] for s in samples]
    finally:
        hook.remove()
    assert seen and set(seen) == {VISION_ATTENTION} and set(used) == {"sdpa"}
    assert grouped == plain and len(set(plain)) > 1
