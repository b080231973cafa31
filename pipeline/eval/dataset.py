"""The one eval format every benchmark is imported into: an Arrow IPC file of samples.

Columns:
  id        unique within the suite (string)
  suite     benchmark name, e.g. "docvqa"
  image     the encoded image file as published (PNG/JPEG bytes), null for text-only samples
  video     URL of the video file (video benchmarks), "" otherwise; frames are sampled at eval time
  question  the question text
  hint      context shown before the question (MMBench), "" if none
  answers   accepted answers; for multiple choice, the one correct letter
  options   option texts in letter order (multiple choice), [] otherwise
  metric    how a prediction is scored: one of metrics.METRICS
  category  the benchmark's own category/type, used for per-category scores
  source    sub-dataset (OCRBench's dataset_name, ChartQA's human/augmented split)
  group     rotations of one circular multiple-choice question share a group, "" otherwise
"""

from __future__ import annotations

import io
from typing import Iterable, Iterator

import pyarrow as pa
from PIL import Image

from pipeline import storage

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("suite", pa.string()),
    ("image", pa.binary()),
    ("video", pa.string()),
    ("question", pa.string()),
    ("hint", pa.string()),
    ("answers", pa.list_(pa.string())),
    ("options", pa.list_(pa.string())),
    ("metric", pa.string()),
    ("category", pa.string()),
    ("source", pa.string()),
    ("group", pa.string()),
])

_DEFAULTS = {"image": None, "video": "", "hint": "", "options": [], "category": "", "source": "", "group": ""}
_BATCH_ROWS = 256  # keeps memory bounded when a benchmark holds gigabytes of images


def make_sample(**fields) -> dict:
    sample = {**_DEFAULTS, **fields}
    missing = [name for name in SCHEMA.names if name not in sample]
    if missing:
        raise ValueError(f"sample lacks {missing}")
    return {name: sample[name] for name in SCHEMA.names}


def write_samples(samples: Iterable[dict], url: str) -> int:
    """Writes samples to an Arrow IPC file at an fsspec URL; returns the number written.

    If producing the samples fails, the file is removed: closing the writer would otherwise leave a
    valid-looking file holding only the first part of the benchmark.
    """
    count = 0
    try:
        with storage.open_url(url, "wb") as f, pa.ipc.new_file(f, SCHEMA) as writer:
            batch: list[dict] = []
            for sample in samples:
                batch.append(make_sample(**sample))
                if len(batch) == _BATCH_ROWS:
                    writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=SCHEMA))
                    count += len(batch)
                    batch = []
            if batch:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=SCHEMA))
                count += len(batch)
    except BaseException:
        storage.delete(url)
        raise
    return count


def read_samples(url: str, limit: int | None = None) -> Iterator[dict]:
    """Samples of an eval file, one record batch in memory at a time."""
    seen = 0
    with storage.open_url(url, "rb") as f:
        reader = pa.ipc.open_file(f)
        for i in range(reader.num_record_batches):
            for row in reader.get_batch(i).to_pylist():
                if limit is not None and seen >= limit:
                    return
                seen += 1
                yield row


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()
