"""Storage helpers and the SeaweedFS server, on the real server and on local disk."""

from __future__ import annotations

import os

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
    storage.delete(root, opts)
    assert storage.list_files(root, opts) == []
