"""The stage contract and lineage without Prefect: attempts committed by a marker written last, skip on a matching
lineage, force, resume only the same lineage, dependents rerun exactly when an input's bytes change, a failed
forced attempt leaves the committed output in use, and `status` says why a stage is stale."""

import logging

import pytest

from pipeline import checkpoints, storage
from pipeline.config import load_config
from pipeline.plan import run_stage, status
from pipeline.stages import COMPLETE, STARTED, Lineage, execute_stage, join, stage_dir, stage_state
from tests.helpers import fake_recipe

log = logging.getLogger("test")
read_json = storage.read_json_or_none


class Work:
    """A stage body that records its calls, writes `content`, commits a checkpoint and can fail after it."""

    def __init__(self, content="weights v1", fail_after_checkpoint=False):
        self.calls, self.resumed_from, self.content, self.fail = 0, [], content, fail_after_checkpoint

    def __call__(self, ctx):
        self.calls += 1
        self.resumed_from.append(checkpoints.latest_checkpoint(ctx.output))
        storage.write_bytes(join(ctx.output, "weights.txt"), self.content.encode())
        checkpoints.commit_checkpoint(ctx, step=10 * self.calls, metrics={"loss": 1.0 / self.calls})
        if self.fail:
            raise RuntimeError("killed")
        return {"loss": 0.5}


def tiny(tmp_path, *overrides):
    return load_config("configs/tiny.yaml", [f"run.root={tmp_path}", *overrides])


def run(cfg, work, force=False, announced=None, version=1):
    announced = [] if announced is None else announced
    return execute_stage(fake_recipe("teacher", work, version=version), cfg, {}, log, force=force,
                         on_checkpoint=lambda uri, step, m: announced.append((uri, step, m)))


def test_skip_force_and_config_change(tmp_path):
    cfg = tiny(tmp_path)
    work, announced = Work(), []
    first = run(cfg, work, announced=announced)
    assert first.status == "done" and first.metrics == {"loss": 0.5}
    assert first.output == join(str(tmp_path), "teacher", "attempt-0001")
    marker = read_json(join(str(tmp_path), "teacher", COMPLETE))
    assert marker["fingerprint"] == first.fingerprint and marker["attempt"] == "attempt-0001"
    # the digest covers what the attempt published, with the sha256 of each file
    assert marker["files"]["weights.txt"] == {"sha256": storage.sha256_file(join(first.output, "weights.txt"))[0],
                                              "bytes": 10}
    assert marker["digest"] == storage.tree_digest(marker["files"]) == first.digest
    assert announced and announced[0][1] == 10

    again = run(cfg, work)
    assert again.status == "skipped" and work.calls == 1 and again.metrics == {"loss": 0.5}

    forced = run(cfg, work, force=True)
    assert forced.status == "done" and work.calls == 2 and forced.output.endswith("attempt-0002")
    assert work.resumed_from[-1] is None, "force starts a fresh attempt"
    assert forced.changed is False, "the same bytes: the output digest did not change"
    assert [n for n, _ in __import__("pipeline.stages", fromlist=["attempts"]).attempts(
        stage_dir(str(tmp_path), "teacher"))] == [2], "older attempts go once the new one commits"

    changed = tiny(tmp_path, "teacher.seed=1")
    state = status(changed)["teacher"]
    assert state.state == "stale" and state.reasons == ["config teacher.seed changed (0 → 1)"]
    run(changed, work)
    assert work.calls == 3 and work.resumed_from[-1] is None, "a changed config never resumes old outputs"


def test_a_new_recipe_version_makes_the_stage_stale():
    cfg = load_config("configs/tiny.yaml")
    old = Lineage.of(cfg, ("teacher",), {}, 1)
    from pipeline.stages import stale_reasons

    assert stale_reasons({"lineage": {"config": old.config, "inputs": {}, "version": 1}},
                         Lineage.of(cfg, ("teacher",), {}, 2)) == ["recipe v1 → v2"]
    assert stale_reasons({"fingerprint": "x"}, old) == ["committed by an older infinitevl that recorded no lineage"]


def test_how_a_stage_is_run_is_not_part_of_its_fingerprint():
    from pipeline.recipes import RECIPES

    def prints(*overrides):
        cfg = load_config("configs/tiny.yaml", list(overrides))
        return {n: Lineage.of(cfg, r.SECTIONS, {}, r.VERSION).fingerprint for n, r in RECIPES.items()}

    base = prints()
    assert prints("eval.schedule=0 5 * * *", "data.workers=8", "train.stage2.loader_workers=4") == base
    changed = prints("eval.max_new_tokens=8")
    assert changed["eval"] != base["eval"] and changed["teacher"] == base["teacher"]
    # the seed draws the data and the training order: every stage reading it is covered
    seeded = prints("run.seed=7")
    assert {n for n in base if seeded[n] != base[n]} == {"data", "stage1a", "stage1b", "stage2", "stage3"}


def test_a_failed_attempt_leaves_no_marker_and_resumes_from_its_checkpoint(tmp_path):
    cfg = tiny(tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg, Work(fail_after_checkpoint=True))
    directory = stage_dir(str(tmp_path), "teacher")
    attempt = join(directory, "attempt-0001")
    assert read_json(join(directory, COMPLETE)) is None and read_json(join(attempt, STARTED)) is not None
    expected = status(cfg)["teacher"].fingerprint
    assert stage_state(directory, expected) == "partial"

    work = Work()
    assert run(cfg, work).status == "done"
    assert work.resumed_from == [(10, checkpoints.checkpoint_dir(attempt, 10))]


def test_a_changed_config_does_not_resume_the_checkpoint_of_another(tmp_path):
    """Config A fails after a checkpoint; config B must start from nothing (not from A's step 10)."""
    with pytest.raises(RuntimeError, match="killed"):
        run(tiny(tmp_path, "teacher.seed=0"), Work(fail_after_checkpoint=True))
    b = tiny(tmp_path, "teacher.seed=1")
    assert status(b)["teacher"].state == "missing", "A's unfinished attempt is not B's to resume"
    work = Work()
    outcome = run(b, work)
    assert work.resumed_from == [None] and outcome.output.endswith("attempt-0002")
    assert [s for s, _ in checkpoints.list_checkpoints(outcome.output)] == [10]


def test_a_forced_attempt_that_fails_leaves_the_committed_output_in_use(tmp_path):
    cfg = tiny(tmp_path)
    first = run(cfg, Work("good weights"))
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg, Work("half-written", fail_after_checkpoint=True), force=True)
    marker = read_json(join(str(tmp_path), "teacher", COMPLETE))
    assert marker["attempt"] == "attempt-0001" and marker["digest"] == first.digest
    assert storage.read_bytes(join(first.output, "weights.txt")) == b"good weights"
    assert status(cfg)["teacher"].state == "done"
    assert run(cfg, Work()).status == "skipped", "the committed output is still the one in use"


def two_stage_run(tmp_path, monkeypatch, teacher_content: list[str]):
    """A fake teacher whose bytes the test decides, and a fake data stage that reads them."""
    import pipeline.plan as plan
    from pipeline.recipes import RECIPES

    produced = iter(teacher_content)
    teacher = Work()
    teacher_recipe = fake_recipe("teacher", lambda ctx: (setattr(teacher, "content", next(produced)), teacher(ctx))[1])
    data_calls = []

    def data_body(ctx):
        data_calls.append(storage.read_bytes(join(ctx.inputs["teacher"], "weights.txt")).decode())
        storage.write_bytes(join(ctx.output, "corpus.txt"), data_calls[-1].upper().encode())

    monkeypatch.setattr(plan, "RECIPES", {**RECIPES, "teacher": teacher_recipe,
                                          "data": fake_recipe("data", data_body, inputs=("teacher",))})
    return tiny(tmp_path), data_calls


def test_a_forced_stage_with_other_bytes_makes_its_dependents_stale(tmp_path, monkeypatch):
    cfg, data_calls = two_stage_run(tmp_path, monkeypatch, ["weights v1", "weights v2"])
    run_stage(cfg, "teacher", log)
    run_stage(cfg, "data", log)
    assert status(cfg)["data"].state == "done"

    forced = run_stage(cfg, "teacher", log, force=True)
    assert forced.changed is True
    data = status(cfg)["data"]
    assert data.state == "stale" and data.reasons == ["input teacher changed"]
    assert run_stage(cfg, "data", log).status == "done" and data_calls == ["weights v1", "weights v2"]
    assert status(cfg)["data"].state == "done"


def test_a_forced_stage_that_reproduces_its_bytes_keeps_its_dependents_done(tmp_path, monkeypatch):
    cfg, data_calls = two_stage_run(tmp_path, monkeypatch, ["weights v1", "weights v1"])
    run_stage(cfg, "teacher", log)
    run_stage(cfg, "data", log)
    forced = run_stage(cfg, "teacher", log, force=True)
    assert forced.status == "done" and forced.changed is False
    assert status(cfg)["data"].state == "done"
    assert run_stage(cfg, "data", log).status == "skipped" and data_calls == ["weights v1"]


def test_checkpoint_listing_and_report(tmp_path):
    from pipeline.stages import StageContext

    cfg = tiny(tmp_path)
    output = join(str(tmp_path), "stage1a", "attempt-0001")
    ctx = StageContext("stage1a", cfg, output, {}, log)
    for step in (5, 10):
        storage.write_bytes(join(checkpoints.checkpoint_dir(output, step), "model.bin"), b"w" * step)
        checkpoints.commit_checkpoint(ctx, step, {"loss": 1.0 / step})
    # a checkpoint directory without its marker is an interrupted save, not a checkpoint
    (tmp_path / "stage1a" / "attempt-0001" / "checkpoints" / "step-00000015").mkdir()
    assert [s for s, _ in checkpoints.list_checkpoints(ctx.output)] == [5, 10]
    assert checkpoints.latest_checkpoint_of_run(str(tmp_path))[:2] == ("stage1a", 10)
    uri = checkpoints.checkpoint_dir(ctx.output, 10)
    assert checkpoints.checkpoint_metrics(uri)["files"]["model.bin"]["bytes"] == 10
    assert checkpoints.stage_output_of(uri) == ctx.output
    report = checkpoints.write_checkpoint_report(uri, 10, {"score": 0.25}, "pipeline.eval.evaluate_checkpoint")
    assert read_json(checkpoints.report_uri(uri)) == report
    assert checkpoints.report_history(ctx.output)[-1] == {"step": 10, "checkpoint": uri, "loss": 0.1, "score": 0.25}
