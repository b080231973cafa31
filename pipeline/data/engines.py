"""Running independent shard tasks in parallel, on one machine or a cluster.

- `process` (default): a process pool on this machine. Workers come from a fork server (spawn where
  there is none), never forked from the caller: a forked worker inherits the caller's live S3 client
  (aiohttp sessions bound to another event loop), and tearing those down in the child has hung the
  parent's next request. The processor is shipped to each worker once instead of being rebuilt.
- `dask`: a Dask cluster through dask.distributed: a local one with `workers` processes, or the
  scheduler at `engine_address`.
- `prefect-dask`: the same cluster driven by Prefect's `DaskTaskRunner` inside a Prefect flow, so
  every shard is a tracked task run; it needs a Prefect API (PREFECT_API_URL) for the workers to
  report to, otherwise each worker starts a temporary server of its own.

Every engine yields results as tasks finish; the caller owns the progress bar.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterable, Iterator

from .config import CorpusConfig


def run_tasks(fn: Callable, args: list[tuple], config: CorpusConfig, initializer: Callable | None = None,
              initargs: tuple = ()) -> Iterator:
    """Yields fn(*a) for each a, in completion order; `initializer(*initargs)` runs once per process."""
    if not args:
        return iter(())
    if config.engine == "process":
        return _process_pool(fn, args, config.workers, initializer, initargs)
    if config.engine == "dask":
        return _dask(fn, args, config.workers, config.engine_address)
    return _prefect_dask(fn, args, config.workers, config.engine_address)


def worker_context() -> mp.context.BaseContext:
    """Fresh worker processes with the heavy imports done once, in the fork server."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "transformers", "pyarrow", "s3fs", "pipeline.data.build",
                                     "pipeline.data.llava"])
        return ctx
    return mp.get_context("spawn")


def start_worker_server() -> int | None:
    """Starts the fork server of `worker_context` now, so that its imports (torch, transformers, ...: ~20 s on a
    fresh GPU node, 52-62% of each proof stage's first step waited for its first batch) run while the caller builds
    its model; the loader's workers then fork from a ready server. Returns the server's pid (None where there is no
    fork server)."""
    from multiprocessing import forkserver

    if worker_context().get_start_method() != "forkserver":
        return None
    forkserver.ensure_running()
    return forkserver._forkserver._forkserver_pid


def _process_pool(fn, args, workers: int, initializer, initargs) -> Iterator:
    if workers == 1:
        yield from (fn(*a) for a in args)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(args)), mp_context=worker_context(),
                             initializer=initializer, initargs=initargs) as pool:
        futures = [pool.submit(fn, *a) for a in args]
        for future in as_completed(futures):
            yield future.result()


def _dask(fn, args, workers: int, address: str | None) -> Iterator:
    from dask.distributed import Client, LocalCluster
    from dask.distributed import as_completed as dask_completed

    cluster = None if address else LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                dashboard_address=None)
    client = Client(address or cluster)
    try:
        # pure=False: two shards with equal arguments are still two tasks
        futures = [client.submit(fn, *a, pure=False) for a in args]
        for future in dask_completed(futures):
            yield future.result()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _prefect_dask(fn, args, workers: int, address: str | None) -> Iterator:
    from prefect import flow, task
    from prefect.futures import as_completed as prefect_completed
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=address) if address else DaskTaskRunner(
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                        "dashboard_address": None})
    shard_task = task(fn, name="build-shard", persist_result=False)

    @flow(name="build-corpus-shards", task_runner=runner, persist_result=False)
    def fan_out(arg_list: list[tuple]) -> list:
        futures = [shard_task.submit(*a) for a in arg_list]
        return [f.result() for f in prefect_completed(futures)]

    yield from fan_out(args)


def chunks(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
