"""One evaluation process of torchrun's N (the eval stage on several processes or nodes):

    python -m pipeline.eval.worker JOB.json

JOB.json: {"config": the run config, "runs": [{"checkpoint": URL, "suite": NAME or null, "out_dir": URL}, ...]}.
Every rank joins the process group and evaluates each run: it answers every world-th sample (pipeline/eval/
runner.py), rank 0 merges the answers and writes the reports, whose summary.json holds the scores the stage's
parent reads.
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist


def main(job_path: str) -> None:
    from pipeline.config import RunConfig
    from pipeline.eval.api import evaluate_checkpoint
    from pipeline.kernel_cache import shared_tuning

    with open(job_path) as f:
        job = json.load(f)
    config = RunConfig.model_validate(job["config"])
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    # a rank may wait at the merge while another scores a long video: a generous timeout
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    try:
        with shared_tuning(config.run.root, "eval", _say, local_rank, dist.get_world_size()):
            for run in job["runs"]:
                evaluate_checkpoint(run["checkpoint"], config, suite=run["suite"], out_dir=run["out_dir"])
        dist.barrier()  # every rank done talking before any tears the group down
    finally:
        dist.destroy_process_group()


def _say(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
