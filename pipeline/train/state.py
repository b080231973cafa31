"""Training checkpoints on fsspec storage: save, commit (marker last), keep the last K, find and restore.

Layout of one checkpoint, `<stage output>/checkpoints/step-<N>/`:
    ds/...                     DeepSpeed's model/optimizer/scheduler state (its per-rank files)
    rng-rank<r>.safetensors    each rank's torch (and CUDA) RNG state
    trainer_state.json         step, data position, recent metrics
    _CHECKPOINT.json           the marker, written last: the checkpoint exists once this does; it lists every
                               file above with its sha256, checked before a resume loads any of them

DeepSpeed writes to a local directory; for remote outputs it writes into a local staging copy that the
first rank of each node uploads before the marker is written. Loading goes through a checkpoint engine
whose unpickler only admits tensors, containers and a short list of DeepSpeed's own plain types.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pipeline import storage
from pipeline.checkpoints import MARKER, checkpoint_dir, checkpoint_metrics, list_checkpoints, write_marker
from pipeline.stages import join

TRAINER_STATE = "trainer_state.json"


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, stage: str, output: str, step: int, loader_state: dict, metrics: dict, keep_last: int,
         rank: int, local_rank: int, staging_root: str, export=None) -> str:
    """Writes step `step` of the run and commits it; every rank calls this. `export(work_dir)` (every rank
    calls it; rank 0 writes) puts the model in Hugging Face format at the checkpoint's root, which is what
    evaluating a checkpoint reads."""
    url = checkpoint_dir(output, step)
    work = local_path(url) if is_local(url) else os.path.join(staging_root, f"step-{step:08d}")
    os.makedirs(work, exist_ok=True)
    engine.save_checkpoint(work, tag="ds")
    if export is not None:
        export(work)
    save_file(_rng_state(), os.path.join(work, f"rng-rank{rank}.safetensors"))
    if rank == 0:
        with open(os.path.join(work, TRAINER_STATE), "w") as f:
            json.dump({"step": step, "loader": loader_state, "metrics": metrics}, f)
    barrier()
    # each node hashes the files it wrote (from local disk, before any upload); rank 0 commits the union
    files = _union_across_nodes(storage.file_digests(work) if local_rank == 0 else {})
    if not is_local(url) and local_rank == 0:
        storage.upload_dir(work, url)
        shutil.rmtree(work, ignore_errors=True)
    barrier()
    if rank == 0:
        write_marker(url, stage, step, metrics, files)
        _prune(output, keep_last)
    barrier()
    return url


def _union_across_nodes(files: dict[str, dict]) -> dict[str, dict]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return files
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, files)
    return {rel: f for part in gathered for rel, f in part.items()}


def _prune(output: str, keep_last: int) -> None:
    """Removes all but the newest `keep_last` committed checkpoints (marker first, so a half-deleted one is
    never mistaken for a complete one)."""
    found = list_checkpoints(output)
    for _, url in found[:-keep_last] if keep_last > 0 else []:
        fs, path = storage.filesystem(url)
        fs.rm(join(path, MARKER))
        fs.rm(path, recursive=True)


def restore(engine, output: str, rank: int, local_rank: int, staging_root: str) -> dict | None:
    """Loads the newest committed checkpoint into `engine` and this rank's RNG; returns its trainer state."""
    found = list_checkpoints(output)
    if not found:
        return None
    step, url = found[-1]
    work = local_path(url) if is_local(url) else os.path.join(staging_root, f"restore-{step:08d}")
    if not is_local(url) and local_rank == 0:
        fs, path = storage.filesystem(url)
        fs.get(path.rstrip("/") + "/", work.rstrip("/") + "/", recursive=True)
    if local_rank == 0:  # nothing is loaded that is not what the checkpoint committed
        storage.verify_dir(work, checkpoint_metrics(url).get("files"))
    barrier()
    load_dir, universal = work, False
    saved_world, world = saved_world_size(os.path.join(work, "ds")), engine.dp_world_size
    if saved_world != world:
        # ZeRO's optimizer shards only load on the world size that wrote them: convert the checkpoint to
        # DeepSpeed's universal (per-parameter) layout in local staging, then load that
        load_dir, universal = os.path.join(staging_root, f"universal-{step:08d}"), True
        if local_rank == 0:
            to_universal(os.path.join(work, "ds"), os.path.join(load_dir, "ds"))
        barrier()
    engine._config.load_universal_checkpoint = universal
    try:
        with safe_deepspeed_load():
            load_path, _ = engine.load_checkpoint(load_dir, tag="ds", load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    if load_path is None:
        raise RuntimeError(f"DeepSpeed found no checkpoint in {url}")
    if universal:
        barrier()
        if local_rank == 0:
            shutil.rmtree(load_dir, ignore_errors=True)
    rng_file = os.path.join(work, f"rng-rank{rank}.safetensors")
    if os.path.exists(rng_file):
        _set_rng_state(load_file(rng_file))
    with open(os.path.join(work, TRAINER_STATE)) as f:
        state = json.load(f)
    barrier()
    if not is_local(url) and local_rank == 0:
        shutil.rmtree(work, ignore_errors=True)
    return state


def saved_world_size(ds_dir: str) -> int:
    """How many data-parallel ranks wrote a DeepSpeed checkpoint folder (one optimizer shard each)."""
    return len([n for n in os.listdir(ds_dir) if n.endswith("optim_states.pt") and "zero_pp_rank_" in n])


def to_universal(ds_dir: str, out_dir: str) -> None:
    """DeepSpeed's ds_to_universal in this process (no worker pool): `out_dir` loads on any world size."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out_dir, ignore_errors=True)
    args = argparse.Namespace(input_folder=ds_dir, output_folder=out_dir, num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    # the conversion reads the checkpoint with torch.load too: through the same weights-only unpickler
    with safe_deepspeed_load(), contextlib.redirect_stdout(io.StringIO()):  # its progress bars, per-parameter lines
        ds_to_universal.main(args)


def staging_dir(output: str) -> str:
    root = os.environ.get("INFINITEVL_STAGING", os.path.join(tempfile.gettempdir(), "infinitevl-staging"))
    return os.path.join(root, hashlib.sha256(output.encode()).hexdigest()[:16])


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class safe_deepspeed_load:
    """Within this block torch.load only admits tensors, plain containers and DeepSpeed's enum/config
    types found in its optimizer states: a checkpoint cannot run code when it is loaded."""

    def __enter__(self):
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        self._load = torch.load
        allowed = [ZeroStageEnum, fragment_address]
        try:
            from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
            allowed += [LossScaler, DynamicLossScaler]
        except ImportError:
            pass
        self._ctx = torch.serialization.safe_globals(allowed)
        self._ctx.__enter__()

        def load(*args, **kwargs):
            kwargs["weights_only"] = True
            return self._load(*args, **kwargs)

        torch.load = load
        return self

    def __exit__(self, *exc):
        torch.load = self._load
        self._ctx.__exit__(*exc)
        return False
