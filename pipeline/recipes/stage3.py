"""Stage III: long-sequence SFT with LoRA (peft) on the long video/document mixture (with Stage II data mixed
in by the data stage); the export is merged into the weights or keeps the adapters beside them.

Steps: as every training stage (pipeline/train/job.py), from Stage II's export, with the student wrapped in
the stage's adapters.

Recipe version 1. Bump VERSION when a change makes this stage write other bytes for the same inputs.
"""

from __future__ import annotations

from pipeline.multinode import launch_problems
from pipeline.stages import StageContext, join
from pipeline.train.job import EXPORT, export_files, run_training

NAME = "stage3"
SECTIONS = ("train.stage3", "run.seed")
VERSION = 1


def inputs(config) -> tuple[str, ...]:
    return ("teacher", "data", "stage2")


def run(ctx: StageContext) -> dict:
    return run_training(ctx, init=join(ctx.inputs["stage2"], EXPORT))


outputs = export_files


def check(config) -> list[str]:
    return launch_problems(config, config.train.stage3.launcher, "train.stage3")


def build(job, dtype, device, log=None):
    from pipeline.train.build import student_setup

    return student_setup(job, dtype, device, "ce", log, lora=job.section.lora)
