"""The deployments on a real `prefect server start`, served by a real `infinitevl serve`, writing to a
real S3 server (SeaweedFS): the full pipeline completes, a rerun does no stage work, force recomputes,
a bad parameter is refused before anything runs, and a checkpoint event triggers its evaluation."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, DeploymentFilter, DeploymentFilterId
from prefect.deployments import run_deployment
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.pipeline import announce_checkpoint, save_resolved_config
from pipeline import checkpoints, storage
from pipeline.config import load_config
from pipeline.stages import STAGE_ORDER, StageContext, committed, join

read_json = storage.read_json_or_none

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
RUN_TIMEOUT_S = 180
# The stages before training: the deployment runs them twice and more; the training stages run in the
# CLI test of the embedded default.
SERVED_STAGES = ("teacher", "data", "teacher-logits")


@dataclass
class Served:
    api_url: str
    run_root: str
    env: dict
    log: Path


@pytest.fixture(scope="module")
def s3_env(s3):
    """Credentials for fsspec in this process and in the served flow runs, as deployments get them."""
    env = s3.env
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.filesystem("s3").clear_instance_cache()
    yield env
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def served(prefect_server, s3, s3_env, tmp_path_factory):
    run_root = s3.fresh("run")
    env = {**os.environ, **s3_env, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--config", TINY, "--set", f"run.root={run_root}",
           "--set", "eval.max_samples=2", "--set", f"run.stages=[{', '.join(SERVED_STAGES)}]",
           "--set", "teacher.train.steps=10",  # the orchestration is under test here, not the teacher's learning
           "--set", "eval.benchmarks=[sample]"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            _wait_for_deployment("infinitevl/eval-checkpoint", proc, log)
            yield Served(prefect_server, run_root, env, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _wait_for_deployment(name: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"infinitevl serve exited:\n{log.read_text()}"
            try:
                client.read_deployment_by_name(name)
                return
            except Exception:
                time.sleep(0.5)
    raise TimeoutError(f"{name} not deployed after {timeout_s} s:\n{log.read_text()}")


def _summary(flow_run_id) -> dict[str, str]:
    """stage -> status in the run's summary table, which lists every stage of the run."""
    import json

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    tables = [a for a in artifacts if a.key == "infinitevl-summary"]
    assert tables, "the run published no summary table"
    rows = {row["stage"]: row["status"] for row in json.loads(tables[0].data)}
    assert list(rows) == list(STAGE_ORDER), "the summary keeps the whole run"
    return rows


@pytest.fixture(scope="module")
def first_run(served):
    """`prefect deployment run infinitevl/full-pipeline --watch`, exactly as a user types it."""
    done = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "infinitevl/full-pipeline", "--watch"],
                          cwd=REPO, env=served.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\nserve log:\n{served.log.read_text()[-4000:]}"
    return {name: committed(join(served.run_root, name)) for name in SERVED_STAGES}


def test_full_pipeline_deployment_completes(served, first_run):
    for name, marker in first_run.items():
        assert marker is not None, f"stage {name} has no committed output"
    resolved = load_config(join(served.run_root, "config.yaml"))
    assert resolved.run.root == served.run_root and resolved.eval.max_samples == 2
    report = storage.read_bytes(join(served.run_root, "report.md")).decode()
    for name, marker in first_run.items():
        assert f"| {name} | ran now |" in report and marker["output"] in report


def test_rerun_does_no_stage_work(served, first_run):
    rerun = run_deployment("infinitevl/full-pipeline", timeout=RUN_TIMEOUT_S)
    assert rerun.state.is_completed(), rerun.state.message
    summary = _summary(rerun.id)
    assert {name: summary[name] for name in first_run} == {name: "already committed" for name in first_run}
    assert summary["stage1a"] == "not in run.stages"
    for name, marker in first_run.items():
        assert committed(join(served.run_root, name)) == marker


def test_force_recomputes_only_the_named_stage(served, first_run):
    forced = run_deployment("infinitevl/stage-teacher", parameters={"force": ["teacher"]}, timeout=RUN_TIMEOUT_S)
    assert forced.state.is_completed(), forced.state.message
    summary = _summary(forced.id)
    assert summary["teacher"] == "ran now" and summary["data"] == "committed earlier", summary
    teacher = committed(join(served.run_root, "teacher"))
    assert teacher["finished_at"] > first_run["teacher"]["finished_at"]
    assert teacher["fingerprint"] == first_run["teacher"]["fingerprint"]
    assert teacher["attempt"] != first_run["teacher"]["attempt"], "a forced stage writes a new attempt"


def test_bad_parameters_are_refused_before_anything_runs(served, s3):
    fresh = s3.fresh("refused")
    bad = run_deployment("infinitevl/full-pipeline", timeout=RUN_TIMEOUT_S,
                         parameters={"overrides": [f"run.root={fresh}", "train.stage1a.steps=-5"]})
    assert bad.state.is_failed()
    assert "train.stage1a.steps: Input should be greater than 0" in bad.state.message
    fs, path = fsspec.core.url_to_fs(fresh)
    assert not fs.exists(path), "a refused run wrote something"
    # A parameter of the wrong type is refused by the server before a flow run exists.
    with pytest.raises(Exception, match="force"):
        run_deployment("infinitevl/full-pipeline", parameters={"force": 5}, timeout=0)


def test_eval_checkpoint_has_its_nightly_schedule(served):
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("infinitevl/eval-checkpoint")
    crons = [s.schedule.cron for s in deployment.schedules]
    assert crons == [load_config(TINY).eval.schedule]
    assert deployment.schedules[0].parameters["checkpoint"] == "latest"


def test_checkpoint_events_are_evaluated_one_at_a_time_newest_first_none_twice(served, tiny_teacher, tmp_path):
    """Three checkpoints committed at once: three events, three triggered runs, queued behind the deployment's
    concurrency limit; they score the newest first, one at a time, each checkpoint once."""
    from model.checkpoint import save_pretrained
    from model.convert import convert_from_qwen2_5_vl

    cfg = load_config(TINY, [f"run.root={served.run_root}", "eval.max_samples=2", "eval.benchmarks=[sample]"])
    config_uri = save_resolved_config(cfg)
    teacher, processor = tiny_teacher
    save_pretrained(convert_from_qwen2_5_vl(teacher, sliding_window=cfg.student.sliding_window), processor, tmp_path)
    ctx = StageContext("stage1a", cfg, join(cfg.run.root, "stage1a", "attempt-0001"), {}, log=logging.getLogger("test"),
                       on_checkpoint=lambda uri, step, metrics: announce_checkpoint(uri, step, metrics, "stage1a", config_uri))
    uris = []
    for step in (10, 20, 30):
        fs, path = fsspec.core.url_to_fs(checkpoints.checkpoint_dir(ctx.output, step))
        fs.put(str(tmp_path) + "/", path + "/", recursive=True)
        uris.append(checkpoints.commit_checkpoint(ctx, step, {"loss": 3.0 - step / 10}))
    EventsWorker.drain_all()

    runs = _wait_for_triggered_runs("infinitevl/eval-checkpoint", 3, timeout_s=240, log=served.log)
    assert sorted(r.name for r in runs) == ["eval-stage1a-step-10", "eval-stage1a-step-20", "eval-stage1a-step-30"]
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), "two ran at once"
    reports = {uri: read_json(checkpoints.report_uri(uri)) for uri in uris}
    assert all(r is not None and r["scores"] and "score" in r["scores"] for r in reports.values())
    written = sorted(reports, key=lambda uri: reports[uri]["written_at"])
    assert written == uris[::-1], "the newest checkpoint is scored first"
    assert reports[uris[0]]["train_metrics"] == {"loss": 2.0}
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[r.id for r in runs])))
    assert {"infinitevl-eval", "infinitevl-checkpoints"} <= {a.key for a in artifacts}
    assert sum(1 for a in artifacts if a.key == "infinitevl-eval") == 3, "each checkpoint scored once"


def _wait_for_triggered_runs(name: str, count: int, timeout_s: float, log: Path):
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))
            triggered = [r for r in runs if r.state and r.parameters.get("checkpoint") != "latest"]
            if len(triggered) >= count and all(r.state.is_final() for r in triggered):
                for run in triggered:
                    assert run.state.is_completed(), f"{run.state.message}\nserve log:\n{log.read_text()[-4000:]}"
                return triggered
            time.sleep(1)
    raise TimeoutError(f"no {count} completed runs of {name} after {timeout_s} s:\n{log.read_text()[-4000:]}")
