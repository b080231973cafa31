"""Scaling over several GPUs: DeepSpeed ZeRO-2/3 training and the sharded teacher-logit stage on 1, 2, 4, 8 GPUs.

    python3 -m bench.scaling --gpus 2                  # every N in 1, 2, 4, 8 up to 2 (or a list: --gpus 0,1,2,3)
    python3 -m bench.scaling --gpus 2 --zero 2 3 --stages stage2 stage3 --steps 4
    python3 -m bench.scaling --tiny --gpus 2 --out /tmp/r   # the same code on small shapes, CPU and gloo

What runs, for every GPU count N (one torchrun process group per N, bench/scaling_rank.py):
  teacher logits  the stage's own store code (pipeline.teacher_logits.store) over 8K-token packed rows of a
                  synthetic corpus, shards split over the N ranks; Qwen2.5-VL-3B shapes, random bf16 weights.
  Stage II        pipeline.train.worker (DeepSpeed engine, packed loader, answer cross-entropy) at 8K tokens
                  per rank and micro-batch, trainable [linear_attn, sliding_attn, mlp, norms, merger], ZeRO-2
                  and ZeRO-3, gradient checkpointing; the student (4.4B) built with random weights on each GPU
                  from a config (init_weights=random), so no checkpoint is written or read.
  Stage III       the same at 32K tokens with LoRA (r 64 on q/k/v/o/gate/up/down, dropout 0 so every GPU
                  count draws the same numbers).
Every N sees the same seed and the same global batch (max N packed rows a step: gradient accumulation
max_N / N), so the loss curves must agree across N; tokens/s is taken over the steps after --warmup.
Scaling efficiency at N = tokens/s at N / (N × tokens/s at 1).

Kill one rank: on N = max GPUs a short Stage II run (full widths, 4 decoder layers, checkpoints every 2
steps) has its last rank SIGKILLed after step 3; the job must exit non-zero in bounded time with torchrun
naming the dead rank. It is then resumed from the last committed checkpoint on max/2 GPUs (1 with 2),
converting the ZeRO state to DeepSpeed's universal layout for the new world size, and its losses must match
an uninterrupted run's (the `kill-reference` job, run with the others on max GPUs).

Environment of every launched process: NCCL_NVLS_ENABLE=0 (NVLink multicast off), and
INFINITEVL_LIFT_FLA_HOPPER_GUARD=1: fla 0.6 refuses the Gated DeltaNet backward on Hopper with Triton < 3.7.1;
with this our guard first runs a gradient check against the fp32 reference on that GPU and lifts it only
if it passes. TRITON_CACHE_AUTOTUNING=1 keeps fla's autotuning results on disk, so its first call (tens
of seconds) is paid once per machine, not once per GPU count.

Results: bench/results/scaling.json (+ scaling.png: tokens/s and efficiency against GPUs); with --tiny
only where --out says.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from bench.common import RESULTS, print_table, write_result
from pipeline import storage
from pipeline.launch import signal_group, torchrun_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE2_TRAINABLE = ["linear_attn", "sliding_attn", "mlp", "norms", "merger"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KILL_AFTER_STEP, KILL_STEPS, KILL_EVERY = 3, 6, 2


# -- shapes, corpora ---------------------------------------------------------------------------------------------

KILL_MODEL = ("Qwen2.5-VL-3B widths, 4 decoder layers (1 SWA + 3 GDN), 2 vision layers, vocabulary 32768; "
              "Stage II on the mixers (linear_attn, sliding_attn): small checkpoints, written every 2 steps")


def teacher_config(tiny: bool, processor, small: bool = False):
    """Qwen2.5-VL-3B shapes (or the tiny teacher's); `small`: the kill test's model (KILL_MODEL)."""
    if tiny:
        from model.tiny import tiny_teacher_config

        config = tiny_teacher_config(processor.tokenizer)
    else:
        from bench.param_count import qwen2_5_vl_3b_config

        config = qwen2_5_vl_3b_config()
        if small:
            config.text_config.num_hidden_layers, config.text_config.vocab_size = 4, 32768
            config.vision_config.depth, config.vision_config.fullatt_block_indexes = 2, [1]
    # the processor's special ids (the tiny tokenizer's): the teacher-logit stage checks they agree
    for name in ("image_token_id", "video_token_id"):
        setattr(config, name, getattr(processor, name))
        setattr(config.text_config, name, getattr(processor, name))
    for name in ("vision_start_token_id", "vision_end_token_id"):
        value = processor.tokenizer.convert_tokens_to_ids(
            "<|vision_start|>" if name == "vision_start_token_id" else "<|vision_end|>")
        if isinstance(value, int) and value >= 0:
            setattr(config, name, value)
    return config


def token_range(processor, vocab: int) -> tuple[int, int]:
    """Token ids the synthetic rows draw from: none of them special (no image or video placeholders)."""
    tok = processor.tokenizer
    special = set(tok.all_special_ids) | {processor.image_token_id, processor.video_token_id}
    if vocab > len(tok) + 1024:
        return len(tok), min(vocab, 151643)  # above the tokenizer's ids, below Qwen's specials
    return 0, min(special)


def write_corpus(root: str, name: str, n_rows: int, seq_len: int, ids: tuple[int, int], fingerprint: str,
                 seed: int, n_shards: int = 1) -> str:
    """Packed text rows of exactly seq_len tokens (documents of random lengths; the second half of each
    document is its answer), as Arrow shards with a manifest the loader and the teacher-logit stage read."""
    from pipeline.data.shards import encode_shard

    rng = np.random.default_rng(seed)
    out = os.path.join(root, name)
    os.makedirs(os.path.join(out, "shards"), exist_ok=True)
    shards, per_shard = [], [n_rows // n_shards + (i < n_rows % n_shards) for i in range(n_shards)]
    for s, count in enumerate(per_shard):
        rows = []
        for r in range(count):
            lens = []
            while sum(lens) < seq_len:
                lens.append(int(min(rng.integers(seq_len // 8, seq_len // 2 + 1), seq_len - sum(lens))))
            tokens = rng.integers(ids[0], ids[1], seq_len).tolist()
            labels, start = [], 0
            for n in lens:
                labels += [-100] * (n - n // 2) + tokens[start + n - n // 2:start + n]
                start += n
            rows.append({"input_ids": tokens, "labels": labels, "doc_lens": lens,
                         "sample_ids": [f"{name}-{s}-{r}-{d}" for d in range(len(lens))], "images": [],
                         "image_grid_thw": [], "videos": [], "video_grid_thw": [], "second_per_grid_ts": []})
        data = encode_shard(rows)
        file = f"shards/shard-{s:05d}.arrow"
        with open(os.path.join(out, file), "wb") as f:
            f.write(data)
        shards.append({"shard": s, "file": file, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                       "sequences": count,
                       "samples": sum(len(r["doc_lens"]) for r in rows), "tokens": count * seq_len,
                       "quarantined": 0})
    manifest = {"schema_version": 1, "name": name, "config_hash": f"synthetic-{name}-{seq_len}-{seed}",
                "processor_fingerprint": fingerprint, "config": {"processor": None}, "max_len": seq_len,
                "sequences": n_rows, "tokens": n_rows * seq_len, "shards": shards}
    path = os.path.join(out, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f)
    return path


def prepare(work: str, tiny: bool, counts: list[int], steps: int, stages: list[str], seed: int) -> dict:
    """The processor, the configs (no weights), and the synthetic corpora."""
    from model import InfiniteVLConfig
    from model.tiny import build_processor
    from pipeline.data.tokenize import processor_fingerprint

    processor = build_processor()
    fingerprint = processor_fingerprint(processor)
    paths = {}
    for name, small in (("teacher", False), ("kill-teacher", True)):
        config = teacher_config(tiny, processor, small)
        d = os.path.join(work, name)
        config.save_pretrained(d)
        processor.save_pretrained(d)
        student = os.path.join(work, name.replace("teacher", "student"))
        InfiniteVLConfig.from_teacher(config).save_pretrained(student)
        paths[name], paths[name.replace("teacher", "student")] = d, student
    vocab = teacher_config(tiny, processor).text_config.vocab_size
    ids = token_range(processor, vocab)
    top = max(counts)
    data = os.path.join(work, "data")
    for stage in stages:
        paths[stage] = write_corpus(data, stage, top * steps, SEQ[tiny][stage], ids, fingerprint, seed)
    kill_ids = token_range(processor, teacher_config(tiny, processor, small=True).text_config.vocab_size)
    paths["kill"] = write_corpus(data, "kill", top * KILL_STEPS, SEQ[tiny]["stage2"], kill_ids, fingerprint, seed + 1)
    rows = LOGIT_ROWS_PER_SHARD[tiny]
    paths["logits"] = write_corpus(data, "logits", top * 2 * rows, SEQ[tiny]["logits"], ids, fingerprint, seed + 2,
                                   n_shards=top * 2)
    paths["logits-warmup"] = write_corpus(data, "logits-warmup", top, SEQ[tiny]["logits"] // 4, ids, fingerprint,
                                          seed + 3, n_shards=top)
    return paths


SEQ = {False: {"stage2": 8192, "stage3": 32768, "logits": 8192}, True: {"stage2": 256, "stage3": 512, "logits": 256}}
LOGIT_ROWS_PER_SHARD = {False: 4, True: 2}


# -- jobs --------------------------------------------------------------------------------------------------------

def section(stage: str, tiny: bool, n: int, top: int, zero: int, steps: int, **over) -> dict:
    s = dict(steps=steps, lr=1e-4 if not tiny else 1e-3, warmup_steps=1, seq_len=SEQ[tiny][stage],
             micro_batch_size=1, grad_accum=top // n, trainable=STAGE2_TRAINABLE, checkpoint_every=steps,
             launcher="torchrun", nproc_per_node=n, deepspeed_config=None, precision="fp32" if tiny else "bf16",
             zero_stage=zero, grad_clip=1.0, weight_decay=0.0, min_lr_ratio=0.1, gradient_checkpointing=not tiny,
             keep_last=2, loader_workers=0)
    if stage == "stage3":
        r = 4 if tiny else 64
        s.update(trainable=["lora"], lora=dict(r=r, alpha=2 * r, dropout=0.0, target_modules=LORA_TARGETS, merge=True))
    s.update(over)
    return s


def train_job(paths: dict, stage: str, sec: dict, output: str, seed: int, kill: bool = False):
    """A throughput job takes no checkpoints and exports nothing; the kill-and-resume job checkpoints."""
    from pipeline.train.job import TrainJob

    return TrainJob(stage=stage, section=sec, student={}, init=paths["kill-student" if kill else "student"],
                    teacher=paths["kill-teacher" if kill else "teacher"], corpus=paths["kill" if kill else stage],
                    output=output, seed=seed, init_weights="random", checkpoints=kill, export=False)


def kill_section(tiny: bool, n: int, top: int, zero: int) -> dict:
    return section("stage2", tiny, n, top, zero, KILL_STEPS, checkpoint_every=KILL_EVERY,
                   trainable=["linear_attn", "sliding_attn"])


# -- launching ---------------------------------------------------------------------------------------------------

def environment(gpus: list[str], n: int, tiny: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "INFINITEVL_LIFT_FLA_HOPPER_GUARD": "1",
           "TRITON_CACHE_AUTOTUNING": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")  # the GPU hosts keep NVLink multicast off everywhere
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    env.setdefault("OMP_NUM_THREADS", "1" if tiny else "4")
    if not tiny:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[:n])
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class Run:
    """One launched process group: its output streamed with a prefix, a deadline, optionally a rank killed
    once a line appears."""

    def __init__(self, cmd: list[str], env: dict, label: str, timeout_s: float, log_path: str):
        self.cmd, self.env, self.label, self.timeout_s, self.log_path = cmd, env, label, timeout_s, log_path
        self.lines: list[str] = []
        self.killed_rank, self.killed_pid, self.killed_at, self.timed_out = None, None, None, False

    def run(self, kill_rank: int | None = None, kill_on: str | None = None) -> int:
        started = time.monotonic()
        proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                text=True, errors="replace", bufsize=1, start_new_session=True)
        timer = threading.Timer(self.timeout_s, self._expire, (proc,))
        timer.start()
        try:
            with open(self.log_path, "w") as log:
                for line in proc.stdout:
                    log.write(line)
                    self.lines.append(line.rstrip("\n"))
                    if _worth_showing(line):
                        print(f"  [{self.label} {time.monotonic() - started:6.1f}s] {line.rstrip()}", flush=True)
                    if kill_on and self.killed_rank is None and kill_on in line:
                        self.killed_pid = kill_worker(proc.pid, kill_rank)
                        self.killed_rank, self.killed_at = kill_rank, time.monotonic()
                        print(f"  [{self.label}] SIGKILL sent to rank {kill_rank} (pid {self.killed_pid})", flush=True)
            returncode = proc.wait()
        except BaseException:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            timer.cancel()
        signal_group(proc.pid, signal.SIGKILL)  # nothing of the group outlives it
        self.seconds = time.monotonic() - started
        self.exit_s = time.monotonic() - self.killed_at if self.killed_at else None
        return returncode

    def _expire(self, proc):
        self.timed_out = True
        print(f"  [{self.label}] over its {self.timeout_s:.0f} s limit: killing the process group", flush=True)
        signal_group(proc.pid, signal.SIGKILL)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


def _worth_showing(line: str) -> bool:
    keys = ("[bench.scaling]", " step ", "Error", "error", "Traceback", "resumed", "rank:", "exitcode", "lifted",
            "gradient check", "Signal", "Killed", "FAILED", "Hopper")
    return any(k in line for k in keys)


def kill_worker(torchrun_pid: int, rank: int) -> int:
    """SIGKILL to the worker process whose RANK is `rank` (torchrun's child); returns its pid."""
    import psutil

    for child in psutil.Process(torchrun_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "scaling_rank" in " ".join(child.cmdline()):
                os.kill(child.pid, signal.SIGKILL)
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise RuntimeError(f"no worker with RANK={rank} under torchrun pid {torchrun_pid}")


def launch_plan(work: str, name: str, n: int, tasks: list[dict], env: dict, timeout_s: float, **kill) -> Run:
    plan = os.path.join(work, f"plan-{name}.json")
    for task in tasks:
        if "job_obj" in task:
            task["job"] = os.path.join(work, f"job-{name}-{task['name']}.json")
            task.pop("job_obj").dump(task["job"])
    with open(plan, "w") as f:
        json.dump({"tasks": tasks}, f, indent=1)
    run = Run(torchrun_command("bench.scaling_rank", [plan], n), env, name, timeout_s, os.path.join(work, f"{name}.log"))
    run.returncode = run.run(**kill)
    return run


# -- reading results ---------------------------------------------------------------------------------------------

def read_steps(output: str) -> list[dict]:
    return storage.read_jsonl(os.path.join(output, "logs", "steps.jsonl"))


def train_row(stage: str, zero: int, n: int, top: int, seq: int, output: str, result: str, warmup: int) -> dict | None:
    steps = read_steps(output)
    if not steps:
        return None  # not run (yet), or cut short
    with open(result) if os.path.exists(result) else open(os.devnull) as f:
        meta = json.loads(f.read() or "{}")
    timed = [s for s in steps if s["step"] > warmup] or steps
    tokens_per_step = top * seq  # the global batch: max-N packed rows of seq tokens
    tps = tokens_per_step * len(timed) / sum(s["step_s"] for s in timed) if timed else float("nan")
    mem = max((s.get("peak_mem_gib") or 0.0) for s in steps) if steps else None
    per_rank = steps[-1].get("peak_mem_gib_per_rank") if steps else None
    return {"stage": stage, "zero": zero, "gpus": n, "seq_len": seq, "global_batch_rows": top, "grad_accum": top // n,
            "steps": len(steps), "tokens_per_s": round(tps, 1), "tokens_per_s_per_gpu": round(tps / n, 1),
            "mfu": None,
            "peak_mem_gib": round(mem, 2) if mem else None, "peak_mem_gib_per_rank": per_rank,
            "start_mem_gib": round(meta.get("baseline_gib", 0.0), 2), "wall_s": round(meta.get("wall_s", 0.0), 1),
            "losses": [round(s["loss"], 6) for s in steps], "device": meta.get("device")}


def flops(config_dir: str, seq: int, trains_weights: bool) -> float:
    from model import InfiniteVLConfig
    from bench.train_throughput import flops_per_token

    return flops_per_token(InfiniteVLConfig.from_pretrained(config_dir), "student", seq, mixers_trained=trains_weights)


def max_rel_diff(a: list[float], b: list[float]) -> float:
    if not a or len(a) != len(b):
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


# -- the bench ---------------------------------------------------------------------------------------------------

def gpu_counts(top: int) -> list[int]:
    return sorted({n for n in (1, 2, 4, 8) if n <= top and top % n == 0} | {top})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", default="2", help="the most GPUs to use: a count (2) or a list of ids (0,1,2,3)")
    ap.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=[2, 3])
    ap.add_argument("--stages", nargs="+", default=["stage2", "stage3"], choices=["stage2", "stage3"])
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per training run")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of tokens/s")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-zero", type=int, default=2, choices=[2, 3], help="ZeRO stage of the kill-one-rank run")
    ap.add_argument("--no-kill", action="store_true", help="skip the kill-one-rank test")
    ap.add_argument("--no-teacher-logits", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU over gloo: a smoke test, not a measurement")
    ap.add_argument("--rtol", type=float, default=None, help="loss agreement across GPU counts (2e-2 bf16, 1e-4 tiny)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per launch (600; 240 with --tiny)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the whole bench: a launch that would start later is skipped, one running past it "
                         "is stopped, and the report says so (partial results are written after every launch)")
    ap.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results; --tiny writes none without it)")
    args = ap.parse_args(argv)

    gpus = args.gpus.split(",") if "," in args.gpus else [str(i) for i in range(int(args.gpus))]
    top = len(gpus)
    counts = gpu_counts(top)
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            ap.error("no GPU here: run with --tiny for the CPU smoke test")
    rtol = args.rtol or (1e-4 if args.tiny else 2e-2)
    timeout = args.timeout or (240 if args.tiny else 600)
    work = args.work or tempfile.mkdtemp(prefix="infinitevl-scaling-")
    os.makedirs(work, exist_ok=True)
    started = time.monotonic()
    print(f"[bench.scaling] GPU counts {counts} on {'CPU (gloo, --tiny)' if args.tiny else 'GPUs ' + ','.join(gpus)}; "
          f"work in {work}", flush=True)
    paths = prepare(work, args.tiny, counts, args.steps, args.stages, args.seed)
    kill_n = max(1, top // 2)
    do_kill = not args.no_kill and top > 1

    launches, kill = [], None

    def remaining() -> float:
        return args.time_budget - (time.monotonic() - started) if args.time_budget else timeout

    def publish(final: bool) -> dict:
        return report(args, argv, paths, work, gpus, counts, rtol, launches, kill, started, final)

    for n in counts:
        tasks = []
        if not args.no_teacher_logits:
            tasks.append({"name": "teacher-logits", "kind": "teacher_logits", "teacher": paths["teacher"],
                          "seed": args.seed, "top_k": 64, "data": paths["logits"],
                          "output": os.path.join(work, f"n{n}", "logits"),
                          "warmup_data": paths["logits-warmup"], "warmup_output": os.path.join(work, f"n{n}", "logits-warmup"),
                          "result": os.path.join(work, f"n{n}", "logits-result.json")})
        for stage in args.stages:
            for zero in args.zero:
                out = os.path.join(work, f"n{n}", f"{stage}-zero{zero}")
                job = train_job(paths, stage, section(stage, args.tiny, n, top, zero, args.steps), out, args.seed)
                tasks.append({"name": f"{stage}-zero{zero}", "kind": "train", "job_obj": job,
                              "result": out + "-result.json"})
        if do_kill and n == top:
            out = os.path.join(work, "kill-reference")
            tasks.append({"name": "kill-reference", "kind": "train", "result": out + "-result.json",
                          "job_obj": train_job(paths, "stage2", kill_section(args.tiny, n, top, args.kill_zero), out,
                                               args.seed, kill=True)})
        os.makedirs(os.path.join(work, f"n{n}"), exist_ok=True)
        if remaining() < 30:
            print(f"[bench.scaling] N={n}: skipped, the time budget is spent", flush=True)
            launches.append({"name": f"n{n}", "gpus": n, "seconds": 0.0, "returncode": None, "skipped": True})
            continue
        print(f"[bench.scaling] N={n}: {', '.join(t['name'] for t in tasks)}", flush=True)
        run = launch_plan(work, f"n{n}", n, tasks, environment(gpus, n, args.tiny), min(timeout, remaining()))
        launches.append({"name": f"n{n}", "gpus": n, "seconds": round(run.seconds, 1), "returncode": run.returncode})
        if run.returncode != 0:
            print(f"[bench.scaling] N={n} failed (exit {run.returncode}); last lines:\n{run.tail()}", flush=True)
        publish(final=False)  # a run cut short still leaves what it measured

    if do_kill:
        if remaining() < 60:
            print("[bench.scaling] kill test: skipped, the time budget is spent", flush=True)
            kill = {"skipped": "time budget"}
        else:
            kill = run_kill_test(args, paths, work, gpus, top, kill_n, timeout, rtol, launches, remaining)
    return publish(final=True)


def report(args, argv, paths: dict, work: str, gpus: list[str], counts: list[int], rtol: float, launches: list[dict],
           kill: dict | None, started: float, final: bool) -> dict:
    """Reads what the launches wrote, computes the rows and the summary, writes the JSON and the plot."""
    top = len(gpus)
    rows, devices = [], set()
    for stage in args.stages:
        fpt = flops(paths["student"], SEQ[args.tiny][stage], stage != "stage3")  # LoRA: no base-weight gradients
        for zero in args.zero:
            for n in counts:
                out = os.path.join(work, f"n{n}", f"{stage}-zero{zero}")
                row = train_row(stage, zero, n, top, SEQ[args.tiny][stage], out, out + "-result.json", args.warmup)
                if row is None:
                    continue
                row["mfu"] = _mfu(fpt, row)
                devices.add(row.pop("device"))
                rows.append(row)
    for row in rows:
        base = next((r for r in rows if (r["stage"], r["zero"], r["gpus"]) == (row["stage"], row["zero"], 1)), None)
        row["scaling_efficiency"] = _efficiency(row, base)
        row["loss_rel_diff_vs_1gpu"] = _finite(max_rel_diff(row["losses"], base["losses"])) if base else None
    logit_rows = []
    for n in counts:
        path = os.path.join(work, f"n{n}", "logits-result.json")
        if not args.no_teacher_logits and os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            devices.add(r["device"])
            logit_rows.append({"stage": "teacher-logits", "zero": None, "gpus": n, "seq_len": SEQ[args.tiny]["logits"],
                               "tokens": r["tokens"], "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
                               "tokens_per_s_per_gpu": round(r["tokens"] / r["seconds"] / n, 1),
                               "peak_mem_gib": round(max(r["peak_mem_gib_per_rank"]), 2),
                               "peak_mem_gib_per_rank": r["peak_mem_gib_per_rank"],
                               "bytes_per_token": round(r["bytes_per_token"], 2)})
    base = next((r for r in logit_rows if r["gpus"] == 1), None)
    for row in logit_rows:
        row["scaling_efficiency"] = _efficiency(row, base)

    devices.discard(None)
    card = sorted(devices)[0] if devices else ("cpu" if args.tiny else "unknown")
    device = f"{card} × {top}" if not args.tiny else f"cpu: {os.cpu_count()} cores, gloo, {top} processes"
    summary = summarize(rows, logit_rows, kill, args, top, rtol, launches)
    summary["complete"] = (final and all(not launch.get("skipped") for launch in launches)
                           and not (kill or {}).get("skipped"))
    summary["wall_s"] = round(time.monotonic() - started, 1)
    if final:
        for table in (rows, logit_rows):
            if table:
                print_table([{k: v for k, v in r.items() if k not in ("losses", "peak_mem_gib_per_rank",
                                                                      "global_batch_rows")} for r in table])
        for key, value in summary.items():
            print(f"  {key}: {value}")
    config = {"shapes": "tiny (model/tiny.py)" if args.tiny else "Qwen2.5-VL-3B shapes, random weights",
              "device": device, "cards": card, "gpu_ids": gpus, "gpu_counts": counts, "stages": args.stages,
              "zero": args.zero, "steps": args.steps, "warmup_steps_excluded": args.warmup, "seed": args.seed,
              "global_batch_rows": top, "tokens_per_row": {s: SEQ[args.tiny][s] for s in args.stages},
              "dtype": "fp32" if args.tiny else "bf16", "gradient_checkpointing": not args.tiny,
              "stage2_trainable": STAGE2_TRAINABLE, "stage3_lora": {"r": 4 if args.tiny else 64,
                                                                     "targets": LORA_TARGETS, "dropout": 0.0},
              "teacher_logits": {"top_k": 64, "positions": "text", "rows_per_shard": LOGIT_ROWS_PER_SHARD[args.tiny],
                                 "shards": top * 2},
              "kill_test": kill, "kill_model": "tiny" if args.tiny else KILL_MODEL, "launches": launches, "time_budget_s": args.time_budget,
              "env": {"NCCL_NVLS_ENABLE": "0", "INFINITEVL_LIFT_FLA_HOPPER_GUARD": "1", "TRITON_CACHE_AUTOTUNING": "1"},
              "command": "python3 -m bench.scaling " + " ".join(argv if argv is not None else sys.argv[1:])}
    out_dir = args.out or (None if args.tiny else RESULTS)
    if out_dir:
        path = write_result("scaling", config, rows + logit_rows, summary, out_dir=out_dir, device=device)
        if rows or logit_rows:
            plot(rows, logit_rows, device, os.path.join(out_dir, "scaling.png"))
        print(f"[bench.scaling] wrote {path}{' and scaling.png' if rows or logit_rows else ''}", flush=True)
    elif final:
        print("[bench.scaling] --tiny: not writing bench/results (pass --out DIR to keep the smoke-test result)")
    failed = [launch for launch in launches if launch["returncode"] not in (0, None) and launch["name"] != "kill"]
    return {"summary": summary, "rows": rows + logit_rows, "config": config, "failed": failed, "work": work}


def _mfu(fpt: float, row: dict) -> float | None:
    """Analytic FLOPs per token (bench.train_throughput.flops_per_token) × tokens/s per GPU ÷ the card's peak."""
    from bench.train_throughput import PEAK

    peak = next((v for k, v in PEAK.items() if row.get("device") and k in row["device"]), None)
    return round(fpt * row["tokens_per_s"] / row["gpus"] / peak, 4) if peak and math.isfinite(row["tokens_per_s"]) else None


def _efficiency(row: dict, base: dict | None) -> float | None:
    if not base or not base["tokens_per_s"] or not math.isfinite(row["tokens_per_s"]):
        return None
    return round(row["tokens_per_s"] / (row["gpus"] * base["tokens_per_s"]), 4)


def _finite(x: float) -> float | None:
    return round(x, 8) if math.isfinite(x) else None


def run_kill_test(args, paths: dict, work: str, gpus: list[str], top: int, resume_n: int, timeout: float, rtol: float,
                  launches: list[dict], remaining) -> dict:
    """SIGKILL the last rank of a run on all GPUs after step 3, then resume on half of them."""
    out = os.path.join(work, "kill-run")
    victim = top - 1
    print(f"[bench.scaling] kill test: stage2 ZeRO-{args.kill_zero} on {top}, SIGKILL rank {victim} after step "
          f"{KILL_AFTER_STEP}, resume on {resume_n}", flush=True)
    task = {"name": "killed", "kind": "train", "result": out + "-result.json",
            "job_obj": train_job(paths, "stage2", kill_section(args.tiny, top, top, args.kill_zero), out, args.seed,
                                 kill=True)}
    killed = launch_plan(work, "kill", top, [task], environment(gpus, top, args.tiny), min(timeout, 300, remaining()),
                         kill_rank=victim, kill_on=f"step {KILL_AFTER_STEP}/{KILL_STEPS}")
    text = "\n".join(killed.lines)
    from pipeline.checkpoints import list_checkpoints

    committed = [s for s, _ in list_checkpoints(out)]
    resume_task = {"name": "resumed", "kind": "train", "result": out + "-resumed.json",
                   "job_obj": train_job(paths, "stage2", kill_section(args.tiny, resume_n, top, args.kill_zero), out,
                                        args.seed, kill=True)}
    resumed = launch_plan(work, "resume", resume_n, [resume_task], environment(gpus, resume_n, args.tiny),
                          max(30.0, min(timeout, remaining())))
    launches += [{"name": "kill", "gpus": top, "seconds": round(killed.seconds, 1), "returncode": killed.returncode},
                 {"name": "resume", "gpus": resume_n, "seconds": round(resumed.seconds, 1),
                  "returncode": resumed.returncode}]
    reference = {s["step"]: s["loss"] for s in read_steps(os.path.join(work, "kill-reference"))}
    after = {s["step"]: s["loss"] for s in read_steps(out)}
    resumed_from = next((int(line.split("at step ")[1].split()[0]) for line in resumed.lines
                         if "resumed stage2 at step" in line), None)
    continued = sorted(s for s in after if resumed_from is not None and s > resumed_from)
    diff = max_rel_diff([after[s] for s in continued], [reference.get(s, float("nan")) for s in continued])
    # torchrun's failure report: "rank : 1 (local_rank: 1) / exitcode : -9 ... Signal 9 (SIGKILL)"
    names_rank = bool(re.search(rf"\brank\s*:\s*{victim}\b", text)) and ("SIGKILL" in text or "Signal 9" in text)
    if killed.killed_rank is not None:
        print(f"[bench.scaling] rank {victim} died (SIGKILL); the job exited with code {killed.returncode} "
              f"{killed.exit_s:.1f} s later; torchrun's report names it: {names_rank}", flush=True)
    result = {"gpus": top, "killed_rank": killed.killed_rank, "killed_after_step": KILL_AFTER_STEP,
              "exit_code": killed.returncode, "seconds_to_exit_after_kill": round(killed.exit_s, 2) if killed.exit_s else None,
              "timed_out": killed.timed_out, "message_names_dead_rank": names_rank,
              "committed_checkpoints_at_kill": committed, "resumed_on_gpus": resume_n, "resumed_from_step": resumed_from,
              "resume_exit_code": resumed.returncode, "continued_steps": continued,
              "losses_resumed": [round(after[s], 6) for s in continued],
              "losses_reference": [round(reference[s], 6) for s in continued if s in reference],
              "max_rel_diff": _finite(diff), "rtol": rtol}
    result["failed_cleanly"] = (killed.killed_rank is not None and killed.returncode != 0 and not killed.timed_out
                                and names_rank)
    result["resume_matches"] = (resumed.returncode == 0 and resumed_from is not None
                                and continued == list(range(resumed_from + 1, KILL_STEPS + 1)) and diff <= rtol)
    print(f"[bench.scaling] kill test: {json.dumps(result)}", flush=True)
    return result


def summarize(rows: list[dict], logit_rows: list[dict], kill: dict | None, args, top: int, rtol: float,
              launches: list[dict]) -> dict:
    def eff(stage, zero, n):
        r = next((r for r in rows if (r["stage"], r["zero"], r["gpus"]) == (stage, zero, n)), None)
        return r["scaling_efficiency"] if r else None

    head = (args.stages[0], args.zero[0])
    summary = {"max_gpus": top, "headline": f"{head[0]} ZeRO-{head[1]}",
               "scaling_efficiency_2gpu": eff(*head, 2) if top >= 2 else None,
               "scaling_efficiency_max": eff(*head, top)}
    for stage in args.stages:
        for zero in args.zero:
            summary[f"scaling_efficiency_max_{stage}_zero{zero}"] = eff(stage, zero, top)
            r = next((r for r in rows if (r["stage"], r["zero"], r["gpus"]) == (stage, zero, top)), None)
            summary[f"tokens_per_s_max_{stage}_zero{zero}"] = r["tokens_per_s"] if r else None
    if logit_rows:
        summary["teacher_logits_scaling_efficiency_max"] = logit_rows[-1]["scaling_efficiency"]
        summary["teacher_logits_tokens_per_s_max"] = logit_rows[-1]["tokens_per_s"]
    diffs = [r["loss_rel_diff_vs_1gpu"] for r in rows]
    summary["loss_max_rel_diff_across_gpus"] = max((d for d in diffs if d is not None), default=None)
    summary["loss_curves_agree"] = bool(rows) and all(d is not None and d <= rtol for d in diffs) and \
        all(r["steps"] == args.steps for r in rows)
    summary["peak_mem_gib_max"] = max((r["peak_mem_gib"] or 0 for r in rows + logit_rows), default=None)
    if kill is not None:
        summary["kill_failed_cleanly"] = kill.get("failed_cleanly")
        summary["kill_resume_matches"] = kill.get("resume_matches")
        summary["kill_seconds_to_exit"] = kill.get("seconds_to_exit_after_kill")
    summary["all_launches_ok"] = all(launch["returncode"] == 0 for launch in launches if launch["name"] != "kill")
    return summary


def plot(rows: list[dict], logit_rows: list[dict], device: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = collections.defaultdict(list)
    for r in rows:
        series[f"{r['stage']} ZeRO-{r['zero']} ({r['seq_len'] // 1024}K)"].append(r)
    if logit_rows:
        series["teacher logits (8K)"] = logit_rows
    for label, rs in series.items():
        gpus = [r["gpus"] for r in rs]
        ax1.plot(gpus, [r["tokens_per_s"] for r in rs], marker="o", label=label)
        ax2.plot(gpus, [r["scaling_efficiency"] or float("nan") for r in rs], marker="o", label=label)
    counts = sorted({r["gpus"] for r in rows + logit_rows})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("GPUs")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("tokens/s (all GPUs)")
    ax2.set_ylabel("scaling efficiency vs 1 GPU")
    ax2.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax2.set_ylim(0, 1.15)
    ax1.legend(fontsize=8)
    fig.suptitle(f"InfiniteVL scaling: {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    result = main()
    sys.exit(1 if result["failed"] else 0)
