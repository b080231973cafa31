"""evaluate_checkpoint on saved tiny checkpoints: local and fsspec, built-in and imported suites, the stage."""

import json
import logging

import fsspec
import pytest

from pipeline.eval.api import evaluate_checkpoint, load_checkpoint, resolve_suite
from pipeline.eval.dataset import write_samples
from pipeline.eval.synthetic import tiny_samples


@pytest.fixture(scope="module")
def checkpoint(tiny_teacher, tmp_path_factory):
    model, processor = tiny_teacher
    path = tmp_path_factory.mktemp("ckpt") / "step-00000010"
    model.save_pretrained(path)
    processor.save_pretrained(str(path))
    return str(path)


def test_resolve_suite():
    assert resolve_suite("sample") == ("tiny", "tiny")
    assert resolve_suite("longvideo") == ("longvideo", "longvideo")
    assert resolve_suite("docvqa=s3://b/eval/docvqa_val.arrow") == ("docvqa", "s3://b/eval/docvqa_val.arrow")
    assert resolve_suite("s3://b/eval/chartqa.arrow") == ("chartqa", "s3://b/eval/chartqa.arrow")
    assert resolve_suite("docvqa", "s3://b/eval/") == ("docvqa", "s3://b/eval/docvqa.arrow")
    with pytest.raises(ValueError, match="unknown suite"):
        resolve_suite("mmmu")


def test_evaluate_checkpoint_on_builtin_imported_and_long_video_suites(checkpoint, tmp_path):
    data = str(tmp_path / "mini.arrow")
    write_samples(tiny_samples(per_kind=1, seed=5), data)
    out = str(tmp_path / "report")
    scores = evaluate_checkpoint(checkpoint, {"batch_size": 4, "max_new_tokens": 4, "limit": 6},
                                 suite=["tiny", f"mini={data}", "longvideo"], out_dir=out,
                                 longvideo={"frame_counts": [4, 8], "samples_per_count": 2})
    assert set(scores) == {"tiny", "mini", "longvideo", "longvideo/4", "longvideo/8", "score"}
    tiny = json.loads((tmp_path / "report/tiny/results.json").read_text())
    mini = json.loads((tmp_path / "report/mini/results.json").read_text())
    assert (tiny["n"], mini["n"]) == (6, 5)  # the limit, and the whole 5-sample file
    assert scores["tiny"] == tiny["score"] and scores["mini"] == mini["score"]
    assert scores["score"] == pytest.approx((scores["tiny"] + scores["mini"] + scores["longvideo"]) / 3)
    assert (tmp_path / "report/longvideo/longvideo.png").exists()
    summary = json.loads((tmp_path / "report/summary.json").read_text())
    assert summary["scores"] == scores
    assert "| tiny | all | 6 |" in (tmp_path / "report/summary.md").read_text()


def test_evaluate_checkpoint_from_fsspec_url_writes_next_to_it(checkpoint):
    fs = fsspec.filesystem("memory")
    fs.put(checkpoint + "/", "/bucket/run/step-10/", recursive=True)
    write_samples(tiny_samples(per_kind=1, seed=7), "memory://bucket/eval/mini.arrow")
    scores = evaluate_checkpoint("memory://bucket/run/step-10", {"max_new_tokens": 2, "limit": 3},
                                 suite=["tiny", "mini"], data_root="memory://bucket/eval")
    assert set(scores) == {"tiny", "mini", "score"}
    for suite in ("tiny", "mini"):
        with fsspec.open(f"memory://bucket/run/step-10.eval/{suite}/samples.jsonl", "r") as f:
            assert len(f.read().splitlines()) == 3


def test_run_config_gives_suites_limit_and_token_budget(checkpoint, tmp_path):
    from pipeline.config import load_config

    config = load_config("configs/tiny.yaml", ["eval.max_samples=5", "eval.max_new_tokens=3"])
    scores = evaluate_checkpoint(checkpoint, config, out_dir=str(tmp_path))
    results = json.loads((tmp_path / "tiny/results.json").read_text())
    assert results["n"] == 5 and results["config"]["max_new_tokens"] == 3 and results["config"]["limit"] == 5
    assert scores["score"] == results["score"]


def test_eval_stage_scores_the_target_output(checkpoint, tmp_path, monkeypatch):
    from pipeline import storage
    from pipeline.config import load_config
    from pipeline.kernel_cache import FOLDER, digest
    from pipeline.recipes.eval import run as evaluate_run
    from pipeline.stages import StageContext

    config = load_config("configs/tiny.yaml", ["eval.target=teacher", "eval.max_samples=2", "eval.max_new_tokens=2",
                                               f"run.root={tmp_path / 'run'}"])
    # the run's shared kernel tuning reaches the evaluating process's Triton cache before it loads the model
    entry = {"KEY/fused_recurrent_gated_delta_rule_fwd_kernel.autotune.json": json.dumps({"key": [1]})}
    storage.write_json(f"{tmp_path}/run/{FOLDER}/stage3-node0.json", {"entries": entry, "sha256": digest(entry)})
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    ctx = StageContext(name="eval", config=config, output=str(tmp_path / "eval"), inputs={"teacher": checkpoint},
                       log=logging.getLogger("test"))
    metrics = evaluate_run(ctx)
    assert metrics["checkpoint"] == checkpoint and "score" in metrics
    assert json.loads((tmp_path / "eval/tiny/results.json").read_text())["n"] == 2
    assert (tmp_path / "triton" / next(iter(entry))).read_text() == next(iter(entry.values()))


def test_unregistered_model_type_fails_clearly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    with pytest.raises(RuntimeError, match="not_a_model"):
        load_checkpoint(str(tmp_path))


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(str(tmp_path))


def test_student_checkpoint_loads_through_the_auto_classes(tiny_teacher, tmp_path):
    from model import convert_from_qwen2_5_vl

    teacher, processor = tiny_teacher
    student = convert_from_qwen2_5_vl(teacher)
    student.save_pretrained(tmp_path / "student")
    processor.save_pretrained(str(tmp_path / "student"))
    loaded, _ = load_checkpoint(str(tmp_path / "student"))
    assert type(loaded).__name__ == "InfiniteVLForConditionalGeneration"
    scores = evaluate_checkpoint(str(tmp_path / "student"), {"max_new_tokens": 2, "limit": 3},
                                 out_dir=str(tmp_path / "out"))
    assert json.loads((tmp_path / "out/tiny/results.json").read_text())["n"] == 3
    assert set(scores) == {"tiny", "score"}


def test_cli_eval_prints_the_scores_it_writes(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    out = tmp_path / "reports"
    done = CliRunner().invoke(app, ["eval", checkpoint, "--suite", "tiny", "--out", str(out), "--limit", "4",
                                    "--max-new-tokens", "2"])
    assert done.exit_code == 0, done.output
    written = json.loads((out / "tiny" / "results.json").read_text())
    assert written["n"] == 4 and written["config"]["max_new_tokens"] == 2  # the options reached the runner
    printed = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in done.output.splitlines()
               if line.count("│") >= 3}
    assert float(printed["tiny"]) == pytest.approx(written["score"], abs=0.005)
    refused = CliRunner().invoke(app, ["eval", checkpoint, "--suite", "mmmu", "--out", str(out)])
    assert refused.exit_code == 2 and "unknown suite" in refused.output
