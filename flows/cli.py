"""`infinitevl`: run the pipeline or one stage, serve the deployments, show what a run has done.

    infinitevl run CONFIG [--set section.field=value ...] [--force stage,...]
    infinitevl stage NAME CONFIG [--set ...] [--force]
    infinitevl serve [--config CONFIG] [--set ...]
    infinitevl status RUN_ROOT_OR_CONFIG
    infinitevl generate CHECKPOINT --prompt TEXT [--image PATH ...] [--video PATH]

`run` and `stage` execute in this process; with no PREFECT_API_URL set, a temporary Prefect server is started
for the run and goes with this process however it ends (infra.prefect_server.TemporaryServer). The config is
validated, the plan checked and every input looked at before any server starts, so mistakes cost seconds, and
all of them are reported at once.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import ConfigError, RunConfig, load_config
from pipeline.plan import PlanError, check_plan, preflight, status as stage_statuses
from pipeline.report import REPORT, eval_section, format_number, format_seconds
from pipeline.stages import STAGE_ORDER, join, model_folder

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="InfiniteVL: convert Qwen2.5-VL, train it in stages, evaluate it, with Prefect.")
# Piped output (CI logs, `| tee`) gets a wide table rather than rich's 80 columns, so paths stay whole.
console = Console(width=None if sys.stdout.isatty() else 160)
STATE_WORDS = {"done": "done", "stale": "stale", "partial": "unfinished (resumes)", "missing": "to do"}
SET_HELP = "override a config field, e.g. --set train.stage1a.steps=5 (repeatable)"


@app.command()
def run(config: str = typer.Argument(..., help="YAML path or fsspec URL"),
        set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
        force: str = typer.Option("", "--force", help="comma-separated stages to recompute")) -> None:
    """Run the config's stages in order, skipping those whose committed output matches their lineage."""
    forced = [s.strip() for s in force.split(",") if s.strip()]
    cfg = _checked(config, set_, None, forced)
    _execute(cfg, config=config, overrides=set_, force=forced, stages=None)


@app.command()
def stage(name: str = typer.Argument(..., help=f"one of: {', '.join(STAGE_ORDER)}"),
          config: str = typer.Argument(..., help="YAML path or fsspec URL"),
          set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
          force: bool = typer.Option(False, "--force", help="recompute even if committed")) -> None:
    """Run one stage; the stages it reads must be committed already."""
    cfg = _checked(config, set_, [name], [name] if force else [])
    _execute(cfg, config=config, overrides=set_, force=[name] if force else [], stages=[name])


@app.command()
def serve(config: Optional[str] = typer.Option(None, "--config", "-c", help="default config of the deployments; "
                                                "also schedules the eval of its run's latest checkpoint"),
          set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP),
          limit: Optional[int] = typer.Option(None, "--limit", help="most flow runs at once (e.g. 1 per GPU host)"),
          eval_concurrency: int = typer.Option(1, "--eval-concurrency", min=1,
                                               help="checkpoint evaluations at once; the others wait their turn")) -> None:
    """Serve every deployment against PREFECT_API_URL until interrupted."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        _fail("PREFECT_API_URL is not set: point it at a Prefect server "
              "(for development: python -m infra.prefect_server)")
    if config:
        _load(config, set_)
    from prefect import serve as prefect_serve

    from flows.deployments import build_deployments, deployments_on_work_pools

    deployments = build_deployments(config, set_, eval_concurrency)
    taken = deployments_on_work_pools([f"{d.flow_name}/{d.name}" for d in deployments])
    if taken:
        _fail("these deployments were made by `prefect deploy` on work pools, and serving would take them over: "
              + ", ".join(taken) + ". Run them through their work pools' workers, or delete them first "
              "(prefect deployment delete NAME).")
    prefect_serve(*deployments, limit=limit)


@app.command()
def status(target: str = typer.Argument(..., help="a run root (holding config.yaml) or a config file"),
           set_: List[str] = typer.Option([], "--set", "-s", help=SET_HELP)) -> None:
    """What is done, what is next and where the outputs are, read from the stage markers."""
    is_config = target.endswith((".yaml", ".yml"))
    print_status(_load(target if is_config else join(target, "config.yaml"), set_))


@app.command("eval")
def eval_(checkpoint: str = typer.Argument(..., help="a checkpoint directory or fsspec URL (Hugging Face format), or a "
                                          "stage folder of a run (runs/tiny/stage3: its committed export)"),
          suite: List[str] = typer.Option(["tiny"], "--suite", help="tiny, longvideo, NAME=URL.arrow, URL.arrow, or a "
                                          "name under --data-root (repeatable)"),
          data_root: Optional[str] = typer.Option(None, "--data-root", help="where bare suite names find NAME.arrow"),
          out: Optional[str] = typer.Option(None, "--out", help="reports folder (default: <checkpoint>.eval)"),
          limit: Optional[int] = typer.Option(None, "--limit", help="at most this many samples per suite"),
          max_new_tokens: int = typer.Option(32, "--max-new-tokens")) -> None:
    """Score a checkpoint on benchmark suites; prints the scores (percent) and writes the reports."""
    from pipeline.eval import evaluate_checkpoint

    settings = {"max_new_tokens": max_new_tokens, **({"limit": limit} if limit else {})}
    checkpoint = model_folder(checkpoint)
    try:
        scores = evaluate_checkpoint(checkpoint, settings, suite=list(suite), out_dir=out, data_root=data_root)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    table = Table(title=f"evaluation of {checkpoint}")
    table.add_column("suite")
    table.add_column("score", justify="right")
    for name, value in scores.items():
        table.add_row(name, f"{value:.2f}")
    console.print(table)


@app.command()
def generate(checkpoints: List[str] = typer.Argument(..., help="checkpoint directories (model + processor) or stage "
                                                     "folders of a run (runs/tiny/stage3: its committed export); "
                                                     "several answer in turn, e.g. teacher and student"),
             prompt: str = typer.Option(..., "--prompt", "-p", help="the question"),
             system: Optional[str] = typer.Option(None, "--system", help="a system prompt"),
             image: List[str] = typer.Option([], "--image", help="an image path or URL (repeatable)"),
             video: Optional[str] = typer.Option(None, "--video", help="a video path or URL"),
             max_new_tokens: int = typer.Option(256, "--max-new-tokens"),
             fps: float = typer.Option(2.0, "--fps", help="video frames sampled per second"),
             max_frames: int = typer.Option(64, "--max-frames", help="most video frames (spread evenly)"),
             stream: bool = typer.Option(True, "--stream/--no-stream", help="print the answer as it is generated")
             ) -> None:
    """Answer a prompt about images and/or a video with each checkpoint (a teacher of any family or a student), in
    its own chat template, stopping at its end of turn."""
    from pipeline.data.quarantine import BadRecord
    from pipeline.serve.chat import answer_from_checkpoint

    for checkpoint in checkpoints:
        if len(checkpoints) > 1:
            typer.echo(f"== {checkpoint}")
        try:
            answer = answer_from_checkpoint(model_folder(checkpoint), prompt, image, video, max_new_tokens, fps,
                                            max_frames, system=system, stream=stream)
        except (FileNotFoundError, ValueError, RuntimeError, BadRecord) as e:
            _fail(f"{checkpoint}: {e}")
        if not stream:
            typer.echo(answer)


def print_status(cfg: RunConfig) -> None:
    """One row per stage: done, stale (and why), unfinished or to do; the holder of a running stage's lease."""
    states = stage_statuses(cfg)
    rows, why, next_stage = [], [], None
    for name in STAGE_ORDER:
        state = states[name]
        planned = name in cfg.run.stages
        if state.state != "done" and planned and next_stage is None:
            next_stage = name
        shown = STATE_WORDS[state.state]
        if state.state == "missing" and not planned:
            shown = "not in run.stages"
        if state.reasons and state.state != "partial":
            why.append(f"  {name}: " + "; ".join(state.reasons))
        if state.holder is not None:
            shown = f"running on {state.holder.get('host')} (pid {state.holder.get('pid')})"
        marker = state.marker if state.state == "done" else None
        metrics = (marker or {}).get("metrics", {})
        rows.append({"stage": name, "status": shown, "time_s": (marker or {}).get("duration_s"),
                     "loss": metrics.get("loss"), "score": None if name == "eval" else metrics.get("score"),
                     "output": (marker or {}).get("output") or join(cfg.run.root, name)})
    console.print(summary_table(rows, f"run {cfg.run.name} at {cfg.run.root}"))
    if why:
        console.print("stale, because:\n" + "\n".join(why), highlight=False, soft_wrap=True)
    console.print(f"next: {next_stage}" if next_stage else "all stages of run.stages are done")


def summary_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column, justify in [("stage", "left"), ("status", "left"), ("time", "right"), ("loss", "right"),
                            ("score", "right")]:
        table.add_column(column, justify=justify, no_wrap=True)
    table.add_column("output", overflow="fold")
    for row in rows:
        table.add_row(row["stage"], row["status"], format_seconds(row.get("time_s")),
                      format_number(row.get("loss")), format_number(row.get("score")), row["output"])
    return table


def _checked(config: str, overrides: list[str], only: list[str] | None, force: list[str]) -> RunConfig:
    """The config, its plan and every input checked before any server starts; all problems at once."""
    cfg = _load(config, overrides)
    try:
        preflight(cfg, check_plan(cfg, only, force))
    except PlanError as e:
        _fail(str(e))
    return cfg


def _execute(cfg: RunConfig, **parameters) -> None:
    from infra.prefect_server import TemporaryServer

    TemporaryServer.for_this_process()
    from flows.pipeline import infinitevl

    try:
        rows = infinitevl(**parameters)
    except KeyboardInterrupt:
        print_status(cfg)
        _fail("interrupted", code=130)
    except Exception as e:  # the flow logged the traceback; the status says what is committed and what is next
        print_status(cfg)
        console.print(f"report: {join(cfg.run.root, REPORT)}")
        _fail(f"run failed: {type(e).__name__}: {e}", code=1)
    console.print(summary_table(rows, f"infinitevl run of {parameters['config']}"))
    eval_row = next((r for r in rows if r["stage"] == "eval"), None)
    if eval_row is not None:
        metrics = (stage_statuses(cfg)["eval"].marker or {}).get("metrics", {})
        console.print("\n".join(eval_section(cfg, metrics)[2:]), highlight=False)
    console.print(f"report: {join(cfg.run.root, REPORT)}")


def _load(config: str, overrides: list[str]) -> RunConfig:
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> None:
    # SIGTERM and SIGHUP end the run as Ctrl-C does: stage processes are stopped, the temporary server goes
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Runs are often on machines without internet; the temporary server's telemetry would only log errors.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":
    main()
