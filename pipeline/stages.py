"""The stage-output contract: where a stage writes, how it says it is done, when it may be skipped.

A stage writes everything under `<run_root>/<stage>/` and commits by writing `_COMPLETE.json` last.
S3 has no atomic directory rename (DESIGN.md), so the marker is the commit: a directory without it is
an attempt in progress or a crash, never an output to build on.

The marker holds the stage's fingerprint: the hash of the config sections the stage reads plus the
fingerprints of the stages it reads from. Fingerprints follow from the config alone, so what is done
can be decided (and shown by `infinitevl status`) without opening any output. A stage whose marker
holds the expected fingerprint is skipped; `force` recomputes it.

An attempt that did not finish leaves `_STARTED.json` with its fingerprint. The next attempt with the
same fingerprint keeps the directory so the stage can resume from its last checkpoint; one with another
fingerprint (the config changed) clears it first, so nothing stale is resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import fsspec
from pydantic import BaseModel

from .lease import StageLease, lease_url

if TYPE_CHECKING:
    from .config import RunConfig

STAGE_ORDER = ("teacher", "data", "teacher-logits", "stage1a", "stage1b", "stage2", "stage3", "eval")
COMPLETE = "_COMPLETE.json"
STARTED = "_STARTED.json"

log = logging.getLogger(__name__)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def stable_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_hash(config: "RunConfig", sections: tuple[str, ...]) -> str:
    return stable_hash({s: identity(config.section(s)) for s in sections})


def identity(section: BaseModel) -> dict:
    """The fields that decide a stage's output bytes: all but those a section lists in RUN_ONLY
    (how the work is run: schedules, worker counts), so changing those never recomputes a stage."""
    dumped = section.model_dump(mode="json")
    run_only = getattr(section, "RUN_ONLY", ())
    return {name: identity(getattr(section, name)) if isinstance(getattr(section, name), BaseModel) else dumped[name]
            for name in type(section).model_fields if name not in run_only}


def fingerprint(section_hash: str, inputs: Mapping[str, str]) -> str:
    return stable_hash({"config": section_hash, "inputs": dict(inputs)})


def read_json(url: str) -> dict | None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_text(url: str, text: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, text.encode())


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, default=str))


def remove_tree(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@dataclass
class StageContext:
    """What a stage's pipeline callable receives: its config, where to write, where its inputs are."""
    name: str
    config: "RunConfig"
    output: str
    inputs: dict[str, str]
    log: logging.Logger
    on_checkpoint: Callable[[str, int, dict], None] = lambda uri, step, metrics: None

    def path(self, *parts: str) -> str:
        return join(self.output, *parts)


@dataclass
class StageOutcome:
    name: str
    status: str  # "done" (ran now) or "skipped" (committed output matched)
    output: str
    fingerprint: str
    duration_s: float
    metrics: dict = field(default_factory=dict)


def stage_state(output: str, expected: str) -> str:
    """"done", "stale" (committed for another config), "partial" (resumable attempt) or "missing"."""
    marker = read_json(join(output, COMPLETE))
    if marker is not None:
        return "done" if marker.get("fingerprint") == expected else "stale"
    started = read_json(join(output, STARTED))
    if started is not None and started.get("fingerprint") == expected:
        return "partial"
    return "missing"


def execute_stage(ctx: StageContext, fn: Callable[[StageContext], Mapping | None], section_hash: str,
                  input_fingerprints: Mapping[str, str], force: bool = False) -> StageOutcome:
    """Runs `fn(ctx)` unless its committed output already matches; commits the marker last."""
    expected = fingerprint(section_hash, input_fingerprints)
    if stage_state(ctx.output, expected) == "done" and not force:
        return _skipped(ctx, expected)
    run = ctx.config.run
    with StageLease(lease_url(run.root, ctx.name), ctx.name, ttl_s=run.lease_ttl_s) as lease:
        state = stage_state(ctx.output, expected)  # again: an attempt we waited on may have committed it
        if state == "done" and not force:
            return _skipped(ctx, expected)
        return _attempt(ctx, fn, section_hash, input_fingerprints, expected, state, force, lease)


def _skipped(ctx: StageContext, expected: str) -> StageOutcome:
    marker = read_json(join(ctx.output, COMPLETE))
    ctx.log.info("stage %s: committed output matches (fingerprint %s), skipping", ctx.name, expected)
    return StageOutcome(ctx.name, "skipped", ctx.output, expected, marker.get("duration_s", 0.0),
                        marker.get("metrics", {}))


def _attempt(ctx: StageContext, fn, section_hash: str, input_fingerprints: Mapping[str, str], expected: str,
             state: str, force: bool, lease: StageLease) -> StageOutcome:
    if force or state in ("stale", "missing"):
        remove_tree(ctx.output)
    else:
        ctx.log.info("stage %s: resuming the unfinished attempt in %s", ctx.name, ctx.output)
    started_at = time.time()
    write_json(join(ctx.output, STARTED), {"stage": ctx.name, "fingerprint": expected, "started_at": started_at})
    metrics = dict(fn(ctx) or {})
    duration = time.time() - started_at
    lease.check()  # an attempt presumed dead must not commit over the one that took its place
    write_json(join(ctx.output, COMPLETE), {
        "stage": ctx.name, "fingerprint": expected, "config_hash": section_hash,
        "inputs": dict(input_fingerprints), "output": ctx.output, "started_at": started_at,
        "finished_at": time.time(), "duration_s": duration, "metrics": metrics,
    })
    ctx.log.info("stage %s: committed %s in %.1f s", ctx.name, ctx.output, duration)
    return StageOutcome(ctx.name, "done", ctx.output, expected, duration, metrics)
