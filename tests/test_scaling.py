"""bench/scaling.py on CPU (--tiny, gloo): the same code the multi-GPU run takes, on 1 and 2 processes.

One run of the bench (Stage II with ZeRO-2, the teacher-logit stage, the kill-one-rank test) feeds every
test here: the report is well formed, the loss curves of 1 and 2 processes agree (same seed, same global
batch), and a run whose rank 1 is SIGKILLed fails in bounded time naming that rank, then resumes from its
last checkpoint on one process (ZeRO state converted to the universal layout) to an uninterrupted run's
losses."""

import json
import os

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


def test_killed_rank_fails_cleanly_and_resumes_on_one_process(report):
    _, record, root = report
    kill = record["config"]["kill_test"]
    assert kill["killed_rank"] == 1 and kill["exit_code"] != 0 and not kill["timed_out"]
    assert kill["seconds_to_exit_after_kill"] < 60
    with open(root / "work" / "kill.log") as f:
        log = f.read()
    assert "SIGKILL" in log and kill["message_names_dead_rank"]
    assert kill["committed_checkpoints_at_kill"] == [2]  # step 3 ran, step 4's checkpoint never came
    assert kill["resumed_on_gpus"] == 1 and kill["resumed_from_step"] == 2 and kill["resume_exit_code"] == 0
    assert kill["continued_steps"] == [3, 4, 5, 6]
    assert kill["losses_resumed"] == pytest.approx(kill["losses_reference"], rel=1e-5)
    assert kill["resume_matches"] and record["summary"]["kill_resume_matches"]
