"""The shard format: an Arrow IPC file, one packed sequence per record batch.

One batch per sequence lets a reader fetch a single sequence with a ranged read (the file footer
indexes the batches), so a loader can visit sequences in any order without downloading whole shards.
Images are stored as published (document pages and video frames as PNG at model resolution); the
loader resizes them to their grids and turns them into patches.
"""

from __future__ import annotations

import io

import pyarrow as pa

from pipeline import storage

from .tokenize import Sample

_grid = pa.list_(pa.list_(pa.int32()))
SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("doc_lens", pa.list_(pa.int32())),
    ("sample_ids", pa.list_(pa.string())),
    ("images", pa.list_(pa.binary())),
    ("image_grid_thw", _grid),
    ("videos", pa.list_(pa.list_(pa.binary()))),
    ("video_grid_thw", _grid),
    ("second_per_grid_ts", pa.list_(pa.float64())),
])


def pack_row(samples: list[Sample]) -> dict:
    """Concatenates samples (documents) into one sequence row."""
    return {
        "input_ids": [t for s in samples for t in s.input_ids],
        "labels": [t for s in samples for t in s.labels],
        "doc_lens": [len(s) for s in samples],
        "sample_ids": [s.sample_id for s in samples],
        "images": [im for s in samples for im in s.images],
        "image_grid_thw": [g for s in samples for g in s.image_grid_thw],
        "videos": [v for s in samples for v in s.videos],
        "video_grid_thw": [g for s in samples for g in s.video_grid_thw],
        "second_per_grid_ts": [x for s in samples for x in s.second_per_grid_ts],
    }


def encode_shard(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, SCHEMA) as writer:
        for row in rows:
            writer.write_batch(pa.RecordBatch.from_pylist([row], schema=SCHEMA))
    return sink.getvalue()


class ShardReader:
    """Random access to the sequences of one shard, local or remote. With `sha256` (and `size`), the digest its
    builder committed, the file is checked before it is read (once per process: pipeline.storage.verify_file)."""

    def __init__(self, url: str, storage_options: dict | None = None, sha256: str | None = None,
                 size: int | None = None):
        self.url = url
        if sha256 is not None:
            storage.verify_file(url, sha256, size, storage_options)
        if storage.is_local(url):
            self._file = pa.memory_map(url.removeprefix("file://"), "r")
        else:
            # small blocks: a ranged read should fetch about one sequence, not megabytes of its neighbours
            self._file = storage.open_url(url, "rb", storage_options, block_size=1 << 20, cache_type="bytes")
        try:
            self._reader = pa.ipc.open_file(self._file)
        except pa.ArrowInvalid as exc:
            self._file.close()
            raise storage.IntegrityError(url, "an Arrow IPC file", f"unreadable bytes ({exc})") from None

    def __len__(self) -> int:
        return self._reader.num_record_batches

    def row(self, i: int) -> dict:
        return self._reader.get_batch(i).to_pylist()[0]

    def close(self) -> None:
        self._file.close()
