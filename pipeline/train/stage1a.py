"""Stage I-a: layer-wise alignment. Each linear mixer (Gated DeltaNet, GLA or Mamba2) learns, by MSE on the
teacher's own per-layer inputs and attention outputs, to replace the attention of its layer."""

from pipeline.stages import StageContext

from .job import run_training


def train_stage1a(ctx: StageContext) -> dict:
    return run_training(ctx, init=ctx.inputs["teacher"])
