"""The teacher-logits stage for the run registry (flows/stages.py): the teacher committed by the teacher
stage over the distillation corpus committed by the data stage, into the stage's output folder.

With teacher_logits.nproc_per_node > 1 the work runs as one process per GPU under torchrun (through
pipeline.launch, so cancelling the stage ends every rank); otherwise in this process.
"""

from __future__ import annotations

from pipeline import storage
from pipeline.launch import launch, torchrun_command
from pipeline.stages import StageContext

from .store import MANIFEST, StoreSettings


def store_teacher_logits(ctx: StageContext) -> dict:
    cfg = ctx.config.teacher_logits
    settings = StoreSettings(top_k=cfg.top_k, positions=cfg.positions, values=cfg.values,
                             batch_size=cfg.batch_size)
    data_manifest = corpus_manifest(ctx.inputs["data"])
    teacher = ctx.inputs["teacher"]
    if cfg.nproc_per_node > 1:
        args = ["--data", data_manifest, "--teacher", teacher, "--output", ctx.output,
                "--top-k", str(settings.top_k), "--positions", settings.positions, "--values", settings.values,
                "--batch-size", str(settings.batch_size), "--max-bytes-per-token", str(cfg.max_bytes_per_token),
                "--no-progress"]
        launch(torchrun_command("pipeline.teacher_logits.run", args, cfg.nproc_per_node), ctx.log)
    else:
        from .run import run

        run(data_manifest, teacher, ctx.output, settings, max_bytes_per_token=cfg.max_bytes_per_token)
    manifest = storage.read_json(storage.join(ctx.output, MANIFEST))
    fidelity = manifest["fidelity"] or {}
    return {"bytes_per_token": round(manifest["bytes_per_token"], 2), "covered": manifest["covered"],
            "tokens": manifest["tokens"], "topk_mass": fidelity.get("topk_mass"), "kl": fidelity.get("kl_mean")}


def corpus_manifest(data_output: str) -> str:
    """The distillation corpus's manifest under the data stage's output."""
    for candidate in (storage.join(data_output, "distill", MANIFEST), storage.join(data_output, MANIFEST)):
        if storage.exists(candidate):
            return candidate
    raise FileNotFoundError(f"no distillation corpus manifest under {data_output} (looked for distill/{MANIFEST} "
                            f"and {MANIFEST})")
