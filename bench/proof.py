"""The transfer proof (issue #9): does the pipeline carry a teacher's capability over to the hybrid student?

We cannot download Qwen2.5-VL, so the teacher is a small Qwen2.5-VL (the real transformers code path) that
the teacher stage trains on the sample-data pictures (`teacher.train`, pipeline/teacher_train.py) until it
answers held-out questions. Then the pipeline runs on it as on a real teacher: data → teacher logits →
Stage I-a → I-b → II → III. The held-out `pictures` suite (the same questions, prompts, greedy decoding and
exact-match scoring) scores the teacher and every stage's export; retention = student / teacher.

Ablations (the paper's): the linear mixer (Gated DeltaNet, GLA, Mamba2) at the default 1/4 sliding share,
and the sliding share (0, 1/8, 1/4, 1/2) with Gated DeltaNet, each through Stages I-a → I-b → II, scored
the same way. They reuse the main run's teacher, data and logits (linked into their run roots, where the
fingerprints find them committed) and run in parallel, one worker process per GPU.

    python -m bench.proof --gpus 0,1                 # configs/proof.yaml on two GPUs (--gpus 0,0,0,0: four
                                                     # workers sharing one GPU; the models are small)
    python -m bench.proof --config configs/proof_cpu.yaml --runner direct   # the CPU-scale recipe (~1 h)
    python -m bench.proof --tiny                     # the CPU smoke test of the same recipe
    python -m bench.proof --tiny --no-ablations --out /tmp/proof

Stages run through the Prefect flow (`flows.pipeline.infinitevl`, what `infinitevl run` calls) when Prefect
is installed, else through the same stage calls without Prefect (`--runner direct`: pipeline/
is callable without Prefect): same fingerprints, skips, markers and outputs. Writes
`<out>/<config name>.json` (the results contract of docs/benchmarks.md), `.md` and `.png`: proof.* for configs/proof.yaml (the
GPU recipe), proof_cpu.* for configs/proof_cpu.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

from bench.common import provenance
from pipeline import storage
from pipeline.config import RunConfig, config_from_dict, load_config, to_yaml
from pipeline.eval.metrics import retention
from pipeline.stages import STAGE_ORDER, TRAINING_STAGES, committed, stage_dir

SHARED = ("teacher", "data", "teacher-logits")
ABLATION_STAGES = ("stage1a", "stage1b", "stage2")
MIXERS = ("gated_deltanet", "gla", "mamba2")  # the paper's mixer ablation (model.mixer_names() has more)
SHARES = (Fraction(0), Fraction(1, 8), Fraction(1, 4), Fraction(1, 2))
DEFAULT_SHARE = Fraction(1, 4)

# The CPU smoke test: the same recipe at a size that runs in a few minutes on two cores.
TINY = {
    "teacher.train.steps": 150, "teacher.train.batch_size": 16, "teacher.train.lr": 2e-3,
    "teacher.train.warmup_steps": 20, "teacher.train.hidden": 128, "teacher.train.num_layers": 8,
    "teacher.train.heads": 4, "teacher.train.intermediate": 256, "teacher.train.vision_hidden": 64,
    "teacher.train.vision_depth": 2, "teacher.train.precision": "fp32", "teacher.train.target_accuracy": None,
    "teacher.train.eval_pictures": 16, "teacher.train.loader_workers": 0, "teacher.train.max_seconds": None,
    "data.distill.max_samples": 64, "data.instruct.max_samples": 64, "data.long.max_samples": 4,
    "data.distill.seq_len": 512, "data.instruct.seq_len": 512, "data.long.seq_len": 2048,
    "data.shard_tokens": 16384, "data.workers": 1, "teacher_logits.top_k": 16, "teacher_logits.batch_size": 4,
    **{f"train.{s}.{k}": v for s in ABLATION_STAGES for k, v in
       {"steps": 4, "seq_len": 512, "micro_batch_size": 1, "checkpoint_every": 4, "precision": "fp32",
        "warmup_steps": 0, "loader_workers": 0}.items()},  # a loader process only competes on a CPU run: see tiny.yaml
    "train.stage3.steps": 2, "train.stage3.loader_workers": 0, "train.stage3.seq_len": 2048,
    "train.stage3.checkpoint_every": 2, "train.stage3.precision": "fp32",
}


# -- configs ----------------------------------------------------------------------------------------------------
def base_config(config: str, tiny: bool, overrides: list[str], root: str) -> RunConfig:
    """The recipe's run config: `config`, shrunk by TINY with --tiny, then the user's overrides."""
    raw = load_config(config).model_dump(mode="json")
    items = [f"{k}={json.dumps(v)}" for k, v in TINY.items()] if tiny else []
    items += [f"run.root={root}/main", *overrides]
    return config_from_dict(raw, items, origin=config)


def layer_types(share: Fraction, num_layers: int) -> list[str]:
    """`student.layer_types` for a sliding-window share: one sliding layer, then linear ones, per period of
    1/share layers (share 0: every layer linear)."""
    if share == 0:
        return ["linear_attention"] * num_layers
    period = int(1 / share)
    if 1 / share != period:
        raise ValueError(f"sliding share {share} is not 1/n")
    if num_layers % period:
        raise ValueError(f"sliding share {share} does not divide the teacher's {num_layers} layers")
    return ["sliding_attention" if i % period == 0 else "linear_attention" for i in range(num_layers)]


def variants(cfg: RunConfig) -> list[dict]:
    """The ablation rows: name, the student fields it sets, and the share/mixer it stands for."""
    num_layers = cfg.teacher.train.num_layers if cfg.teacher.train else None
    rows = []
    for mixer in MIXERS:
        rows.append({"name": f"mixer={mixer}", "ablation": "linear_mixer", "linear_mixer": mixer,
                     "share": str(DEFAULT_SHARE), "student": {"linear_mixer": mixer, "layer_period": 4}})
    for share in SHARES:
        row = {"name": f"share={share}", "ablation": "sliding_share", "linear_mixer": "gated_deltanet",
               "share": str(share)}
        try:
            row["student"] = {"linear_mixer": "gated_deltanet", "layer_types": layer_types(share, num_layers or 8)}
        except ValueError as e:
            row["error"] = str(e)
        rows.append(row)
    return rows


def variant_config(cfg: RunConfig, variant: dict, root: str) -> RunConfig:
    raw = cfg.model_dump(mode="json")
    raw["student"].update(variant["student"])
    raw["run"]["root"] = f"{root}/{slug(variant['name'])}"
    raw["run"]["stages"] = list(ABLATION_STAGES)
    types = variant["student"].get("layer_types", ["sliding_attention", "linear_attention"])
    # a student without sliding layers (share 0) or without linear ones (share 1) has nothing in that group,
    # which a stage rightly refuses; a stage left with no group trains the attention the student has
    absent = {g for g, t in (("sliding_attn", "sliding_attention"), ("linear_attn", "linear_attention")) if t not in types}
    for stage in ABLATION_STAGES[1:]:  # Stage I-a aligns the linear mixers, whatever the student has
        kept = [g for g in raw["train"][stage]["trainable"] if g not in absent]
        raw["train"][stage]["trainable"] = kept or [{"sliding_attention": "sliding_attn"}.get(types[0], "linear_attn")]
    return config_from_dict(raw, origin=variant["name"])


def slug(name: str) -> str:
    return name.replace("=", "-").replace("/", "_")


def is_main_variant(variant: dict, cfg: RunConfig) -> bool:
    """The ablation row the main run already is (same student fields): its stages are not run twice."""
    from pipeline.train.objectives import student_overrides

    fields = variant.get("student")
    if fields is None:
        return False
    num_layers = cfg.teacher.train.num_layers if cfg.teacher.train else 8
    variant_student = cfg.student.model_copy(update=fields)
    # compared as built: layer_types spelled out equals the layer_period pattern it spells
    return student_overrides(variant_student, num_layers) == student_overrides(cfg.student, num_layers)


# -- running stages ---------------------------------------------------------------------------------------------
def run_stages(config_path: str, names: list[str], runner: str) -> None:
    """The stages through the Prefect flow, or through the same calls without Prefect."""
    if runner == "flows":
        from flows.pipeline import infinitevl

        infinitevl(config_path, stages=names)
        return
    import logging

    from pipeline.plan import check_plan, preflight, run_stage

    cfg = load_config(config_path)
    log = logging.getLogger("infinitevl.proof")
    names = check_plan(cfg, names)
    preflight(cfg, names)
    for name in names:
        outcome = run_stage(cfg, name, log)
        print(f"  {name}: {outcome.status} in {outcome.duration_s:.1f}s", flush=True)


def pick_runner(runner: str) -> str:
    if runner != "auto":
        return runner
    try:
        import prefect  # noqa: F401
    except ImportError:
        return "direct"
    return "flows"


def write_config(cfg: RunConfig) -> str:
    root = Path(cfg.run.root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "proof_config.yaml"
    path.write_text(to_yaml(cfg))
    return str(path)


def link_shared(main_root: str, variant_root: str) -> None:
    """The variant reads the main run's teacher, data and logits: the same config sections, so the same
    fingerprints, and the stages find them committed."""
    os.makedirs(variant_root, exist_ok=True)
    for name in SHARED:
        link = os.path.join(variant_root, name)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(main_root, name)), link)


# -- scoring ----------------------------------------------------------------------------------------------------
def score(checkpoint: str, n_pictures: int, out_dir: str, kinds=None, max_frames: int = 64) -> dict:
    """Held-out accuracy (percent, overall and per kind) of a Hugging Face-format checkpoint."""
    import torch

    from pipeline.eval.api import load_checkpoint
    from pipeline.teacher_train import score_pictures

    model, processor = load_checkpoint(checkpoint)
    scores = score_pictures(model, processor, n_pictures, out_dir, kinds=kinds, max_frames=max_frames)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return scores


def score_checkpoint(checkpoint: str, job: dict, out_dir: str, cfg: RunConfig) -> dict:
    """A job's score of one checkpoint: `accuracy` (the headline, percent) and the details. Each bench that runs
    jobs names its own in the job's `scorer` (a module with this function); this is the proof's."""
    frames = cfg.teacher.train.max_frames if cfg.teacher.train else 64
    acc = score(checkpoint, job["eval_pictures"], out_dir, cfg.picture_kinds, frames)
    return {"accuracy": acc["pictures"], "by_kind": acc}


def stage_tokens(stage_dir: str) -> int | None:
    """Tokens the stage trained on: the sum over its logged steps (`logs/steps.jsonl`); None where it logged none."""
    path = os.path.join(stage_dir, "logs", "steps.jsonl")
    if not os.path.exists(path):
        return None
    return sum(int(r.get("tokens", 0) or 0) for r in storage.read_jsonl(path))


SCORES = "scores.json"


def cached_score(eval_dir: str, marker: dict, job: dict, score) -> dict:
    """`score()`, or the scores an earlier run of this root committed for the same checkpoint (the stage's output
    digest) under the same scoring settings: a run resumed after a cut scores only what it had not scored yet."""
    settings = {k: v for k, v in job.items() if k not in ("name", "config", "stages", "runner", "score_stages")}
    key = {"digest": marker.get("digest"), "settings": settings}
    path = os.path.join(eval_dir, SCORES)
    kept = storage.read_json_or_none(path)
    if key["digest"] is not None and kept is not None and kept.get("key") == json.loads(json.dumps(key)):
        return kept["scores"]
    scores = score()
    storage.write_json(path, {"key": key, "scores": scores})  # after scoring, whole: a cut leaves none
    return scores


def run_job(job: dict, result_path: Path | None = None) -> dict:
    """One worker's job: each stage, and the score of each stage in `score_stages` (default: the teacher in the
    main job, every student stage) by the job's `scorer` module. The result is rewritten after every score, so
    a run cut short (a time limit, a kill) keeps what it measured."""
    import importlib

    start = time.time()
    cfg = load_config(job["config"])
    result = {"name": job["name"], "stages": {}, "seconds": None}
    scorer = importlib.import_module(job.get("scorer", "bench.proof")).score_checkpoint
    scored = job.get("score_stages") or [*(["teacher"] if job["name"] == "main" else []), *TRAINING_STAGES]

    def score_stage(stage: str) -> None:
        t0 = time.time()
        marker = committed(stage_dir(cfg.run.root, stage)) or {}
        out = marker.get("output", os.path.join(cfg.run.root, stage))
        checkpoint = out if stage == "teacher" else os.path.join(out, "export")
        metrics = marker.get("metrics", {})
        tokens = metrics.get("train_tokens") if stage == "teacher" else stage_tokens(out)
        eval_dir = os.path.join(cfg.run.root, "proof-eval", stage)
        scores = cached_score(eval_dir, marker, job, lambda: scorer(checkpoint, job, eval_dir, cfg))
        result["stages"][stage] = {**scores, "tokens": tokens, "seconds": round(marker.get("duration_s", 0.0), 1),
                                   "loss": metrics.get("loss")}
        result["seconds"] = round(time.time() - start, 1)
        if result_path is not None:
            storage.write_json(str(result_path), result)
        print(f"[{job['name']}] {stage}: held-out accuracy {scores['accuracy']:.1f}% (scored in "
              f"{time.time() - t0:.0f} s)", flush=True)

    # the scorer thread and this one would otherwise import transformers' lazy modules at once, which can fail
    # ("cannot import name 'AutoConfig'"): everything both use is imported here, before the thread starts
    import model  # noqa: F401
    import pipeline.data.loader  # noqa: F401
    import pipeline.eval.api  # noqa: F401
    import pipeline.teacher_train  # noqa: F401

    scoring = InOrder()  # a stage's score runs while the next stage trains: the GPU has room for both
    for stage in job["stages"]:
        run_stages(job["config"], [stage], job["runner"])  # committed stages (the shared ones) are skipped
        if stage in scored:
            scoring.submit(lambda stage=stage: score_stage(stage))
    scoring.wait()
    result["seconds"] = round(time.time() - start, 1)
    return result


class InOrder:
    """Runs calls one at a time, in the order submitted, on a thread of its own; `wait` re-raises the first
    error (the calls after it are dropped). A daemon thread: a job cut short does not wait for a score."""

    def __init__(self):
        self._calls: queue.Queue = queue.Queue()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name="proof-scorer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (call := self._calls.get()) is not None:
            if self._errors:
                continue
            try:
                call()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                self._errors.append(e)

    def submit(self, call) -> None:
        self._calls.put(call)

    def wait(self) -> None:
        self._calls.put(None)
        self._thread.join()
        if self._errors:
            raise self._errors[0]


# -- the recipe -------------------------------------------------------------------------------------------------
def run_jobs(main_path: str, jobs: list[dict], runner: str, jobs_dir: Path, gpus: list,
             started: float, teacher_gate=None, warm: tuple | None = None) -> tuple[dict, dict, str | None]:
    """The shared stages (teacher, data, teacher logits of `main_path`) on the first GPU, then `jobs` on one
    worker per entry of `gpus`. Returns (results, failures, why it was cut short or None): cut short by SIGTERM
    or ^C, the results are what the jobs had scored. `teacher_gate()`, called once the teacher is committed, may
    return why the run should go no further: then nothing else runs and failures holds it under "teacher".
    `warm`: (config path, jobs, jobs folder) of a throwaway chain run beside the shared stages (`warm_up`)."""
    for job in jobs:  # a result left by an earlier run of this root is not this run's
        (jobs_dir / f"{slug(job['name'])}.result.json").unlink(missing_ok=True)
    interrupted = None
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)  # `timeout`, a scheduler's kill
    try:
        _log_phase(started, "teacher, data and teacher logits")
        warming = None
        if warm is not None:
            warming = threading.Thread(target=warm_up, args=(*warm, runner, gpus, started), daemon=True)
            warming.start()
        if teacher_gate is not None:
            _spawn({"name": "teacher", "config": main_path, "stages": ["teacher"], "runner": runner, "score": False},
                   jobs_dir, gpus[0])  # its own log: the next spawn's would write over it
            why = teacher_gate()
            if why:
                print(why, flush=True)
                _stop_children()  # the warm-up's, if still running
                return {}, {"teacher": why}, None
        _spawn(_shared_job(main_path, runner), jobs_dir, gpus[0])
        if warming is not None and warming.is_alive():
            _log_phase(started, "waiting for the kernel warm-up")
            warming.join()
        _log_phase(started, f"{len(jobs)} student runs on {len(gpus)} worker(s)")
        results, failures = _run_parallel(jobs, jobs_dir, gpus, started)
    except (Interrupted, KeyboardInterrupt) as e:
        interrupted = (f"cut short after {time.time() - started:.0f} s ({type(e).__name__}): "
                       "stages not scored are missing")
        _stop_children()
        results, failures = _partial_results(jobs, jobs_dir), {}
        print(f"{interrupted}; reporting what was scored", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results, failures, interrupted


def run(args: argparse.Namespace) -> dict:
    started = time.time()
    runner = pick_runner(args.runner)
    root = os.path.abspath(args.root)
    cfg = base_config(args.config, args.tiny, args.set, root)
    if cfg.teacher.train is None:
        raise SystemExit(f"{args.config}: teacher.train is not set; the proof trains the tiny teacher")
    main_cfg = config_from_dict(cfg.model_dump(mode="json"),
                                [f"run.stages={json.dumps([s for s in STAGE_ORDER if s != 'eval'])}"])
    rows = variants(cfg) if args.ablations else []
    jobs_dir = Path(root) / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    gpus = [g for g in args.gpus.split(",") if g] if args.gpus else [None]
    eval_pictures = args.eval_pictures
    print(f"proof: runner {runner}, run root {root}, {len(gpus)} worker(s), {len(rows)} ablation rows", flush=True)

    main_path = write_config(main_cfg)
    jobs = [{"name": "main", "config": main_path, "stages": ["teacher", *TRAINING_STAGES], "runner": runner,
             "eval_pictures": eval_pictures}]
    for row in rows:
        if "error" in row or is_main_variant(row, main_cfg):
            continue
        vcfg = variant_config(main_cfg, row, root)
        link_shared(main_cfg.run.root, vcfg.run.root)
        jobs.append({"name": row["name"], "config": write_config(vcfg), "stages": list(ABLATION_STAGES),
                     "runner": runner, "eval_pictures": eval_pictures})
    results, failures, interrupted = run_jobs(main_path, jobs, runner, jobs_dir, gpus, started)

    report = build_report(args, cfg, runner, rows, results, failures, time.time() - started)
    if interrupted:
        report["interrupted"] = interrupted
    write_report(report, args.out, report_name(args.config))
    print(json.dumps(report["summary"], indent=2))
    if "main" in failures:
        raise SystemExit(f"the main run failed: {failures['main']}")
    return report


def build_report(args, cfg: RunConfig, runner: str, rows: list[dict], results: dict, failures: dict,
                 seconds: float) -> dict:
    main = results.get("main", {}).get("stages", {})
    teacher = main.get("teacher", {}).get("accuracy")
    stages = []
    for stage in ("teacher", *TRAINING_STAGES):
        if stage in main:
            s = main[stage]
            stages.append({"stage": stage, "accuracy": s["accuracy"], "retention": retention(s["accuracy"], teacher)
                           if stage != "teacher" else 1.0 if teacher else None, "tokens": s["tokens"],
                           "seconds": s["seconds"], "by_kind": s["by_kind"]})
    ablations = []
    for row in rows:
        out = {k: row[k] for k in ("name", "ablation", "linear_mixer", "share")}
        source = "main" if is_main_variant(row, cfg) else row["name"]
        if "error" in row:
            out["error"] = row["error"]
        elif source in failures:
            out["error"] = failures[source]
        elif "stage2" not in results.get(source, {}).get("stages", {}):
            out["error"] = "not scored: the run was cut short before its Stage II was scored"
        else:
            acc = results[source]["stages"]["stage2"]["accuracy"]
            out.update(accuracy_stage2=acc, retention_stage2=retention(acc, teacher))
        ablations.append(out)
    by_stage = {s["stage"]: s for s in stages}
    student2 = by_stage.get("stage2", {}).get("accuracy")
    final = by_stage.get("stage3", {}).get("accuracy")
    summary = {"teacher_acc": teacher, "student_acc_stage2": student2, "retention_stage2": retention(student2, teacher),
               "student_acc_final": final, "retention_final": retention(final, teacher),
               "goal_retention_stage2": 0.95,
               "teacher_acc_goal_met": teacher is not None and teacher >= 90.0}
    return {"bench": "proof", **provenance(), "config": {"config": args.config, "tiny": args.tiny, "overrides": args.set,
                                            "runner": runner, "gpus": args.gpus, "eval_questions": 2 * args.eval_pictures,
                                            "run": cfg.model_dump(mode="json")},
            "rows": stages, "ablations": ablations, "failures": failures, "seconds": round(seconds, 1),
            "summary": summary}


def report_name(config: str) -> str:
    """The report's file stem: the recipe's config name (proof, proof_cpu, ...), so that the GPU and the CPU
    recipes' results sit side by side in bench/results."""
    return Path(config).stem


def write_report(report: dict, out: str, name: str = "proof", to_markdown=None, to_plot=None) -> None:
    """<out>/<name>.json, .md (`to_markdown`, default this bench's table) and .png (`to_plot`)."""
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, name)
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write((to_markdown or markdown)(report))
    try:
        (to_plot or plot)(report, base + ".png")
    except ImportError as e:  # matplotlib absent: the JSON and the table still stand
        print(f"no plot: {e}")
    print(f"report: {base}.json, {name}.md, {name}.png")


def _fmt(v, pct: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" if pct else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    lines = [f"# Transfer proof ({report['device']}, {report['date']}, commit {report['commit']})", "",
             "Held-out accuracy on the `pictures` suite (exact match, percent); retention = student / teacher.", "",
             "| stage | accuracy | retention | tokens | time (s) |", "|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['stage']} | {_fmt(r['accuracy'], True)} | {_fmt(r['retention'])} | {_fmt(r['tokens'])} "
                     f"| {_fmt(r['seconds'])} |")
    lines += ["", "Ablations (Stages I-a → I-b → II; retention after Stage II):", "",
              "| ablation | linear mixer | sliding share | accuracy | retention |", "|---|---|---|---|---|"]
    for a in report["ablations"]:
        if "error" in a:
            lines.append(f"| {a['ablation']} | {a['linear_mixer']} | {a['share']} | failed: {a['error'][:160]} | – |")
        else:
            lines.append(f"| {a['ablation']} | {a['linear_mixer']} | {a['share']} | {_fmt(a['accuracy_stage2'], True)} "
                         f"| {_fmt(a['retention_stage2'])} |")
    return "\n".join(lines + closing_lines(report, _fmt))


def closing_lines(report: dict, fmt) -> list[str]:
    """A report's last lines in markdown: what cut it short, if anything, and its summary."""
    lines = ["", f"**Incomplete:** {report['interrupted']}."] if report.get("interrupted") else []
    return lines + ["", "Summary: " + ", ".join(f"{k} {fmt(v)}" for k, v in report["summary"].items()), ""]


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [a for a in report["ablations"] if "error" not in a]
    fig, axes = plt.subplots(1, 2 if ok else 1, figsize=(11 if ok else 6, 4), squeeze=False)
    left = axes[0][0]
    rows = report["rows"]
    bars = left.bar([r["stage"] for r in rows], [r["accuracy"] for r in rows],
                    color=["gray"] + ["tab:blue"] * (len(rows) - 1))
    left.bar_label(bars, fmt="%.1f")
    teacher = report["summary"].get("teacher_acc")
    if teacher:  # the goal: the student keeps 95% of what the teacher answers
        left.axhline(0.95 * teacher, color="k", ls="--", lw=1, label="95% of the teacher")
        left.legend(loc="lower right")
    left.set_ylabel("held-out accuracy (%)")
    left.set_ylim(0, 105)
    left.set_title("teacher and student after each stage")
    if ok:
        right = axes[0][1]
        right.bar([a["name"] for a in ok], [a["retention_stage2"] or 0 for a in ok], color="tab:orange")
        right.axhline(0.95, color="k", ls="--", lw=1)
        right.set_ylabel("retention after Stage II")
        right.set_title("ablations")
        right.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- workers ----------------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """SIGTERM reached the proof's parent process."""


def _raise_interrupted(signum, frame):
    # once: `timeout` signals the whole process group and the parent then stops its jobs too; a second
    # SIGTERM raised inside the launcher's clean-up would cut that clean-up short
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted()


_children: set = set()  # running job processes, stopped when the proof is cut short


def _stop_children() -> None:
    for child in list(_children):
        child.terminate()
    for child in list(_children):
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()


def _partial_results(jobs: list[dict], jobs_dir: Path) -> dict:
    """The results the jobs had written when the run was cut short (each rewritten after every score)."""
    results = {}
    for job in jobs:
        path = jobs_dir / f"{slug(job['name'])}.result.json"
        if path.exists():
            results[job["name"]] = json.loads(path.read_text())
    return results


def _spawn(job: dict, jobs_dir: Path, gpu: str | None, workers: int = 1) -> dict:
    """Runs one job in a child process (on `gpu` when given; its CPU threads a `workers`-th of the cores, as many
    jobs run at once); returns its result or raises with its log."""
    from pipeline.launch import thread_env

    path = jobs_dir / f"{slug(job['name'])}.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, **thread_env(workers)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log_path = jobs_dir / f"{slug(job['name'])}.log"
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, "-m", "bench.proof", "--job", str(path)], env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        _children.add(child)
        code = child.wait()  # interrupted: the child stays in _children for _stop_children
        _children.discard(child)
    if code != 0:
        tail = log_path.read_text()[-2000:]
        raise RuntimeError(f"job {job['name']} failed (exit {code}); log {log_path}:\n{tail}")
    result_path = path.with_suffix(".result.json")
    return json.loads(result_path.read_text()) if result_path.exists() else {}


def _run_parallel(jobs: list[dict], jobs_dir: Path, gpus: list, started: float) -> tuple[dict, dict]:
    pending: queue.Queue = queue.Queue()
    for job in jobs:
        pending.put(job)
    results, failures, lock = {}, {}, threading.Lock()
    durations: list[float] = []

    def worker(gpu):
        while True:
            try:
                job = pending.get_nowait()
            except queue.Empty:
                return
            t0 = time.time()
            try:
                result = _spawn(job, jobs_dir, gpu, workers=len(gpus))
                with lock:
                    results[job["name"]] = result
            except RuntimeError as e:
                with lock:
                    failures[job["name"]] = str(e).splitlines()[0] + " " + str(e).splitlines()[-1][:300]
                print(str(e), flush=True)
            with lock:
                durations.append(time.time() - t0)
                done = len(results) + len(failures)
                left = len(jobs) - done
                eta = (sum(durations) / len(durations)) * -(-left // len(gpus)) if left else 0
                print(f"[{time.time() - started:.0f}s] {job['name']} finished on "
                      f"{'GPU ' + gpu if gpu is not None else 'CPU'} in {time.time() - t0:.0f}s; {done}/{len(jobs)} "
                      f"done, ETA {eta:.0f}s", flush=True)

    threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, failures


def _shared_job(main_path: str, runner: str) -> dict:
    """The job of a chain's shared stages (teacher, data, teacher logits), unscored."""
    return {"name": "shared", "config": main_path, "stages": list(SHARED), "runner": runner, "score": False}


def warm_up(main_path: str, jobs: list[dict], jobs_dir: Path, runner: str, gpus: list, started: float) -> None:
    """Runs a throwaway chain (its own root: a teacher of a few steps, a few samples, a few steps a stage, the
    students' shapes) while the real teacher trains: its stages compile and autotune, into the node's caches, the
    kernels the students will call, which the students otherwise all do at once after the shared stages, each
    slowed by the others (on an H100, the GLA and KDA students' first step took 270 s among eight). A failure
    here only costs the time: the students compile what they lack themselves."""
    try:
        _spawn(_shared_job(main_path, runner), jobs_dir, gpus[0])
        _, failures = _run_parallel(jobs, jobs_dir, gpus[:len(jobs)], started)
    except Exception as e:  # noqa: BLE001 - reported, never fatal
        failures = {"shared": str(e).splitlines()[0]}
    _log_phase(started, "kernel warm-up done" + (f" (failed: {', '.join(sorted(failures))})" if failures else ""))


def _log_phase(started: float, what: str) -> None:
    print(f"[{time.time() - started:.0f}s] {what}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/proof.yaml", help="the base run config (GPU-sized)")
    p.add_argument("--tiny", action="store_true", help="shrink it to a CPU smoke test")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config overrides")
    p.add_argument("--root", default="runs/proof", help="run roots: <root>/main, <root>/<variant>")
    p.add_argument("--out", default="bench/results", help="where <config name>.json, .md, .png go")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids: one worker each (default: one worker)")
    p.add_argument("--runner", choices=("auto", "flows", "direct"), default="auto",
                   help="flows: the Prefect flow; direct: the same stage calls without Prefect; auto: flows if installed")
    p.add_argument("--no-ablations", dest="ablations", action="store_false")
    p.add_argument("--eval-pictures", type=int, default=64, help="held-out pictures scored (two questions each)")
    p.add_argument("--job", help=argparse.SUPPRESS)  # a worker process: runs one job file
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.job:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        job = json.loads(Path(args.job).read_text())
        # SIGTERM (the proof cut short) as an exception: the launcher then stops the stage's process group
        signal.signal(signal.SIGTERM, _raise_interrupted)
        if job.get("score") is False:
            run_stages(job["config"], job["stages"], job["runner"])
            return
        result_path = Path(args.job).with_suffix(".result.json")
        storage.write_json(str(result_path), run_job(job, result_path))
        return
    run(args)


if __name__ == "__main__":
    main()
