"""The stage-output contract without Prefect: commit marker last, skip on match, force, clear on change,
resume an unfinished attempt, committed checkpoints."""

import logging

import pytest

from flows.stages import fingerprints
from pipeline import checkpoints
from pipeline.config import load_config
from pipeline.stages import COMPLETE, STARTED, StageContext, execute_stage, join, read_json, stage_state

log = logging.getLogger("test")


class Work:
    """A stage body that records its calls and can fail midway, after writing a checkpoint."""

    def __init__(self, fail_after_checkpoint=False):
        self.calls, self.resumed_from, self.fail = 0, [], fail_after_checkpoint

    def __call__(self, ctx: StageContext):
        self.calls += 1
        self.resumed_from.append(checkpoints.latest_checkpoint(ctx.output))
        with open(join(ctx.output, "weights.txt"), "w") as f:
            f.write(str(self.calls))
        checkpoints.commit_checkpoint(ctx, step=10 * self.calls, metrics={"loss": 1.0 / self.calls})
        if self.fail:
            raise RuntimeError("killed")
        return {"loss": 0.5}


def run(cfg, work, force=False, announced=None):
    _, section_hash, inputs = fingerprints(cfg)["teacher"]
    announced = [] if announced is None else announced
    ctx = StageContext("teacher", cfg, join(cfg.run.root, "teacher"), {}, log,
                       on_checkpoint=lambda uri, step, m: announced.append((uri, step, m)))
    return execute_stage(ctx, work, section_hash, inputs, force=force)


def test_skip_force_and_config_change(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    work, announced = Work(), []
    first = run(cfg, work, announced=announced)
    assert first.status == "done" and first.metrics == {"loss": 0.5}
    marker = read_json(join(first.output, COMPLETE))
    assert marker["fingerprint"] == first.fingerprint and marker["metrics"] == {"loss": 0.5}
    assert announced and announced[0][1] == 10

    again = run(cfg, work)
    assert again.status == "skipped" and work.calls == 1 and again.metrics == {"loss": 0.5}

    forced = run(cfg, work, force=True)
    assert forced.status == "done" and work.calls == 2
    assert work.resumed_from[-1] is None, "force starts from an empty output"

    changed = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "teacher.seed=1"])
    assert stage_state(first.output, fingerprints(changed)["teacher"][0]) == "stale"
    run(changed, work)
    assert work.calls == 3 and work.resumed_from[-1] is None, "a changed config never resumes old outputs"


def test_how_a_stage_is_run_is_not_part_of_its_fingerprint():
    base = fingerprints(load_config("configs/tiny.yaml"))
    rescheduled = fingerprints(load_config("configs/tiny.yaml", ["eval.schedule=0 5 * * *", "data.workers=8"]))
    assert rescheduled == base
    changed = fingerprints(load_config("configs/tiny.yaml", ["eval.max_new_tokens=8"]))
    assert changed["eval"] != base["eval"] and changed["teacher"] == base["teacher"]


def test_a_failed_attempt_leaves_no_marker_and_resumes_from_its_checkpoint(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg, Work(fail_after_checkpoint=True))
    output = join(str(tmp_path), "teacher")
    assert read_json(join(output, COMPLETE)) is None and read_json(join(output, STARTED)) is not None
    assert stage_state(output, fingerprints(cfg)["teacher"][0]) == "partial"

    work = Work()
    assert run(cfg, work).status == "done"
    assert work.resumed_from == [(10, checkpoints.checkpoint_dir(output, 10))]


def test_checkpoint_listing_and_report(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    ctx = StageContext("stage1a", cfg, join(str(tmp_path), "stage1a"), {}, log)
    for step in (5, 10):
        checkpoints.commit_checkpoint(ctx, step, {"loss": 1.0 / step})
    # a checkpoint directory without its marker is an interrupted save, not a checkpoint
    (tmp_path / "stage1a" / "checkpoints" / "step-00000015").mkdir()
    assert [s for s, _ in checkpoints.list_checkpoints(ctx.output)] == [5, 10]
    assert checkpoints.latest_checkpoint_of_run(str(tmp_path))[:2] == ("stage1a", 10)
    uri = checkpoints.checkpoint_dir(ctx.output, 10)
    assert checkpoints.stage_output_of(uri) == ctx.output
    report = checkpoints.write_checkpoint_report(uri, 10, {"score": 0.25}, "pipeline.eval:evaluate_checkpoint")
    assert read_json(checkpoints.report_uri(uri)) == report
    assert checkpoints.report_history(ctx.output)[-1] == {"step": 10, "checkpoint": uri, "loss": 0.1, "score": 0.25}
