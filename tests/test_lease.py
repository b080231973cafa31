"""One attempt at a time per stage: a second attempt is refused while the first runs (and touches nothing),
a dead attempt's lease expires and the next one resumes, renewals keep a long attempt alive, an attempt
that lost its lease does not commit, and two attempts racing for a free stage (local disk and a real S3
server) end with exactly one running."""

import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline import storage
from pipeline.config import load_config
from pipeline.lease import StageBusy, StageLease, lease_url
from pipeline.stages import COMPLETE, execute_stage, join
from tests.helpers import fake_recipe

log = logging.getLogger("test")
read_json = storage.read_json_or_none


def attempt(cfg, work, force=False):
    return execute_stage(fake_recipe("teacher", work), cfg, {}, log, force=force)


class Blocking:
    """A stage body that writes a file, then waits until released."""

    def __init__(self):
        self.inside, self.release, self.calls = threading.Event(), threading.Event(), 0

    def __call__(self, ctx):
        self.calls += 1
        storage.write_json(join(ctx.output, "weights.json"), {"call": self.calls})
        self.inside.set()
        assert self.release.wait(30)
        return {"calls": self.calls}


def other_lease(url, renewed_ago: float, ttl_s: float = 120.0) -> None:
    now = time.time()
    storage.write_json(url, {"stage": "teacher", "owner": "someone-else", "host": "node-7", "pid": 4242,
                             "started_at": now - 600, "renewed_at": now - renewed_ago, "ttl_s": ttl_s})


def test_second_attempt_is_refused_while_the_first_runs_and_touches_nothing(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    first, outcome = Blocking(), {}
    runner = threading.Thread(target=lambda: outcome.update(done=attempt(cfg, first)))
    runner.start()
    assert first.inside.wait(30)

    second = Blocking()
    with pytest.raises(StageBusy, match=rf"stage teacher is being run by another attempt: host {socket.gethostname()}"):
        attempt(cfg, second)
    assert second.calls == 0
    assert read_json(join(str(tmp_path), "teacher", "attempt-0001", "weights.json")) == {"call": 1}, \
        "the refused attempt touched the running one's output"

    first.release.set()
    runner.join(30)
    assert outcome["done"].status == "done"
    assert not storage.exists(lease_url(str(tmp_path), "teacher")), "the lease is given back after the commit"
    assert attempt(cfg, second).status == "skipped"


def test_a_dead_attempts_lease_blocks_until_it_expires_then_the_next_attempt_runs(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "run.lease_ttl_s=1.5"])
    url = lease_url(str(tmp_path), "teacher")
    other_lease(url, renewed_ago=0.0, ttl_s=1.5)  # a SIGKILLed attempt: its lease is never renewed again
    work = Blocking()
    work.release.set()
    with pytest.raises(StageBusy, match=r"node-7 pid 4242.*expires 1 s from now"):
        attempt(cfg, work)
    time.sleep(1.6)
    assert attempt(cfg, work).status == "done" and work.calls == 1
    assert not storage.exists(url)


def test_a_rerun_on_the_host_where_the_last_attempt_was_killed_takes_over_at_once(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    url = lease_url(str(tmp_path), "teacher")
    gone = subprocess.Popen(["true"])
    gone.wait()
    other_lease(url, renewed_ago=0.0)
    record = storage.read_json(url)
    storage.write_json(url, {**record, "host": socket.gethostname(), "pid": gone.pid,
                             "pid_namespace": os.readlink("/proc/self/ns/pid")})
    work = Blocking()
    work.release.set()
    assert attempt(cfg, work).status == "done", "a fresh lease of a process that is gone from this host"
    storage.write_json(url, {**record, "host": socket.gethostname(), "pid": os.getppid(),
                             "pid_namespace": os.readlink("/proc/self/ns/pid")})
    with pytest.raises(StageBusy):  # a live process on this host still holds it
        attempt(cfg, work, force=True)


def test_renewals_keep_a_long_attempt_alive_past_its_time_to_live(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}", "run.lease_ttl_s=0.8"])
    first, outcome = Blocking(), {}
    runner = threading.Thread(target=lambda: outcome.update(done=attempt(cfg, first)))
    runner.start()
    assert first.inside.wait(30)
    time.sleep(2.0)  # 2.5 times the time to live
    with pytest.raises(StageBusy):
        attempt(cfg, Blocking())
    first.release.set()
    runner.join(30)
    assert outcome["done"].status == "done"


def test_an_attempt_that_lost_its_lease_does_not_commit(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run.root={tmp_path}"])
    url = lease_url(str(tmp_path), "teacher")

    def presumed_dead(ctx):
        other_lease(url, renewed_ago=0.0)  # it expired while we stalled, and another attempt took it
        return {}

    with pytest.raises(StageBusy, match="lost its lease.*node-7 pid 4242"):
        attempt(cfg, presumed_dead)
    assert read_json(join(str(tmp_path), "teacher", COMPLETE)) is None
    assert storage.read_json(url)["owner"] == "someone-else", "the new holder's lease is left alone"


def race(url: str) -> list[str]:
    barrier, results = threading.Barrier(4), []

    def contender():
        lease = StageLease(url, "teacher", ttl_s=60, settle_s=1.0)
        barrier.wait()
        try:
            lease.acquire()
            results.append("won")
            time.sleep(3)  # hold it while the others verify
            lease.release()
        except StageBusy:
            results.append("busy")

    threads = [threading.Thread(target=contender) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return sorted(results)


def test_attempts_racing_for_a_free_stage_on_local_disk_end_with_one_running(tmp_path):
    assert race(lease_url(str(tmp_path), "teacher")) == ["busy", "busy", "busy", "won"]


@pytest.mark.usefixtures("s3_env")
def test_attempts_racing_for_a_free_stage_on_s3_end_with_one_running(s3):
    url = lease_url(s3.fresh("run"), "teacher")
    assert race(url) == ["busy", "busy", "busy", "won"]
    assert not storage.exists(url)


def test_status_shows_who_runs_a_stage(tmp_path):
    other_lease(lease_url(str(tmp_path), "stage1a"), renewed_ago=5.0)
    other_lease(lease_url(str(tmp_path), "stage1b"), renewed_ago=500.0)  # expired: that attempt died
    shown = subprocess.run([sys.executable, "-m", "flows.cli", "status", "configs/tiny.yaml", "--set",
                            f"run.root={tmp_path}"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "COLUMNS": "200"}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert shown.returncode == 0, shown.stderr
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in shown.stdout.splitlines()
            if line.count("│") > 2}
    assert rows["stage1a"] == "running on node-7 (pid 4242)"
    assert rows["stage1b"] == "to do"
