"""The pipeline's last stage: evaluate the newest checkpoint of the configured target stage."""

from __future__ import annotations

from pipeline.checkpoints import latest_checkpoint
from pipeline.stages import StageContext

from .api import evaluate_checkpoint


def evaluate_run(ctx: StageContext) -> dict:
    """Scores the target stage's latest committed checkpoint, or its output itself when the stage writes a
    model directory rather than checkpoints (the teacher). Reports go to the stage output."""
    target = ctx.config.eval.target
    source = ctx.inputs[target]
    latest = latest_checkpoint(source)
    checkpoint = latest[1] if latest else source
    ctx.log.info("evaluating %s on %s", checkpoint, ", ".join(ctx.config.eval.benchmarks))
    scores = evaluate_checkpoint(checkpoint, ctx.config, out_dir=ctx.output)
    return {**scores, "checkpoint": checkpoint}
