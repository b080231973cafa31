"""Stage I-a: layer-wise alignment. Each linear mixer (`student.linear_mixer`) learns, by MSE on the teacher's own
per-layer inputs and token-mixer outputs, to replace its layer's mixer (attention, or the teacher's own linear
layer), whatever the teacher's family.

Steps, parent side: check the job against its inputs, launch the workers, report what they committed
(pipeline/train/job.py). Worker side (`build`): the frozen teacher loaded once, with one new mixer per linear
layer fed by hooks on the teacher's token mixers (online: nothing is precomputed), trained alone; the export is
the converted student with the trained mixers.

Recipe version 1. Bump VERSION when a change makes this stage write other bytes for the same inputs.
"""

from __future__ import annotations

from pipeline.multinode import launch_problems
from pipeline.stages import StageContext
from pipeline.train.job import export_files, run_training

NAME = "stage1a"
SECTIONS = ("student", "train.stage1a", "run.seed")
VERSION = 1


def inputs(config) -> tuple[str, ...]:
    return ("teacher", "data")


def run(ctx: StageContext) -> dict:
    return run_training(ctx, init=ctx.inputs["teacher"])


outputs = export_files


def check(config) -> list[str]:
    problems = launch_problems(config, config.train.stage1a.launcher, "train.stage1a")
    if config.train.stage1a.trainable != ["linear_attn"]:
        problems.append("train.stage1a.trainable: must be [linear_attn]: layer-wise alignment trains the linear "
                        f"mixers only (got {config.train.stage1a.trainable})")
    return problems


def build(job, dtype, device, log=None):
    from model import load_teacher
    from pipeline.train.build import TrainSetup, log_trainable
    from pipeline.train.job import load_processor, materialize
    from pipeline.train.objectives import LayerwiseAligner, student_config

    processor = load_processor(job.teacher)
    teacher_dir = materialize(job.teacher)
    # built on the CPU, then moved: where the teacher runs packed rows as its exact student (Qwen3.5), the
    # teacher itself is dropped once that copy is made, and never sits on the device beside it
    teacher = load_teacher(teacher_dir, dtype=dtype)
    config = student_config(teacher.config, job.student)
    module = LayerwiseAligner(teacher, config, loss_scale=job.section.loss_scale)
    del teacher
    module.to(device)
    counts = {"linear_attn": sum(p.numel() for p in module.mixers.parameters())}
    if log:
        log_trainable(job, counts, log)
    flops = 6 * counts["linear_attn"] + 2 * sum(p.numel() for p in module.teacher.parameters())
    return TrainSetup(job, module, processor, dtype,
                      lambda state, out, checkpoint=False: module.export(state, teacher_dir, out, processor), flops)
