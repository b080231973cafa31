"""The teacher stage: put the Qwen2.5-VL teacher and its processor into the run root.

Every later stage reads the teacher from `<run_root>/teacher/`, not from wherever it came from, so a
run keeps working (and stays reproducible) when the source moves or a Hub revision changes.
"""

from __future__ import annotations

import json
import os
import tempfile

import fsspec

from .stages import StageContext

TINY = "tiny"


def prepare_teacher(ctx: StageContext) -> dict:
    """Copies (or builds) the teacher into the stage output; with `teacher.train`, trains the tiny teacher
    on the synthetic picture questions first and reports its held-out accuracy (pipeline/teacher_train.py)."""
    source, train = ctx.config.teacher.source, ctx.config.teacher.train
    metrics: dict = {"source": source}
    with tempfile.TemporaryDirectory() as tmp:
        if train is not None:
            metrics.update(_train_tiny(train, ctx.config.teacher.seed, tmp, ctx.log))
            local = tmp
        else:
            local = _materialise(source, ctx.config.teacher.seed, tmp)
        _upload(local, ctx.output)
    ctx.log.info("teacher %s%s saved to %s", source, " (trained)" if train else "", ctx.output)
    return metrics


def _train_tiny(settings, seed: int, tmp: str, log) -> dict:
    from .teacher_train import train_teacher

    teacher, processor, metrics = train_teacher(settings, seed=seed, log=log.info)
    teacher.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, "training_report.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    metrics.pop("loss_curve")  # in training_report.json beside the weights; the stage result stays flat
    return {"trained": True, **metrics}


def _materialise(source: str, seed: int, tmp: str) -> str:
    if source == TINY:
        from model.tiny import build_tiny_teacher

        teacher, processor = build_tiny_teacher(seed=seed)
        teacher.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        return tmp
    if os.path.isdir(source):
        return source
    if source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"teacher.source {source} is not a directory")
    if "://" in source:
        fs, path = fsspec.core.url_to_fs(source)
        if not fs.isdir(path):
            raise FileNotFoundError(f"teacher.source {source} is not a directory")
        fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
        return tmp
    from huggingface_hub import snapshot_download

    return snapshot_download(source, local_dir=tmp)


def _upload(local: str, output: str) -> None:
    fs, path = fsspec.core.url_to_fs(output)
    fs.makedirs(path, exist_ok=True)
    for dirpath, _, files in os.walk(local):
        rel = os.path.relpath(dirpath, local)
        if rel.split(os.sep)[0] == ".cache":  # snapshot_download's bookkeeping, not the model
            continue
        for name in files:
            target = path if rel == "." else f"{path}/{rel.replace(os.sep, '/')}"
            fs.makedirs(target, exist_ok=True)
            fs.put_file(os.path.join(dirpath, name), f"{target}/{name}")
