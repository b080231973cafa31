"""GPU stages on one node or several: torchrun's c10d rendezvous, coordinated by the leader node.

Who runs what. The leader node (node rank 0) runs the pipeline itself: the Prefect flow run or `infinitevl run`.
Only its process takes a stage's lease, picks the stage's attempt and writes the job; for the whole run it also
hosts the rendezvous store, a torch TCPStore at `launch.rdzv_endpoint`, from the wrapper
`python -m pipeline.multinode lead` (or `node`, which picks lead or follow from the platform's node rank). Every
other node runs `python -m pipeline.multinode follow`: no pipeline code, no lease, only torchrun agents. A stage
launch on the leader posts a record (torchrun's arguments and the job's files) to the store, then runs its own
agent; each follower starts an agent with the same arguments, and all agents join the c10d rendezvous whose run
id names the stage's attempt. torchrun assigns the ranks; rank 0 (on whichever node) commits checkpoints and the
export to the run root, which every node must reach (S3, or a shared file system).

When a node dies, the ranks on the others fail at their next collective and their agents restart the group
(`launch.max_restarts`): they re-rendezvous, waiting up to `launch.join_timeout_s` for `launch.nnodes` nodes (the
platform replaces the lost one, which follows the running launch again) or going on with `launch.min_nnodes`, and
every worker resumes from the newest committed checkpoint (converted to DeepSpeed's universal layout when the world
size changed). When the leader's launch ends, whatever some follower's agent still runs is stopped; when the
leader's command ends, the followers exit (0), and a follower that loses the store exits with LOST_LEADER.

One node (`launch.nnodes` 1) needs none of this: the stage's agent hosts a store of its own on a free port.

Keys in the store: `infinitevl/launches` (how many launches were posted), `infinitevl/launch/<n>` (the record),
`infinitevl/launch/<n>/end` (ok, failed or cancelled), `infinitevl/done` (the leader's command's exit code),
`infinitevl/arrived`, `infinitevl/left` (followers).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator, Mapping, Sequence

from pipeline.launch import LaunchError, Rendezvous, kill_group, launch, launch_command

log = logging.getLogger(__name__)

PREFIX = "infinitevl/"
FILES = "{files}"          # in a launch's arguments: the folder its files were written to, on each node
DEFAULT_PORT = 29400       # torchrun's own default for c10d
LEADER_FAILED = 86         # exit codes the platforms act on (infra/k8s: the Job fails at once)
LOST_LEADER = 87
ENDPOINT_ENV, NNODES_ENV, NODE_RANK_ENV = "INFINITEVL_RDZV_ENDPOINT", "INFINITEVL_NNODES", "INFINITEVL_NODE_RANK"
K8S_SUBDOMAIN_ENV = "INFINITEVL_K8S_SUBDOMAIN"
# Each rendezvous round publishes the workers' MASTER_ADDR/PORT anew. With torchrun's default (rank 0's agent
# shares its own store with the workers and remembers its address across rounds) an agent that joins a later
# round, a lost node's replacement, waits forever for an address the earlier agents never publish again, and an
# agent whose rank-0 peer died keeps pointing its workers at it (torch 2.13).
AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class LaunchConfigError(ValueError):
    """A multi-node launch that cannot work as configured, found before any agent starts."""


# -- what a stage runs on ---------------------------------------------------------------------------------------

def processes_per_node(config, own: int | None) -> int:
    """launch.nproc_per_node when set (it wins), else the stage's own nproc_per_node (eval has none: 1)."""
    return config.launch.nproc_per_node or own or 1


def gpus_per_node(config) -> int:
    """What each node must hold for the run's stages: launch.nproc_per_node, else the most any planned stage
    takes (a pod or Slurm node is sized once for the whole run)."""
    if config.launch.nproc_per_node:
        return config.launch.nproc_per_node
    own = {"teacher-logits": config.teacher_logits.nproc_per_node,
           **{name: getattr(config.train, name).nproc_per_node for name in type(config.train).model_fields}}
    return max([own.get(stage, 1) for stage in config.run.stages] + [1])


def rendezvous_id(output: str) -> str:
    """The run id of a stage attempt's rendezvous: its stage and attempt folder, and a hash of the whole URL (two
    runs roots may share a leader)."""
    parts = output.rstrip("/").split("/")
    return f"{'-'.join(parts[-2:])}-{hashlib.sha256(output.encode()).hexdigest()[:8]}"


def endpoint_of(config) -> str | None:
    return config.launch.rdzv_endpoint or os.environ.get(ENDPOINT_ENV) or None


def launch_problems(config, launcher: str | None = None, field: str = "") -> list[str]:
    """What makes a multi-node launch impossible, one line each (the recipes' `check`)."""
    nnodes = config.launch.nnodes
    if nnodes == 1:
        return []
    problems = []
    if launcher == "deepspeed":
        problems.append(f"{field}.launcher: deepspeed's launcher reaches other nodes over ssh with a hostfile; with "
                        f"launch.nnodes {nnodes} use torchrun (python is taken as torchrun there)")
    if endpoint_of(config) is None:
        problems.append(f"launch.rdzv_endpoint: launch.nnodes is {nnodes} but no rendezvous endpoint is set (nor "
                        f"{ENDPOINT_ENV}): set it to the leader node's host:port, or start the run under `python -m "
                        "pipeline.multinode node` (infra/k8s, infra/slurm do)")
    platform = os.environ.get(NNODES_ENV)
    if platform and int(platform) != nnodes:
        problems.append(f"launch.nnodes is {nnodes} but this job has {platform} nodes ({NNODES_ENV})")
    return problems


def launch_stage(ctx, module: str, args: Sequence[str], nproc_per_node: int, launcher: str = "torchrun",
                 files: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None) -> None:
    """Runs `module` for the stage of `ctx` on launch.nnodes nodes of `nproc_per_node` processes each. `files`
    (name -> text) are written to a fresh folder on every node, which FILES in `args` names."""
    settings = ctx.config.launch
    env = {**AGENT_ENV, **(env or {})}
    problems = launch_problems(ctx.config, launcher, f"train.{ctx.name}")
    if problems:
        raise LaunchConfigError("; ".join(problems))
    # on one node a failed group fails the stage at once (a worker that always fails, out of memory say, is not
    # tried max_restarts more times); the next run resumes from the newest committed checkpoint
    restarts = settings.max_restarts if settings.nnodes > 1 else 0
    rendezvous = Rendezvous(rendezvous_id(ctx.output), nnodes=settings.nnodes, min_nnodes=settings.min_nnodes,
                            max_restarts=restarts, join_timeout_s=settings.join_timeout_s)
    if settings.nnodes == 1:
        with _written(files) as folder:
            cmd = launch_command(launcher, module, _placed(args, folder), nproc_per_node, rendezvous)
            launch(cmd, ctx.log, env=env, processes=nproc_per_node)
        return
    board = Board.connect(endpoint_of(ctx.config), wait_s=60)
    try:
        seq = board.next_launch()
        rendezvous = Rendezvous(f"{rendezvous.run_id}-{seq}", endpoint_of(ctx.config), settings.nnodes,
                                settings.min_nnodes, settings.max_restarts, settings.join_timeout_s,
                                external_store=True)
        argv = launch_command("torchrun", module, list(args), nproc_per_node, rendezvous)
        record = {"stage": ctx.name, "output": ctx.output, "argv": argv, "files": dict(files or {}), "env": env,
                  "cwd": os.getcwd()}  # relative paths of the config mean on every node what they mean here
        board.post(seq, record)
        ctx.log.info("%s: launch %d posted to %d nodes x %d processes (rendezvous %s at %s)", ctx.name, seq,
                     settings.nnodes, nproc_per_node, rendezvous.run_id, rendezvous.endpoint)
        status = "cancelled"
        try:
            run_record(record, ctx.log)
            status = "ok"
        except LaunchError:
            status = "failed"
            raise
        finally:
            board.end(seq, status)
    finally:
        board.close()


def run_record(record: dict, logger: logging.Logger, on_start=None) -> None:
    """This node's agent for a posted launch (with this node's interpreter), its files in a fresh folder."""
    with _written(record["files"]) as folder:
        argv = [sys.executable, *_placed(record["argv"][1:], folder)]
        cwd = record.get("cwd")
        processes = next((int(a.split("=", 1)[1]) for a in argv if a.startswith("--nproc-per-node=")), 1)
        launch(argv, logger, env=record.get("env"), cwd=cwd if cwd and os.path.isdir(cwd) else None,
               on_start=on_start, processes=processes)


@contextlib.contextmanager
def _written(files: Mapping[str, str] | None) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="infinitevl-launch-") as folder:
        for name, text in (files or {}).items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
        yield folder


def _placed(args: Sequence[str], folder: str) -> list[str]:
    return [a.replace(FILES, folder) for a in args]


# -- the store that coordinates the nodes ---------------------------------------------------------------------

def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchConfigError(f"rendezvous endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


class Board:
    """The leader's store seen from one process: what was launched, how it ended, whether the run is done."""

    def __init__(self, store):
        self.store = store

    @classmethod
    def host(cls, endpoint: str) -> "Board":
        """Hosts the store on every interface at endpoint's port (the leader's wrapper does, for the whole run)."""
        from torch.distributed import TCPStore

        host, port = split_endpoint(endpoint)
        store = TCPStore(host, port, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=60))
        return cls(store)

    @classmethod
    def connect(cls, endpoint: str, wait_s: float) -> "Board":
        """A client of the store at `endpoint`, retrying until it answers or `wait_s` passes."""
        from torch.distributed import TCPStore

        host, port = split_endpoint(endpoint)
        deadline = time.monotonic() + wait_s
        while True:
            attempt_s = max(1.0, min(30.0, deadline - time.monotonic()))  # also how long each operation may wait
            try:
                return cls(TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=attempt_s)))
            except (RuntimeError, TimeoutError, OSError) as exc:
                if time.monotonic() >= deadline:
                    raise LaunchConfigError(
                        f"nothing hosts the rendezvous store at {endpoint} ({type(exc).__name__}: {exc}); the "
                        "leader node runs `python -m pipeline.multinode lead` (or `node`) for the whole run") from exc
                time.sleep(2)

    def _get(self, key: str):
        return json.loads(self.store.get(PREFIX + key))

    def _has(self, key: str) -> bool:
        return self.store.check([PREFIX + key])

    def next_launch(self) -> int:
        return int(self.store.add(PREFIX + "launches", 1))

    def latest(self) -> int:
        return int(self.store.add(PREFIX + "launches", 0))

    def post(self, seq: int, record: dict) -> None:
        self.store.set(f"{PREFIX}launch/{seq}", json.dumps(record))

    def record(self, seq: int) -> dict | None:
        return self._get(f"launch/{seq}") if self._has(f"launch/{seq}") else None

    def end(self, seq: int, status: str) -> None:
        self.store.set(f"{PREFIX}launch/{seq}/end", json.dumps(status))

    def ended(self, seq: int) -> str | None:
        return self._get(f"launch/{seq}/end") if self._has(f"launch/{seq}/end") else None

    def finish_run(self, returncode: int) -> None:
        self.store.set(PREFIX + "done", json.dumps(returncode))

    def done(self) -> int | None:
        return self._get("done") if self._has("done") else None

    def count(self, name: str, add: int = 0) -> int:
        return int(self.store.add(PREFIX + name, add))

    def close(self) -> None:
        self.store = None


# -- the leader's wrapper ---------------------------------------------------------------------------------------

def lead(endpoint: str, command: Sequence[str], nnodes: int | None = None, linger_s: float = 60.0) -> int:
    """Hosts the store, runs `command` (the pipeline) with the endpoint in its environment, then tells the
    followers the run is done and waits (up to `linger_s`) for them to leave. Returns the exit code for the node:
    0, or LEADER_FAILED when the command failed (its own code is logged)."""
    board = Board.host(endpoint)
    env = {**os.environ, ENDPOINT_ENV: endpoint}
    if nnodes is not None:
        env[NNODES_ENV] = str(nnodes)
    log.info("leader: rendezvous store at %s; running %s", endpoint, " ".join(command))
    child = subprocess.Popen(list(command), env=env)
    forward = {sig: signal.signal(sig, lambda s, _f: child.send_signal(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = child.wait()
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)
    board.finish_run(returncode)
    # every follower the job has (those not arrived yet too: a short command may end before they start) reads
    # that the run is done before the store goes away with this process
    expected = lambda: max(board.count("arrived"), (nnodes or 1) - 1)  # noqa: E731
    deadline = time.monotonic() + linger_s
    while board.count("left") < expected() and time.monotonic() < deadline:
        time.sleep(0.5)
    log.info("leader: %s exited with %d; %d of %d followers left", command[0], returncode, board.count("left"),
             board.count("arrived"))
    return 0 if returncode == 0 else LEADER_FAILED


# -- a follower ----------------------------------------------------------------------------------------------------

def follow(endpoint: str, wait_s: float = 1800.0, poll_s: float = 1.0, grace_s: float = 120.0) -> int:
    """Runs this node's agent for every launch the leader posts until the leader's run is done. A launch already
    running when the follower starts (it replaces a lost node) is joined; one that has ended is not."""
    board = Board.connect(endpoint, wait_s)
    node = socket.gethostname()
    board.count("arrived", 1)
    log.info("follower %s: waiting for launches at %s", node, endpoint)
    seen = 0
    try:
        while True:
            latest = board.latest()
            record = board.record(latest) if latest > seen else None
            if record is not None:  # (the number is taken a moment before the record is posted)
                seen = latest
                if board.ended(latest) is None:
                    _follow_launch(board, latest, record, poll_s, grace_s)
                continue
            code = board.done()
            if code is not None:
                log.info("follower %s: the leader's run ended (exit code %d)", node, code)
                board.count("left", 1)
                return 0
            time.sleep(poll_s)
    except (RuntimeError, OSError) as exc:  # the store's host is gone: so is the run this node served
        log.error("follower %s: lost the leader's store at %s (%s)", node, endpoint, exc)
        return LOST_LEADER


def _follow_launch(board: Board, seq: int, record: dict, poll_s: float, grace_s: float) -> None:
    """Runs the agent of launch `seq`, stopping it when the leader's launch ends without it (at once unless it
    ended well: then after `grace_s`, the time this node's ranks may still need to leave the group)."""
    started: list[subprocess.Popen] = []
    outcome: list[BaseException | None] = []

    def agent():
        try:
            run_record(record, log, on_start=started.append)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported below, the follower goes on
            outcome.append(exc)

    log.info("follower: launch %d (%s), %s", seq, record["stage"], " ".join(record["argv"]))
    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    stop_at = None
    try:
        while thread.is_alive():
            thread.join(poll_s)
            if stop_at is None and thread.is_alive():
                status = board.ended(seq)
                if status is not None:
                    stop_at = time.monotonic() + (grace_s if status == "ok" else 0.0)
            if stop_at is not None and time.monotonic() >= stop_at and started:
                log.warning("follower: the leader's launch %d ended; stopping this node's agent", seq)
                kill_group(started[0], grace_s=10.0)
    except BaseException:
        if started:
            kill_group(started[0], grace_s=10.0)
        raise
    error = outcome[0] if outcome else None
    log.info("follower: launch %d ended on this node: %s", seq, "ok" if error is None else error)


# -- a node of a platform's job -----------------------------------------------------------------------------------

def node_rank() -> int:
    """This node's place in the platform's job: INFINITEVL_NODE_RANK, else the Kubernetes indexed Job's
    JOB_COMPLETION_INDEX, else Slurm's SLURM_NODEID."""
    for name in (NODE_RANK_ENV, "JOB_COMPLETION_INDEX", "SLURM_NODEID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    raise LaunchConfigError(f"no node rank: set {NODE_RANK_ENV}, or run as a Kubernetes indexed Job's pod "
                            "(JOB_COMPLETION_INDEX) or a Slurm task (SLURM_NODEID)")


def platform_nnodes() -> int | None:
    for name in (NNODES_ENV, "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def platform_endpoint(port: int = DEFAULT_PORT, k8s_subdomain: str | None = None) -> str:
    """INFINITEVL_RDZV_ENDPOINT, else on Kubernetes index 0's pod: an indexed Job's pods are named
    `<job>-<index>`, and the headless Service whose name is their subdomain gives each a DNS name."""
    if os.environ.get(ENDPOINT_ENV):
        return os.environ[ENDPOINT_ENV]
    index, subdomain = os.environ.get("JOB_COMPLETION_INDEX"), k8s_subdomain or os.environ.get(K8S_SUBDOMAIN_ENV)
    if index is not None and subdomain:
        job = socket.gethostname().removesuffix(f"-{index}")
        return f"{job}-0.{subdomain}:{port}"
    raise LaunchConfigError(f"no rendezvous endpoint: set {ENDPOINT_ENV} (the sbatch script does), or give "
                            "--k8s-subdomain in an indexed Job's pods (the Kubernetes template does)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.multinode", description=__doc__,
                                     usage="%(prog)s {node,lead,follow} [options] [-- COMMAND ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    for name, text in (("node", "lead or follow, as the platform's node rank says"),
                       ("lead", "host the store and run the pipeline command"),
                       ("follow", "run the leader's launches until its run is done")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--endpoint", help=f"host:port of the store (default: {ENDPOINT_ENV} or the platform's)")
        p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the store's port, where the platform gives "
                                                                      "the host")
        p.add_argument("--k8s-subdomain", help="Kubernetes: the headless Service naming the indexed Job's pods")
        p.add_argument("--nnodes", type=int, help=f"nodes of the platform's job (default: {NNODES_ENV} or Slurm's)")
        p.add_argument("--wait", type=float, default=1800.0, help="seconds a follower waits for the leader's store")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]  # after --: the leader's command
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s %(message)s")
    endpoint = args.endpoint or platform_endpoint(args.port, args.k8s_subdomain)
    role = args.role
    if role == "node":
        role = "lead" if node_rank() == 0 else "follow"
    if role == "follow":
        return follow(endpoint, wait_s=args.wait)
    if not command:
        parser.error("the leader runs the pipeline command given after --")
    return lead(endpoint, command, args.nnodes or platform_nnodes())


if __name__ == "__main__":
    sys.exit(main())
