"""A GPU node checked end to end in one command, within a time budget: the kernels against their references, then
what our GPU numbers rest on, measured on this node.

    python -m bench.node_check --budget 570 --out OUT            # every step, in order, as long as time allows
    python -m bench.node_check --steps startup,second-node --out OUT
    python -m bench.node_check --tiny --steps startup,second-node --out OUT    # the CPU smoke test

Steps, in this order; each runs as its own process group with its log in `OUT/<step>.log`, gets what is left of the
budget up to its own cap, and is stopped (SIGTERM, then SIGKILL) when that runs out:

  gpu-tests    `pytest -m gpu` on the modules that hold GPU tests: every fla kernel and fused path against its
               reference, forward and gradients, and a compiled kernel shared between two fresh Triton caches
               through a run root
  startup      the proof recipe's main run (configs/proof.yaml, no ablations) with this node's compile caches empty
               but for the autotuning results the project ships (infra/autotune), as on a node that never ran it;
               then bench.stage_startup → `OUT/stage_startup.json`: seconds from each training stage's process start
               to its first optimizer step, part by part. Run again with the same --work, it resumes from the
               committed stages, on the same caches (the node it was). In both steps a training process prints
               every thread's stack to its stage log every 30 s until its first step is done: what a cold first
               step compiles or tunes is there to read
  second-node  a committed training stage of that run (--second-node-stage; default the newest), forced again on
               empty local caches, so that only the run root's shared kernels and tuning (`<run root>/_kernel_cache/`)
               stand between it and compiling: `OUT/second_node/stage_startup.json`, and the seconds it saved beside
               the first node's
  inference    bench.inference: prefill, decode, streaming, teacher beside student → `OUT/inference.json`
  train        bench.train_throughput: Stage II at 8K, Stage III at 32K → `OUT/train_throughput.json`

On a node prepared as README's "On GPUs" says (the wheelhouse, `source infra/gpu_env.sh`); the startup step's
sample corpora hold videos, so the wheelhouse needs WITH_MEDIA=1 (the plan refuses them before any work otherwise).
Writes `OUT/node_check.json` (the results contract of docs/benchmarks.md: a row a step with its status, seconds, log
and what it wrote) and prints the table. The work (run root, caches) goes under --work (default runs/node_check).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import print_table, write_result
from pipeline import stages
from pipeline.train.worker import FIRST_STEP_STACKS_ENV

REPO = Path(__file__).resolve().parent.parent
GRACE_S = 20.0     # between SIGTERM and SIGKILL: bench.proof writes what it has on SIGTERM
RESERVE_S = 10.0   # kept for the stage_startup reports and this script's own


@dataclass(frozen=True)
class Step:
    name: str
    cap_s: float
    what: str


STEPS = (
    Step("gpu-tests", 300, "kernels against their references"),
    Step("startup", 560, "the proof's main run from empty caches; start-up per training stage"),
    Step("second-node", 240, "a committed stage again on empty local caches, with the run root's shared kernels"),
    Step("inference", 420, "bench.inference"),
    Step("train", 420, "bench.train_throughput"),
)


def fresh_caches(folder: Path, keep: bool, inductor: bool = True) -> dict:
    """Environment for a process whose compile caches are `folder`'s: Triton's (with the shipped autotuning
    results unpacked in it, as infra/gpu_env.sh does) and, with `inductor`, Inductor's. `keep` reuses what an
    earlier call left."""
    if folder.exists() and not keep:
        shutil.rmtree(folder)
    triton = folder / "triton"
    if not triton.exists():
        triton.mkdir(parents=True)
        for bundle in sorted((REPO / "infra" / "autotune").glob("*.tgz")):
            with tarfile.open(bundle) as tar:
                tar.extractall(triton, filter="data")
    env = {"TRITON_CACHE_DIR": str(triton), "TRITON_CACHE_AUTOTUNING": "1"}
    if inductor:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    return env


def run_step(name: str, argv: list[str], env: dict, log_path: Path, timeout_s: float) -> tuple[str, float]:
    """Runs argv in its own process group; (status, seconds). Status: passed, failed (exit N), cut short."""
    started = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            _stop(proc)
            return "cut short", time.monotonic() - started
    return ("passed" if code == 0 else f"failed (exit {code})"), time.monotonic() - started


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _pytest_counts(log_path: Path) -> str:
    """pytest's last summary line ("12 passed, 3 skipped in 80.1s"), or ""."""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?) in [\d.]+s", log_path.read_text(errors="replace"),
                       re.MULTILINE)
    return found[-1] if found else ""


def gpu_test_files() -> list[str]:
    """The test modules that hold GPU tests: collecting the whole suite would import what only CPU tests need
    (s3fs, Prefect), which a GPU image need not have."""
    return sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").glob("test_*.py")
                  if "mark.gpu" in path.read_text())


def newest_committed_training_stage(root: str) -> str | None:
    done = [s for s in stages.TRAINING_STAGES if stages.committed(stages.stage_dir(root, s))]
    return done[-1] if done else None


def rerun_stage(config_path: str, stage: str) -> None:
    """The stage forced again, as a second node would run it (the `second-node` step's process)."""
    import logging

    from pipeline.config import load_config
    from pipeline.plan import run_stage

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    outcome = run_stage(load_config(config_path), stage, logging.getLogger("infinitevl.node_check"), force=True)
    print(f"{stage}: {outcome.status} in {outcome.duration_s:.1f} s", flush=True)


def _startup(root: str, out: Path) -> list[dict]:
    """bench.stage_startup on the run root, written into `out`: its rows ([] where no stage has trained yet)."""
    from bench import stage_startup

    if not os.path.isdir(root) or not stage_startup.first_steps(root):
        return []
    stage_startup.main([root, "--out", str(out)])
    return json.loads((out / "stage_startup.json").read_text())["rows"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=570.0, help="seconds for all the steps together")
    p.add_argument("--steps", default=",".join(s.name for s in STEPS),
                   help="comma-separated, from: " + ", ".join(s.name for s in STEPS))
    p.add_argument("--out", default="bench/results/node_check", help="logs and results")
    p.add_argument("--work", default="runs/node_check", help="the proof's run root and the compile caches")
    p.add_argument("--tiny", action="store_true", help="the CPU smoke test: tiny recipe and benches (Inductor's "
                   "cache stays the machine's: a CPU compile from nothing takes minutes)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="overrides of the proof recipe's config (the startup step)")
    p.add_argument("--eval-pictures", type=int, default=None, help="held-out pictures the proof scores each stage on")
    p.add_argument("--second-node-stage", choices=stages.TRAINING_STAGES, default=None,
                   help="the committed stage the second-node step forces again (default: the newest)")
    p.add_argument("--rerun-stage", nargs=2, metavar=("CONFIG", "STAGE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rerun_stage:
        rerun_stage(*args.rerun_stage)
        return {}
    deadline = time.monotonic() + args.budget
    known = {s.name: s for s in STEPS}
    wanted = [name.strip() for name in args.steps.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(f"unknown steps {unknown}: the steps are {', '.join(known)}")
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    proof_root = work / "proof"
    main_root = str(proof_root / "main")
    tiny = ["--tiny"] if args.tiny else []
    py = sys.executable

    rows, summary = [], {}
    for step in (known[name] for name in [s.name for s in STEPS] if name in wanted):
        log_path = out / f"{step.name}.log"
        left = deadline - time.monotonic() - RESERVE_S
        row = {"step": step.name, "what": step.what, "log": str(log_path)}
        if left < 30:
            rows.append({**row, "status": "skipped: no time left", "seconds": 0.0})
            continue
        env, argv = {}, None
        if step.name == "gpu-tests":
            argv = [py, "-m", "pytest", "-m", "gpu", *gpu_test_files(), "-q", "-rs", "-p", "no:cacheprovider"]
        elif step.name == "startup":
            # stacks every 30 s of a first step: what a cold first step compiles or tunes shows in the stage logs
            env = {**fresh_caches(work / "node-1", keep=True, inductor=not args.tiny), FIRST_STEP_STACKS_ENV: "30"}
            argv = [py, "-m", "bench.proof", "--runner", "direct", "--no-ablations", "--root", str(proof_root),
                    "--out", str(out / "proof"), *tiny, *[a for o in args.set for a in ("--set", o)]]
            if args.eval_pictures is not None:
                argv += ["--eval-pictures", str(args.eval_pictures)]
        elif step.name == "second-node":
            newest = newest_committed_training_stage(main_root) if os.path.isdir(main_root) else None
            stage = args.second_node_stage or newest
            if stage is None or not stages.committed(stages.stage_dir(main_root, stage)):
                why = "no training stage" if stage is None else stage
                rows.append({**row, "status": f"skipped: the startup step has not committed {why} yet",
                             "seconds": 0.0})
                continue
            from bench.stage_startup import first_steps

            first_node = {r["stage"]: r for r in first_steps(main_root)}.get(stage, {})  # before it is replaced
            env = {**fresh_caches(work / "node-2", keep=False, inductor=not args.tiny), FIRST_STEP_STACKS_ENV: "30"}
            argv = [py, "-m", "bench.node_check", "--rerun-stage", str(proof_root / "main" / "proof_config.yaml"),
                    stage]
            row["stage"] = stage
        elif step.name == "inference":
            argv = [py, "-m", "bench.inference", "--out", str(out), *tiny]
        elif step.name == "train":
            argv = [py, "-m", "bench.train_throughput", "--out", str(out), *tiny]
        print(f"node_check: {step.name} ({step.what}), up to {min(step.cap_s, left):.0f} s; log {log_path}",
              flush=True)
        status, seconds = run_step(step.name, argv, env, log_path, min(step.cap_s, left))
        row.update(status=status, seconds=round(seconds, 1))
        if step.name == "gpu-tests":
            row["detail"] = summary["gpu_tests"] = _pytest_counts(log_path)
        elif step.name == "startup":
            timed = [r for r in _startup(main_root, out) if "seconds" in r]
            summary.update({f"startup_{r['stage']}_s": r["seconds"] for r in timed})
            row["detail"] = ", ".join(f"{r['stage']} {r['seconds']:.0f} s" for r in timed) + \
                (" to the first step" if timed else "no training stage has taken a step")
        elif step.name == "second-node" and status == "passed":
            again = {r["stage"]: r for r in _startup(main_root, out / "second_node")}.get(stage, {})
            if "seconds" in again:
                row["second_node_s"] = summary["second_node_s"] = again["seconds"]
                summary["second_node_stage"] = stage
            if "seconds" in again and "seconds" in first_node:
                row["first_node_s"] = first_node["seconds"]
                summary["second_node_saved_s"] = round(first_node["seconds"] - again["seconds"], 1)
                row["detail"] = (f"{stage}: {first_node['seconds']:.0f} s to the first step on the first node, "
                                 f"{again['seconds']:.0f} s on a second")
        rows.append(row)
        print(f"node_check: {step.name} {status} after {seconds:.0f} s", flush=True)

    summary["all_passed"] = all(r["status"] == "passed" for r in rows)
    path = write_result("node_check", {"budget_s": args.budget, "steps": wanted, "tiny": args.tiny,
                                       "work": str(work)}, rows, summary, str(out))
    print_table([{"step": r["step"], "status": r["status"], "seconds": r["seconds"], "detail": r.get("detail", "")}
                 for r in rows])
    print("summary:", json.dumps(summary), f"\nwrote {path}", flush=True)
    return summary


if __name__ == "__main__":
    main()
