"""The data stage (corpora → packed Arrow shards + manifest) and the training loader over its output."""

from __future__ import annotations

SHARD_DIR = "shards"
CORPORA = ("distill", "instruct", "long")  # the run's three corpora: Stage I, Stage II, Stage III
SAMPLE = "sample"  # the built-in synthetic sample data, as a source
# single-turn questions on the sample pictures, worded as the held-out `pictures` eval suite asks them
SAMPLE_PICTURES = "sample-pictures"


def shard_name(shard: int) -> str:
    """The shard's path relative to the build's output, as the manifest lists it."""
    return f"{SHARD_DIR}/shard-{shard:05d}.arrow"


def shard_url(output: str, shard: int) -> str:
    return f"{output.rstrip('/')}/{shard_name(shard)}"


def marker_url(output: str, shard: int) -> str:
    return shard_url(output, shard).removesuffix(".arrow") + ".done.json"


def quarantine_url(output: str, shard: int) -> str:
    return shard_url(output, shard).removesuffix(".arrow") + ".quarantine.jsonl"
