"""The stage registry: one line per stage, naming the pipeline callable that does its work.

A stage's callable is `fn(ctx: pipeline.stages.StageContext) -> dict | None`: it reads its config from
`ctx.config`, its inputs from `ctx.inputs[<stage>]` (output URLs of the stages it needs), writes under
`ctx.output`, and returns metrics (`loss`, `score`, anything JSON) that go into its `_COMPLETE.json`
and the summary table. Training stages commit checkpoints with `pipeline.checkpoints.commit_checkpoint`.

`sections` are the config sections hashed into the stage's fingerprint; `needs` the stages it reads.
A stage whose module is not in this build is refused before anything runs, never faked.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from pipeline.config import RunConfig
from pipeline.stages import STAGE_ORDER, config_hash, fingerprint, join, stage_state

# Evaluates one checkpoint: evaluate_checkpoint(checkpoint_uri: str, config: RunConfig) -> dict[str, float].
EVALUATOR = "pipeline.eval:evaluate_checkpoint"


class StageUnavailable(RuntimeError):
    pass


class PlanError(RuntimeError):
    pass


@dataclass(frozen=True)
class Stage:
    name: str
    entry: str  # "module:function"
    sections: tuple[str, ...]
    needs: tuple[str, ...] | Callable[[RunConfig], tuple[str, ...]] = ()

    def inputs(self, config: RunConfig) -> tuple[str, ...]:
        return self.needs(config) if callable(self.needs) else self.needs

    def load(self) -> Callable:
        return load_entry(self.entry, f"stage {self.name}")


REGISTRY: dict[str, Stage] = {s.name: s for s in [
    Stage("teacher", "pipeline.teacher:prepare_teacher", ("teacher",)),
    Stage("data", "pipeline.data.stage:build_corpora", ("data",), needs=("teacher",)),
    Stage("teacher-logits", "pipeline.teacher_logits.stage:store_teacher_logits", ("teacher_logits",), needs=("teacher", "data")),
    Stage("stage1a", "pipeline.train.stage1a:train_stage1a", ("student", "train.stage1a"), needs=("teacher", "data")),
    Stage("stage1b", "pipeline.train.stage1b:train_stage1b", ("train.stage1b",), needs=("teacher", "data", "stage1a", "teacher-logits")),
    Stage("stage2", "pipeline.train.stage2:train_stage2", ("train.stage2",), needs=("teacher", "data", "stage1b")),
    Stage("stage3", "pipeline.train.stage3:train_stage3", ("train.stage3",), needs=("teacher", "data", "stage2")),
    # eval reads the teacher too: it scores it on the held-out pictures for the retention
    Stage("eval", "pipeline.eval.stage:evaluate_run", ("eval",), needs=lambda c: tuple(dict.fromkeys(("teacher", c.eval.target)))),
]}
assert tuple(REGISTRY) == STAGE_ORDER, "the registry must list every stage of pipeline.stages.STAGE_ORDER, in order"


def load_entry(entry: str, what: str) -> Callable:
    """Imports "module:function"; a module or function missing from this build raises StageUnavailable.

    Only the absence of the named module itself counts: an ImportError from inside it is a real bug
    and propagates.
    """
    module_name, _, attr = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise StageUnavailable(f"{what} is not available in this build ({module_name} does not exist yet)") from None
        raise
    fn = getattr(module, attr, None)
    if fn is None:
        raise StageUnavailable(f"{what} is not available in this build ({module_name} has no {attr})")
    return fn


def is_available(name: str) -> bool:
    try:
        REGISTRY[name].load()
        return True
    except StageUnavailable:
        return False


def fingerprints(config: RunConfig) -> dict[str, tuple[str, str, dict[str, str]]]:
    """name -> (fingerprint, section hash, input fingerprints), for every stage, from the config alone."""
    out: dict[str, tuple[str, str, dict[str, str]]] = {}
    for name in STAGE_ORDER:  # needs always point upstream, so upstream fingerprints exist already
        stage = REGISTRY[name]
        inputs = {need: out[need][0] for need in stage.inputs(config)}
        section_hash = config_hash(config, stage.sections)
        out[name] = (fingerprint(section_hash, inputs), section_hash, inputs)
    return out


def stage_output(config: RunConfig, name: str) -> str:
    return join(config.run.root, name)


def run_planned_stage(config: RunConfig, name: str, log, force: bool = False, on_checkpoint=None):
    """Executes one stage of a checked plan where its inputs are committed (no Prefect here: the flow's task
    and callers without Prefect share it); returns its StageOutcome."""
    from pipeline.stages import StageContext, execute_stage

    _, section_hash, input_prints = fingerprints(config)[name]
    announce = {"on_checkpoint": on_checkpoint} if on_checkpoint else {}  # else StageContext's no-op
    ctx = StageContext(name=name, config=config, output=stage_output(config, name),
                       inputs={need: stage_output(config, need) for need in input_prints}, log=log, **announce)
    return execute_stage(ctx, REGISTRY[name].load(), section_hash, input_prints, force=force)


def plan(config: RunConfig, only: list[str] | None = None, force: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The stages to run, checked before any runs: known, available, and every input either runs
    earlier in this plan or is already committed."""
    names = list(only) if only else list(config.run.stages)
    for name in [*names, *force]:
        if name not in REGISTRY:
            raise PlanError(f"unknown stage {name!r}; known: {', '.join(STAGE_ORDER)}")
    names = sorted(set(names), key=STAGE_ORDER.index)
    for name in names:
        REGISTRY[name].load()
    prints = fingerprints(config)
    for i, name in enumerate(names):
        for need in REGISTRY[name].inputs(config):
            if STAGE_ORDER.index(need) >= STAGE_ORDER.index(name):
                raise PlanError(f"stage {name} cannot read {need}, which comes after it")
            if need in names[:i]:
                continue
            if stage_state(stage_output(config, need), prints[need][0]) != "done":
                raise PlanError(f"stage {name} needs {need}, which is not committed for this config in "
                                f"{stage_output(config, need)}: add {need} to the stages to run")
    return names
