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

from tests.helpers import alive, descendants

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
def test_embedded_default_killed_inside_training_resumes_there_and_reruns_what_a_change_makes_stale(tmp_path):
    """The main job, its CLI process SIGKILLed once Stage I-a has committed a checkpoint: nothing it started
    lives on. Run again: finished stages are skipped, Stage I-a resumes from its checkpoint (TensorBoard holds
    each step once), the run completes and its report holds the eval stage's numbers. Then a changed Stage II
    setting makes Stage II stale, and, its output changed, every stage after it."""
    root = tmp_path / "run"
    # Few steps: the training stages' own tests cover training; this one covers the chain.
    steps = ["--set=train.stage1a.steps=3", "--set=train.stage1a.checkpoint_every=1"]
    steps += [f"--set=train.{s}.{field}=1" for s in ("stage1b", "stage2", "stage3") for field in ("steps", "checkpoint_every")]
    steps += ["--set=teacher.train.steps=10", "--set=data.distill.max_samples=64", "--set=data.instruct.max_samples=64",
              "--set=eval.max_samples=4"]
    args = ["run", "configs/tiny.yaml", f"--set=run.root={root}", *steps]

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=_env(), stdout=log,
                                 stderr=subprocess.STDOUT)
    checkpoint = root / "stage1a" / "attempt-0001" / "checkpoints" / "step-00000001" / "_CHECKPOINT.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "no Stage I-a checkpoint after 300 s"
        time.sleep(0.5)
    started = descendants(first.pid)
    assert len(started) >= 2, "the temporary Prefect server and Stage I-a's worker run beside the CLI"
    os.kill(first.pid, signal.SIGKILL)  # the CLI alone, as `kill -9 PID` does
    first.wait()
    deadline = time.monotonic() + 30
    while (left := [p for p in started if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes the killed CLI started live on: {[_cmdline(p) for p in left]}"
    status = infinitevl("status", str(root))
    assert "stage1a" in status.stdout and "unfinished (resumes)" in status.stdout, status.stdout

    again = infinitevl(*args)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output
    assert re.search(r"resumed stage1a at step [1-3] from its newest committed checkpoint", output), output
    rows = _summary_rows(again.stdout)
    assert {rows[s] for s in ("teacher", "data", "teacher-logits")} == {"skipped"}
    assert {rows[s] for s in ("stage1a", "stage1b", "stage2", "stage3", "eval")} == {"done"}
    assert "all stages of run.stages are done" in infinitevl("status", str(root)).stdout
    assert _tensorboard_steps(root / "stage1a" / "attempt-0001" / "logs" / "tensorboard") == [1, 2, 3]
    _assert_report_holds_the_eval_numbers(root)

    changed = [*args, "--set=train.stage2.lr=3.0e-4"]
    listed = infinitevl("status", "configs/tiny.yaml", *changed[2:]).stdout
    shown = {r[0]: r[1] for r in _rows(listed)}
    assert [shown[s] for s in ("stage1b", "stage2", "stage3", "eval")] == ["done", "stale", "stale", "stale"], listed
    assert "  stage2: config train.stage2.lr changed (0.0002 → 0.0003)\n" in listed, listed
    assert "  stage3: input stage2 is stale (it runs first)\n" in listed, listed
    third = infinitevl(*changed)
    assert third.returncode == 0, third.stdout + third.stderr
    rows = _summary_rows(third.stdout)
    assert {rows[s] for s in ("teacher", "data", "teacher-logits", "stage1a", "stage1b")} == {"skipped"}
    assert {rows[s] for s in ("stage2", "stage3", "eval")} == {"done"}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except FileNotFoundError:
        return str(pid)


def _tensorboard_steps(folder) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def _assert_report_holds_the_eval_numbers(root) -> None:
    from pipeline.stages import committed

    metrics = committed(str(root / "eval"))["metrics"]
    report = (root / "report.md").read_text()
    table = report[report.index("| suite | student | teacher |"):]
    cells = {c[0]: c[1:] for c in (_cells(line) for line in table.splitlines()[2:]) if len(c) == 3}
    assert set(cells) == {"tiny", "pictures", "longvideo"}, report
    for suite, (student, teacher) in cells.items():
        assert float(student) == pytest.approx(metrics[suite], rel=1e-3, abs=1e-3), (suite, report)
    assert float(cells["pictures"][1]) == pytest.approx(metrics["teacher_pictures"], rel=1e-3, abs=1e-3)
    assert cells["tiny"][1] == "-"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _rows(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines() if line.count("│") > 2]


def _summary_rows(stdout: str) -> dict[str, str]:
    table = stdout[stdout.index("infinitevl run of"):]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in table.splitlines() if line.count("│") > 2]
    return {c[0]: c[1] for c in cells}


def test_bad_override_is_refused_before_prefect_starts():
    refused = infinitevl("run", "configs/tiny.yaml", "--set", "train.stage1a.steps=-5", "--set", "run.nmae=x")
    assert refused.returncode == 2
    assert "train.stage1a.steps: Input should be greater than 0" in refused.stdout
    assert "run.nmae: Extra inputs are not permitted" in refused.stdout
    assert "temporary" not in (refused.stdout + refused.stderr).lower()


def test_missing_inputs_and_a_busy_stage_are_refused_at_once_before_anything_starts(tmp_path):
    """Every problem the plan can know of, in one message, within seconds: no server, no stage folder."""
    from pipeline import storage
    from pipeline.lease import lease_url

    root = tmp_path / "run"
    now = time.time()
    storage.write_json(lease_url(str(root), "stage2"), {
        "stage": "stage2", "owner": "another", "host": "gpu-node-3", "pid": 777, "started_at": now - 60,
        "renewed_at": now, "ttl_s": 120.0})
    started = time.monotonic()
    refused = infinitevl("run", "configs/tiny.yaml", f"--set=run.root={root}",
                         f"--set=data.distill.sources=[{tmp_path}/nowhere/records.jsonl]",
                         "--set=eval.benchmarks=[pictures, docvqa=/nowhere/docvqa.arrow]")
    elapsed = time.monotonic() - started
    out = refused.stdout + refused.stderr
    assert refused.returncode == 2, out
    assert f"data.distill.sources[0]: '{tmp_path}/nowhere/records.jsonl' does not exist" in out
    assert "eval.benchmarks[1]: the eval file '/nowhere/docvqa.arrow' does not exist" in out
    assert "stage stage2 is being run by another attempt: host gpu-node-3 pid 777" in out
    assert "temporary" not in out.lower()
    assert sorted(p.name for p in root.iterdir()) == ["_leases"], "nothing was started"
    assert elapsed < 5, f"refused after {elapsed:.1f} s"


def test_serve_needs_a_prefect_api():
    refused = infinitevl("serve")
    assert refused.returncode == 2 and "PREFECT_API_URL is not set" in refused.stdout
