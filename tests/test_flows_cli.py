"""The CLI as a user runs it: the embedded default on Prefect's temporary local server, status from
the markers, and mistakes refused before Prefect starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.stages import is_available
from pipeline.config import load_config
from pipeline.stages import STAGE_ORDER

REPO = Path(__file__).resolve().parents[1]


def infinitevl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(COLUMNS="200", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_run_the_embedded_default_then_status(tmp_path):
    root = str(tmp_path / "run")
    # One step per training stage: the stages' own tests cover training; this one covers the chain.
    one_step = [f"--set=train.{s}.{field}=1" for s in ("stage1a", "stage1b", "stage2", "stage3")
                for field in ("steps", "checkpoint_every")]
    done = infinitevl("run", "configs/tiny.yaml", "--set", f"run.root={root}", *one_step)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout[done.stdout.index("infinitevl run of"):]
    for stage in load_config("configs/tiny.yaml").run.stages:
        assert any(line.split("│")[1].strip() == stage and "done" in line for line in summary.splitlines()
                   if line.count("│") > 2), summary
    status = infinitevl("status", root)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "all stages of run.stages are done" in status.stdout


def test_bad_override_is_refused_before_prefect_starts():
    refused = infinitevl("run", "configs/tiny.yaml", "--set", "train.stage1a.steps=-5", "--set", "run.nmae=x")
    assert refused.returncode == 2
    assert "train.stage1a.steps: Input should be greater than 0" in refused.stdout
    assert "run.nmae: Extra inputs are not permitted" in refused.stdout
    assert "temporary server" not in refused.stdout + refused.stderr


def test_a_stage_not_in_this_build_is_refused_by_name():
    missing = [name for name in STAGE_ORDER if not is_available(name)]
    if not missing:
        pytest.skip("every stage is in this build")
    refused = infinitevl("stage", missing[0], "configs/tiny.yaml")
    assert refused.returncode == 2 and f"stage {missing[0]} is not available in this build" in refused.stdout


def test_serve_needs_a_prefect_api():
    refused = infinitevl("serve")
    assert refused.returncode == 2 and "PREFECT_API_URL is not set" in refused.stdout
