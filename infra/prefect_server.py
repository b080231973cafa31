"""A throwaway `prefect server start` on 127.0.0.1: its own port, PREFECT_HOME and SQLite database.

Deployments, schedules and event triggers need a real server (the temporary one a flow starts on its
own has no schedulers or triggers), so the tests and local development start one of these:

    with PrefectServer() as server:          # in code; server.api_url is the PREFECT_API_URL
        ...

    python -m infra.prefect_server           # for development: a persistent home (~/.infinitevl/prefect), prints
                                             # the export line, runs until Ctrl-C or SIGTERM (--help: options)

`TemporaryServer` is what `infinitevl run` starts when no PREFECT_API_URL is set: Prefect's API alone (as the
temporary server Prefect itself would start), tied to the process that started it, so it goes when that
process goes, whatever ends it (SIGKILL included).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class PrefectServer:
    def __init__(self, port: int | None = None, home: str | None = None, startup_timeout_s: float = 90.0):
        self.port = port or free_port()
        self._own_home = home is None
        self.home = home or tempfile.mkdtemp(prefix="prefect-home-")
        self.startup_timeout_s = startup_timeout_s
        self.log_path = os.path.join(self.home, "server.log")
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    def env(self) -> dict[str, str]:
        """The environment that points a Prefect client or serving process at this server."""
        return {"PREFECT_API_URL": self.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def start(self) -> "PrefectServer":
        env = {
            **os.environ,
            "PREFECT_HOME": self.home,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home}/prefect.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": os.environ.get("PREFECT_UI_ENABLED", "false"),
            "PREFECT_API_URL": "",  # the server must not talk to another one
        }
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(self.port)]
        from pipeline.launch import parent_death_signal

        with open(self.log_path, "ab") as log:  # its own session, ended with its parent even if that is SIGKILLed
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=parent_death_signal(signal.SIGTERM))
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"prefect server not healthy after {self.startup_timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        if self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TemporaryServer:
    """Prefect's API served by one uvicorn process on 127.0.0.1 for the life of this process. The kernel kills it
    when the thread that started it dies (PR_SET_PDEATHSIG), so neither a SIGKILL of the CLI nor an exit that
    skips exit handlers leaves it running; a normal exit stops it. It keeps Prefect's default home and database,
    like the temporary server Prefect starts on its own."""

    def __init__(self, startup_timeout_s: float = 90.0):
        self.port = free_port()
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @classmethod
    def for_this_process(cls) -> "TemporaryServer | None":
        """Unless PREFECT_API_URL is set already: a temporary server, PREFECT_API_URL pointing at it, stopped at
        exit. Call it before Prefect is imported (Prefect reads the URL then); its exit handler runs after
        Prefect's own (registered later, run first), so Prefect's last logs and events still reach it."""
        if os.environ.get("PREFECT_API_URL"):
            return None
        server = cls().start()
        os.environ["PREFECT_API_URL"] = server.api_url
        os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: flow runs print no link to one
        atexit.register(server.stop)
        return server

    def start(self) -> "TemporaryServer":
        import importlib.util

        from pipeline.launch import parent_death_signal

        # found, not imported: Prefect reads PREFECT_API_URL when it is first imported, which must come after
        prefect_dir = os.path.dirname(importlib.util.find_spec("prefect").origin)

        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1", "PREFECT_API_URL": ""}
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", os.path.dirname(prefect_dir),
               "--factory", "prefect.server.api.server:create_app", "--host", HOST, "--port", str(self.port),
               "--log-level", "error", "--lifespan", "on"]
        logging.getLogger("infinitevl").info("starting a temporary Prefect server on %s", self.api_url)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=parent_death_signal(signal.SIGKILL))
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"the temporary Prefect server exited with code {self.proc.returncode}:\n"
                                   f"{self._log.read().decode(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the temporary Prefect server was not healthy after {self.startup_timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._log.close()


DEFAULT_HOME = os.path.join("~", ".infinitevl", "prefect")


def main(argv: list[str] | None = None) -> None:
    """A development server whose state (flow runs, deployments, artifacts) lives in a home folder that outlives it;
    SIGTERM or Ctrl-C stops it, and so does the end of this process, however it ends."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infra.prefect_server", description=main.__doc__)
    parser.add_argument("--home", default=os.environ.get("INFINITEVL_PREFECT_HOME", DEFAULT_HOME),
                        help="PREFECT_HOME: the database and logs (default: $INFINITEVL_PREFECT_HOME or %(default)s)")
    parser.add_argument("--port", type=int, default=4200, help="port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--ui", action="store_true", help="serve Prefect's web UI too")
    args = parser.parse_args(argv)
    home = os.path.abspath(os.path.expanduser(args.home))
    os.makedirs(home, exist_ok=True)
    if args.ui:
        os.environ["PREFECT_UI_ENABLED"] = "true"
    signal.signal(signal.SIGTERM, _stop_on_signal)
    with PrefectServer(port=args.port, home=home) as server:
        print(f"export PREFECT_API_URL={server.api_url}", flush=True)
        if args.ui:
            print(f"UI: http://{HOST}:{server.port}", flush=True)
        else:  # without it, every flow run would print a link to a UI that is not there
            print("export PREFECT_UI_URL=", flush=True)
        print(f"(PREFECT_HOME {server.home}; Ctrl-C stops the server)", flush=True)
        try:
            while server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


def _stop_on_signal(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    main()
