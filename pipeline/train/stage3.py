"""Stage III: long-sequence SFT with LoRA (peft) on the long video/document mixture (with Stage II data
mixed in by the data stage); the export is merged into the weights or kept as an adapter."""

from pipeline.stages import StageContext, join

from .job import run_training


def train_stage3(ctx: StageContext) -> dict:
    return run_training(ctx, init=join(ctx.inputs["stage2"], "export"))
