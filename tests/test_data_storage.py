"""Storage helpers and the SeaweedFS server, on the real server and on local disk."""

from __future__ import annotations

import http.client
import http.server
import os
import threading
import urllib.parse

import pytest
import s3fs

from pipeline import storage


def test_server_is_local_and_checks_credentials(s3):
    assert s3.endpoint.startswith("http://127.0.0.1:")
    fs = s3fs.S3FileSystem(**s3.storage_options)
    url = s3.fresh("auth") + "/x.bin"
    storage.write_bytes(url, b"x", s3.storage_options)
    wrong = s3fs.S3FileSystem(key=s3.key, secret="not-the-secret", endpoint_url=s3.endpoint, skip_instance_cache=True)
    with pytest.raises(PermissionError):
        wrong.cat_file(url.removeprefix("s3://"))
    assert fs.cat_file(url.removeprefix("s3://")) == b"x"


@pytest.mark.parametrize("where", ["s3", "local"])
def test_commit_writes_the_marker_last_and_lists(s3, tmp_path, where, monkeypatch):
    root = s3.fresh("commit") if where == "s3" else str(tmp_path / "out")
    opts = s3.storage_options if where == "s3" else None
    shard, marker = storage.join(root, "part-0.bin"), storage.join(root, "part-0.done.json")
    objects = {shard: b"abc", storage.join(root, "part-0.q.jsonl"): b""}
    assert storage.list_files(root, opts) == [] and not storage.exists(marker, opts)

    # every write is recorded, and as the marker's starts, what a reader would find then
    writes, readable_before_marker = [], {}
    write_bytes = storage.write_bytes

    def recording(url, data, storage_options=None):
        if url == marker:
            assert not storage.exists(marker, opts)
            readable_before_marker.update(
                {u: storage.read_bytes(u, opts) for u in objects if storage.exists(u, opts)})
        write_bytes(url, data, storage_options)
        writes.append(url)

    monkeypatch.setattr(storage, "write_bytes", recording)
    storage.commit(marker, {"rows": 3}, objects, opts)
    monkeypatch.undo()
    assert writes[-1] == marker and sorted(writes[:-1]) == sorted(objects), writes
    assert readable_before_marker == objects
    assert storage.read_bytes(shard, opts) == b"abc" and storage.read_json(marker, opts) == {"rows": 3}
    assert storage.list_files(root, opts, suffix=".done.json") == [marker]
    assert len(storage.list_files(root, opts)) == 3
    if where == "local":  # written beside the target and renamed: no temporary files stay behind
        assert sorted(os.listdir(root)) == ["part-0.bin", "part-0.done.json", "part-0.q.jsonl"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "nope"), opts)
    assert storage.read_jsonl(storage.join(root, "nope.jsonl"), opts) == []
    with pytest.raises(FileNotFoundError):  # a file its producer must have written
        storage.read_jsonl(storage.join(root, "nope.jsonl"), opts, missing_ok=False)
    storage.delete(root, opts)
    assert storage.list_files(root, opts) == []


class _FlakyS3(http.server.ThreadingHTTPServer):
    """A proxy in front of the real S3 server that answers the first `failures` PUTs with S3's 500 InternalError
    (what the store sends when it cannot take a write for a moment) and forwards everything else unchanged (the
    Host header too, which the request's signature covers)."""

    daemon_threads = True

    def __init__(self, upstream: str, failures: int):
        self.upstream, self.failures, self.puts = urllib.parse.urlsplit(upstream), failures, 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _FlakyHandler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _relay(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        server: _FlakyS3 = self.server
        if self.command == "PUT":
            with server.lock:
                server.puts += 1
                fail = server.puts <= server.failures
            if fail:
                error = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                         b'<Message>We encountered an internal error, please try again.</Message></Error>')
                self.send_response(500)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(error)))
                self.end_headers()
                self.wfile.write(error)
                return
        upstream = http.client.HTTPConnection(server.upstream.hostname, server.upstream.port, timeout=30)
        upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            upstream.putheader(name, value)
        upstream.endheaders(body)
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _relay


def test_a_store_that_fails_a_write_several_times_in_a_row_does_not_fail_the_write(s3, monkeypatch):
    # botocore's own retry decision runs; only its waits are zeroed so the test takes no backoff time
    from aiobotocore.retries import standard as aio_standard
    from botocore.retries import standard

    for module in (standard, aio_standard):
        monkeypatch.setattr(module.ExponentialBackoff, "delay_amount", lambda self, context: 0.0)
    for name in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    proxy = _FlakyS3(s3.endpoint, failures=6)  # past botocore's default of 5 attempts
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        options = {**s3.storage_options, "endpoint_url": proxy.endpoint, "skip_instance_cache": True}
        options.pop("config_kwargs")  # as a user's options come: no retry policy of their own
        url = s3.fresh("flaky") + "/shard.bin"
        storage.write_bytes(url, b"payload", options)
        assert proxy.puts == 7  # six answered with 500, the seventh forwarded
        assert storage.read_bytes(url, s3.storage_options) == b"payload"  # read from the server itself

        # a user's own policy is kept: two attempts in all, then the error
        proxy.puts, proxy.failures = 0, 3
        own = {**options, "config_kwargs": {"retries": {"total_max_attempts": 2, "mode": "standard"}}}
        with pytest.raises(OSError, match="internal error"):
            storage.write_bytes(s3.fresh("flaky") + "/other.bin", b"x", own)
        assert proxy.puts == 2
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_retries_are_added_to_s3_options_only_where_none_are_set(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    assert storage.with_retries("s3://b/k", None) == {"config_kwargs": {"retries": storage.S3_RETRIES}}
    own = {"config_kwargs": {"retries": {"max_attempts": 2}, "read_timeout": 5}, "key": "k"}
    assert storage.with_retries("s3://b/k", own) == own
    assert storage.with_retries("s3://b/k", own)["config_kwargs"]["retries"] is not own["config_kwargs"]["retries"]
    assert storage.with_retries("s3://b/k", {"config_kwargs": {"read_timeout": 5}}) == {
        "config_kwargs": {"read_timeout": 5, "retries": storage.S3_RETRIES}}
    assert storage.with_retries("/local/path", {"x": 1}) == {"x": 1}
    assert storage.with_retries("memory://a", None) == {}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # botocore reads the user's policy from the environment
    assert storage.with_retries("s3://b/k", None) == {}
