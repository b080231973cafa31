"""The GPU image: its Dockerfile passes hadolint, builds where Docker and the base image are at hand, and the
import check it ends with passes in the environment the tests run in (the same packages, CPU)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_check_passes_here_and_names_what_is_missing():
    done = subprocess.run([sys.executable, "-m", "infra.image_check"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "flash-linear-attention   0.6.0" in done.stdout and "Gated DeltaNet backward on Hopper:" in done.stdout
    # a missing package is named, with every other one still checked
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "hide_prefect")}
    hidden = subprocess.run([sys.executable, "-m", "infra.image_check"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert hidden.returncode == 1
    assert "prefect: cannot import prefect" in hidden.stderr and "av " in hidden.stdout


def test_the_image_installs_what_the_kubernetes_pool_runs():
    text = DOCKERFILE.read_text()
    assert '-e ".[gpu]"' in text and "python -m infra.image_check" in text
    assert "infra/autotune" in text
    template = (REPO / "infra" / "k8s" / "gpu-job-template.json").read_text()
    assert "infra/docker/Dockerfile" in template, "the job template says which image it runs"


def _docker_ready() -> str | None:
    if shutil.which("docker") is None:
        return "no docker client"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return "no Docker daemon"
    base = re.search(r"^ARG BASE=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    if subprocess.run(["docker", "image", "inspect", base], capture_output=True, timeout=60).returncode != 0:
        return f"the base image {base} is not here (no registry to pull it from)"
    return None


@pytest.mark.slow
def test_the_image_builds_where_docker_can():
    why = _docker_ready()
    if why:
        pytest.skip(why)
    done = subprocess.run(["docker", "build", "-f", str(DOCKERFILE), "-t", "infinitevl:test", str(REPO)],
                          capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
