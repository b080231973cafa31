"""How long each training stage of a finished run took from its process's start to its first optimizer step.

    python -m bench.stage_startup runs/proof/main [--out bench/results]

Every training process records, on its first step, the seconds since the process started (model built, DeepSpeed
set up, checkpoint restored, the first step's kernel compilation and autotuning), the seconds of each part before
that step (`startup_s`: imports, process group, shared kernels restored, model build, fla's gradient check, ...)
and the card it ran on, in its stage's `logs/steps.jsonl`. This reads them from a run root's committed stages (each
stage's newest attempt when none is committed) and writes `<out>/stage_startup.json` (the results contract of
docs/benchmarks.md), with the goal of 60 s a stage. Run it on a run made on a fresh node, where no compile or
autotuning cache was warm yet but the one the project ships (infra/autotune).
"""

from __future__ import annotations

import argparse
import os

from bench.common import print_table, write_result
from pipeline import stages, storage

GOAL_S = 60.0


def stage_records(root: str, stage: str) -> tuple[str, list[dict]]:
    """The logged steps of the stage's committed attempt, else of its newest attempt ([] if it never trained)."""
    folder = stages.stage_dir(root, stage)
    marker = stages.committed(folder)
    attempt = marker["output"] if marker else stages.current_attempt(folder)
    if attempt is None:
        return "", []
    path = stages.join(attempt, "logs", "steps.jsonl")
    return path, storage.read_jsonl(path)


def first_steps(root: str) -> list[dict]:
    rows = []
    for stage in stages.TRAINING_STAGES:
        path, records = stage_records(root, stage)
        if not records:
            continue
        first = next((r for r in records if "first_step_after_start_s" in r), None)
        if first is None:
            rows.append({"stage": stage, "error": f"{path} records no first step's start-up (an older run)"})
            continue
        row = {"stage": stage, "step": first["step"], "seconds": round(first["first_step_after_start_s"], 1),
               "first_step_s": round(first["step_s"], 1), "device": first.get("device", "unknown"),
               "within_goal": first["first_step_after_start_s"] <= GOAL_S}
        if "startup_s" in first:  # where the seconds before the first step went, part by part (the ready line's)
            row["startup_s"] = first["startup_s"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", help="a run root whose training stages ran (e.g. runs/proof/main)")
    p.add_argument("--out", default="bench/results", help="where stage_startup.json goes")
    args = p.parse_args(argv)
    rows = first_steps(args.root)
    if not rows:
        raise SystemExit(f"{args.root}: no training stage has logs/steps.jsonl")
    timed = [r for r in rows if "seconds" in r]
    summary = {f"{r['stage']}_s": r["seconds"] for r in timed}
    summary.update(max_s=max((r["seconds"] for r in timed), default=None), goal_s=GOAL_S,
                   goal_met=bool(timed) and all(r["within_goal"] for r in timed) and len(timed) == len(rows))
    devices = sorted({r["device"] for r in timed})
    path = write_result("stage_startup", {"root": os.path.abspath(args.root)}, rows, summary, args.out,
                        device=", ".join(devices) or None)
    print_table([{k: v for k, v in r.items() if k != "startup_s"} for r in rows])
    for r in rows:
        if "startup_s" in r:
            parts = ", ".join(f"{part} {seconds:.1f} s" for part, seconds in r["startup_s"].items())
            print(f"{r['stage']} before its first step: {parts}")
    print("summary:", summary, f"\nwrote {path}")
    return summary


if __name__ == "__main__":
    main()
