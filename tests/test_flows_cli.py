"""The CLI as a user runs it: the embedded default on Prefect's temporary local server, status from
the markers, and mistakes refused before Prefect starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.stages import is_available
from pipeline.stages import STAGE_ORDER

REPO = Path(__file__).resolve().parents[1]


def infinitevl(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _env() -> dict:
    """No PREFECT_API_URL: each run starts Prefect's temporary local server, as on a fresh machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(COLUMNS="200", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


@pytest.mark.slow
def test_embedded_default_killed_inside_training_resumes_there(tmp_path):
    """The main job, killed like a lost node once Stage I-a has committed a checkpoint, then run again:
    finished stages are skipped, Stage I-a resumes from its checkpoint, the run completes."""
    root = tmp_path / "run"
    # Few steps: the training stages' own tests cover training; this one covers the chain.
    steps = ["--set=train.stage1a.steps=3", "--set=train.stage1a.checkpoint_every=1"]
    steps += [f"--set=train.{s}.{field}=1" for s in ("stage1b", "stage2", "stage3") for field in ("steps", "checkpoint_every")]
    steps += ["--set=teacher.train.steps=10", "--set=data.distill.max_samples=64", "--set=data.instruct.max_samples=64"]
    args = ["run", "configs/tiny.yaml", f"--set=run.root={root}", *steps]

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=_env(), stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    checkpoint = root / "stage1a" / "checkpoints" / "step-00000001" / "_CHECKPOINT.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "no Stage I-a checkpoint after 300 s"
        time.sleep(0.5)
    _kill_tree(first.pid)
    first.wait()
    status = infinitevl("status", str(root))
    assert "stage1a" in status.stdout and "unfinished (resumes)" in status.stdout, status.stdout

    again = infinitevl(*args)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output
    assert re.search(r"resumed stage1a at step [1-3] from its newest committed checkpoint", output), output
    rows = _summary_rows(again.stdout)
    assert {rows[s] for s in ("teacher", "data", "teacher-logits")} == {"skipped"}
    assert {rows[s] for s in ("stage1a", "stage1b", "stage2", "stage3")} == {"done"}
    assert "all stages of run.stages are done" in infinitevl("status", str(root)).stdout


def _summary_rows(stdout: str) -> dict[str, str]:
    table = stdout[stdout.index("infinitevl run of"):]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines() if line.count("│") > 2]
    return {c[0]: c[1] for c in cells}


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, whatever session they started, as a lost node would."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_bad_override_is_refused_before_prefect_starts():
    refused = infinitevl("run", "configs/tiny.yaml", "--set", "train.stage1a.steps=-5", "--set", "run.nmae=x")
    assert refused.returncode == 2
    assert "train.stage1a.steps: Input should be greater than 0" in refused.stdout
    assert "run.nmae: Extra inputs are not permitted" in refused.stdout
    assert "temporary server" not in refused.stdout + refused.stderr


def test_a_stage_not_in_this_build_is_refused_by_name(monkeypatch):
    """Every stage is in this build, so one is pointed at a module that does not exist."""
    import dataclasses

    from flows import stages
    from pipeline.config import load_config

    assert all(is_available(name) for name in STAGE_ORDER)
    monkeypatch.setitem(stages.REGISTRY, "stage3",
                        dataclasses.replace(stages.REGISTRY["stage3"], entry="pipeline.train.not_here:train"))
    with pytest.raises(stages.StageUnavailable, match="stage stage3 is not available in this build"):
        stages.plan(load_config("configs/tiny.yaml"), only=["stage3"])


def test_serve_needs_a_prefect_api():
    refused = infinitevl("serve")
    assert refused.returncode == 2 and "PREFECT_API_URL is not set" in refused.stdout
