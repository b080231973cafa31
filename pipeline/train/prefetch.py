"""The next micro-batches made ready while the accelerator runs this one.

Without it each micro-step drew its rows from the loader, packed them and read their stored teacher logits on
the training thread, while the GPU sat idle (the proof recipe waited ~28% of every step for data on a GPU node).
A background thread now does that host work up to `depth` micro-batches ahead, into pinned memory on CUDA, and
the training thread only issues the copies, which run asynchronously behind the compute already queued.

Resuming stays exact: the loader runs ahead of the steps, so each prepared batch carries the loader's position
taken right after its rows were drawn, and `state_dict()` is the position of the last batch handed out, which
is what a checkpoint must record (not the loader's own, which includes batches drawn but never trained on).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass


@dataclass
class Prepared:
    batch: dict          # host tensors (pinned on CUDA) and plain values
    position: dict       # the loader's state right after this batch's rows were drawn
    prepare_s: float     # the background thread's time to draw and pack it


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Hands out `count` micro-batches from `recipe.next_rows(batches)` + `recipe.prepare(rows)`, drawn by a
    background thread at most `depth` ahead. `next(device)` returns the batch on `device` and the seconds the
    caller waited for it (the step's data wait); an error in the thread is raised there, with its traceback."""

    def __init__(self, recipe, loader, count: int, depth: int = 2):
        self._recipe, self._loader = recipe, loader
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._position = loader.state_dict()
        self._left = count
        self._thread = threading.Thread(target=self._fill, args=(count,), name="batch-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, count: int) -> None:
        try:
            batches = iter(self._loader)
            for _ in range(count):
                started = time.monotonic()
                rows = self._recipe.next_rows(batches)
                batch = self._recipe.prepare(rows)
                item = Prepared(batch, self._loader.state_dict(), time.monotonic() - started)
                if not self._put(item):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put(_Failed(e))

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self, device) -> tuple[dict, float, float]:
        """(the batch on `device`, seconds waited for it, seconds the thread spent preparing it)."""
        if self._left <= 0:
            raise RuntimeError("the prefetcher has handed out every batch it was asked for")
        started = time.monotonic()
        item = self._queue.get()
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        batch = self._recipe.to_device(item.batch, device)
        self._left -= 1
        self._position = item.position
        return batch, time.monotonic() - started, item.prepare_s

    def state_dict(self) -> dict:
        """The loader's state as of the last batch handed out: where a resumed run must continue."""
        return dict(self._position)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
