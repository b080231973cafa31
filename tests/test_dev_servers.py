"""The development servers as a person runs them: `--help` answers, the Prefect server keeps its database in a
home that outlives it, and SIGTERM stops it with nothing left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from infra.prefect_server import free_port
from tests.helpers import alive, descendants

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["infra.prefect_server", "infra.s3server"])
def test_help_answers(module):
    shown = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith(f"usage: python -m {module}"), shown
    assert "Ctrl-C" in shown.stdout


def _start(home: Path, port: int, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    proc = subprocess.Popen([sys.executable, "-m", "infra.prefect_server", "--home", str(home), "--port", str(port)],
                            cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "export PREFECT_API_URL=" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.3)
    return proc


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


@pytest.mark.slow
def test_the_dev_prefect_server_keeps_its_state_and_stops_on_sigterm(tmp_path):
    home, port = tmp_path / "new" / "home", free_port()  # a home that does not exist yet is made
    api = f"http://127.0.0.1:{port}/api"
    first = _start(home, port, tmp_path / "first.log")
    shown = (tmp_path / "first.log").read_text()
    assert f"export PREFECT_API_URL={api}" in shown and "export PREFECT_UI_URL=" in shown
    assert "UI:" not in shown, "the UI is off: no link to it"
    _post(f"{api}/work_pools/", {"name": "kept-across-restarts", "type": "process"})
    started = descendants(first.pid)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while (left := [p for p in started if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not left, "SIGTERM left the server running"
    assert (home / "prefect.db").exists()

    second = _start(home, port, tmp_path / "second.log")
    try:
        pools = _post(f"{api}/work_pools/filter", {})
        assert "kept-across-restarts" in [p["name"] for p in pools]
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
