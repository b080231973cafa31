"""Stage I-b: end-to-end distillation. KL between the student's logits and the teacher's stored top-k,
at a temperature with the T² factor, averaged per token over the positions the logit store covers."""

from pipeline.stages import StageContext, join

from .job import run_training


def train_stage1b(ctx: StageContext) -> dict:
    return run_training(ctx, init=join(ctx.inputs["stage1a"], "export"))
