"""The data stage (corpora → packed Arrow shards + manifest) and the training loader over its output."""

from __future__ import annotations

SHARD_DIR = "shards"


def shard_url(output: str, shard: int) -> str:
    return f"{output.rstrip('/')}/{SHARD_DIR}/shard-{shard:05d}.arrow" if output else f"{SHARD_DIR}/shard-{shard:05d}.arrow"


def marker_url(output: str, shard: int) -> str:
    return shard_url(output, shard).removesuffix(".arrow") + ".done.json"


def quarantine_url(output: str, shard: int) -> str:
    return shard_url(output, shard).removesuffix(".arrow") + ".quarantine.jsonl"
