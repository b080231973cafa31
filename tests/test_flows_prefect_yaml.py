"""prefect.yaml and the Kubernetes job template are accepted by a real server: the work pools are
created, `prefect deploy --all` registers every deployment, the eval trigger keeps its templates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from infra.prefect_server import PrefectServer
from pipeline.stages import STAGE_ORDER

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def prefect_server():
    """A server of its own: these deployments share names with the ones `infinitevl serve` registers
    on the session's server, and must not replace them."""
    with PrefectServer() as server:
        yield server.api_url


def test_prefect_yaml_deploys_on_work_pools(prefect_server):
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "INFINITEVL_HOME": str(REPO)}

    def prefect(*args):
        done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr

    prefect("work-pool", "create", "infinitevl-cpu", "--type", "process")
    prefect("work-pool", "create", "infinitevl-gpu", "--type", "kubernetes",
            "--base-job-template", "infra/k8s/gpu-job-template.json")
    prefect("--no-prompt", "deploy", "--all")

    with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        names = ["full-pipeline", "eval-checkpoint", *[f"stage-{s}" for s in STAGE_ORDER]]
        deployments = {n: client.read_deployment_by_name(f"infinitevl/{n}") for n in names}
        assert deployments["stage-stage1a"].work_pool_name == "infinitevl-gpu"
        assert deployments["stage-stage1a"].job_variables == {"gpus": 8}
        assert deployments["stage-data"].parameters["stages"] == ["data"]
        assert deployments["full-pipeline"].pull_steps[0]["prefect.deployments.steps.set_working_directory"] == {
            "directory": str(REPO)}
        eval_id = deployments["eval-checkpoint"].id
        actions = [a for automation in client.read_automations() for a in automation.actions
                   if getattr(a, "deployment_id", None) == eval_id]
        assert actions and actions[0].parameters["checkpoint"] == "{{ event.payload.checkpoint }}"
    # `infinitevl serve` on the same server would take these names over: it refuses, naming them
    served = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--config", "configs/tiny.yaml"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=180)
    assert served.returncode == 2, served.stdout + served.stderr
    assert "made by `prefect deploy` on work pools" in served.stdout
    assert "infinitevl/full-pipeline (work pool infinitevl-gpu)" in served.stdout
