"""Cancelling a served flow run ends the whole process group its stage launched, as the UI's or
`prefect flow-run cancel`'s cancel does: the runner signals the flow-run process, the launcher takes
the group down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelling

from pipeline.launch import launch
from tests.helpers import alive

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@flow(name="launching")
def launching(pid_file: str) -> None:
    """Launches a child that starts a grandchild, records its pid, and waits far beyond the test."""
    child = ("import subprocess, time; p = subprocess.Popen(['sleep', '600']); "
             f"open({pid_file!r}, 'w').write(str(p.pid)); time.sleep(600)")
    launch([sys.executable, "-c", child], get_run_logger(), grace_s=2)


def test_cancelling_a_served_run_kills_the_launched_group(prefect_server, tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = tmp_path / "serve.log"
    serve = "from tests.test_flows_cancel import launching; launching.serve(name='cancel-test')"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", serve], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    pid_file = tmp_path / "grandchild.pid"
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
            _until(lambda: _deployed(client, "launching/cancel-test"), 90, log)
            run = run_deployment("launching/cancel-test", parameters={"pid_file": str(pid_file)}, timeout=0)
            _until(lambda: pid_file.exists() and pid_file.read_text(), 90, log)
            grandchild = int(pid_file.read_text())
            client.set_flow_run_state(run.id, Cancelling(), force=True)
            _until(lambda: not alive(grandchild), 60, log)
            _until(lambda: client.read_flow_run(run.id).state.is_cancelled(), 60, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def _deployed(client, name: str) -> bool:
    try:
        client.read_deployment_by_name(name)
        return True
    except Exception:
        return False


def _until(condition, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise TimeoutError(f"condition not met in {timeout_s} s; serve log:\n{log.read_text()[-4000:]}")
