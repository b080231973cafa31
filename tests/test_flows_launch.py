"""The subprocess launcher: output streams line by line, a failure carries the log tail, and an
interrupted launch takes its whole process group down (grandchildren included)."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.launch import LaunchError, launch, launch_command
from tests.helpers import alive


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append((time.monotonic(), record.getMessage()))


@pytest.fixture
def log():
    logger = logging.getLogger("test.launch")
    logger.setLevel(logging.INFO)
    handler = Lines()
    logger.addHandler(handler)
    yield logger, handler
    logger.removeHandler(handler)


def test_output_streams_as_it_is_written(log):
    logger, handler = log
    code = "import time\nprint('first')\ntime.sleep(1.0)\nprint('second')"
    launch([sys.executable, "-c", code], logger)
    lines = {message: t for t, message in handler.lines}
    assert "first" in lines and "second" in lines
    assert lines["second"] - lines["first"] > 0.5, "lines arrive as the child prints them, not at exit"


def test_nonzero_exit_raises_with_the_tail(log):
    logger, _ = log
    code = "import sys\nfor i in range(100): print(f'line {i}')\nprint('boom', file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(LaunchError) as e:
        launch([sys.executable, "-c", code], logger, tail_lines=5)
    assert e.value.returncode == 3
    assert e.value.tail == ["line 96", "line 97", "line 98", "line 99", "boom"]
    assert "exited with code 3" in str(e.value) and "boom" in str(e.value) and "line 50" not in str(e.value)


def test_launch_command_builds_each_launcher():
    assert launch_command("python", "pipeline.x", ["--a"])[1:] == ["-m", "pipeline.x", "--a"]
    torchrun = launch_command("torchrun", "pipeline.x", [], nproc_per_node=2)
    assert torchrun[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in torchrun
    assert launch_command("deepspeed", "pipeline.x", [], nproc_per_node=2)[:3] == ["deepspeed", "--num_gpus=2", "--module"]
    with pytest.raises(ValueError):
        launch_command("slurm", "pipeline.x")


def test_torchrun_joins_the_rendezvous_it_is_given():
    """Without one a standalone rendezvous; with one, torchrun's c10d options: an elastic MIN:MAX node range, the
    leader's store (not hosted by the agent) and the restarts."""
    from pipeline.launch import Rendezvous

    assert "--standalone" in launch_command("torchrun", "pipeline.x", [], nproc_per_node=2)
    group = Rendezvous("stage2-attempt-0001-ab12cd34-3", "node0:29400", nnodes=4, min_nnodes=2, max_restarts=5,
                       join_timeout_s=600, external_store=True)
    cmd = launch_command("torchrun", "pipeline.x", ["--a"], nproc_per_node=8, rendezvous=group)
    assert cmd[cmd.index("-m", 2):] == ["-m", "pipeline.x", "--a"] and "--standalone" not in cmd
    assert {"--nproc-per-node=8", "--nnodes=2:4", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400",
            "--rdzv-id=stage2-attempt-0001-ab12cd34-3", "--rdzv-conf=join_timeout=600,is_host=false",
            "--max-restarts=5"} <= set(cmd)
    one = launch_command("torchrun", "pipeline.x", [], 2, Rendezvous("r", max_restarts=1))
    assert {"--nnodes=1", "--rdzv-endpoint=127.0.0.1:0", "--rdzv-conf=join_timeout=900"} <= set(one)


# The launching process is a real one we signal, as Prefect's runner signals a cancelled flow run: a
# SIGTERM that becomes an exception (Prefect raises TerminationSignal) or a Ctrl-C.
LAUNCHER = textwrap.dedent("""
    import logging, signal, sys
    from pipeline.launch import launch

    def terminate(signum, frame):
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C as a terminal delivers it: a shell's background job (CI run with `&`) starts with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    child = "import subprocess, sys, time; p = subprocess.Popen(['sleep', '300']); print('grandchild', p.pid, flush=True); time.sleep(300)"
    launch([sys.executable, "-c", child], logging.getLogger("x"), grace_s=2)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cancel_kills_the_whole_process_group(sig):
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    grandchild = None
    for line in proc.stdout:
        if line.startswith("grandchild"):
            grandchild = int(line.split()[1])
            break
    assert grandchild is not None
    proc.send_signal(sig)
    proc.wait(timeout=20)
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild), "the grandchild outlived the cancelled launch"


# Launched from a worker thread (as a task submitted to a thread pool would): the signal's exception
# reaches the main thread only, and the group must still go when the process exits.
THREADED_LAUNCHER = LAUNCHER.replace(
    'launch([sys.executable, "-c", child], logging.getLogger("x"), grace_s=2)',
    'import threading, time\n'
    'threading.Thread(target=launch, args=([sys.executable, "-c", child], logging.getLogger("x")), daemon=True).start()\n'
    'time.sleep(300)')


def test_a_launch_in_a_worker_thread_dies_with_its_process():
    assert THREADED_LAUNCHER != LAUNCHER
    proc = subprocess.Popen([sys.executable, "-c", THREADED_LAUNCHER], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    grandchild = next(int(line.split()[1]) for line in proc.stdout if line.startswith("grandchild"))
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(grandchild), "the grandchild outlived the process that launched it"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_launched_child_dies_when_its_launcher_is_sigkilled():
    """No exit handler runs on SIGKILL: the kernel's parent-death signal is what stops the stage's process, which
    would otherwise train on, orphaned, beside the attempt that replaces it."""
    launcher = LAUNCHER.replace("print('grandchild', p.pid, flush=True)", "print('child', os.getpid(), flush=True)")
    launcher = launcher.replace("child = \"import subprocess, sys, time;", "child = \"import os, subprocess, sys, time;")
    assert "print('child', os.getpid()" in launcher and "import os, subprocess" in launcher
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    child = next(int(line.split()[1]) for line in proc.stdout if line.startswith("child"))
    assert alive(child)
    proc.kill()
    proc.wait(timeout=20)
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the launched process outlived its SIGKILLed launcher"


def test_children_keep_autotuning_on_disk_unless_the_user_says_otherwise(log, monkeypatch):
    logger, handler = log
    code = "import os\nprint('autotune=' + os.environ.get('TRITON_CACHE_AUTOTUNING', 'unset'))"
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    launch([sys.executable, "-c", code], logger)
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")
    launch([sys.executable, "-c", code], logger)
    printed = [m for _, m in handler.lines if m.startswith("autotune=")]
    assert printed == ["autotune=1", "autotune=0"]


def test_launched_processes_share_the_cores_and_keep_what_the_user_set(monkeypatch):
    """Two torch processes that each take every core run many times slower than either alone: a launch gives each
    of its processes its share, unless the user set the thread count."""
    import logging
    import sys

    from pipeline.launch import launch

    cores = len(os.sched_getaffinity(0))
    lines = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    log = logging.getLogger("test.threads")
    log.addHandler(Capture())
    log.setLevel(logging.INFO)
    probe = [sys.executable, "-c", "import os, torch; print('threads', os.environ['OMP_NUM_THREADS'], "
                                   "torch.get_num_threads())"]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    launch(probe, log, processes=2)
    share = max(1, cores // 2)
    assert f"threads {share} {share}" in lines
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    launch(probe, log, processes=2)
    assert any(line.startswith("threads 3 ") for line in lines), lines
