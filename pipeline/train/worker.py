"""One training process (of torchrun's N): `python -m pipeline.train.worker JOB.json`.

It reads as the stage it runs: join the process group, build the recipe's module, choose what trains,
wrap it in DeepSpeed, open the data stream, resume from the newest committed checkpoint, take the steps
(logging, checkpointing every N), export the trained model for the next stage.
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import shutil
import signal
import socket
import sys
import time

import torch

from pipeline.stages import join

from .job import TrainJob


def main(job_path: str) -> None:
    install_stack_dump()
    mark = _Marks({"python and torch imports": time.time() - _process_started()})
    if _loader_workers(job_path):
        from pipeline.data.engines import start_worker_server

        # first thing: the data workers' imports run beside this process's, not in the first step
        start_worker_server()
        mark("data workers' server started")
    job = TrainJob.load(job_path)
    mark("job read (checking its config imports the model's code)")
    rank, world, local_rank, device = join_process_group()
    mark("process group")
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # a rank or a node of the group failed
    if local_rank == 0 and restarts:
        _log(f"{job.stage}: torchrun's agent restarted this node's ranks (group restart {restarts}); the group "
             "resumes from the newest committed checkpoint")
    torch.manual_seed(job.seed)
    dtype = torch.bfloat16 if job.section.precision == "bf16" else torch.float32
    from pipeline.kernel_cache import publish_tuning, restore_tuning

    # before anything compiles or autotunes
    tuning = restore_tuning(job.kernel_cache, job.stage, local_rank, world, _log)
    mark("shared kernels restored")

    from pipeline.recipes import RECIPES

    mark("recipe imports")  # transformers and fla came with the job's check
    recipe = RECIPES[job.stage].build(job, dtype, device, log=_log if rank == 0 else None)
    mark("model built")
    from model.ops.common import check_guarded_backwards

    checked = check_guarded_backwards(recipe.module, device)  # before anything compiles (its docstring says why)
    if rank == 0 and checked:
        _log(f"{job.stage}: fla's Hopper guard lifted for {', '.join(checked)} after a passing gradient check")
    mark("fla gradient check")
    engine = wrap_in_deepspeed(recipe.module, job, dtype)
    loader = recipe.loader(rank, world)

    from . import state

    staging = state.staging_dir(job.output)
    resumed = state.restore(engine, job.output, rank, local_rank, staging)
    mark("DeepSpeed and checkpoint restore")
    watch = watch_first_step()
    if rank == 0:  # where a stage's start-up goes, before its first (compiling) step
        _log(f"{job.stage} ready on {world} ranks, {os.environ.get('GROUP_WORLD_SIZE', '1')} nodes, "
             f"{mark.total():.1f} s after the process started: {mark.summary()}"
             + (f"; until its first step is done, every thread's stack is printed here every {watch:.0f} s"
                if watch > 0 else ""))
    step = 0
    if resumed is not None:
        step = resumed["step"]
        loader.load_state_dict(resumed["loader"])
        if rank == 0:
            _log(f"resumed {job.stage} at step {step} from its newest committed checkpoint")

    steps, accum = job.section.steps, job.section.grad_accum
    writer = MetricsWriter(job, rank, staging, resume_step=step)
    from .prefetch import Prefetcher

    feed = Prefetcher(recipe, loader, count=(steps - step) * accum)
    # Rates and the ETA count from the end of this process's first step, which pays kernel compilation and
    # autotuning (140 s against 0.3 s for the next steps on a fresh H200); until then, that step's own rate.
    warm_from, warm_tokens, warm_steps = None, 0, 0
    every = job.section.checkpoint_every if job.checkpoints else 0  # benchmarks take no checkpoints
    while step < steps:
        metrics, step_started = {"loss": 0.0, "tokens": 0, "data_s": 0.0, "prepare_s": 0.0}, time.monotonic()
        for _ in range(accum):
            # data_s: what the step waited for its batch; prepare_s: the thread's work on it, hidden behind the
            # previous steps unless data_s grows too
            batch, waited, prepared = feed.next(device)
            metrics["data_s"] += waited
            metrics["prepare_s"] += prepared
            loss, extra = engine(batch)
            engine.backward(loss)
            engine.step()
            metrics["loss"] += float(loss.detach()) / accum
            metrics["tokens"] += extra.pop("tokens", 0)
            for k, v in extra.items():
                metrics[k] = metrics.get(k, 0.0) + v / accum
        step += 1
        metrics["step_s"] = time.monotonic() - step_started
        metrics.update(_across_ranks(metrics["loss"], device, world))
        now = time.monotonic()
        if warm_from is None:
            first_step_done()
            warm_from, rate, step_time = now, metrics["tokens"] / metrics["step_s"], metrics["step_s"]
            # the stage's start-up as a fresh node pays it (bench/stage_startup.py reads this record)
            metrics["first_step_after_start_s"] = time.time() - _process_started()
            metrics["startup_s"] = {part: round(seconds, 2) for part, seconds in mark.marks.items()}
            metrics["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            if rank == 0:
                _log(f"{job.stage}: first step done {metrics['first_step_after_start_s']:.0f} s after the process "
                     f"started (the step itself {metrics['step_s']:.1f} s, with its compiles and autotuning)")
            publish_tuning(tuning, _log)
        else:
            warm_tokens, warm_steps = warm_tokens + metrics["tokens"], warm_steps + 1
            rate, step_time = warm_tokens / (now - warm_from), (now - warm_from) / warm_steps
        metrics.update(lr=engine.get_lr()[0], grad_norm=_grad_norm(engine), tokens_per_s=rate * world)
        metrics["mfu"] = recipe.mfu(rate)
        writer.write(step, metrics)
        if rank == 0:
            eta = step_time * (steps - step)
            _log(f"{job.stage} step {step}/{steps} loss {metrics['loss']:.6g} lr {metrics['lr']:.3g} "
                 f"grad_norm {metrics['grad_norm']:.3g} tok/s {metrics['tokens_per_s']:.0f} "
                 f"waiting for data {100 * metrics['data_s'] / metrics['step_s']:.0f}% "
                 f"(preparing it {100 * metrics['prepare_s'] / metrics['step_s']:.0f}%, ahead) eta {eta:.0f}s")
        if every > 0 and (step % every == 0 or step == steps):
            writer.flush()
            state.save(engine, job.stage, job.output, step, feed.state_dict(), _summary(metrics),
                       job.section.keep_last, rank, local_rank, staging,
                       export=lambda work: export_to(engine, recipe, job, rank, work))
    first_step_done()  # also where there was no step left to take (a resumed run at its end)
    feed.close()
    if job.export:
        export(engine, recipe, job, rank, local_rank, staging)
    publish_tuning(tuning, _log)  # what later steps, validation and the export tuned
    writer.close()
    engine.destroy()  # frees ZeRO's buffers and hooks: a process may run several jobs (bench/scaling.py)


FIRST_STEP_STACKS_ENV = "INFINITEVL_FIRST_STEP_STACKS_S"


def watch_first_step() -> float:
    """Until `first_step_done()`, every thread's Python stack goes to the stage log every N seconds (env
    INFINITEVL_FIRST_STEP_STACKS_S, default 180; 0: off). A first step that compiles and autotunes for minutes
    and one that is stuck look alike in a log otherwise (on an H100, the proof's Stage II showed nothing for
    minutes). Returns N."""
    seconds = float(os.environ.get(FIRST_STEP_STACKS_ENV, "180"))
    if seconds > 0:
        faulthandler.dump_traceback_later(seconds, repeat=True)
    return seconds


def first_step_done() -> None:
    faulthandler.cancel_dump_traceback_later()


def install_stack_dump() -> None:
    """`kill -USR1 <pid>` prints every thread's Python stack to the stage log and the process goes on: where a
    slow or stuck stage is (a compile, waiting on the data loader, a collective). Only the training processes
    have it: the data loader's workers come from a fork server and would die of the signal."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def join_process_group():
    """torchrun sets RANK/WORLD_SIZE; a plain `python -m` run is a group of one."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    import deepspeed

    cuda = torch.cuda.is_available()
    if not cuda:
        # On CPU DeepSpeed JIT-builds a shared-memory allreduce under a lock file in ~/.cache/torch_extensions; a
        # run killed while it builds leaves that file behind and every later run waits on it forever. gloo does
        # the CPU ranks' collectives (the tiny default, the tests) without it.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device


def _across_ranks(loss: float, device: torch.device, world: int) -> dict:
    """The global batch's loss (the mean of the ranks' losses: each rank averages its micro-batches) and,
    on CUDA, each rank's peak memory so far in GiB."""
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    mine = torch.tensor([loss, peak or 0.0], dtype=torch.float64, device=device)
    if world > 1:
        import torch.distributed as dist

        gathered = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
    else:
        gathered = [mine]
    values = torch.stack(gathered).cpu()
    out = {"loss": float(values[:, 0].mean())}
    if peak is not None:
        out["peak_mem_gib"] = float(values[:, 1].max())
        out["peak_mem_gib_per_rank"] = [round(float(v), 3) for v in values[:, 1]]
    return out


def deepspeed_config(section, dtype: torch.dtype) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": section.grad_accum,
        "gradient_clipping": section.grad_clip,
        "zero_optimization": {"stage": section.zero_stage, "overlap_comm": False,
                              "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if section.deepspeed_config:
        with open(section.deepspeed_config) as f:
            config.update(json.load(f))
    return config


def wrap_in_deepspeed(module, job: TrainJob, dtype: torch.dtype):
    import deepspeed

    section = job.section
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)]
    no_decay = [p for p in params if not (p.ndim >= 2 and not getattr(p, "_no_weight_decay", False))]
    groups = [{"params": decay, "weight_decay": section.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]],  # ZeRO drops empty groups
                                  lr=section.lr, betas=(0.9, 0.95), eps=1e-8)
    schedule = warmup_cosine(section.warmup_steps, section.steps, section.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(section, dtype))
    return engine


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def full_state_dict(engine, job: TrainJob, rank: int) -> dict | None:
    """The whole model's weights on rank 0 (gathered from the shards under ZeRO-3); None elsewhere."""
    if job.section.zero_stage == 3:
        full = engine._zero3_consolidated_16bit_state_dict()
    else:
        full = engine.module.state_dict() if rank == 0 else None
    return {k: v.detach().cpu() for k, v in full.items()} if rank == 0 else None


def export_to(engine, recipe, job: TrainJob, rank: int, directory: str) -> None:
    full = full_state_dict(engine, job, rank)
    if rank == 0:
        recipe.export(full, directory, checkpoint=True)


def export(engine, recipe, job: TrainJob, rank: int, local_rank: int, staging: str) -> None:
    """Gathers the full weights on rank 0 and writes the Hugging Face export the next stage reads, committed by
    its _FILES.json (every file's sha256, hashed from the local copy before it is uploaded)."""
    from pipeline import storage

    from . import state as st
    from .job import EXPORT

    full = full_state_dict(engine, job, rank)
    if rank == 0:
        out = join(job.output, EXPORT)
        work = st.local_path(out) if st.is_local(out) else os.path.join(staging, EXPORT)
        recipe.export(full, work)
        storage.publish_dir(work, out, stage=job.stage, step=job.section.steps)
        _log(f"{job.stage} exported to {out}")
    st.barrier()


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _summary(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _loader_workers(job_path: str) -> int:
    """The job's data loader processes, read before the job is checked (its check imports the model's code, seconds
    the fork server can spend on its own imports meanwhile). A job file as TrainJob.dump writes it holds the field."""
    with open(job_path) as f:
        return int(json.load(f).get("section", {}).get("loader_workers") or 0)


class _Marks:
    """Seconds spent in each part of a stage's start-up, in order: `mark(part)` closes the part that ends now."""

    def __init__(self, marks: dict[str, float]):
        self.marks, self.last = marks, time.monotonic()

    def __call__(self, part: str) -> None:
        now = time.monotonic()
        self.marks[part] = self.marks.get(part, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return sum(self.marks.values())

    def summary(self) -> str:
        return ", ".join(f"{part} {seconds:.1f} s" for part, seconds in self.marks.items() if seconds >= 0.05)


def _process_started() -> float:
    """This process's start, in seconds since the epoch (psutil comes with DeepSpeed)."""
    import psutil

    return psutil.Process().create_time()


def _log(message: str) -> None:
    print(message, flush=True)


class MetricsWriter:
    """TensorBoard scalars and a JSON line per step (rank 0), in the stage output's `logs/`.

    `steps.jsonl` is the record: on a resume it keeps the steps up to the checkpoint resumed from (those after
    it are taken again), and TensorBoard's event files are written anew from it, so each step is there once
    however often the stage was killed and resumed."""

    def __init__(self, job: TrainJob, rank: int, staging: str, resume_step: int = 0):
        from pipeline import storage

        from . import state as st

        self.rank = rank
        self.remote = None if st.is_local(job.output) else join(job.output, "logs")
        self.dir = os.path.join(st.local_path(job.output) if self.remote is None else staging, "logs")
        self.tb = None
        if rank != 0:
            return
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, "steps.jsonl")
        if self.remote is not None and resume_step > 0:  # the record lives with the output, not on this node
            try:
                with open(path, "wb") as f:
                    f.write(storage.read_bytes(join(self.remote, "steps.jsonl")))
            except FileNotFoundError:
                pass
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                kept = [json.loads(line) for line in f if line.strip()]
            kept = [record for record in kept if record["step"] <= resume_step]
        from torch.utils.tensorboard import SummaryWriter

        shutil.rmtree(os.path.join(self.dir, "tensorboard"), ignore_errors=True)
        self.tb = SummaryWriter(os.path.join(self.dir, "tensorboard"))
        self.steps = open(path, "w")
        for record in kept:
            self.write(record.pop("step"), record)

    def write(self, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, step)
        self.steps.write(json.dumps({"step": step, **metrics}) + "\n")

    def flush(self) -> None:
        if self.rank != 0:
            return
        self.tb.flush()
        self.steps.flush()
        if self.remote:
            from pipeline import storage

            storage.upload_dir(self.dir, self.remote)

    def close(self) -> None:
        if self.rank == 0:
            self.flush()
            self.tb.close()
            self.steps.close()


if __name__ == "__main__":
    main(sys.argv[1])
