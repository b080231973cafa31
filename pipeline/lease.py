"""One attempt at a time per stage output: a lease object that the running attempt renews.

Two attempts at the same stage of the same run root (a deployment run twice, a retry while a stalled
run is still alive, a second machine pointed at the same bucket) would write checkpoints into the same
directory and resume from each other's files. Before a stage runs, its attempt takes the lease
`<run root>/_leases/<stage>.json` (outside the stage's output, which a fresh attempt clears); while
someone else's lease is younger than its time to live, the stage refuses to start and says who holds it.

On a local file system the lease file is created exclusively (a hard link, which fails if it exists).
S3 has no compare-and-swap, so there taking a lease is write-then-verify: read (free or expired), write
ours, wait `settle_s`, read again; of two attempts that raced, only the one whose write landed last
still finds its own lease and goes on. A thread renews the lease every ttl/4 while the stage runs, so a live
attempt never expires; one that died (SIGKILL, a lost node) frees the stage `ttl_s` after its last
renewal (at once for a rerun on the same host, where its process can be seen to be gone), and the next
attempt resumes the stage from its newest checkpoint. Ages are measured on the
renewing host's clock, so keep hosts within a small fraction of the time to live of each other.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from . import storage

log = logging.getLogger(__name__)

LEASES = "_leases"


class StageBusy(RuntimeError):
    """Another live attempt holds the stage's lease."""


def lease_url(run_root: str, stage: str) -> str:
    return storage.join(run_root, LEASES, f"{stage}.json")


def live_holder(run_root: str, stage: str) -> dict | None:
    """The lease record of the attempt running `stage` now, or None (no lease, or an expired one)."""
    try:
        current = storage.read_json(lease_url(run_root, stage))
    except FileNotFoundError:
        return None
    return current if _is_live(current) else None


class StageLease:
    def __init__(self, url: str, stage: str, ttl_s: float = 120.0, settle_s: float = 2.0):
        self.url, self.stage, self.ttl_s, self.settle_s = url, stage, ttl_s, settle_s
        self.owner = uuid.uuid4().hex
        self.started_at = time.time()
        self.lost: str | None = None  # why the lease is no longer ours, found by the renewing thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking, keeping and giving back ----------------------------------------------------------------
    def acquire(self) -> None:
        current = self._read()
        self._refuse_if_held(current)
        if current is None and storage.is_local(self.url):
            if not self._create_local():  # a local file system can create exclusively: no wait
                self._refuse_if_held(self._read())
        else:
            self._write()
            time.sleep(self.settle_s)  # an attempt that raced us has written by now: the last write wins
            self._refuse_if_held(self._read())
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.stage}", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raises StageBusy if the lease was lost while the stage ran (it expired and another attempt took it)."""
        self.lost = self.lost or self._taken_by(self._read())
        if self.lost is not None:
            raise StageBusy(f"stage {self.stage}: this attempt lost its lease {self.url} ({self.lost}); "
                            "not committing over the attempt that holds it now")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self._read()
        if current is not None and current.get("owner") == self.owner:
            storage.delete(self.url)

    def __enter__(self) -> "StageLease":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals --------------------------------------------------------------------------------------
    def _read(self) -> dict | None:
        try:
            return storage.read_json(self.url)
        except FileNotFoundError:
            return None

    def _record(self) -> dict:
        return {"stage": self.stage, "owner": self.owner, "host": socket.gethostname(), "pid_namespace": _pid_namespace(),
                "pid": os.getpid(), "started_at": self.started_at, "renewed_at": time.time(), "ttl_s": self.ttl_s}

    def _write(self) -> None:
        storage.write_json(self.url, self._record())

    def _create_local(self) -> bool:
        """Creates the lease file only if there is none (written aside, then hard-linked: readers never see
        half of it); False if another attempt created it first."""
        path = self.url[len("file://"):] if self.url.startswith("file://") else self.url
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{self.owner}"
        with open(tmp, "w") as f:
            json.dump(self._record(), f)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _taken_by(self, current: dict | None) -> str | None:
        if current is None or current.get("owner") == self.owner:
            return None
        return f"now held by {current.get('host')} pid {current.get('pid')}"

    def _refuse_if_held(self, current: dict | None) -> None:
        if self._taken_by(current) is None:
            return
        age = time.time() - float(current["renewed_at"])
        if not _is_live(current):
            log.warning("stage %s: taking over the lease of %s pid %s (renewed %.0f s ago, time to live %.0f s; "
                        "expired, or its process is gone from this host)", self.stage, current.get("host"),
                        current.get("pid"), age, current["ttl_s"])
            return
        ttl = float(current["ttl_s"])
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(current.get("started_at", 0))))
        raise StageBusy(
            f"stage {self.stage} is being run by another attempt: host {current.get('host')} pid "
            f"{current.get('pid')}, since {since}, lease renewed {age:.0f} s ago ({self.url}). Wait for it to "
            f"finish (the stage is then skipped) or stop it; if it died, its lease expires {ttl - age:.0f} s "
            "from now and the next attempt resumes from its newest checkpoint.")

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.lost = self._taken_by(self._read())
                if self.lost is not None:
                    log.error("stage %s: lost its lease (%s)", self.stage, self.lost)
                    return
                self._write()
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: the next renewal tries again
                log.warning("stage %s: renewing its lease failed (%s); retrying in %.0f s", self.stage, exc,
                            self.ttl_s / 4)


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _is_live(holder: dict) -> bool:
    """Renewed within its time to live, and not seen to be dead."""
    return time.time() - float(holder["renewed_at"]) < float(holder["ttl_s"]) and not _died_here(holder)


def _died_here(holder: dict) -> bool:
    """Whether the lease's holder ran on this host, in this PID namespace (containers may share a host
    name; without namespaces there is no telling), and its process is gone."""
    namespace = _pid_namespace()
    if namespace is None or holder.get("host") != socket.gethostname() or holder.get("pid_namespace") != namespace:
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's process: alive
        pass
    return False
