"""bench.node_check: its steps run within the budget, stopped whole when it runs out; the tiny proof through its
startup and second-node steps on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bench import node_check

REPO = Path(__file__).resolve().parent.parent


def test_a_step_past_its_time_is_stopped_with_the_processes_it_started(tmp_path):
    # the step starts a child that would outlive it; both must be gone when the step is cut short
    pid_file = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(600)']); open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(600)")
    started = time.monotonic()
    status, seconds = node_check.run_step("sleeper", [sys.executable, "-c", script], {}, tmp_path / "s.log", 3)
    assert status == "cut short" and 3 <= seconds < 3 + node_check.GRACE_S and time.monotonic() - started < 30
    child = int(pid_file.read_text())
    for _ in range(50):
        if not os.path.exists(f"/proc/{child}") or "zombie" in _state(child):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}") or "zombie" in _state(child)

    assert node_check.run_step("fails", [sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "f.log",
                               30)[0] == "failed (exit 3)"
    assert "$ " in (tmp_path / "f.log").read_text()  # the log names the command it ran


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"  # gone between the two reads


def test_steps_that_no_longer_fit_the_budget_are_reported_skipped_and_unknown_steps_refused(tmp_path):
    summary = node_check.main(["--budget", "20", "--steps", "gpu-tests,inference", "--out", str(tmp_path / "out"),
                               "--work", str(tmp_path / "work")])
    report = json.loads((tmp_path / "out" / "node_check.json").read_text())
    assert [(r["step"], r["status"]) for r in report["rows"]] == [("gpu-tests", "skipped: no time left"),
                                                                ("inference", "skipped: no time left")]
    assert summary["all_passed"] is False and report["bench"] == "node_check"
    with pytest.raises(SystemExit, match="unknown steps"):
        node_check.main(["--steps", "startup,warp-drive", "--out", str(tmp_path / "out")])


def test_a_second_node_of_a_stage_the_run_has_not_committed_is_reported_skipped(tmp_path):
    for chosen, why in ((None, "no training stage"), ("stage2", "stage2")):
        node_check.main(["--budget", "200", "--steps", "second-node", "--out", str(tmp_path / "out"),
                         "--work", str(tmp_path / "work"), *(["--second-node-stage", chosen] if chosen else [])])
        row = json.loads((tmp_path / "out" / "node_check.json").read_text())["rows"][0]
        assert row["status"] == f"skipped: the startup step has not committed {why} yet"


def test_the_gpu_step_collects_the_modules_with_gpu_tests_and_none_that_needs_s3_or_prefect():
    files = node_check.gpu_test_files()
    assert "tests/test_model_gdn.py" in files and "tests/test_kernel_cache.py" in files
    assert "tests/test_data_storage.py" not in files and "tests/test_flows_server.py" not in files
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                                "-p", "no:cacheprovider", *files], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert collected.returncode == 0, collected.stdout[-2000:]
    gpu_tests = [line for line in collected.stdout.splitlines() if "::" in line]
    assert len(gpu_tests) >= 20 and all(line.split("::")[0] in files for line in gpu_tests)


def test_fresh_caches_hold_the_shipped_autotuning_and_nothing_else(tmp_path):
    folder = tmp_path / "node"
    (folder / "triton").mkdir(parents=True)
    (folder / "triton" / "stale.json").write_text("{}")  # what an earlier node left
    env = node_check.fresh_caches(folder, keep=False)
    shipped = set()
    for bundle in (REPO / "infra" / "autotune").glob("*.tgz"):
        with tarfile.open(bundle) as tar:
            shipped |= {os.path.normpath(m.name) for m in tar.getmembers() if m.isfile()}
    found = {str(p.relative_to(env["TRITON_CACHE_DIR"])) for p in Path(env["TRITON_CACHE_DIR"]).rglob("*")
             if p.is_file()}
    assert shipped and found == shipped
    assert env["TORCHINDUCTOR_CACHE_DIR"].startswith(str(folder)) and env["TRITON_CACHE_AUTOTUNING"] == "1"
    (Path(env["TRITON_CACHE_DIR"]) / "compiled.json").write_text("{}")
    assert (Path(node_check.fresh_caches(folder, keep=True)["TRITON_CACHE_DIR"]) / "compiled.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tiny_startup_then_a_second_node_reruns_the_chosen_stage_on_empty_caches(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    overrides = ["teacher.train.steps=4", "teacher.train.num_layers=4", "teacher.train.hidden=32",
                 "teacher.train.intermediate=64", "teacher.train.vision_hidden=32", "teacher.train.vision_depth=1",
                 "data.distill.max_samples=8", "data.instruct.max_samples=8", "data.long.max_samples=2",
                 "train.stage1a.steps=2", "train.stage1b.steps=1", "train.stage2.steps=1", "train.stage3.steps=1",
                 "student.sliding_window=16"]
    cmd = [sys.executable, "-m", "bench.node_check", "--tiny", "--steps", "startup,second-node", "--budget", "540",
           "--out", str(out), "--work", str(work), "--eval-pictures", "2", "--second-node-stage", "stage2",
           *[a for o in overrides for a in ("--set", o)]]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "node_check.json").read_text())
    rows = {r["step"]: r for r in report["rows"]}
    assert rows["startup"]["status"] == "passed", (out / "startup.log").read_text()[-3000:]
    assert rows["second-node"]["status"] == "passed", (out / "second-node.log").read_text()[-3000:]
    summary = report["summary"]
    assert {f"startup_{s}_s" for s in ("stage1a", "stage1b", "stage2", "stage3")} <= set(summary)
    # the chosen stage, run again as its second attempt, on caches made for it; the newer stage is left as it was
    assert summary["second_node_stage"] == rows["second-node"]["stage"] == "stage2"
    attempt = lambda stage: json.loads((work / "proof" / "main" / stage / "_COMPLETE.json").read_text())["attempt"]  # noqa: E731
    assert attempt("stage2").rstrip("/").endswith("attempt-0002")
    assert attempt("stage3").rstrip("/").endswith("attempt-0001")
    second = json.loads((out / "second_node" / "stage_startup.json").read_text())
    assert {r["stage"]: r["seconds"] for r in second["rows"]}["stage2"] == summary["second_node_s"]
    assert summary["second_node_saved_s"] == pytest.approx(summary["startup_stage2_s"] - summary["second_node_s"],
                                                           abs=0.11)
    assert (work / "node-2" / "triton").is_dir() and (out / "proof" / "proof.json").exists()
