"""The plan of a run: which stages there are, what each reads, what is done, stale or next and why, and the
checks made before any work starts.

The stages are the recipe modules of `pipeline.recipes`, in pipeline order. `status` reads each stage's commit
marker and compares its recorded lineage with the one the config and the committed inputs give now
(pipeline.stages); `check_plan` refuses a plan whose inputs are missing or stale, and `preflight` gathers every
problem that can be known before work starts (input URLs, storage credentials, leases) into one error. The
Prefect flows and the direct runner both go through `run_stage`, so they share one rule.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

from . import storage
from .config import RunConfig
from .lease import live_holder
from .recipes import RECIPES
from .stages import (STAGE_ORDER, Lineage, StageOutcome, committed, execute_stage, join, resumable_attempt,
                     stage_dir, stale_reasons)

assert tuple(RECIPES) == STAGE_ORDER, "pipeline.recipes must list every stage of STAGE_ORDER, in order"


class PlanError(RuntimeError):
    """The plan cannot run; the message lists every problem found, one per line."""


def needs(config: RunConfig, name: str) -> tuple[str, ...]:
    """The stages whose committed outputs `name` reads."""
    return tuple(RECIPES[name].inputs(config))


def stage_output(config: RunConfig, name: str) -> str:
    """The committed attempt folder of a stage (where its outputs are), or its stage folder if none is committed."""
    directory = stage_dir(config.run.root, name)
    marker = committed(directory)
    return marker["output"] if marker and "output" in marker else directory


@dataclass
class StageStatus:
    name: str
    state: str                      # done, stale, partial, missing
    reasons: list[str] = field(default_factory=list)
    marker: dict | None = None
    fingerprint: str | None = None  # the expected one; None while an input is not done
    holder: dict | None = None      # the lease of an attempt running it now

    @property
    def output(self) -> str | None:
        return None if self.marker is None else self.marker.get("output")


def status(config: RunConfig) -> dict[str, StageStatus]:
    """Every stage's state and, where it is not done, why; from the commit markers, without opening outputs."""
    out: dict[str, StageStatus] = {}
    for name in STAGE_ORDER:
        recipe, directory = RECIPES[name], stage_dir(config.run.root, name)
        marker = committed(directory)
        inputs = needs(config, name)
        waiting = [n for n in inputs if out[n].state != "done"]
        holder = live_holder(config.run.root, name)
        if waiting:  # nothing to compare yet: an input is to run first
            if marker is None:
                out[name] = StageStatus(name, "missing", [], None, None, holder)
            else:
                reasons = [f"input {n} is {out[n].state} (it runs first)" for n in waiting]
                out[name] = StageStatus(name, "stale", reasons, marker, None, holder)
            continue
        lineage = Lineage.of(config, recipe.SECTIONS, {n: out[n].marker["digest"] for n in inputs}, recipe.VERSION)
        fingerprint = lineage.fingerprint
        if marker is not None and marker.get("fingerprint") == fingerprint:
            out[name] = StageStatus(name, "done", [], marker, fingerprint, holder)
        elif resumable_attempt(directory, fingerprint) is not None:
            out[name] = StageStatus(name, "partial", ["an unfinished attempt resumes"], marker, fingerprint, holder)
        elif marker is not None:
            out[name] = StageStatus(name, "stale", stale_reasons(marker, lineage), marker, fingerprint, holder)
        else:
            out[name] = StageStatus(name, "missing", [], None, fingerprint, holder)
    return out


def check_plan(config: RunConfig, only: list[str] | None = None, force: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The stages to run, in order: known, and every input either runs earlier in this plan or is committed and
    current. Raises PlanError listing every problem."""
    names = list(only) if only else list(config.run.stages)
    unknown = [n for n in [*names, *force] if n not in RECIPES]
    if unknown:
        raise PlanError("\n".join(f"unknown stage {n!r}; known: {', '.join(STAGE_ORDER)}" for n in unknown))
    names = sorted(set(names), key=STAGE_ORDER.index)
    problems, states = [], None
    for i, name in enumerate(names):
        for need in needs(config, name):
            if STAGE_ORDER.index(need) >= STAGE_ORDER.index(name):
                problems.append(f"stage {name} cannot read {need}, which comes after it")
                continue
            if need in names[:i]:
                continue
            states = states or status(config)
            state = states[need]
            if state.state != "done":
                why = f" ({'; '.join(state.reasons)})" if state.reasons else ""
                problems.append(f"stage {name} needs {need}, which is {state.state} in "
                                f"{stage_dir(config.run.root, need)}{why}: add {need} to the stages to run")
    if problems:
        raise PlanError("\n".join(problems))
    return names


def preflight(config: RunConfig, names: list[str]) -> None:
    """Everything that can be known wrong before work starts, all at once: each planned stage's inputs
    (sources, media roots, teacher, eval suites: `check` of its recipe), that the run root takes writes with
    the credentials at hand, and that no other live attempt holds a planned stage's lease."""
    # stages that share an input (or a launch setting) report its problem once
    problems = list(dict.fromkeys(p for name in names for p in RECIPES[name].check(config)))
    problems += _storage_problems(config.run.root)
    for name in names:
        holder = live_holder(config.run.root, name)
        if holder is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started_at", 0))))
            problems.append(f"stage {name} is being run by another attempt: host {holder.get('host')} pid "
                            f"{holder.get('pid')}, since {since} (infinitevl status {config.run.root})")
    if problems:
        raise PlanError("\n".join(problems))


def _storage_problems(root: str) -> list[str]:
    probe = join(root, "_leases", f".probe-{uuid.uuid4().hex[:8]}")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except (OSError, ValueError) as exc:
        return [f"run.root: cannot write under {root!r}: {exc}"]
    return []


def run_stage(config: RunConfig, name: str, log: logging.Logger, force: bool = False,
              on_checkpoint=None) -> StageOutcome:
    """Runs one stage of a checked plan (its inputs committed by now), or skips it when its committed output
    matches the lineage its inputs give now: an input rerun earlier in the plan that reproduced the same bytes
    keeps this stage done."""
    inputs = {}
    for need in needs(config, name):
        marker = committed(stage_dir(config.run.root, need))
        if marker is None:
            raise PlanError(f"stage {name} needs {need}, which is not committed in {stage_dir(config.run.root, need)}")
        inputs[need] = marker
    return execute_stage(RECIPES[name], config, inputs, log, force=force, on_checkpoint=on_checkpoint)
