"""Run a training process (python -m, torchrun, deepspeed) as a subprocess that cannot outlive its stage.

The child starts its own process group, so torchrun's workers and their dataloader processes can be
ended together: cancelling the run (KeyboardInterrupt, Prefect's TerminationSignal on SIGTERM, any
exception in the caller) sends SIGTERM to the whole group, then SIGKILL after a grace period. On Linux
the child is also sent SIGTERM when the launching process dies, even by SIGKILL. Its
output streams line by line into a logger (the Prefect run log under the flow), and a non-zero exit
raises LaunchError carrying the last lines, so the failure is readable where the stage failed.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

TAIL_LINES = 40

# Every stage is its own process: without Triton's disk cache of autotuning results each one would
# re-benchmark fla's kernels (minutes on a fresh node). The user's environment overrides these.
CHILD_DEFAULTS = {"TRITON_CACHE_AUTOTUNING": "1"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

def parent_death_signal(sig: int = signal.SIGTERM):
    """Linux: a function for Popen's preexec_fn that asks the kernel to send `sig` to the child when the process
    that launched it dies, even by SIGKILL (no exit handler runs then): a stage whose orchestrator is gone
    must not train on, writing checkpoints beside the attempt that replaces it. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, sig)


_PDEATHSIG = parent_death_signal()

# Process groups of launches still running. A launch in a worker thread never sees the exception a
# signal raises in the main thread, so whatever is left when the interpreter exits is killed then.
_live_groups: set[int] = set()


class LaunchError(RuntimeError):
    def __init__(self, cmd: Sequence[str], returncode: int, tail: list[str]):
        self.cmd, self.returncode, self.tail = list(cmd), returncode, tail
        shown = "\n".join(tail) if tail else "(no output)"
        super().__init__(f"{' '.join(cmd)} exited with code {returncode}; last {len(tail)} lines:\n{shown}")


def python_command(module: str, args: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", module, *args]


@dataclass(frozen=True)
class Rendezvous:
    """torchrun's c10d rendezvous of one launch: the agents that give the same `run_id` to the store at
    `endpoint` form one group of `nnodes` (at least `min_nnodes`) nodes, and restart it from scratch up to
    `max_restarts` times when a worker or a node fails. With `external_store` the store is hosted by the leader
    node's long-lived process (pipeline.multinode), so it outlives any agent; otherwise the agent that finds
    `endpoint` on its own host hosts it (port 0: a free port, for one node)."""
    run_id: str
    endpoint: str = "127.0.0.1:0"
    nnodes: int = 1
    min_nnodes: int | None = None
    max_restarts: int = 0
    join_timeout_s: int = 900
    external_store: bool = False

    def options(self) -> list[str]:
        low = self.min_nnodes or self.nnodes
        conf = [f"join_timeout={self.join_timeout_s}"] + (["is_host=false"] if self.external_store else [])
        return [f"--nnodes={low}:{self.nnodes}" if low != self.nnodes else f"--nnodes={self.nnodes}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}", f"--rdzv-id={self.run_id}",
                f"--rdzv-conf={','.join(conf)}", f"--max-restarts={self.max_restarts}"]


def torchrun_command(module: str, args: Sequence[str] = (), nproc_per_node: int = 1,
                     rendezvous: Rendezvous | None = None) -> list[str]:
    """torchrun for one node's agent; without `rendezvous` a standalone one (a fresh store, a random run id)."""
    group = rendezvous.options() if rendezvous is not None else ["--nnodes=1", "--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", *group,
            "-m", module, *args]


def deepspeed_command(module: str, args: Sequence[str] = (), nproc_per_node: int = 1) -> list[str]:
    return ["deepspeed", f"--num_gpus={nproc_per_node}", "--module", module, *args]


def launch_command(launcher: str, module: str, args: Sequence[str] = (), nproc_per_node: int = 1,
                   rendezvous: Rendezvous | None = None) -> list[str]:
    """The command for a stage's `launcher` config field (`rendezvous`: torchrun's)."""
    if launcher == "python":
        return python_command(module, args)
    if launcher == "torchrun":
        return torchrun_command(module, args, nproc_per_node, rendezvous)
    if launcher == "deepspeed":
        return deepspeed_command(module, args, nproc_per_node)
    raise ValueError(f"unknown launcher {launcher!r}; use python, torchrun or deepspeed")


def thread_env(processes: int = 1) -> dict[str, str]:
    """CPU threads for each of `processes` torch processes started together: their share of the cores this
    process may use (two processes that each take every core run many times slower than either alone). Values
    the user set are kept."""
    share = str(max(1, len(os.sched_getaffinity(0)) // max(1, processes)))
    return {k: os.environ.get(k, share) for k in THREAD_VARIABLES}


def launch(cmd: Sequence[str], log: logging.Logger, env: Mapping[str, str] | None = None, cwd: str | None = None,
           grace_s: float = 10.0, tail_lines: int = TAIL_LINES,
           on_start: Callable[[subprocess.Popen], None] | None = None, processes: int = 1) -> None:
    """Runs `cmd` to completion, streaming its output to `log`; raises LaunchError on a non-zero exit.
    `processes`: how many torch processes `cmd` starts on this node (torchrun's nproc_per_node), which share its
    cores (thread_env). `on_start(proc)` is told the child as soon as it runs (to stop it from another thread:
    kill_group)."""
    full_env = {**CHILD_DEFAULTS, **os.environ, **thread_env(processes), "PYTHONUNBUFFERED": "1", **(env or {})}
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, cwd=cwd,
                            start_new_session=True, preexec_fn=_PDEATHSIG, text=True, errors="replace",
                            bufsize=1)
    _live_groups.add(proc.pid)
    if on_start is not None:
        on_start(proc)
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log.info(line)
        returncode = proc.wait()
    except BaseException:
        log.warning("stopping process group %d of %s", proc.pid, cmd[0])
        kill_group(proc, grace_s)
        raise
    finally:
        _live_groups.discard(proc.pid)
        proc.stdout.close()
    if returncode != 0:
        raise LaunchError(cmd, returncode, list(tail))


def kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the child's whole process group, SIGKILL for whatever is left after `grace_s`."""
    deadline = time.monotonic() + grace_s
    signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    # Workers may outlive the group leader (torchrun's do): the group, not the leader, decides when
    # we are done.
    while signal_group(proc.pid, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


@atexit.register
def _kill_live_groups() -> None:
    for pgid in list(_live_groups):
        signal_group(pgid, signal.SIGKILL)


def signal_group(pgid: int, sig: int) -> bool:
    """Whether any process of the group was there to receive `sig` (0 only checks)."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
