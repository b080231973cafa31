"""The deployments `infinitevl serve` puts on the Prefect server.

- `infinitevl/full-pipeline`: every stage of the config's run.stages.
- `infinitevl/stage-<name>`: one stage, to run or rerun it alone.
- `infinitevl/slurm-pipeline`: the same as one Slurm job of launch.nnodes nodes (serve it on the login node).
- `infinitevl/eval-checkpoint`: one checkpoint, triggered by every `infinitevl.checkpoint.written`
  event, and on the config's eval.schedule for the latest checkpoint of its run; one at a time (a deployment
  concurrency limit: the others queue), newest first, none twice.

`infinitevl serve` and `prefect deploy` (prefect.yaml) register the same names: the first serves them from one
process, the second on work pools. `serve` refuses to take over names that `prefect deploy` put on a work pool.

Entrypoints are module paths (`flows.pipeline.infinitevl`), so a served run loads the installed package
whatever directory the server process started in.
"""

from __future__ import annotations

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger
from prefect.schedules import Cron

from pipeline.config import load_config
from pipeline.stages import STAGE_ORDER

from flows.pipeline import CHECKPOINT_EVENT, eval_checkpoint, infinitevl, slurm_pipeline


def checkpoint_trigger() -> DeploymentEventTrigger:
    return DeploymentEventTrigger(
        name="eval on checkpoint written",
        expect={CHECKPOINT_EVENT},
        match={"prefect.resource.id": "infinitevl.checkpoint.*"},
        parameters={"checkpoint": "{{ event.payload.checkpoint }}", "step": "{{ event.payload.step }}",
                    "config": "{{ event.payload.config }}", "stage": "{{ event.payload.stage }}"},
    )


def build_deployments(config: str | None = None, overrides: list[str] | None = None,
                      eval_concurrency: int = 1) -> list[RunnerDeployment]:
    """All deployments; with a config it becomes their default parameters and sets the eval schedule. At most
    `eval_concurrency` checkpoint evaluations run at once; the others wait their turn (queued, not dropped)."""
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
    deployments.append(slurm_pipeline.to_deployment(
        "slurm-pipeline", parameters=defaults, entrypoint_type=module,
        description="the whole run (or one stage) as one Slurm job of launch.nnodes nodes, followed to its end"))
    deployments.append(eval_checkpoint.to_deployment(
        "eval-checkpoint",
        triggers=[checkpoint_trigger()], schedules=schedules, entrypoint_type=module,
        concurrency_limit=ConcurrencyLimitConfig(limit=eval_concurrency,
                                                 collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        description="evaluate checkpoints one at a time, newest first: on every checkpoint event, and on schedule "
                    "for the latest"))
    return deployments


def deployments_on_work_pools(names: list[str]) -> list[str]:
    """Those of `names` ("infinitevl/full-pipeline") that the server holds on a work pool: `prefect deploy` made
    them, and serving the same names would take them over."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    found = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if deployment.work_pool_name:
                found.append(f"{name} (work pool {deployment.work_pool_name})")
    return found
