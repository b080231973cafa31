"""The teacher-logit shard format: an Arrow IPC file, one record batch per packed row, like the token
shards, so a reader fetches one row with a ranged read.

A row stores which of its positions are covered (a bitmask over its T tokens, see coverage.py) and, for
each covered position in order, the encoded top-k (encoding.py). It carries the row's sample ids and
token count so a reader can prove it is looking at the row it was asked for.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch

SCHEMA = pa.schema([
    ("row", pa.int32()),
    ("sample_ids", pa.list_(pa.string())),
    ("tokens", pa.int32()),
    ("covered", pa.binary()),   # np.packbits(mask, bitorder="little") over the row's T tokens
    ("logits", pa.binary()),    # covered positions × encoding.bytes_per_position, in position order
])


def logit_row(row: int, sample_ids: list[str], mask: torch.Tensor, encoded: torch.Tensor) -> dict:
    """[T] bool covered mask and its [N, bytes_per_position] uint8 encoded top-k → one shard row."""
    return {"row": row, "sample_ids": list(sample_ids), "tokens": int(mask.numel()),
            "covered": np.packbits(mask.numpy(), bitorder="little").tobytes(),
            "logits": encoded.numpy().tobytes()}


def encode_rows(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, SCHEMA) as writer:
        for row in rows:
            writer.write_batch(pa.RecordBatch.from_pylist([row], schema=SCHEMA))
    return sink.getvalue()


def covered_from_row(row: dict) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(row["covered"], dtype=np.uint8), bitorder="little")[:row["tokens"]]
    return torch.from_numpy(bits.astype(bool))


def encoded_from_row(row: dict, bytes_per_position: int) -> torch.Tensor:
    data = np.frombuffer(row["logits"], dtype=np.uint8)
    return torch.from_numpy(data.copy()).reshape(-1, bytes_per_position)
