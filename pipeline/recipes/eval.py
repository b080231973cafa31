"""The pipeline's last stage: evaluate the newest checkpoint of the configured target stage.

Steps: check that every suite's file exists (before any work); score the target stage's newest committed
checkpoint, or its output itself when the stage writes a model folder rather than checkpoints (the teacher);
when the held-out `pictures` suite is among the benchmarks, score the teacher on it too (reports in
`<output>/teacher/`) and report `retention`, the student's accuracy over the teacher's. On one process the
scoring runs here; on several (launch.nproc_per_node or launch.nnodes above 1) every process of torchrun's group
answers its share of the samples (pipeline/eval/worker.py) and the scores are read from the reports.

Recipe version 1. Bump VERSION when a change makes this stage score differently for the same inputs.
"""

from __future__ import annotations

import json

from pipeline import storage
from pipeline.checkpoints import latest_checkpoint
from pipeline.eval.suites import BUILTIN, resolve_suite
from pipeline.multinode import FILES, launch_problems, launch_stage, processes_per_node
from pipeline.stages import StageContext

NAME = "eval"
# the pictures suite asks about the picture kinds the trained tiny teacher learned
SECTIONS = ("eval", "teacher.train.pictures")
VERSION = 1
# The held-out suite the trained tiny teacher knows (pipeline/teacher_train.py): scored for the teacher too.
RETENTION_SUITE = "pictures"


def inputs(config) -> tuple[str, ...]:
    return tuple(dict.fromkeys(("teacher", config.eval.target)))  # the teacher: scored for the retention


def run(ctx: StageContext) -> dict:
    from pipeline.eval.metrics import retention

    target = ctx.config.eval.target
    source = ctx.inputs[target]
    latest = latest_checkpoint(source)
    checkpoint = latest[1] if latest else source
    ctx.log.info("evaluating %s on %s", checkpoint, ", ".join(ctx.config.eval.benchmarks))
    runs = [{"checkpoint": checkpoint, "suite": None, "out_dir": ctx.output}]
    with_teacher = RETENTION_SUITE in ctx.config.eval.benchmarks and target != "teacher"
    if with_teacher:
        # The teacher answers the same held-out questions, scored the same way: retention = student / teacher.
        runs.append({"checkpoint": ctx.inputs["teacher"], "suite": RETENTION_SUITE,
                     "out_dir": f"{ctx.output.rstrip('/')}/teacher"})
    scores, *teacher_scores = _evaluate(ctx, runs)
    metrics = {**scores, "checkpoint": checkpoint}
    if with_teacher:
        teacher = teacher_scores[0]
        metrics["teacher_" + RETENTION_SUITE] = teacher[RETENTION_SUITE]
        metrics["retention"] = retention(scores[RETENTION_SUITE], teacher[RETENTION_SUITE])
        ctx.log.info("held-out %s: teacher %.1f, student %.1f, retention %s", RETENTION_SUITE,
                     teacher[RETENTION_SUITE], scores[RETENTION_SUITE], metrics["retention"])
    return metrics


def _evaluate(ctx: StageContext, runs: list[dict]) -> list[dict[str, float]]:
    """Each run's flat scores: in this process, or under torchrun on every process of launch's nodes."""
    from pipeline.eval.api import evaluate_checkpoint
    from pipeline.kernel_cache import shared_tuning

    nproc = processes_per_node(ctx.config, None)
    if nproc == 1 and ctx.config.launch.nnodes == 1:
        with shared_tuning(ctx.config.run.root, "eval", ctx.log.info):
            return [evaluate_checkpoint(r["checkpoint"], ctx.config, suite=r["suite"], out_dir=r["out_dir"])
                    for r in runs]
    job = {"config": ctx.config.model_dump(mode="json"), "runs": runs}
    launch_stage(ctx, "pipeline.eval.worker", [f"{FILES}/job.json"], nproc, files={"job.json": json.dumps(job)})
    return [storage.read_json(f"{r['out_dir'].rstrip('/')}/summary.json")["scores"] for r in runs]


def outputs(folder: str) -> dict[str, dict]:
    return storage.remote_file_digests(folder)


def check(config) -> list[str]:
    """Every suite is a built-in one or an eval file that exists; a multi-node launch can start."""
    problems = launch_problems(config)
    for i, spec in enumerate(config.eval.benchmarks):
        field = f"eval.benchmarks[{i}]"
        try:
            _, source = resolve_suite(spec)
        except ValueError as exc:
            problems.append(f"{field}: {exc}")
            continue
        if source in BUILTIN.values():
            continue
        try:
            if not storage.exists(source):
                problems.append(f"{field}: the eval file {source!r} does not exist")
        except (OSError, ValueError) as exc:
            problems.append(f"{field}: cannot read {source!r}: {exc}")
    return problems
