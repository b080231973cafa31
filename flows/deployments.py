"""The deployments `infinitevl serve` puts on the Prefect server.

- `infinitevl/full-pipeline`: every stage of the config's run.stages.
- `infinitevl/stage-<name>`: one stage, to run or rerun it alone.
- `infinitevl/eval-checkpoint`: one checkpoint, triggered by every `infinitevl.checkpoint.written`
  event, and on the config's eval.schedule for the latest checkpoint of its run.

Entrypoints are module paths (`flows.pipeline.infinitevl`), so a served run loads the installed package
whatever directory the server process started in.
"""

from __future__ import annotations

from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from pipeline.config import load_config
from pipeline.stages import STAGE_ORDER

from flows.pipeline import CHECKPOINT_EVENT, eval_checkpoint, infinitevl


def checkpoint_trigger() -> DeploymentEventTrigger:
    return DeploymentEventTrigger(
        name="eval on checkpoint written",
        expect={CHECKPOINT_EVENT},
        match={"prefect.resource.id": "infinitevl.checkpoint.*"},
        parameters={"checkpoint": "{{ event.payload.checkpoint }}", "step": "{{ event.payload.step }}",
                    "config": "{{ event.payload.config }}"},
    )


def build_deployments(config: str | None = None, overrides: list[str] | None = None) -> list[RunnerDeployment]:
    """All deployments; with a config it becomes their default parameters and sets the eval schedule."""
    defaults: dict = {}
    schedules = []
    if config:
        cfg = load_config(config, overrides or [])  # a bad config stops `serve` before anything is registered
        defaults = {"config": config, "overrides": list(overrides or [])}
        schedules = [Cron(cfg.eval.schedule, parameters={"checkpoint": "latest", **defaults})]
    module = EntrypointType.MODULE_PATH
    deployments = [infinitevl.to_deployment("full-pipeline", parameters=defaults, entrypoint_type=module,
                                            description="data -> teacher logits -> stage I-a/I-b/II/III -> eval")]
    deployments += [
        infinitevl.to_deployment(f"stage-{name}", parameters={**defaults, "stages": [name]}, entrypoint_type=module,
                                 description=f"only the {name} stage (its inputs must be committed)")
        for name in STAGE_ORDER
    ]
    deployments.append(eval_checkpoint.to_deployment(
        "eval-checkpoint",
        triggers=[checkpoint_trigger()], schedules=schedules, entrypoint_type=module,
        description="evaluate a checkpoint: on every checkpoint event, and on schedule for the latest"))
    return deployments
