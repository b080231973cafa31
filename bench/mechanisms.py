"""The mechanisms bench (issue #29): window attention forgets, linear attention blurs text, the hybrid does both?

A tiny Qwen2.5-VL teacher is trained by the teacher stage on the mechanisms suite's two tasks
(pipeline/eval/mechanisms.py: `recall`, a key frame then distractor frames, question last; `dense_text`, strings
of 6-12 random characters, one to each image token), then distilled through the real pipeline (data → teacher
logits → I-a → I-b → II) into students that differ only in their layers:

    share=1       all sliding-window attention          share=0      all Gated DeltaNet
    share=1/8, 1/4 (the default: the main run), 1/2      one sliding layer per 8, 4, 2 layers, Gated DeltaNet
    mixer=gla, mixer=mamba2, mixer=kda                   at 1/4 (each mixer model.mixer_names() has)

The main run (1/4, Gated DeltaNet) goes on through Stage III and is scored with and without it. Each checkpoint
is scored on held-out streams: recall against the key's distance in tokens (from inside the window to 16x past
it), dense-text exact match and character accuracy, and (teacher, main run) recall against the frame count.

    python -m bench.mechanisms --gpus 0,0,0,0,0,0,0,0 --runner direct   # configs/mechanisms.yaml, one GPU
    python -m bench.mechanisms --tiny                                   # the CPU smoke test of the same recipe

It reuses bench.proof's machinery (shared stages once, then one worker process per job, results kept when cut
short; run again on the same root, it resumes from the committed stages). On a GPU a throwaway chain at the
students' shapes runs beside the teacher (`warm_chain`) so that the students find their kernels compiled and tuned
(`--no-warm`: not). Writes `<out>/mechanisms.{json,md,png}`
(the results contract of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

from bench import proof
from bench.common import provenance
from pipeline.config import RunConfig, config_from_dict
from pipeline.eval.mechanisms import MechanismsConfig
from pipeline.eval.metrics import retention
from pipeline.stages import STAGE_ORDER, TRAINING_STAGES

DEFAULT_SHARE = Fraction(1, 4)
SHARES = (Fraction(1), Fraction(0), Fraction(1, 8), Fraction(1, 2))  # besides the main run's 1/4
MIXERS = ("gla", "mamba2", "kda")                                    # besides the main run's Gated DeltaNet
GOAL_RETENTION = 0.9
MIN_TEACHER = 50.0  # percent held out: below it the students are not run (--min-teacher)

# The CPU smoke test: the proof's tiny sizes, the two tasks at a few frames, a sweep of a few samples.
TINY = {
    **proof.TINY,
    "teacher.train.steps": 4, "teacher.train.batch_size": 4, "teacher.train.hidden": 64,
    "teacher.train.intermediate": 128, "teacher.train.vision_hidden": 32, "teacher.train.vision_depth": 1,
    "teacher.train.eval_pictures": 2, "teacher.train.max_frames": 24,
    "data.distill.max_samples": 8, "data.instruct.max_samples": 8, "data.long.max_samples": 4,
    "data.long.seq_len": 512, "train.stage3.seq_len": 512,
    "train.stage1a.steps": 2, "train.stage1b.steps": 1, "train.stage2.steps": 1, "train.stage3.steps": 1,
    "train.stage1a.checkpoint_every": 2, "train.stage1b.checkpoint_every": 1, "train.stage2.checkpoint_every": 1,
    "train.stage3.checkpoint_every": 1, "student.sliding_window": 16,
}
TINY_SWEEP = {"distances": [2, 8, 18], "frame_counts": [8, 24], "recall_samples": 2, "text_samples": 2,
              "batch_size": 4}

# The kernel warm-up (bench.proof.warm_up) beside the teacher: the students' shapes (widths, rows, micro batches,
# precision) with a teacher of two steps, a few samples and two steps a stage; scored on a short sweep, the
# longest stream included (the decode kernels and the evaluation's row counts).
WARM = {
    "teacher.train.steps": 2, "teacher.train.warmup_steps": 1, "teacher.train.eval_pictures": 4,
    "teacher.train.loader_workers": 2, "teacher.train.target_accuracy": None, "teacher.train.max_seconds": None,
    "data.distill.max_samples": 160, "data.instruct.max_samples": 160, "data.long.max_samples": 16,
    "data.workers": 2, "data.shard_tokens": 16384,
    **{f"train.{s}.{k}": v for s in TRAINING_STAGES for k, v in
       {"steps": 2, "checkpoint_every": 2, "warmup_steps": 0}.items()},
}
WARM_SWEEP = {"distances": [2, 504], "frame_counts": [1024], "recall_samples": 16, "text_samples": 16,
              "batch_size": 16}


# -- the arms ---------------------------------------------------------------------------------------------------
def arms(cfg: RunConfig) -> list[dict]:
    """The student variants besides the main run: name, the student fields they set, share and mixer."""
    from model import mixer_names

    num_layers = cfg.teacher.train.num_layers
    rows = []
    for share in SHARES:
        row = {"name": f"share={share}", "linear_mixer": "gated_deltanet", "share": str(share)}
        try:
            types = (["sliding_attention"] * num_layers if share == 1 else proof.layer_types(share, num_layers))
        except ValueError as e:  # a share the teacher's depth cannot take: reported, not run
            rows.append({**row, "error": str(e)})
            continue
        # share 1 has no linear layer: Stages I-a and I-b commit the converted teacher untrained, II trains it
        rows.append({**row, "student": {"linear_mixer": "gated_deltanet", "layer_types": types}})
    for mixer in MIXERS:
        if mixer in mixer_names():
            rows.append({"name": f"mixer={mixer}", "linear_mixer": mixer, "share": str(DEFAULT_SHARE),
                         "student": {"linear_mixer": mixer, "layer_types": proof.layer_types(DEFAULT_SHARE, num_layers)}})
    return rows


def base_config(config: str, tiny: bool, overrides: list[str], root: str) -> RunConfig:
    from pipeline.config import load_config

    raw = load_config(config).model_dump(mode="json")
    items = [f"{k}={json.dumps(v)}" for k, v in TINY.items()] if tiny else []
    return config_from_dict(raw, [*items, f"run.root={root}/main", *overrides], origin=config)


# -- scoring (in the job's worker process) ----------------------------------------------------------------------
def score_checkpoint(checkpoint: str, job: dict, out_dir: str, cfg: RunConfig) -> dict:
    """bench.proof's scorer hook: the mechanisms sweeps of one checkpoint; `accuracy` is the mean recall."""
    import torch

    from pipeline.eval.api import load_checkpoint
    from pipeline.eval.mechanisms import score_mechanisms

    model, processor = load_checkpoint(checkpoint)
    stage = os.path.basename(out_dir.rstrip("/"))
    out = score_mechanisms(model, processor, out_dir, MechanismsConfig.from_dict(job["mechanisms"]),
                           frames_sweep=stage in job.get("frames_sweep", ()))
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    recall = [r["accuracy"] for r in out["recall_by_distance"]]
    return {"accuracy": sum(recall) / len(recall), **out}


# -- the recipe -------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    started = time.time()
    runner = proof.pick_runner(args.runner)
    root = os.path.abspath(args.root)
    cfg = base_config(args.config, args.tiny, args.set, root)
    if cfg.teacher.train is None or not {"recall", "dense_text"} <= set(cfg.teacher.train.pictures or ()):
        raise SystemExit(f"{args.config}: teacher.train.pictures must include recall and dense_text")
    sweep = asdict(MechanismsConfig.from_dict({**(TINY_SWEEP if args.tiny else {}), **json.loads(args.sweep or "{}")}))
    main_cfg = config_from_dict(cfg.model_dump(mode="json"),
                                [f"run.stages={json.dumps([s for s in STAGE_ORDER if s != 'eval'])}"])
    rows = arms(cfg) if args.variants else []
    if args.arms:
        unknown = set(args.arms.split(",")) - {r["name"] for r in rows}
        if unknown:
            raise SystemExit(f"--arms: unknown {sorted(unknown)}; known: {', '.join(r['name'] for r in rows)}")
        rows = [r for r in rows if r["name"] in args.arms.split(",")]
    jobs_dir = Path(root) / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    gpus = [g for g in args.gpus.split(",") if g] if args.gpus else [None]
    print(f"mechanisms: runner {runner}, run root {root}, {len(gpus)} worker(s), {len(rows)} variants", flush=True)

    common = {"runner": runner, "scorer": "bench.mechanisms", "mechanisms": sweep}
    main_path = proof.write_config(main_cfg)
    jobs = [{"name": "main", "config": main_path, "stages": ["teacher", *TRAINING_STAGES],
             "score_stages": ["teacher", "stage2", "stage3"], "frames_sweep": ["teacher", "stage2", "stage3"],
             **common}]
    for row in rows:
        if "error" in row:
            continue
        vcfg = proof.variant_config(main_cfg, row, root)
        proof.link_shared(main_cfg.run.root, vcfg.run.root)
        jobs.append({"name": row["name"], "config": proof.write_config(vcfg), "stages": list(proof.ABLATION_STAGES),
                     "score_stages": ["stage2"], **common})
    floor = args.min_teacher if args.min_teacher is not None else (0.0 if args.tiny else MIN_TEACHER)
    if args.warm is None:
        import torch

        args.warm = torch.cuda.is_available() and not args.tiny
    warm = warm_chain(main_cfg, rows, root, runner, args.tiny) if args.warm else None
    results, failures, interrupted = proof.run_jobs(main_path, jobs, runner, jobs_dir, gpus, started,
                                                    teacher_gate=lambda: teacher_gate(main_cfg, floor), warm=warm)

    report = build_report(args, cfg, runner, sweep, rows, results, failures, time.time() - started)
    if interrupted:
        report["interrupted"] = interrupted
    write_report(report, args.out, proof.report_name(args.config))
    print(json.dumps(report["summary"], indent=2))
    if "teacher" in failures:
        raise SystemExit(failures["teacher"])
    if "main" in failures:
        raise SystemExit(f"the main run failed: {failures['main']}")
    return report


def warm_chain(main_cfg: RunConfig, rows: list[dict], root: str, runner: str, tiny: bool = False) -> tuple:
    """The kernel warm-up's chain under <root>/warm: the main run and one arm of each other mixer (the shares
    call the same kernels), at the students' shapes, each stage two steps (WARM). Returns (its config path, its
    jobs, their folder) for bench.proof.run_jobs."""
    wroot = f"{root}/warm"
    shrink = {k: v for k, v in WARM.items() if not (tiny and k.startswith("data."))}  # tiny corpora are smaller
    wcfg = config_from_dict(main_cfg.model_dump(mode="json"),
                            [*(f"{k}={json.dumps(v)}" for k, v in shrink.items()), f"run.root={wroot}/main"])
    path = proof.write_config(wcfg)
    common = {"runner": runner, "scorer": "bench.mechanisms", "mechanisms": TINY_SWEEP if tiny else WARM_SWEEP}
    jobs = [{"name": "warm-main", "config": path, "stages": list(TRAINING_STAGES), "score_stages": ["stage3"],
             "frames_sweep": ["stage3"], **common}]
    mixers = {main_cfg.student.linear_mixer}
    for row in rows:
        if "error" in row or row["linear_mixer"] in mixers:
            continue
        mixers.add(row["linear_mixer"])
        vcfg = proof.variant_config(wcfg, row, wroot)
        proof.link_shared(wcfg.run.root, vcfg.run.root)
        jobs.append({"name": f"warm-{row['name']}", "config": proof.write_config(vcfg),
                     "stages": list(proof.ABLATION_STAGES), "score_stages": ["stage2"], **common})
    jobs_dir = Path(wroot) / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    return path, jobs, jobs_dir


def teacher_gate(cfg: RunConfig, floor: float) -> str | None:
    """Why distilling the committed teacher would measure nothing (its held-out score under `floor` percent), or
    None: students of a teacher that learned neither task tie with it at chance, whatever their layers."""
    from pipeline.stages import committed, stage_dir

    metrics = (committed(stage_dir(cfg.run.root, "teacher")) or {}).get("metrics", {})
    score = metrics.get("score")
    if score is None or score >= floor:
        return None
    kinds = ", ".join(f"{k.removeprefix('heldout/')} {v:.0f}%" for k, v in sorted(metrics.items())
                      if k.startswith("heldout/") and k != "heldout/pictures")
    return (f"the teacher scored {score:.1f}% held out ({kinds}) after {metrics.get('steps')} steps, under "
            f"--min-teacher {floor:g}: students distilled from it would measure nothing, so none was run. Find a "
            "teacher setting that learns both tasks first (python -m bench.proof_teacher --out OUT --config "
            "configs/mechanisms.yaml --mechanisms), or pass --min-teacher 0 to distil this one anyway")


def beyond_window(scored: dict | None, window: int) -> float | None:
    """Mean recall accuracy over the distances whose key lies past the sliding window (in tokens)."""
    if not scored:
        return None
    past = [r["accuracy"] for r in scored["recall_by_distance"] if r["tokens"] > window]
    return sum(past) / len(past) if past else None


def text_reach(distances: list[int], window: int) -> dict:
    """The dense-text questions' distances (tokens from the asked line's first character to the answer) against
    the window: how many a sliding window alone cannot read."""
    ordered = sorted(distances)
    return {"min": ordered[0], "median": ordered[len(ordered) // 2], "max": ordered[-1], "n": len(ordered),
            "past_window": sum(d > window for d in ordered)} if ordered else {}


def build_report(args, cfg: RunConfig, runner: str, sweep: dict, rows: list[dict], results: dict, failures: dict,
                 seconds: float) -> dict:
    window = cfg.student.sliding_window
    main = results.get("main", {}).get("stages", {})
    arms_out = [{"name": "teacher", "stage": "teacher", "linear_mixer": None, "share": None, **_scored(main, "teacher")},
                {"name": f"share={DEFAULT_SHARE}", "stage": "stage2", "linear_mixer": cfg.student.linear_mixer,
                 "share": str(DEFAULT_SHARE), **_scored(main, "stage2")},
                {"name": f"share={DEFAULT_SHARE} + Stage III", "stage": "stage3", "linear_mixer": cfg.student.linear_mixer,
                 "share": str(DEFAULT_SHARE), **_scored(main, "stage3")}]
    for row in rows:
        out = {"name": row["name"], "stage": "stage2", "linear_mixer": row["linear_mixer"], "share": row["share"]}
        if row["name"] in failures or "error" in row:
            out["error"] = row.get("error") or failures[row["name"]]
        arms_out.append({**out, **_scored(results.get(row["name"], {}).get("stages", {}), "stage2")})
    unscored = failures.get("teacher") or "not scored: the run was cut short or the stage failed"
    for a in arms_out:
        a["recall_beyond_window"] = beyond_window(a.get("scores"), window)
        text = (a.get("scores") or {}).get("text", {})
        if "distances" in text:
            text["distances"] = text_reach(text["distances"], window)
        if a.get("scores") is None and "error" not in a:
            a["error"] = unscored
    by_name = {a["name"]: a for a in arms_out}

    def text(name):
        s = by_name.get(name, {}).get("scores")
        return s["text"]["exact"] if s else None

    def mean_recall(name):
        s = by_name.get(name, {}).get("scores")
        return s["accuracy"] if s else None

    def at_frames(name, n):
        s = by_name.get(name, {}).get("scores")
        return next((r["accuracy"] for r in (s or {}).get("frames", []) if r["frames"] == n), None)

    hybrid, longest = f"share={DEFAULT_SHARE}", max(sweep["frame_counts"])
    with3, without3 = at_frames(f"{hybrid} + Stage III", longest), at_frames(hybrid, longest)
    summary = {
        "teacher_recall": mean_recall("teacher"), "teacher_text": text("teacher"),
        "teacher_recall_beyond_window": by_name["teacher"]["recall_beyond_window"],
        "hybrid_recall_beyond_window": by_name[hybrid]["recall_beyond_window"], "hybrid_text": text(hybrid),
        "swa_only_recall_beyond_window": by_name.get("share=1", {}).get("recall_beyond_window"),
        "linear_only_text": text("share=0"),
        "stage3_gain_1024_frames": None if with3 is None or without3 is None else with3 - without3,
        "stage3_gain_frames": longest,
        "hybrid_recall_retention": retention(by_name[hybrid]["recall_beyond_window"],
                                             by_name["teacher"]["recall_beyond_window"]),
        "hybrid_text_retention": retention(text(hybrid), text("teacher")),
        "goal_retention": GOAL_RETENTION,
    }
    return {"bench": "mechanisms", **provenance(),
            "config": {"config": args.config, "tiny": args.tiny, "overrides": args.set, "runner": runner,
                       "arms": args.arms or "all", "warm": args.warm,
                       "gpus": args.gpus, "sliding_window": window, "sweep": sweep, "run": cfg.model_dump(mode="json")},
            "rows": arms_out, "failures": failures, "seconds": round(seconds, 1), "summary": summary}


def _scored(stages: dict, stage: str) -> dict:
    s = stages.get(stage)
    if s is None:
        return {"scores": None}
    keys = ("recall_by_distance", "text", "frames", "accuracy")
    return {"scores": {k: s[k] for k in keys if k in s}, "tokens": s.get("tokens"), "seconds": s.get("seconds")}


# -- the report -------------------------------------------------------------------------------------------------
def write_report(report: dict, out: str, name: str = "mechanisms") -> None:
    proof.write_report(report, out, name, markdown, plot)


def _f(v) -> str:
    return "–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def _r(v) -> str:
    return "–" if v is None else f"{v:.3f}"


def markdown(report: dict) -> str:
    window = report["config"]["sliding_window"]
    scored = [a for a in report["rows"] if a.get("scores")]
    distances = scored[0]["scores"]["recall_by_distance"] if scored else []
    lines = [f"# Mechanisms ({report['device']}, {report['date']}, commit {report['commit']})", "",
             f"Held-out accuracy in percent. Recall: the key's distance in tokens (window {window}); students after "
             "Stage II unless named. Text: exact match and character accuracy.", "",
             "| arm | " + " | ".join(f"recall @{d['tokens']} ({d['tokens'] / window:.1f}x)" for d in distances)
             + " | recall past window | text exact | text chars |",
             "|---" * (len(distances) + 4) + "|"]
    for a in report["rows"]:
        if not a.get("scores"):
            lines.append(f"| {a['name']} | failed: {a.get('error', '')[:160]} |")
            continue
        s = a["scores"]
        lines.append(f"| {a['name']} | " + " | ".join(_f(r["accuracy"]) for r in s["recall_by_distance"])
                     + f" | {_f(a['recall_beyond_window'])} | {_f(s['text']['exact'])} | {_f(s['text']['char_accuracy'])} |")
    reach = _text_reach(report)
    if reach:
        lines += ["", f"Text: the asked line's first character sits {reach['min']}-{reach['max']} tokens before the "
                      f"answer (median {reach['median']}); {reach['past_window']} of {reach['n']} questions lie past "
                      f"the {window}-token window, out of a sliding window's reach."]
    framed = [a for a in scored if a["scores"].get("frames")]
    if framed:
        counts = [r["frames"] for r in framed[0]["scores"]["frames"]]
        lines += ["", "Recall against the number of frames (the key anywhere in the stream):", "",
                  "| arm | " + " | ".join(f"{n} frames" for n in counts) + " |", "|---" * (len(counts) + 1) + "|"]
        for a in framed:
            lines.append(f"| {a['name']} | " + " | ".join(_f(r["accuracy"]) for r in a["scores"]["frames"]) + " |")
    return "\n".join(lines + proof.closing_lines(report, _f))


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = report["config"]["sliding_window"]
    scored = [a for a in report["rows"] if a.get("scores")]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(17, 4.5))
    for a in scored:
        rows = a["scores"]["recall_by_distance"]
        style = {"color": "k", "lw": 2.5} if a["name"] == "teacher" else {}
        left.plot([r["tokens"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=a["name"], **style)
    left.axvline(window, color="grey", ls="--", lw=1, label=f"window ({window} tokens)")
    _recall_axes(left, "key's distance from the answer (tokens)", "recall against distance")
    names = [a["name"] for a in scored]
    x = range(len(names))
    mid.bar([i - 0.2 for i in x], [a["scores"]["text"]["exact"] for a in scored], 0.4, label="exact match")
    mid.bar([i + 0.2 for i in x], [a["scores"]["text"]["char_accuracy"] for a in scored], 0.4, label="characters")
    mid.set_xticks(list(x), names, rotation=35, ha="right", fontsize=7)
    mid.set_ylim(0, 105)
    mid.set_title("dense text")
    mid.legend(fontsize=7)
    for a in scored:
        if a["scores"].get("frames"):
            rows = a["scores"]["frames"]
            right.plot([r["frames"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=a["name"])
    _recall_axes(right, "frames", "accuracy against frames, with and without Stage III")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _recall_axes(ax, xlabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("recall accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:  # a report with nothing scored (a gated or cut run) draws no lines
        ax.legend(fontsize=7)


README_BEGIN, README_END = "<!-- mechanisms results: begin -->", "<!-- mechanisms results: end -->"


MIXER_NAMES = {"gated_deltanet": "Gated DeltaNet", "gla": "GLA", "mamba2": "Mamba2", "kda": "KDA"}


def readme_block(report: dict) -> str:
    """What a user should take from a report, its numbers filled in: README's mechanisms block. The summary's
    lines always; with the report's rows, the arms side by side (mixers, shares, frames) and the students'
    schedule, so that a rerun rewrites the comparison and not only the headline."""
    s, window = report["summary"], report["config"]["sliding_window"]
    frames = s.get("stage3_gain_frames")
    train = report["config"].get("run", {}).get("train", {})
    steps = [train.get(k, {}).get("steps") for k in ("stage1a", "stage1b", "stage2", "stage3")]
    schedule = (f"; students trained {steps[0]} + {steps[1]} + {steps[2]} steps (I-a, I-b, II), Stage III "
                f"{steps[3]}" if all(steps) else "")
    lines = [
        README_BEGIN,
        f"Measured on {report['device']}, {report['date'][:10]}, commit {report['commit']}"
        + (" (the CPU smoke test: tiny sizes, not evidence)" if report["config"]["tiny"] else "") + schedule + ":",
        f"- the teacher recalls {_f(s['teacher_recall'])}% of keys and reads {_f(s['teacher_text'])}% of the strings "
        "exactly;",
        f"- past the {window}-token window the all-sliding student recalls {_f(s['swa_only_recall_beyond_window'])}%, "
        f"the default hybrid (1/4 Gated DeltaNet) {_f(s['hybrid_recall_beyond_window'])}% "
        f"(teacher {_f(s['teacher_recall_beyond_window'])}%, retention {_r(s['hybrid_recall_retention'])});",
        f"- the all-linear student reads {_f(s['linear_only_text'])}% of the strings exactly, the hybrid "
        f"{_f(s['hybrid_text'])}% (retention {_r(s['hybrid_text_retention'])}; the goal is "
        f"{s['goal_retention']} on both tasks);",
        f"- Stage III changes recall at {frames} frames by {_f(s['stage3_gain_1024_frames'])} points;",
        *_arm_lines(report),
        *_reach_line(report, window),
        f"- the goal: {_goal(s)}.",
        "Per-arm tables (every mixer and share): `bench/results/mechanisms.md`; plots: `mechanisms.png`.",
        README_END]
    return "\n".join(lines)


def _text_reach(report: dict) -> dict:
    """The text questions' distances of the report (the same prompt and pictures for every arm: the first)."""
    return next((a["scores"]["text"]["distances"] for a in report.get("rows", [])
                 if (a.get("scores") or {}).get("text", {}).get("distances")), {})


def _goal(s: dict) -> str:
    kept = [s.get("hybrid_recall_retention"), s.get("hybrid_text_retention")]
    if any(k is None for k in kept):
        return "not judged: the hybrid or the teacher was not scored"
    verdict = "met" if min(kept) >= s["goal_retention"] else "not met"
    return (f"{verdict}: the default hybrid keeps {_r(kept[0])} of the teacher's recall past the window and "
            f"{_r(kept[1])} of its exact text (goal {s['goal_retention']} on both)")


def _reach_line(report: dict, window: int) -> list[str]:
    reach = _text_reach(report)
    if not reach:
        return []
    return [f"- {reach['past_window']} of the {reach['n']} text questions ask for a line whose first character "
            f"sits past the {window}-token window ({reach['min']}-{reach['max']} tokens back): no window alone reads "
            "those;"]


def _arm_lines(report: dict) -> list[str]:
    """The arms side by side, from the report's rows: recall past the window by mixer (at the default share),
    text and recall by sliding share, and the hybrid's recall against frames with and without Stage III."""
    rows = {a["name"]: a for a in report.get("rows", []) if a.get("scores")}
    if not rows:
        return []
    out, hybrid = [], f"share={DEFAULT_SHARE}"
    mixers = [(MIXER_NAMES.get(a["linear_mixer"], a["linear_mixer"]), a["recall_beyond_window"])
              for name, a in rows.items() if name == hybrid or name.startswith("mixer=")]
    if len(mixers) > 1:
        mixers.sort(key=lambda m: -(m[1] or 0))
        out.append(f"- recall past the window by linear mixer (at {DEFAULT_SHARE}): "
                   + ", ".join(f"{n} {_f(v)}%" for n, v in mixers) + ";")
    shares = sorted((Fraction(a["share"]), a) for name, a in rows.items()
                    if name.startswith("share=") and "Stage III" not in name)
    if len(shares) > 1:
        shares.reverse()  # all sliding first
        out.append(f"- by sliding share ({', '.join(str(share) for share, _ in shares)}): text characters read "
                   + ", ".join(_f(a["scores"]["text"]["char_accuracy"]) for _, a in shares) + "% (exact strings "
                   + ", ".join(_f(a["scores"]["text"]["exact"]) for _, a in shares) + "%); recall past the window "
                   + ", ".join(_f(a["recall_beyond_window"]) for _, a in shares) + "%;")
    curves = [(label, rows[name]["scores"].get("frames")) for label, name in
              (("without Stage III", hybrid), ("with it", f"{hybrid} + Stage III")) if name in rows]
    curves = [(label, c) for label, c in curves if c]
    if curves:
        out.append("- the hybrid's recall against frames, " + "; ".join(
            f"{label} {_f(c[0]['accuracy'])}% at {c[0]['frames']} and {_f(c[-1]['accuracy'])}% at {c[-1]['frames']}"
            for label, c in curves) + ";")
    return out


def update_readme(report: dict, readme: str = "README.md") -> None:
    """Rewrites the block between README_BEGIN and README_END of `readme` from `report`."""
    text = Path(readme).read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_BEGIN} ... {README_END} block to fill")
    head, rest = text.split(README_BEGIN, 1)
    Path(readme).write_text(head + readme_block(report) + rest.split(README_END, 1)[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/mechanisms.yaml", help="the base run config (GPU-sized)")
    p.add_argument("--tiny", action="store_true", help="shrink it to a CPU smoke test")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config overrides")
    p.add_argument("--sweep", default="", help='JSON overriding the scored sweep (pipeline.eval.mechanisms.'
                                               'MechanismsConfig), e.g. \'{"recall_samples": 8}\'')
    p.add_argument("--root", default="runs/mechanisms", help="run roots: <root>/main, <root>/<variant>")
    p.add_argument("--out", default="bench/results", help="where <config name>.json, .md, .png go")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids: one worker each (0,0,0,0: four on one GPU)")
    p.add_argument("--runner", choices=("auto", "flows", "direct"), default="auto",
                   help="flows: the Prefect flow; direct: the same stage calls without Prefect; auto: flows if installed")
    p.add_argument("--no-variants", dest="variants", action="store_false", help="the main run only")
    p.add_argument("--arms", default="", help="only these variants, comma-separated (e.g. share=0,mixer=gla)")
    p.add_argument("--warm", action=argparse.BooleanOptionalAction, default=None,
                   help="a kernel warm-up beside the teacher: a throwaway chain under <root>/warm that compiles and "
                        "autotunes the students' kernels while the teacher trains (default: on a GPU, not --tiny)")
    p.add_argument("--min-teacher", type=float, default=None, metavar="PERCENT",
                   help=f"distil only a teacher that scores at least this held out (default {MIN_TEACHER:g}; 0 with "
                        "--tiny, whose teacher learns nothing in its few steps)")
    p.add_argument("--readme", metavar="REPORT_JSON", help="fill README.md's mechanisms block from a report "
                                                          "(e.g. bench/results/mechanisms.json) and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.readme:
        update_readme(json.loads(Path(args.readme).read_text()))
        return
    run(args)


if __name__ == "__main__":
    main()
