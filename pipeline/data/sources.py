"""Source readers: count the records of a source, and read one record by its index.

Readers only parse; they do not judge. A record comes out as turns (role, text) and media references,
and whatever is wrong with it is found by `pipeline.data.tokenize`. Only a line that is not JSON at all
is rejected here, because there is nothing else to hand on.

A record's index is its place in the source (0-based over all files of a source in sorted order), so a
shard task can be described by indices alone and re-read on any machine.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from pipeline import storage

from .config import SourceConfig
from .quarantine import BadRecord


@dataclass
class RawRecord:
    source: str
    index: int
    location: str
    position: str
    turns: Any  # as found: normally a list of (role, text)
    images: list = field(default_factory=list)  # URLs (annotations) or bytes (Parquet)
    video: str | None = None
    document: str | None = None


def count_records(source: SourceConfig, storage_options: dict | None = None) -> int:
    if source.format == "llava":
        return len(_annotation(source.path, storage_options))
    return sum(n for _, n in _parquet_files(source.path, storage_options))


def read_record(source: SourceConfig, index: int, storage_options: dict | None = None) -> RawRecord:
    if source.format == "llava":
        return _llava_record(source, index, storage_options)
    return _parquet_record(source, index, storage_options)


def media_root(source: SourceConfig) -> str:
    if source.media_root:
        return source.media_root
    return posixpath.dirname(source.path) if "://" in source.path else os.path.dirname(os.path.abspath(source.path))


# -- LLaVA / ShareGPT annotations ------------------------------------------------------------------------------
_cache: dict[tuple, Any] = {}


def _cached(key: tuple, load):
    """One loaded file per key and process: a shard task reads many records of the same file."""
    if key not in _cache:
        if len(_cache) >= 8:
            _cache.pop(next(iter(_cache)))
        _cache[key] = load()
    return _cache[key]


def _annotation(path: str, storage_options: dict | None) -> list:
    """The items of a .json list, or the raw lines of a .jsonl file (parsed one by one, later)."""

    def load():
        text = storage.read_bytes(path, storage_options).decode("utf-8", errors="replace")
        if path.endswith(".jsonl"):
            return text.splitlines()
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); use .jsonl to keep the good records of a "
                             "damaged file") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: a LLaVA .json annotation file holds a list of records")
        return items

    return _cached(("llava", path), load)


def _llava_record(source: SourceConfig, index: int, storage_options: dict | None) -> RawRecord:
    items = _annotation(source.path, storage_options)
    jsonl = source.path.endswith(".jsonl")
    position = f"line {index + 1}" if jsonl else f"item {index}"
    item = items[index]
    if jsonl:
        if not item.strip():
            raise BadRecord("empty line")
        try:
            item = json.loads(item)
        except json.JSONDecodeError as exc:
            raise BadRecord(f"broken JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(item, dict):
        raise BadRecord(f"malformed record: a {type(item).__name__}, not an object")
    turns = item.get("conversations")
    if isinstance(turns, list):
        turns = [(t.get("from", t.get("role")), t.get("value", t.get("content"))) if isinstance(t, dict) else t
                 for t in turns]
    image = item.get("image", item.get("images"))
    images = [] if image is None else image if isinstance(image, list) else [image]
    root = media_root(source)
    for ref in images:
        if not isinstance(ref, str):
            raise BadRecord(f"malformed record: image reference {ref!r} is not a path")
    return RawRecord(
        source=source.name, index=index, location=source.path, position=position, turns=turns,
        images=[_resolve(ref, root) for ref in images],
        video=_resolve(item["video"], root) if isinstance(item.get("video"), str) else None,
        document=_resolve(item["document"], root) if isinstance(item.get("document"), str) else None,
    )


def _resolve(ref: str, root: str) -> str:
    from .media import resolve

    return resolve(ref, root)


# -- Parquet (FineVision, The Cauldron and the like) ----------------------------------------------------------
def _parquet_files(path: str, storage_options: dict | None) -> list[tuple[str, int]]:
    """(file URL, row count) for a Parquet file, a folder of them or a glob, in sorted order."""

    def load():
        fs, fspath = storage.filesystem(path, storage_options)
        if any(c in fspath for c in "*?["):
            found = sorted(fs.glob(fspath))
        elif fs.isdir(fspath):
            found = sorted(p for p in fs.find(fspath) if p.endswith(".parquet"))
        else:
            found = [fspath]
        if not found:
            raise FileNotFoundError(f"no Parquet files at {path}")
        scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
        out = []
        for p in found:
            with fs.open(p, "rb") as f:
                out.append((scheme + p, pq.ParquetFile(f).metadata.num_rows))
        return out

    return _cached(("parquet-files", path), load)


def _parquet_rows(url: str, columns: tuple[str, ...], storage_options: dict | None) -> list[dict]:
    def load():
        with storage.open_url(url, "rb", storage_options) as f:
            return pq.read_table(f, columns=list(columns)).to_pylist()

    return _cached(("parquet", url, columns), load)


def _parquet_record(source: SourceConfig, index: int, storage_options: dict | None) -> RawRecord:
    offset = index
    for url, rows in _parquet_files(source.path, storage_options):
        if offset < rows:
            break
        offset -= rows
    else:
        raise IndexError(f"{source.name} has no record {index}")
    try:
        row = _parquet_rows(url, (source.images_column, source.texts_column), storage_options)[offset]
    except KeyError as exc:
        raise ValueError(f"{url} has no column {exc}; set images_column / texts_column") from None
    images = row.get(source.images_column) or []
    data = []
    for im in images:
        blob = im.get("bytes") if isinstance(im, dict) else im
        if not isinstance(blob, (bytes, bytearray)) or not blob:
            raise BadRecord("missing image: no bytes in the row")
        data.append(bytes(blob))
    return RawRecord(source=source.name, index=index, location=url, position=f"row {offset}",
                     turns=_parquet_turns(row.get(source.texts_column)), images=data)


def _parquet_turns(texts) -> Any:
    """{user, assistant} pairs (The Cauldron, FineVision) or {role, content} messages, as (role, text)."""
    if not isinstance(texts, list):
        return texts
    turns = []
    for t in texts:
        if isinstance(t, dict) and "user" in t and "assistant" in t:
            turns += [("user", t["user"]), ("assistant", t["assistant"])]
        elif isinstance(t, dict):
            turns.append((t.get("role"), t.get("content")))
        else:
            turns.append(t)
    return turns


def locate(source: SourceConfig, index: int, storage_options: dict | None = None) -> tuple[str, str]:
    """(file, "line n" / "item n" / "row n") of a record, for quarantine entries."""
    if source.format == "llava":
        return source.path, f"line {index + 1}" if source.path.endswith(".jsonl") else f"item {index}"
    for url, rows in _parquet_files(source.path, storage_options):
        if index < rows:
            return url, f"row {index}"
        index -= rows
    return source.path, f"row {index}"
