"""Data-parallel evaluation: two gloo processes on CPU must report what one process reports."""

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.eval.runner import EvalConfig, run_suite
from pipeline.eval.synthetic import tiny_samples
from tests.helpers import lively_tiny_teacher

CONFIG = EvalConfig(batch_size=2, max_new_tokens=4, limit=7)


def _lively_teacher():
    return lively_tiny_teacher()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, processor = _lively_teacher()
        results = run_suite(model, processor, tiny_samples(per_kind=2), "tiny", out_dir, CONFIG)
        with open(os.path.join(out_dir, f"returned.{rank}.json"), "w") as f:
            json.dump(results, f)
        # both ranks done talking before either tears gloo down (a rank leaving early aborted its peer once)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_report_what_one_process_reports(tmp_path):
    model, processor = _lively_teacher()
    single = run_suite(model, processor, tiny_samples(per_kind=2), "tiny", str(tmp_path / "one"), CONFIG)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)

    one = (tmp_path / "one/tiny/samples.jsonl").read_text().splitlines()
    two = (tmp_path / "two/tiny/samples.jsonl").read_text().splitlines()
    assert len({json.loads(line)["prediction"] for line in one}) > 2  # distinct answers, so order matters
    assert two == one
    assert sorted(p.name for p in (tmp_path / "two/tiny").iterdir()) == ["results.json", "results.md", "samples.jsonl"]
    merged = json.loads((tmp_path / "two/tiny/results.json").read_text())
    returned = [json.loads((tmp_path / f"two/returned.{r}.json").read_text()) for r in (0, 1)]
    assert returned[0] == returned[1] == merged
    assert (merged["n"], merged["score"], merged["categories"]) == (single["n"], single["score"], single["categories"])
