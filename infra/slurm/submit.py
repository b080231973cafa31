"""The Slurm side of a multi-node run: render the sbatch script from a run config, submit it, follow it.

    python -m infra.slurm.submit configs/infinitevl_4b.yaml --set launch.nnodes=2 \\
        [--image REGISTRY/infinitevl:TAG] [--dry-run] [-- infinitevl run configs/infinitevl_4b.yaml ...]

On a login node (where `sbatch`, `squeue` and `sacct` are): the script (infinitevl.sbatch) asks for
`launch.nnodes` nodes of `launch.nproc_per_node` GPUs and starts `python -m pipeline.multinode node` on each,
the first node running the pipeline command (default: `infinitevl run CONFIG` with the same overrides). Submitting
returns the job id; following polls squeue until the job leaves the queue, copies the job's output file into the
log as it grows, and reads the final state from sacct: anything but COMPLETED raises SlurmJobFailed with the
state, the exit code and the output's last lines. Cancelling the follower (Ctrl-C, a cancelled Prefect flow run
that calls `run_on_slurm`) scancels the job. With an image, srun starts each task in it through pyxis
(`--container-image`).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import time
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "infinitevl.sbatch")
REPO = os.path.dirname(os.path.dirname(HERE))
TAIL_LINES = 40

log = logging.getLogger(__name__)


class SlurmError(RuntimeError):
    """Slurm's tools are missing or refused the job."""


class SlurmJobFailed(RuntimeError):
    def __init__(self, job_id: str, state: str, exit_code: str, tail: list[str]):
        self.job_id, self.state, self.exit_code, self.tail = job_id, state, exit_code, tail
        shown = "\n".join(tail) if tail else "(no output)"
        super().__init__(f"Slurm job {job_id} ended {state} (exit code {exit_code}); last {len(tail)} lines:\n{shown}")


def render_sbatch(config, command: Sequence[str], *, image: str | None = None, job_name: str | None = None,
                  output: str | None = None, workdir: str = REPO, python: str = "python", port: int = 29400,
                  directives: Sequence[str] = ()) -> str:
    """The sbatch script of a run: launch.nnodes nodes of the run's GPUs per node, `command` on the first."""
    from pipeline.multinode import gpus_per_node

    srun_options = f"--container-image={shlex.quote(image)} --container-workdir={shlex.quote(workdir)} " \
        if image else ""
    with open(TEMPLATE) as f:
        template = string.Template(f.read())
    return template.substitute(
        nodes=config.launch.nnodes, gpus_per_node=gpus_per_node(config), job_name=job_name or config.run.name,
        output=output or os.path.join(workdir, "slurm-%j.out"),
        directives="\n".join(f"#SBATCH {d}" for d in directives),
        workdir=shlex.quote(workdir), port=port, srun_options=srun_options, python=shlex.quote(python),
        command=shlex.join(command))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SlurmError(f"{name} is not on PATH: submit from a Slurm login node (or a host with Slurm's client "
                         "tools and its configuration)")
    return path


def submit(script: str) -> str:
    """Submits `script` with sbatch; returns the job id."""
    sbatch = _tool("sbatch")
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
        f.write(script)
    try:
        done = subprocess.run([sbatch, "--parsable", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused the job (exit code {done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def follow(job_id: str, output: str, logger: logging.Logger, poll_s: float = 10.0) -> str:
    """Waits for the job to leave the queue, logging its output file as it grows; returns its final state
    (COMPLETED) or raises SlurmJobFailed."""
    squeue, sacct = _tool("squeue"), _tool("sacct")
    tail: list[str] = []
    offset, state = 0, "PENDING"
    while True:
        queued = subprocess.run([squeue, "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
        now = queued.stdout.strip()
        if now and now != state:
            state = now
            logger.info("Slurm job %s: %s", job_id, state)
        offset = _copy_new_lines(output, offset, logger, tail)
        if not now:  # left the queue: sacct has the outcome
            break
        time.sleep(poll_s)
    offset = _copy_new_lines(output, offset, logger, tail)
    final = subprocess.run([sacct, "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"],
                           capture_output=True, text=True).stdout.strip().splitlines()
    state, exit_code = (final[0].split("|") + ["?"])[:2] if final else ("UNKNOWN", "?")
    state = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 1000"
    if state != "COMPLETED":
        raise SlurmJobFailed(job_id, state, exit_code, tail[-TAIL_LINES:])
    logger.info("Slurm job %s: COMPLETED", job_id)
    return state


def _copy_new_lines(path: str, offset: int, logger: logging.Logger, tail: list[str]) -> int:
    try:
        with open(path, errors="replace") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:  # not written yet (pending), or on a file system this host does not see
        return offset
    complete = chunk[:chunk.rfind("\n") + 1]
    for line in complete.splitlines():
        logger.info(line)
        tail.append(line)
    del tail[:-TAIL_LINES]
    return offset + len(complete.encode())


def run_on_slurm(config, command: Sequence[str], logger: logging.Logger, *, image: str | None = None,
                 output: str | None = None, poll_s: float = 10.0, **options) -> str:
    """Submits the run and follows it to its end; an interrupted follower scancels the job."""
    output = output or os.path.join(REPO, f"slurm-{config.run.name}-{int(time.time())}.out")
    job_id = submit(render_sbatch(config, command, image=image, output=output, **options))
    logger.info("Slurm job %s submitted: %d nodes; output %s", job_id, config.launch.nnodes, output)
    try:
        return follow(job_id, output, logger, poll_s)
    except BaseException as exc:
        if not isinstance(exc, SlurmJobFailed):
            subprocess.run([_tool("scancel"), job_id], capture_output=True)
            logger.warning("Slurm job %s cancelled", job_id)
        raise


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config

    parser = argparse.ArgumentParser(prog="python -m infra.slurm.submit", description=__doc__,
                                     usage="%(prog)s CONFIG [--set k=v ...] [--image IMAGE] [--dry-run] "
                                           "[-- COMMAND ...]",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="section.field=value")
    parser.add_argument("--image", help="a container image for srun's pyxis plugin")
    parser.add_argument("--python", default="python", help="the interpreter with this repository installed")
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    config = load_config(args.config, args.overrides)
    command = command or ["infinitevl", "run", args.config, *[f"--set={o}" for o in args.overrides]]
    if args.dry_run:
        print(render_sbatch(config, command, image=args.image, python=args.python))
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    try:
        run_on_slurm(config, command, logging.getLogger("slurm"), image=args.image, python=args.python)
    except (SlurmError, SlurmJobFailed) as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
