"""Source readers: count the records of a source, read one by its index, say where it is.

One reader per `format` (see `pipeline.data.config.SourceConfig`):
    llava          JSON lists / JSON Lines with media files beside them   (pipeline.data.llava)
    llava-parquet  Parquet rows with LLaVA conversations and image bytes   (pipeline.data.llava)
    parquet        Parquet rows with images and user/assistant texts      (pipeline.data.parquet)

Readers only parse; they do not judge. A record comes out as turns (role, text) and media references,
and whatever is wrong with its content is found by `pipeline.data.tokenize`. Only what cannot be read
at all (bytes that are not UTF-8, a line that is not JSON) is rejected here.

A record's index is its place in the source (0-based over the source's files in sorted order), so a
shard task can be described by indices alone and re-read on any machine. A record is named by its own
`id` when it has one, else by its file and line (JSON Lines), item (JSON list) or row (Parquet).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline import storage

from .config import SourceConfig


@dataclass
class RawRecord:
    source: str
    index: int
    location: str  # the file it came from
    position: str  # "line 7", "item 3 (line 12)", "row 12"
    ref: str  # its place as a name: "train.jsonl:7", "llava.json:3", "ai2d/train-00000.parquet:12"
    turns: Any  # as found: normally a list of (role, text)
    record_id: str | None = None  # the record's own id
    images: list = field(default_factory=list)  # URLs (annotations) or bytes (Parquet)
    video: str | None = None
    document: str | None = None

    @property
    def name(self) -> str:
        """What the shards call it: its own id, or where it is."""
        return self.record_id if self.record_id is not None else self.ref


@dataclass(frozen=True)
class Place:
    location: str
    position: str
    ref: str


class Reader(Protocol):
    def count(self) -> int: ...

    def read(self, index: int) -> RawRecord: ...

    def place(self, index: int) -> Place: ...


def count_records(source: SourceConfig, storage_options: dict | None = None) -> int:
    return reader(source, storage_options).count()


def read_record(source: SourceConfig, index: int, storage_options: dict | None = None) -> RawRecord:
    return reader(source, storage_options).read(index)


def locate(source: SourceConfig, index: int, storage_options: dict | None = None) -> Place:
    """Where a record is, for a quarantine entry (also when it could not be read)."""
    return reader(source, storage_options).place(index)


_readers: OrderedDict[tuple, Reader] = OrderedDict()


def reader(source: SourceConfig, storage_options: dict | None = None) -> Reader:
    """The source's reader, made once per process: it indexes the source's files when it is made."""
    key = (source.model_dump_json(), json.dumps(storage_options or {}, sort_keys=True, default=str))
    if key in _readers:
        _readers.move_to_end(key)
        return _readers[key]
    from .llava import LlavaParquetReader, LlavaReader
    from .parquet import ParquetReader

    made = {"llava": LlavaReader, "parquet": ParquetReader, "llava-parquet": LlavaParquetReader}[source.format](
        source, storage_options)
    _readers[key] = made
    while len(_readers) > 16:
        _readers.popitem(last=False)
    return made


# -- files of a source ------------------------------------------------------------------------------------------
_GLOB = re.compile(r"[*?\[]")


def source_files(path: str, suffixes: tuple[str, ...], storage_options: dict | None = None) -> tuple[str, list[str]]:
    """(root, file URLs in sorted order) of a file, a folder (searched recursively for `suffixes`) or a glob.
    Files are named relative to the root in record names."""
    fs, fspath = storage.filesystem(path, storage_options)
    scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
    try:
        glob = _GLOB.search(fspath)
        if glob:  # matching files, and the files under matching folders
            found = []
            for p, info in fs.glob(fspath, detail=True).items():
                if info.get("type") == "directory":
                    found += [f for f in fs.find(p) if f.lower().endswith(suffixes)]
                elif p.lower().endswith(suffixes):
                    found.append(p)
            root = fspath[:glob.start()].rsplit("/", 1)[0]
        elif fs.isdir(fspath):
            found = [p for p in fs.find(fspath) if p.lower().endswith(suffixes)]
            root = fspath.rstrip("/")
        else:
            found = [fspath] if fs.exists(fspath) else []
            root = fspath.rsplit("/", 1)[0]
    except OSError as exc:
        raise storage.StorageError(storage.redact(f"cannot list {path}: {exc}", storage_options)) from None
    if not found:
        raise FileNotFoundError(f"no {' or '.join(suffixes)} files at {path}")
    return scheme + root, [scheme + p for p in sorted(found)]


def relative(url: str, root: str) -> str:
    return url[len(root):].lstrip("/") if url.startswith(root + "/") else url.rsplit("/", 1)[-1]


def folder_of(url: str) -> str:
    return posixpath.dirname(url) if "://" in url else os.path.dirname(os.path.abspath(url))


def record_id(value) -> str | None:
    """A record's own id, as text; ids that are not a string or a whole number are not ids."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (str, int)):
        return str(value)
    return None
