"""bench/stage_startup.py reads each training stage's first-step record from the attempt the run committed (or the
newest one, for a stage still running) and writes the results file with the 60 s goal."""

import json

from bench import stage_startup


STARTUP = {"python and torch imports": 9.1, "model built": 1.6, "fla gradient check": 23.8}


def _attempt(root, stage, attempt, first_s, step_s=2.0):
    logs = root / stage / attempt / "logs"
    logs.mkdir(parents=True)
    records = [{"step": 1, "loss": 1.0, "step_s": step_s, "first_step_after_start_s": first_s,
                "startup_s": STARTUP, "device": "NVIDIA H100 80GB HBM3"}, {"step": 2, "loss": 0.5, "step_s": 0.3}]
    (logs / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_committed_attempt_is_read_and_the_goal_judged(tmp_path):
    root = tmp_path / "run"
    _attempt(root, "stage1a", "attempt-0001", 41.26)
    _attempt(root, "stage1b", "attempt-0001", 210.0)   # committed, though a newer attempt (a forced rerun) exists
    _attempt(root, "stage1b", "attempt-0002", 35.0)
    (root / "stage1b" / "_COMPLETE.json").write_text(json.dumps({"attempt": "attempt-0001"}))
    _attempt(root, "stage2", "attempt-0003", 30.0)     # uncommitted: its newest attempt
    old = root / "stage3" / "attempt-0001" / "logs"
    old.mkdir(parents=True)
    (old / "steps.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "step_s": 5.0}) + "\n")
    out = tmp_path / "results"

    summary = stage_startup.main([str(root), "--out", str(out)])

    assert summary == {"stage1a_s": 41.3, "stage1b_s": 210.0, "stage2_s": 30.0, "max_s": 210.0, "goal_s": 60.0,
                       "goal_met": False}
    record = json.loads((out / "stage_startup.json").read_text())
    assert record["device"] == "NVIDIA H100 80GB HBM3"
    rows = {r["stage"]: r for r in record["rows"]}
    assert rows["stage1b"]["within_goal"] is False and rows["stage1a"]["within_goal"] is True
    assert "records no first step" in rows["stage3"]["error"]
    assert rows["stage1a"]["startup_s"] == STARTUP  # where the seconds before the first step went
