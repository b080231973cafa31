"""One teacher-logit job, in this process or as one process per GPU under torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node=8 -m pipeline.teacher_logits.run \
        --data s3://bucket/run/data/distill/manifest.json --teacher s3://bucket/run/teacher \
        --output s3://bucket/run/teacher-logits --top-k 64 --positions answer

Each rank takes cuda:LOCAL_RANK and the shards at rank, rank + world, ...; rank 0 writes the manifest
after a barrier (gloo). Without torchrun it is rank 0 of 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os

import torch

from .encoding import SparseEncoding
from .store import StoreSettings, store_teacher_logits_for
from .teacher import load_teacher

log = logging.getLogger(__name__)


class BudgetExceeded(ValueError):
    """The chosen k and value encoding cost more bytes per position than the configured budget."""


def check_budget(encoding: SparseEncoding, max_bytes_per_token: int | None) -> None:
    if max_bytes_per_token is not None and encoding.bytes_per_position > max_bytes_per_token:
        raise BudgetExceeded(
            f"top-{encoding.k} over a vocabulary of {encoding.vocab_size} with {encoding.values} values costs "
            f"{encoding.bytes_per_position} bytes per position, over the budget of {max_bytes_per_token}: "
            "lower top_k, pick smaller values, or raise max_bytes_per_token")


def run(data_manifest: str, teacher_source: str, output: str, settings: StoreSettings, *,
        max_bytes_per_token: int | None = None, rank: int = 0, world_size: int = 1, nodes: int = 1,
        device: str | torch.device | None = None, storage_options: dict | None = None,
        attn_implementation: str = "sdpa", progress: bool = True) -> dict:
    teacher = load_teacher(teacher_source, device=device, storage_options=storage_options,
                           attn_implementation=attn_implementation)
    check_budget(SparseEncoding(settings.top_k, teacher.vocab_size, settings.values), max_bytes_per_token)
    return store_teacher_logits_for(data_manifest, teacher, output, settings, rank=rank, world_size=world_size,
                                    nodes=nodes, storage_options=storage_options, progress=progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the token corpus's manifest.json")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint folder (local or remote)")
    parser.add_argument("--output", required=True)
    defaults = StoreSettings()
    for field in dataclasses.fields(StoreSettings):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    parser.add_argument("--max-bytes-per-token", type=int, default=None)
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", 1))  # torchrun's: the agents, one per node
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        # Only a barrier before the manifest is ever exchanged, so gloo even on GPUs; ranks with fewer or
        # shorter shards may wait there for hours, hence the long timeout.
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    try:
        settings = StoreSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StoreSettings)})
        result = run(args.data, args.teacher, args.output, settings, max_bytes_per_token=args.max_bytes_per_token,
                     rank=rank, world_size=world, nodes=nodes, device=device,
                     attn_implementation=args.attn_implementation, progress=not args.no_progress)
        log.info("rank %d: computed shards %s, skipped %s", rank, result["computed"], result["skipped"])
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
