"""The teacher-logits stage: the committed teacher, run once over the committed distillation corpus, stores
sparse top-k logits next to the token shards (pipeline/teacher_logits/store.py).

Steps: read the distillation manifest, then compute the shards, in this process or, on more than one process
(teacher_logits.nproc_per_node or launch.nproc_per_node above 1, or launch.nnodes above 1), one process per GPU
under torchrun on every node (pipeline.multinode, so cancelling the stage ends every rank); rank 0 writes the
manifest last, saying how many nodes and ranks computed it. Each token shard is checked against the sha256
the data stage recorded before it is read, and each logit shard's sha256 goes into the manifest, against
which Stage I-b's reader checks it.

Recipe version 1. Bump VERSION when a change makes this stage write other bytes for the same inputs.
"""

from __future__ import annotations

from pipeline import storage
from pipeline.multinode import launch_problems, launch_stage, processes_per_node
from pipeline.stages import StageContext

MANIFEST = "manifest.json"

NAME = "teacher-logits"
SECTIONS = ("teacher_logits",)
VERSION = 1


def inputs(config) -> tuple[str, ...]:
    return ("teacher", "data")


def run(ctx: StageContext) -> dict:
    from pipeline.teacher_logits.store import StoreSettings

    cfg = ctx.config.teacher_logits
    settings = StoreSettings(top_k=cfg.top_k, positions=cfg.positions, values=cfg.values,
                             batch_size=cfg.batch_size)
    data_manifest = storage.join(ctx.inputs["data"], "distill", MANIFEST)
    teacher = ctx.inputs["teacher"]
    nproc = processes_per_node(ctx.config, cfg.nproc_per_node)
    if nproc > 1 or ctx.config.launch.nnodes > 1:
        args = ["--data", data_manifest, "--teacher", teacher, "--output", ctx.output,
                "--top-k", str(settings.top_k), "--positions", settings.positions, "--values", settings.values,
                "--batch-size", str(settings.batch_size), "--max-bytes-per-token", str(cfg.max_bytes_per_token),
                "--no-progress"]
        launch_stage(ctx, "pipeline.teacher_logits.run", args, nproc)
    else:
        from pipeline.teacher_logits.run import run as store

        store(data_manifest, teacher, ctx.output, settings, max_bytes_per_token=cfg.max_bytes_per_token)
    manifest = storage.read_json(storage.join(ctx.output, MANIFEST))
    fidelity = manifest["fidelity"] or {}
    return {"bytes_per_token": round(manifest["bytes_per_token"], 2), "covered": manifest["covered"],
            "tokens": manifest["tokens"], "topk_mass": fidelity.get("topk_mass"), "kl": fidelity.get("kl_mean")}


def outputs(folder: str) -> dict[str, dict]:
    manifest = storage.read_json(storage.join(folder, MANIFEST))
    return {s["file"]: {"sha256": s["sha256"], "bytes": s["bytes"]} for s in manifest["shards"]}


def check(config) -> list[str]:
    return launch_problems(config)  # otherwise it reads only what earlier stages commit
