"""Stage I-b: end-to-end distillation. KL between the student's logits and the teacher's stored top-k, at a
temperature with the T² factor, averaged per token over the positions the logit store covers.

Steps: as every training stage (pipeline/train/job.py), from Stage I-a's export; the worker reads each row's
stored teacher logits beside it (checked against the sha256 the teacher-logits stage committed).

Recipe version 1. Bump VERSION when a change makes this stage write other bytes for the same inputs.
"""

from __future__ import annotations

from pipeline.multinode import launch_problems
from pipeline.stages import StageContext, join
from pipeline.train.job import EXPORT, export_files, run_training

NAME = "stage1b"
SECTIONS = ("train.stage1b", "run.seed")
VERSION = 1


def inputs(config) -> tuple[str, ...]:
    return ("teacher", "data", "stage1a", "teacher-logits")


def run(ctx: StageContext) -> dict:
    return run_training(ctx, init=join(ctx.inputs["stage1a"], EXPORT))


outputs = export_files


def check(config) -> list[str]:
    return launch_problems(config, config.train.stage1b.launcher, "train.stage1b")


def build(job, dtype, device, log=None):
    from pipeline.train.build import StoredLogits, student_setup

    setup = student_setup(job, dtype, device, "kl", log)
    setup.logits = StoredLogits(job.logits, job.seed)
    return setup
