"""The pipeline's last stage: evaluate the newest checkpoint of the configured target stage.

Steps: check that every suite's file exists (before any work); score the target stage's newest committed
checkpoint, or its output itself when the stage writes a model folder rather than checkpoints (the teacher);
when the held-out `pictures` suite is among the benchmarks, score the teacher on it too (reports in
`<output>/teacher/`) and report `retention`, the student's accuracy over the teacher's.

Recipe version 1. Bump VERSION when a change makes this stage score differently for the same inputs.
"""

from __future__ import annotations

from pipeline import storage
from pipeline.checkpoints import latest_checkpoint
from pipeline.eval.suites import BUILTIN, resolve_suite
from pipeline.stages import StageContext

NAME = "eval"
# the pictures suite asks about the picture kinds the trained tiny teacher learned
SECTIONS = ("eval", "teacher.train.pictures")
VERSION = 1
# The held-out suite the trained tiny teacher knows (pipeline/teacher_train.py): scored for the teacher too.
RETENTION_SUITE = "pictures"


def inputs(config) -> tuple[str, ...]:
    return tuple(dict.fromkeys(("teacher", config.eval.target)))  # the teacher: scored for the retention


def run(ctx: StageContext) -> dict:
    from pipeline.eval.api import evaluate_checkpoint
    from pipeline.eval.metrics import retention

    target = ctx.config.eval.target
    source = ctx.inputs[target]
    latest = latest_checkpoint(source)
    checkpoint = latest[1] if latest else source
    ctx.log.info("evaluating %s on %s", checkpoint, ", ".join(ctx.config.eval.benchmarks))
    scores = evaluate_checkpoint(checkpoint, ctx.config, out_dir=ctx.output)
    metrics = {**scores, "checkpoint": checkpoint}
    if RETENTION_SUITE in ctx.config.eval.benchmarks and target != "teacher":
        # The teacher answers the same held-out questions, scored the same way: retention = student / teacher.
        teacher = evaluate_checkpoint(ctx.inputs["teacher"], ctx.config, suite=RETENTION_SUITE,
                                      out_dir=f"{ctx.output.rstrip('/')}/teacher")
        metrics["teacher_" + RETENTION_SUITE] = teacher[RETENTION_SUITE]
        metrics["retention"] = retention(scores[RETENTION_SUITE], teacher[RETENTION_SUITE])
        ctx.log.info("held-out %s: teacher %.1f, student %.1f, retention %s", RETENTION_SUITE,
                     teacher[RETENTION_SUITE], scores[RETENTION_SUITE], metrics["retention"])
    return metrics


def outputs(folder: str) -> dict[str, dict]:
    return storage.remote_file_digests(folder)


def check(config) -> list[str]:
    """Every suite is a built-in one or an eval file that exists."""
    problems = []
    for i, spec in enumerate(config.eval.benchmarks):
        field = f"eval.benchmarks[{i}]"
        try:
            _, source = resolve_suite(spec)
        except ValueError as exc:
            problems.append(f"{field}: {exc}")
            continue
        if source in BUILTIN.values():
            continue
        try:
            if not storage.exists(source):
                problems.append(f"{field}: the eval file {source!r} does not exist")
        except (OSError, ValueError) as exc:
            problems.append(f"{field}: cannot read {source!r}: {exc}")
    return problems
