"""Stage II: supervised fine-tuning on the instruction mix (images up to 1344²), cross-entropy on the
assistant's answer tokens only."""

from pipeline.stages import StageContext, join

from .job import run_training


def train_stage2(ctx: StageContext) -> dict:
    return run_training(ctx, init=join(ctx.inputs["stage1b"], "export"))
