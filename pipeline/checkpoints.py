"""Committed checkpoints inside a stage's output, and the evaluation report written next to each.

A training stage saves step N under `<stage output>/checkpoints/step-<N>/` (its attempt folder) and commits
it with `_CHECKPOINT.json`, written last, which lists every file of the checkpoint with its sha256 (resuming
and evaluating check them); the orchestrator then emits `infinitevl.checkpoint.written` so the checkpoint gets
evaluated. A stage resumes from `latest_checkpoint(ctx.output)`.
"""

from __future__ import annotations

import re
import time

from . import storage
from .stages import STAGE_ORDER, StageContext, current_attempt, join, stage_dir

MARKER = "_CHECKPOINT.json"
REPORT_SUFFIX = ".eval.json"
_STEP_DIR = re.compile(r"step-(\d+)$")


def checkpoint_dir(stage_output: str, step: int) -> str:
    return join(stage_output, "checkpoints", f"step-{step:08d}")


def commit_checkpoint(ctx: StageContext, step: int, metrics: dict | None = None,
                      files: dict[str, dict] | None = None) -> str:
    """Commits the checkpoint folder of `step` (its files, hashed here unless the writer gives their digests)."""
    uri = checkpoint_dir(ctx.output, step)
    metrics = dict(metrics or {})
    write_marker(uri, ctx.name, step, metrics, storage.remote_file_digests(uri) if files is None else files)
    ctx.on_checkpoint(uri, step, metrics)
    return uri


def write_marker(uri: str, stage: str, step: int, metrics: dict, files: dict[str, dict]) -> None:
    storage.write_json(join(uri, MARKER), {"stage": stage, "step": step, "metrics": metrics, "files": files,
                                           "written_at": time.time()})


def list_checkpoints(stage_output: str) -> list[tuple[int, str]]:
    """(step, uri) of every committed checkpoint of a stage, oldest first."""
    fs, path = storage.filesystem(join(stage_output, "checkpoints"))
    fs.invalidate_cache(path)  # another process (the training job) writes the checkpoints
    if not fs.exists(path):
        return []
    found = []
    for entry in fs.ls(path, detail=False):
        match = _STEP_DIR.search(entry.rstrip("/"))
        uri = checkpoint_dir(stage_output, int(match.group(1))) if match else None
        if uri and storage.read_json_or_none(join(uri, MARKER)) is not None:
            found.append((int(match.group(1)), uri))
    return sorted(found)


def latest_checkpoint(stage_output: str) -> tuple[int, str] | None:
    found = list_checkpoints(stage_output)
    return found[-1] if found else None


def newest_unscored(stage_output: str) -> tuple[int, str] | None:
    """(step, uri) of the newest committed checkpoint of a stage with no evaluation report yet, if any."""
    for step, uri in reversed(list_checkpoints(stage_output)):
        if storage.read_json_or_none(report_uri(uri)) is None:
            return step, uri
    return None


def latest_checkpoint_of_run(run_root: str) -> tuple[str, int, str] | None:
    """(stage, step, uri) of the newest committed checkpoint of the latest stage that has one (in its newest
    attempt: the one running or committed)."""
    for stage in reversed(STAGE_ORDER):
        attempt = current_attempt(stage_dir(run_root, stage))
        latest = latest_checkpoint(attempt) if attempt else None
        if latest:
            return stage, latest[0], latest[1]
    return None


def checkpoint_metrics(uri: str) -> dict:
    marker = storage.read_json_or_none(join(uri, MARKER))
    if marker is None:
        raise FileNotFoundError(f"{uri} is not a committed checkpoint (no {MARKER})")
    return marker


def stage_output_of(checkpoint: str) -> str:
    """`<stage output>/checkpoints/step-N` -> `<stage output>`."""
    return checkpoint.rstrip("/").rsplit("/", 2)[0]


def report_uri(checkpoint: str) -> str:
    return checkpoint.rstrip("/") + REPORT_SUFFIX


def write_checkpoint_report(checkpoint: str, step: int, scores: dict | None, evaluator: str | None) -> dict:
    """The JSON next to a checkpoint: its training metrics and, when an evaluator ran, its scores."""
    marker = checkpoint_metrics(checkpoint)
    report = {
        "checkpoint": checkpoint, "step": step, "stage": marker.get("stage"),
        "train_metrics": marker.get("metrics", {}), "scores": scores, "evaluator": evaluator,
        "written_at": time.time(),
    }
    storage.write_json(report_uri(checkpoint), report)
    return report


def report_history(stage_output: str) -> list[dict]:
    """Every checkpoint's metrics and report of a stage, oldest first: what the loss/score plot shows."""
    rows = []
    for step, uri in list_checkpoints(stage_output):
        report = storage.read_json_or_none(report_uri(uri)) or {}
        rows.append({"step": step, "checkpoint": uri, **checkpoint_metrics(uri).get("metrics", {}),
                     **(report.get("scores") or {})})
    return rows
