"""The teacher stage: put the teacher and its processor into the run root.

`teacher.source: tiny` builds the in-code tiny teacher of `teacher.family`; a checkpoint's family is read from its
config.json (the stage's result names it). Every later stage reads the teacher from this stage's committed output,
not from wherever it came from, so a run keeps working (and stays reproducible) when the source moves or a Hub
revision changes. With `teacher.train`, the in-code tiny teacher is trained on the synthetic picture questions
first and its held-out accuracy reported (pipeline/teacher_train.py); the training saves itself in the attempt's
folder every `teacher.train.checkpoint_seconds`, so a killed stage goes on from there when run again.

Recipe version 1. Bump VERSION when a change makes this stage write other bytes for the same config.
"""

from __future__ import annotations

import json
import os
import tempfile

from pipeline import storage
from pipeline.stages import StageContext

NAME = "teacher"
SECTIONS = ("teacher",)
VERSION = 1
TINY = "tiny"
REPORT = "training_report.json"  # the tiny teacher's training curve: a report, not part of the model
TRAINING_STATE = "_training_state.pt"  # a training in progress; deleted once the teacher is published


def inputs(config) -> tuple[str, ...]:
    return ()


def run(ctx: StageContext) -> dict:
    source, train = ctx.config.teacher.source, ctx.config.teacher.train
    metrics: dict = {"source": source}
    with tempfile.TemporaryDirectory() as tmp:
        state = None
        if train is not None:
            from pipeline.teacher_train import TrainingState

            # in the attempt's folder, outside its file list: a killed stage resumes this attempt and goes on
            state = TrainingState(storage.join(ctx.output, TRAINING_STATE))
            metrics.update(_train_tiny(ctx.config.teacher, tmp, ctx.log, state))
            local = tmp
        else:
            local = _materialise(ctx.config.teacher, tmp)
        metrics["family"] = _family(local).name
        storage.publish_dir(local, ctx.output, keep=lambda rel: not rel.startswith(".cache/"), source=source)
        if state is not None:
            state.clear()  # published: what is left is the commit marker
    ctx.log.info("teacher %s%s saved to %s", source, " (trained)" if train else "", ctx.output)
    return metrics


def outputs(folder: str) -> dict[str, dict]:
    """The model and processor files (the training report is not part of what later stages read)."""
    return {rel: f for rel, f in storage.committed_files(folder).items() if rel != REPORT}


def check(config) -> list[str]:
    """The teacher source is there: a local folder or URL holding the config.json of a supported family, or a Hub
    id in the local cache (or answered by the Hub, when online)."""
    source = config.teacher.source
    if source == TINY:
        return []
    if "://" in source or source.startswith(("/", ".", "~")) or os.path.isdir(source):
        try:
            config_json = storage.join(source, "config.json")
            if storage.exists(config_json):
                return _family_problems(source, storage.read_json(config_json))
            return [f"teacher.source: {source!r} has no config.json (not a Hugging Face model folder)"]
        except (OSError, ValueError) as exc:
            return [f"teacher.source: cannot read {source!r}: {exc}"]
    return _hub_problems(source)


def _family_problems(source: str, config_json: dict) -> list[str]:
    from model import family_of

    try:
        family_of(str(config_json.get("model_type")))
    except ValueError as exc:
        return [f"teacher.source: {source!r}: {exc}"]
    return []


def _hub_problems(repo_id: str) -> list[str]:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return []
    if HF_HUB_OFFLINE:
        return [f"teacher.source: {repo_id!r} is not a folder or URL, and not in the Hugging Face cache "
                "(HF_HUB_OFFLINE is set): download it first (huggingface-cli download) or give its folder"]
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(repo_id, timeout=10)
    except Exception as exc:  # noqa: BLE001 - any answer but a model is the problem to report
        return [f"teacher.source: {repo_id!r} is not a folder or URL, and the Hugging Face Hub has no such model "
                f"for these credentials ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"]
    return []


def _family(local: str):
    from model import family_of_checkpoint

    family = family_of_checkpoint(local)
    if family is None:
        raise FileNotFoundError(f"the teacher in {local} has no config.json")
    return family


def _train_tiny(section, tmp: str, log, state) -> dict:
    from pipeline.teacher_train import train_teacher

    teacher, processor, metrics = train_teacher(section.train, seed=section.seed, log=log.info, family=section.family,
                                                state=state)
    teacher.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    with open(os.path.join(tmp, REPORT), "w") as f:
        json.dump(metrics, f, indent=2)
    metrics.pop("loss_curve")  # in the report beside the weights; the stage result stays flat
    return {"trained": True, **metrics}


def _materialise(section, tmp: str) -> str:
    source = section.source
    if source == TINY:
        from model.tiny import build_tiny_teacher

        teacher, processor = build_tiny_teacher(seed=section.seed, family=section.family)
        teacher.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        return tmp
    if os.path.isdir(source):
        return source
    if source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"teacher.source {source} is not a directory")
    if "://" in source:
        return storage.local_dir(source, verify=False)
    from huggingface_hub import snapshot_download

    return snapshot_download(source, local_dir=tmp)
