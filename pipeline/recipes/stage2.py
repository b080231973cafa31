"""Stage II: supervised fine-tuning on the instruction mix (images up to 1344²), cross-entropy on the
assistant's answer tokens only.

Steps: as every training stage (pipeline/train/job.py), from Stage I-b's export.

Recipe version 1. Bump VERSION when a change makes this stage write other bytes for the same inputs.
"""

from __future__ import annotations

from pipeline.multinode import launch_problems
from pipeline.stages import StageContext, join
from pipeline.train.job import EXPORT, export_files, run_training

NAME = "stage2"
SECTIONS = ("train.stage2", "run.seed")
VERSION = 1


def inputs(config) -> tuple[str, ...]:
    return ("teacher", "data", "stage1b")


def run(ctx: StageContext) -> dict:
    return run_training(ctx, init=join(ctx.inputs["stage1b"], EXPORT))


outputs = export_files


def check(config) -> list[str]:
    return launch_problems(config, config.train.stage2.launcher, "train.stage2")


def build(job, dtype, device, log=None):
    from pipeline.train.build import student_setup

    return student_setup(job, dtype, device, "ce", log)
