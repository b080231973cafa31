"""One rank of bench/scaling.py: `torchrun --nproc-per-node=N -m bench.scaling_rank PLAN.json`.

Runs the plan's tasks in order in one process group (imports, kernel compilation and autotuning are paid
once per GPU count, not once per run):
  teacher_logits  the teacher-logit stage's own code (pipeline.teacher_logits.store) over this rank's shards
                  of a synthetic corpus, with a random-weight teacher built on the GPU; timed from a common
                  barrier to the committed manifest, after a warm-up pass over a small corpus.
  train           a training job through pipeline.train.worker.main, the stage's own worker (DeepSpeed engine,
                  packed loader, loss, accumulation, checkpoints); the GPU is emptied between jobs and each
                  job's starting memory is recorded, so a leak from an earlier job would show.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

import torch


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    from pipeline.train.worker import join_process_group

    rank, world, local_rank, device = join_process_group()
    for task in plan["tasks"]:
        if rank == 0:
            print(f"[bench.scaling] N={world}: {task['name']}", flush=True)
        if task["kind"] == "teacher_logits":
            teacher_logits(task, rank, world, device)
        else:
            train(task, rank, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write(path: str, record: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def device_record(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": f"cpu: {os.cpu_count()} cores"}
    return {"device": torch.cuda.get_device_name(device)}


def train(task: dict, rank: int, device: torch.device) -> None:
    from pipeline.train import worker

    baseline = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / 2**30
    started = time.monotonic()
    worker.main(task["job"])
    if rank == 0:
        _write(task["result"], {"wall_s": time.monotonic() - started, "baseline_gib": baseline,
                                **device_record(device)})


class RandomTeacher:
    """pipeline.teacher_logits' Teacher for a model built in memory: its identity names the seed, not files."""

    def __init__(self, model, processor, seed: int):
        from pipeline.teacher_logits.teacher import Teacher

        self._teacher = Teacher(model, processor, source=f"random-weights-seed-{seed}", local_dir="")
        self.seed = seed

    def __getattr__(self, name):
        return getattr(self._teacher, name)

    def identity(self) -> dict:
        return {"path": self._teacher.source, "weights_sha256": f"random-seed-{self.seed}",
                "vocab_size": self._teacher.vocab_size, "dtype": str(self._teacher.model.dtype).removeprefix("torch.")}


def build_teacher(config_dir: str, device: torch.device, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_pretrained(config_dir)
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        with torch.device(device):  # built where it runs: no 7.5 GB checkpoint on disk
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def teacher_logits(task: dict, rank: int, world: int, device: torch.device) -> None:
    from model.processing import InfiniteVLProcessor
    from pipeline.teacher_logits.store import StoreSettings, store_teacher_logits_for

    processor = InfiniteVLProcessor.from_pretrained(task["teacher"])
    teacher = RandomTeacher(build_teacher(task["teacher"], device, task["seed"]), processor, task["seed"])
    settings = StoreSettings(top_k=task["top_k"], positions="text", values="fp16", batch_size=1)
    # warm-up (kernels, allocator) on a small corpus, then the timed pass from a common start
    store_teacher_logits_for(task["warmup_data"], teacher, task["warmup_output"], settings, rank=rank,
                             world_size=world, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    _barrier()
    started = time.monotonic()
    result = store_teacher_logits_for(task["data"], teacher, task["output"], settings, rank=rank, world_size=world,
                                      progress=False)
    seconds = time.monotonic() - started  # rank 0: until every rank's shards and the manifest are committed
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    peaks = [peak]
    if world > 1:
        mine = torch.tensor([peak], dtype=torch.float64, device=device)
        gathered = [torch.zeros_like(mine) for _ in range(world)]
        torch.distributed.all_gather(gathered, mine)
        peaks = [float(g) for g in gathered]
    if rank == 0:
        manifest = result["manifest"]
        _write(task["result"], {"seconds": seconds, "tokens": manifest["tokens"], "covered": manifest["covered"],
                                "bytes_per_token": manifest["bytes_per_token"], "peak_mem_gib_per_rank": peaks,
                                **device_record(device)})
    del teacher
    _barrier()


if __name__ == "__main__":
    main(sys.argv[1])
