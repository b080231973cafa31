"""The Prefect flows: the whole pipeline (or some of its stages) and the evaluation of one checkpoint.

Both are registered under the flow name `infinitevl`, so their deployments read as
`infinitevl/full-pipeline`, `infinitevl/stage-<name>` and `infinitevl/eval-checkpoint`.
The work itself is in `pipeline/`; these only load the config, decide what to skip, emit the
checkpoint events and publish artifacts.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from pipeline import checkpoints, storage
from pipeline.config import RunConfig, load_config, to_yaml
from pipeline.plan import check_plan, preflight, run_stage as run_planned_stage
from pipeline.report import build_report, stage_rows, write_report
from pipeline.stages import StageOutcome, join

from flows import plots

CHECKPOINT_EVENT = "infinitevl.checkpoint.written"
CONFIG_FILE = "config.yaml"


@flow(name="infinitevl", log_prints=True)
def infinitevl(config: str, overrides: list[str] | None = None, force: list[str] | None = None,
               stages: list[str] | None = None) -> list[dict]:
    """Runs the configured stages (or `stages`) in order, skipping those whose committed output matches their
    lineage (pipeline.stages); writes `<run root>/report.md` at the end, also when a stage fails.

    config: YAML path or fsspec URL. overrides: `section.field=value` items. force: stages to recompute.
    stages: run only these (their inputs must be committed or run too); default: the config's run.stages.
    """
    log = get_run_logger()
    cfg = load_config(config, overrides or [])
    names = check_plan(cfg, stages, force or [])
    preflight(cfg, names)
    log.info("stages to run: %s (run root %s)", ", ".join(names), cfg.run.root)
    config_uri = save_resolved_config(cfg)
    outcomes: dict[str, StageOutcome] = {}
    failed: dict[str, str] = {}
    try:
        for name in names:
            try:
                outcomes[name] = run_stage(name, cfg, name in (force or []), config_uri)
            except BaseException as e:
                failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                raise
    finally:
        publish_report(cfg, outcomes, failed, log)
    return [summary_row(o) for o in outcomes.values()]


@flow(name="infinitevl", flow_run_name="slurm-{config}", log_prints=True)
def slurm_pipeline(config: str, overrides: list[str] | None = None, force: list[str] | None = None,
                   stages: list[str] | None = None, image: str | None = None) -> str:
    """Runs `infinitevl run` as one Slurm job of launch.nnodes nodes (infra/slurm): submits it from this worker (a
    process pool on the login node), streams the job's output into this run's log and follows it to its end;
    cancelling this flow run cancels the job. Returns the job's final state."""
    from infra.slurm.submit import run_on_slurm

    if stages and len(stages) > 1:
        raise ValueError(f"slurm-pipeline runs the whole config or one stage, not {stages}")
    cfg = load_config(config, overrides or [])
    check_plan(cfg, stages, force or [])  # a bad config or plan is refused before anything is queued
    command = ["infinitevl", "stage", stages[0], config] if stages else ["infinitevl", "run", config]
    command += [f"--set={o}" for o in overrides or []]
    if force:
        command += ["--force"] if stages else ["--force", ",".join(force)]
    return run_on_slurm(cfg, command, get_run_logger(), image=image)


def save_resolved_config(cfg: RunConfig) -> str:
    """The config with overrides applied, beside the outputs: what `status` and checkpoint evals read."""
    uri = join(cfg.run.root, CONFIG_FILE)
    storage.write_bytes(uri, to_yaml(cfg).encode())
    return uri


def publish_report(cfg: RunConfig, outcomes: dict[str, StageOutcome], failed: dict[str, str], log) -> None:
    """report.md under the run root, the same markdown as the run's artifact (its plots inline), and a table of
    every stage of the run (those this flow run did not touch too)."""
    try:
        rows = [{k: v for k, v in row.items() if k != "marker"} for row in stage_rows(cfg, outcomes, failed)]
        create_table_artifact(rows, key="infinitevl-summary",
                              description=f"Stages of run {cfg.run.name} ({cfg.run.root})")
        report = build_report(cfg, outcomes, failed)
        url = write_report(cfg, report)
        markdown = report.markdown
        for name, png in report.plots.items():
            markdown = markdown.replace(f"(report/{name})", f"({plots.png_data_uri(png)})")
        create_markdown_artifact(markdown, key="infinitevl-report", description=f"Report of run {cfg.run.name}")
        log.info("report: %s", url)
    except Exception as e:  # noqa: BLE001 - a report that cannot be written must not hide the run's own outcome
        log.warning("could not write the run report: %s: %s", type(e).__name__, e)


@task(task_run_name="{name}", cache_policy=NO_CACHE)
def run_stage(name: str, cfg: RunConfig, force: bool, config_uri: str) -> StageOutcome:
    return run_planned_stage(cfg, name, get_run_logger(), force,
                             on_checkpoint=lambda uri, step, metrics: announce_checkpoint(uri, step, metrics, name,
                                                                                          config_uri))


def announce_checkpoint(uri: str, step: int, metrics: dict, stage: str, config_uri: str) -> None:
    """The event that triggers `infinitevl/eval-checkpoint`; it carries what that run needs."""
    emit_event(event=CHECKPOINT_EVENT,
               resource={"prefect.resource.id": f"infinitevl.checkpoint.{uri}", "infinitevl.stage": stage},
               payload={"checkpoint": uri, "step": step, "stage": stage, "config": config_uri, "metrics": metrics})


def summary_row(outcome: StageOutcome) -> dict:
    metrics = outcome.metrics or {}
    # the eval stage's scores are per suite (report.md): one mean over unrelated suites would mislead
    score = None if outcome.name == "eval" else metrics.get("score")
    return {"stage": outcome.name, "status": outcome.status, "time_s": round(outcome.duration_s, 1),
            "loss": metrics.get("loss"), "score": score, "output": outcome.output}


def eval_run_name() -> str:
    """`eval-stage2-step-150` from the run's parameters (the checkpoint event's stage and step), `eval-latest`
    for the scheduled evaluation of the newest checkpoint."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    if parameters.get("checkpoint", "latest") == "latest":
        return "eval-latest"
    stage = parameters.get("stage") or checkpoints.stage_output_of(parameters["checkpoint"]).rsplit("/", 2)[-2]
    return f"eval-{stage}-step-{parameters.get('step')}"


@flow(name="infinitevl", flow_run_name=eval_run_name, log_prints=True)
def eval_checkpoint(checkpoint: str = "latest", step: int | None = None, config: str | None = None,
                    overrides: list[str] | None = None, stage: str | None = None) -> dict:
    """Evaluates a committed checkpoint and writes its report JSON next to it.

    checkpoint: a checkpoint's URI (a checkpoint event's), or "latest" for the newest committed checkpoint of the
    config's run. The deployment runs these one at a time (its concurrency limit), so events queue while one is
    scored; when its turn comes, a run scores the newest checkpoint of that stage not yet scored (its own, or one
    committed since), and does nothing when all are: no checkpoint is scored twice, the newest first.
    config: the run's config (a checkpoint event carries the resolved one from the run root). stage: the stage
    that wrote the checkpoint (in the run's name).
    """
    from pipeline.eval import evaluate_checkpoint
    from pipeline.kernel_cache import shared_tuning

    if config is None:
        raise ValueError("evaluating a checkpoint needs the run's config (the event payload's 'config')")
    log = get_run_logger()
    cfg = load_config(config, overrides or [])
    if checkpoint == "latest":
        found = checkpoints.latest_checkpoint_of_run(cfg.run.root)
        if found is None:
            raise FileNotFoundError(f"no committed checkpoint under {cfg.run.root} yet")
        checkpoint = found[2]
    chosen = checkpoints.newest_unscored(checkpoints.stage_output_of(checkpoint))
    if chosen is None:
        log.info("every committed checkpoint of %s is scored already: nothing to do",
                 checkpoints.stage_output_of(checkpoint))
        return {"checkpoint": checkpoint, "skipped": "already scored"}
    step, checkpoint = chosen
    log.info("scoring %s (step %d)", checkpoint, step)
    with shared_tuning(cfg.run.root, "eval-checkpoint", log.info):
        scores = dict(evaluate_checkpoint(checkpoint, cfg))
    report = checkpoints.write_checkpoint_report(checkpoint, step, scores, "pipeline.eval.evaluate_checkpoint")
    publish_checkpoint_artifacts(report)
    return report


def publish_checkpoint_artifacts(report: dict) -> None:
    stage_dir = checkpoints.stage_output_of(report["checkpoint"])
    history = checkpoints.report_history(stage_dir)
    create_table_artifact(history, key="infinitevl-checkpoints",
                          description=f"Checkpoints of {stage_dir}: training metrics and scores")
    scores = report["scores"] or {}
    lines = [f"# {report['stage']} step {report['step']}", f"`{report['checkpoint']}`", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in {**report["train_metrics"], **scores}.items()]
    image = plots.history_png_data_uri(history)
    if image:
        lines += ["", f"![loss and score by step]({image})"]
    create_markdown_artifact("\n".join(lines), key="infinitevl-eval", description=f"Evaluation of {report['checkpoint']}")
