"""The training step's batch prefetcher: it prepares ahead, hands batches out in order, records the position of the
last one handed out (what a checkpoint stores, so a resume neither skips nor repeats), stops at its count and
raises a loader's error on the training thread. The whole-trainer check is test_train.py's SIGKILL resume."""

import threading
import time

import pytest
import torch

from pipeline.train.prefetch import Prefetcher


class CountingLoader:
    """A loader over rows 0, 1, 2, ... whose state is how many rows it has drawn (PackedLoader's `consumed`)."""

    def __init__(self, fail_at: int | None = None):
        self.consumed, self.fail_at, self.threads = 0, fail_at, set()

    def __iter__(self):
        while True:
            self.threads.add(threading.current_thread().name)
            if self.consumed == self.fail_at:
                raise ValueError(f"shard 3: row {self.consumed} is unreadable")
            row = {"input_ids": torch.tensor([[self.consumed]])}
            self.consumed += 1
            yield row

    def state_dict(self):
        return {"consumed": self.consumed}


class PairRecipe:
    """Two rows a micro-batch, packed side by side (TrainSetup's next_rows / prepare / to_device)."""

    def next_rows(self, batches):
        return [next(batches) for _ in range(2)]

    def prepare(self, rows):
        return {"input_ids": torch.cat([r["input_ids"] for r in rows], -1), "position": [0, 0]}

    def to_device(self, batch, device):
        return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_batches_come_in_order_and_the_position_is_the_last_handed_out_not_the_loaders():
    loader = CountingLoader()
    feed = Prefetcher(PairRecipe(), loader, count=6, depth=2)
    batch, waited, prepared = feed.next("cpu")
    assert batch["input_ids"].tolist() == [[0, 1]] and waited >= 0 and prepared > 0
    # the thread runs ahead in the background: two batches queued and a third in hand, blocked on the full queue
    _wait_for(lambda: loader.consumed == 2 * 4)
    assert feed.state_dict() == {"consumed": 2}  # not 8: rows 2..7 were drawn but not trained on
    time.sleep(0.2)
    assert loader.consumed == 8, "drew further ahead than its depth"
    assert loader.threads == {"batch-prefetch"}
    got = [feed.next("cpu")[0]["input_ids"].tolist() for _ in range(5)]
    assert got == [[[2, 3]], [[4, 5]], [[6, 7]], [[8, 9]], [[10, 11]]]
    assert feed.state_dict() == {"consumed": 12} and loader.consumed == 12  # stopped at its count
    with pytest.raises(RuntimeError, match="every batch"):
        feed.next("cpu")
    feed.close()


def test_a_resume_from_the_recorded_position_continues_where_the_steps_left_off():
    first = Prefetcher(PairRecipe(), CountingLoader(), count=6, depth=3)
    seen = [first.next("cpu")[0]["input_ids"].tolist() for _ in range(3)]
    saved = first.state_dict()  # a checkpoint after three micro-batches, with more already prepared
    first.close()
    loader = CountingLoader()
    loader.consumed = saved["consumed"]  # PackedLoader.load_state_dict
    second = Prefetcher(PairRecipe(), loader, count=3)
    seen += [second.next("cpu")[0]["input_ids"].tolist() for _ in range(3)]
    assert seen == [[[2 * i, 2 * i + 1]] for i in range(6)]


def test_a_loader_error_is_raised_on_the_training_thread_after_the_good_batches():
    feed = Prefetcher(PairRecipe(), CountingLoader(fail_at=3), count=4)
    assert feed.next("cpu")[0]["input_ids"].tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="shard 3: row 3 is unreadable"):
        feed.next("cpu")
    assert feed.state_dict() == {"consumed": 2}
