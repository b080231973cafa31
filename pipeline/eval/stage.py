"""The pipeline's last stage: evaluate the newest checkpoint of the configured target stage."""

from __future__ import annotations

from pipeline.checkpoints import latest_checkpoint
from pipeline.stages import StageContext

from .api import evaluate_checkpoint
from .metrics import retention

# The held-out suite the trained tiny teacher knows (pipeline/teacher_train.py): scored for the teacher too.
RETENTION_SUITE = "pictures"


def evaluate_run(ctx: StageContext) -> dict:
    """Scores the target stage's latest committed checkpoint, or its output itself when the stage writes a
    model directory rather than checkpoints (the teacher). Reports go to the stage output. When the
    held-out `pictures` suite is among the benchmarks, the teacher is scored on it as well (reports in
    `<output>/teacher/`) and `retention` is the student's accuracy over the teacher's."""
    target = ctx.config.eval.target
    source = ctx.inputs[target]
    latest = latest_checkpoint(source)
    checkpoint = latest[1] if latest else source
    ctx.log.info("evaluating %s on %s", checkpoint, ", ".join(ctx.config.eval.benchmarks))
    scores = evaluate_checkpoint(checkpoint, ctx.config, out_dir=ctx.output)
    metrics = {**scores, "checkpoint": checkpoint}
    if RETENTION_SUITE in ctx.config.eval.benchmarks and target != "teacher" and "teacher" in ctx.inputs:
        # The teacher answers the same held-out questions, scored the same way: retention = student / teacher.
        teacher = evaluate_checkpoint(ctx.inputs["teacher"], ctx.config, suite=RETENTION_SUITE,
                                      out_dir=f"{ctx.output.rstrip('/')}/teacher")
        metrics["teacher_" + RETENTION_SUITE] = teacher[RETENTION_SUITE]
        metrics["retention"] = retention(scores[RETENTION_SUITE], teacher[RETENTION_SUITE])
        ctx.log.info("held-out %s: teacher %.1f, student %.1f, retention %s", RETENTION_SUITE,
                     teacher[RETENTION_SUITE], scores[RETENTION_SUITE], metrics["retention"])
    return metrics
