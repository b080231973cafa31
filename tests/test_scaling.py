"""bench/scaling.py on CPU (--tiny, gloo): the same code the multi-GPU run takes, on 1 and 2 processes.

One run of the bench (Stage II with ZeRO-2, the teacher-logit stage, the kill-one-rank test) feeds every
test here: the report is well formed, the loss curves of 1 and 2 processes agree (same seed, same global
batch), and a run whose rank 1 is SIGKILLed fails in bounded time naming that rank, then resumes from its
last checkpoint on one process (ZeRO state converted to the universal layout) to an uninterrupted run's
losses."""

import json
import os
import re

import pytest

STEPS = 3


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from bench.scaling import main

    root = tmp_path_factory.mktemp("scaling")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = main(["--tiny", "--gpus", "2", "--zero", "2", "--stages", "stage2", "--steps", str(STEPS),
                   "--work", str(root / "work"), "--out", str(root / "out")])
    with open(root / "out" / "scaling.json") as f:
        return result, json.load(f), root


def test_report_is_well_formed(report):
    result, record, root = report
    assert not result["failed"], result["failed"]
    assert {"bench", "device", "date", "commit", "config", "rows", "summary"} <= set(record)
    assert record["bench"] == "scaling" and "2 processes" in record["device"]
    summary = record["summary"]
    assert summary["max_gpus"] == 2 and summary["all_launches_ok"]
    for key in ("scaling_efficiency_2gpu", "scaling_efficiency_max", "teacher_logits_scaling_efficiency_max"):
        assert isinstance(summary[key], float) and summary[key] > 0, (key, summary[key])
    train = [r for r in record["rows"] if r["stage"] == "stage2"]
    assert [(r["gpus"], r["grad_accum"], r["steps"]) for r in train] == [(1, 2, STEPS), (2, 1, STEPS)]
    assert all(r["tokens_per_s"] > 0 for r in train)
    logits = [r for r in record["rows"] if r["stage"] == "teacher-logits"]
    assert [r["gpus"] for r in logits] == [1, 2] and all(r["tokens"] == logits[0]["tokens"] for r in logits)
    assert (root / "out" / "scaling.png").stat().st_size > 10_000


def test_loss_curves_agree_across_process_counts(report):
    _, record, _ = report
    one, two = (r["losses"] for r in record["rows"] if r["stage"] == "stage2")
    assert len(one) == STEPS and one[-1] != one[0]  # it trains
    assert two == pytest.approx(one, rel=1e-5)
    assert record["summary"]["loss_curves_agree"]


def _steps(output) -> list[tuple[int, float]]:
    """(step, loss) in the order the run's metrics log holds them."""
    with open(output / "logs" / "steps.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _logged_steps(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"^stage2 step (\d+)/6 loss", log, re.MULTILINE)]


def test_killed_rank_fails_cleanly_and_resumes_on_one_process(report):
    """Judged on what the runs wrote (torchrun's failure report, the workers' logs and metrics), not on the
    bench's own verdicts."""
    _, record, root = report
    work = root / "work"
    kill = record["config"]["kill_test"]
    assert kill["exit_code"] != 0 and not kill["timed_out"] and kill["seconds_to_exit_after_kill"] < 60

    # torchrun's report: the first failure is rank 1, ended by SIGKILL, and the signal names that same process
    killed_log = (work / "kill.log").read_text()
    assert "Root Cause (first observed failure):" in killed_log, killed_log[-3000:]
    root_cause = killed_log.split("Root Cause (first observed failure):", 1)[1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause), root_cause
    pid = re.search(r"exitcode\s*:\s*-9 \(pid: (\d+)\)\s*\(SIGKILL\)", root_cause)
    assert pid and f"Signal 9 (SIGKILL) received by PID {pid.group(1)}" in root_cause, root_cause
    assert _logged_steps(killed_log) == [1, 2, 3]  # killed after step 3, before step 4's checkpoint

    # one process resumes from the step-2 checkpoint and trains steps 3 to 6
    resume_log = (work / "resume.log").read_text()
    assert "resumed stage2 at step 2 from its newest committed checkpoint" in resume_log, resume_log[-3000:]
    assert _logged_steps(resume_log) == [3, 4, 5, 6]

    # the interrupted run's metrics (steps 1-2 before the kill, 3-6 after the resume) against the uninterrupted
    # run on 2 processes, step by step
    reference, resumed = _steps(work / "kill-reference"), _steps(work / "kill-run")
    assert [s for s, _ in reference] == [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6], (reference, resumed)
    assert len({loss for _, loss in reference}) > 1  # it trains
    for (step, loss), (_, expected) in zip(resumed, reference):
        assert loss == pytest.approx(expected, rel=1e-5), (step, resumed, reference)
    # the bench's report says what the runs show
    assert kill["resume_matches"] and kill["failed_cleanly"] and record["summary"]["kill_resume_matches"]
