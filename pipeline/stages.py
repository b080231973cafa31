"""The stage-output contract: attempts, the commit marker, and the lineage that decides what is done.

Layout of one stage of a run:

    <run root>/<stage>/
        _COMPLETE.json        the commit: names the committed attempt, its fingerprint, lineage and output digest
        attempt-0001/         everything one attempt writes, and nothing else
            _STARTED.json     the attempt's fingerprint: only an attempt of the same fingerprint is resumed
            ...

An attempt writes only inside its own folder, so a forced or retried stage never touches the committed
output: the marker, written last in one atomic PUT (S3) or rename (local disk), switches readers over, and
only then are the older attempts deleted. A failed attempt leaves the previous output committed and used.

Lineage. A stage's fingerprint is the hash of
  - its config sections (all fields but the run-only ones that a section lists in RUN_ONLY),
  - the output digests of the stages it reads (from their commit markers), and
  - the version its recipe module declares (bumped when the stage's output changes meaning).
A stage is done when its committed marker holds that fingerprint. A forced or changed upstream stage whose
output differs changes the fingerprint of every stage downstream; one whose rerun reproduces the same bytes
changes nothing. The marker keeps the lineage itself (not only its hash), so `stale_reasons` can say why a
stage must run again: "input stage2 changed", "recipe v1 → v2", "config train.stage3.lr changed".

The output digest is `storage.tree_digest` of the files the stage publishes (its recipe's `outputs`), whose
sha256s its producers record as they write them (shard markers, manifests, a model directory's _FILES.json);
readers check what they open against those records (pipeline.storage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from pydantic import BaseModel

from . import storage
from .lease import StageLease, lease_url

if TYPE_CHECKING:
    from .config import RunConfig

STAGE_ORDER = ("teacher", "data", "teacher-logits", "stage1a", "stage1b", "stage2", "stage3", "eval")
TRAINING_STAGES = ("stage1a", "stage1b", "stage2", "stage3")  # the stages pipeline/train/worker.py runs
COMPLETE = "_COMPLETE.json"
STARTED = "_STARTED.json"
ATTEMPT = "attempt-"
_ATTEMPT_NAME = re.compile(r"attempt-(\d+)$")

log = logging.getLogger(__name__)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def stable_hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def identity(section: Any) -> Any:
    """The fields that decide a stage's output bytes: all but those a section lists in RUN_ONLY (how the work
    is run: schedules, worker counts), so changing those never recomputes a stage. Plain values are their own
    identity (`run.seed`)."""
    if not isinstance(section, BaseModel):
        return section
    dumped = section.model_dump(mode="json")
    run_only = getattr(section, "RUN_ONLY", ())
    return {name: identity(getattr(section, name)) if isinstance(getattr(section, name), BaseModel) else dumped[name]
            for name in type(section).model_fields if name not in run_only}


# -- lineage ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lineage:
    """What decides a stage's output: config sections, the digests of its inputs' outputs, its recipe version."""
    config: dict[str, Any]
    inputs: dict[str, str]
    version: int

    @property
    def fingerprint(self) -> str:
        return stable_hash(asdict(self))

    @classmethod
    def of(cls, config: "RunConfig", sections: tuple[str, ...], input_digests: Mapping[str, str],
           version: int) -> "Lineage":
        return cls({s: identity(config.section(s)) for s in sections}, dict(input_digests), version)


def stale_reasons(marker: dict, current: Lineage) -> list[str]:
    """Why a committed output no longer matches, one phrase per difference."""
    recorded = marker.get("lineage")
    if recorded is None:
        return ["committed by an older infinitevl that recorded no lineage"]
    reasons = []
    for name in sorted(set(recorded["inputs"]) | set(current.inputs)):
        before, now = recorded["inputs"].get(name), current.inputs.get(name)
        if before != now:
            reasons.append(f"input {name} changed" if before and now else
                           f"input {name} {'added' if now else 'removed'}")
    if recorded["version"] != current.version:
        reasons.append(f"recipe v{recorded['version']} → v{current.version}")
    for section in sorted(set(recorded["config"]) | set(current.config)):
        reasons += [f"config {path} changed ({_short(a)} → {_short(b)})"
                    for path, a, b in _differences(section, recorded["config"].get(section),
                                                   current.config.get(section))]
    return reasons or ["fingerprint differs"]


def _differences(path: str, a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(f"{path}.{key}", a.get(key), b.get(key))
        return out
    return [] if a == b else [(path, a, b)]


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


# -- attempts and the commit marker ----------------------------------------------------------------------------------

def stage_dir(run_root: str, name: str) -> str:
    return join(run_root, name)


def committed(stage_directory: str) -> dict | None:
    """The stage's commit marker, with `output` resolved to the committed attempt's folder; None if uncommitted."""
    marker = storage.read_json_or_none(join(stage_directory, COMPLETE))
    if marker is not None and "attempt" in marker:
        marker["output"] = join(stage_directory, marker["attempt"])
    return marker


def attempts(stage_directory: str) -> list[tuple[int, str]]:
    """(number, folder) of every attempt of a stage, oldest first."""
    fs, path = storage.filesystem(stage_directory)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        match = _ATTEMPT_NAME.search(entry.rstrip("/"))
        if match:
            found.append((int(match.group(1)), join(stage_directory, match.group(0))))
    return sorted(found)


def resumable_attempt(stage_directory: str, fingerprint: str) -> str | None:
    """The newest uncommitted attempt started for `fingerprint` (a killed run of the same config), if any."""
    marker = committed(stage_directory)
    for _, folder in reversed(attempts(stage_directory)):
        if marker is not None and folder == marker.get("output"):
            continue
        started = storage.read_json_or_none(join(folder, STARTED))
        if started is not None and started.get("fingerprint") == fingerprint:
            return folder
    return None


def current_attempt(stage_directory: str) -> str | None:
    """The attempt a person would look at: the newest one started (running or committed)."""
    found = attempts(stage_directory)
    return found[-1][1] if found else None


def model_folder(url: str) -> str:
    """The model a stage folder holds (`runs/tiny/stage3`: its committed attempt's export; the teacher stage: its
    committed output); any other folder is returned as it is."""
    marker = committed(url)
    if marker is None or "output" not in marker:
        return url
    export = join(marker["output"], "export")
    return export if storage.committed_files(export) is not None else marker["output"]


def stage_state(stage_directory: str, fingerprint: str) -> str:
    """"done", "stale" (committed for another lineage), "partial" (a resumable attempt) or "missing"."""
    marker = committed(stage_directory)
    if marker is not None and marker.get("fingerprint") == fingerprint:
        return "done"
    if resumable_attempt(stage_directory, fingerprint) is not None:
        return "partial"
    return "stale" if marker is not None else "missing"


@dataclass
class StageContext:
    """What a stage's recipe receives: its config, the attempt folder to write, the committed outputs it reads."""
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
    digest: str | None = None
    changed: bool | None = None  # ran now: whether the output differs from the one it replaced


def execute_stage(recipe, config: "RunConfig", inputs: Mapping[str, dict], log: logging.Logger, force: bool = False,
                  on_checkpoint: Callable[[str, int, dict], None] | None = None) -> StageOutcome:
    """Runs `recipe` (a module of pipeline.recipes) unless its committed output matches its lineage; the
    attempt writes into its own folder and commits with the marker, written last.

    `inputs` maps each stage the recipe reads to that stage's commit marker."""
    lineage = Lineage.of(config, recipe.SECTIONS, {n: m["digest"] for n, m in inputs.items()}, recipe.VERSION)
    expected = lineage.fingerprint
    directory = stage_dir(config.run.root, recipe.NAME)
    marker = committed(directory)
    if marker is not None and marker.get("fingerprint") == expected and not force:
        return _skipped(recipe.NAME, marker, log)
    with StageLease(lease_url(config.run.root, recipe.NAME), recipe.NAME, ttl_s=config.run.lease_ttl_s) as lease:
        marker = committed(directory)  # again: an attempt we waited on may have committed it
        if marker is not None and marker.get("fingerprint") == expected and not force:
            return _skipped(recipe.NAME, marker, log)
        if marker is not None and not force:
            log.info("stage %s is stale: %s", recipe.NAME, "; ".join(stale_reasons(marker, lineage)))
        output = None if force else resumable_attempt(directory, expected)
        if output is None:
            numbers = [n for n, _ in attempts(directory)]
            output = join(directory, f"{ATTEMPT}{(max(numbers) + 1 if numbers else 1):04d}")
        else:
            log.info("stage %s: resuming the unfinished attempt in %s", recipe.NAME, output)
        started_at = time.time()
        storage.write_json(join(output, STARTED), {"stage": recipe.NAME, "fingerprint": expected,
                                                   "started_at": started_at, "forced": force})
        announce = {"on_checkpoint": on_checkpoint} if on_checkpoint else {}
        ctx = StageContext(recipe.NAME, config, output, {n: m["output"] for n, m in inputs.items()}, log, **announce)
        metrics = dict(recipe.run(ctx) or {})
        files = recipe.outputs(output)
        digest = storage.tree_digest(files)
        duration = time.time() - started_at
        lease.check()  # an attempt presumed dead must not commit over the one that took its place
        storage.write_json(join(directory, COMPLETE), {
            "stage": recipe.NAME, "attempt": output.rsplit("/", 1)[-1], "fingerprint": expected, "digest": digest,
            "lineage": asdict(lineage), "files": files, "started_at": started_at, "finished_at": time.time(),
            "duration_s": duration, "metrics": metrics,
        })
        changed = None if marker is None else marker.get("digest") != digest
        _delete_other_attempts(directory, output)
    log.info("stage %s: committed %s in %.1f s (output digest %s%s)", recipe.NAME, output, duration, digest[:12],
             "" if changed is None else (", changed" if changed else ", the same bytes as before"))
    return StageOutcome(recipe.NAME, "done", output, expected, duration, metrics, digest, changed)


def _skipped(name: str, marker: dict, log: logging.Logger) -> StageOutcome:
    log.info("stage %s: committed output matches (fingerprint %s), skipping", name, marker["fingerprint"])
    return StageOutcome(name, "skipped", marker["output"], marker["fingerprint"], marker.get("duration_s", 0.0),
                        marker.get("metrics", {}), marker.get("digest"))


def _delete_other_attempts(directory: str, keep: str) -> None:
    """After a commit only the committed attempt is of use: older ones (and stale partial ones) go."""
    for _, folder in attempts(directory):
        if folder != keep:
            try:
                storage.delete(folder)
            except OSError as exc:  # a leftover costs disk, not correctness: the marker names the attempt
                log.warning("could not delete the old attempt %s: %s", folder, exc)
