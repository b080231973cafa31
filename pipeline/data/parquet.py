"""Parquet sources: rows found by index, read one row group at a time; FineVision's layout.

format `parquet` covers FineVision (one folder per subset, `ai2d_merged/train-00000-of-00005.parquet`;
rows of `images` (a list of {bytes, path}, empty for text-only subsets), `texts` (a list of
{user, assistant} turns), `source`, and per-turn quality ratings) and The Cauldron (the same `images`
and `texts`). FineVision rows carry no id: they are named by file and row.

Only the footers are read up front (row counts per row group); a row is read with its row group, of the
columns the reader needs, and the last few row groups stay in memory, so a shard that reads its records
in file order reads each row group once. A string that is not UTF-8 sets its row aside, not the file.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow.parquet as pq

from pipeline import storage

from .config import SourceConfig
from .quarantine import BadRecord
from .sources import Place, RawRecord, record_id, relative, source_files

OPEN_FILES = 4
CACHED_ROW_GROUPS = 2


class ParquetRows:
    """The rows of a source's Parquet files by global index, as {field: value} of the fields asked for.

    `required` and `optional` map field names to column names; a file without a required column is an
    error about the whole source (the wrong `format` or `columns`), not about its rows.
    """

    def __init__(self, path: str, storage_options: dict | None, required: dict[str, str],
                 optional: dict[str, str], layout_hint: str):
        self.path, self.storage_options = path, storage_options
        self.required, self.optional, self.layout_hint = required, optional, layout_hint
        self.root, self.files = source_files(path, (".parquet",), storage_options)
        self._handles: OrderedDict[int, tuple] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int], tuple[dict, object]] = OrderedDict()
        self.group_rows, self.columns = [], []
        for k in range(len(self.files)):
            meta = self._parquet(k).metadata
            self.group_rows.append(np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]))
            self.columns.append(set(self._parquet(k).schema_arrow.names))
        self.offsets = np.cumsum([0] + [int(g[-1]) for g in self.group_rows])
        self.fields = [self._columns(k) for k in range(len(self.files))]  # a file of another layout fails here

    def count(self) -> int:
        return int(self.offsets[-1])

    def _find(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.count():
            raise IndexError(f"{self.path} has no record {index}")
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return k, index - int(self.offsets[k])

    def place(self, index: int) -> Place:
        k, row = self._find(index)
        return Place(self.files[k], f"row {row}", f"{relative(self.files[k], self.root)}:{row}")

    def _parquet(self, k: int) -> pq.ParquetFile:
        if k not in self._handles:
            # no read-ahead: pyarrow asks for exactly the column chunks it needs
            f = storage.open_url(self.files[k], "rb", self.storage_options, cache_type="none") \
                if not storage.is_local(self.files[k]) else open(self.files[k].removeprefix("file://"), "rb")
            self._handles[k] = (f, pq.ParquetFile(f))
            while len(self._handles) > OPEN_FILES:
                old, _ = self._handles.popitem(last=False)[1]
                old.close()
        self._handles.move_to_end(k)
        return self._handles[k][1]

    def _columns(self, k: int) -> dict[str, str]:
        """field -> column of file k; a file without the required columns is of another layout."""
        present = self.columns[k]
        missing = [c for c in self.required.values() if c not in present]
        if missing:
            raise ValueError(f"{self.files[k]} has no column {', '.join(map(repr, missing))} (its columns: "
                             f"{', '.join(sorted(present))}); the source is read as format {self.layout_hint}: "
                             f"{_LAYOUTS}; or name the columns with `columns`")
        return {**self.required, **{f: c for f, c in self.optional.items() if c in present}}

    def row(self, index: int) -> dict:
        """The row's fields; BadRecord if a string in it is not UTF-8."""
        k, row = self._find(index)
        g = int(np.searchsorted(self.group_rows[k], row, side="right") - 1)
        if (k, g) not in self._groups:
            columns = self.fields[k]
            table = self._parquet(k).read_row_group(g, columns=sorted(set(columns.values())))
            self._groups[(k, g)] = (columns, table)
            while len(self._groups) > CACHED_ROW_GROUPS:
                self._groups.popitem(last=False)
        self._groups.move_to_end((k, g))
        columns, table = self._groups[(k, g)]
        r = row - int(self.group_rows[k][g])
        out = {}
        for field, column in columns.items():
            try:
                out[field] = table.column(column)[r].as_py()
            except UnicodeDecodeError as exc:
                raise BadRecord(f"not UTF-8 at byte {exc.start} of column {column!r}: {exc.reason}") from None
        return out


_LAYOUTS = ("`parquet` reads FineVision / The Cauldron (images, texts), `llava-parquet` reads LLaVA-OneVision-Data "
            "(id, image, conversations)")


class ParquetReader:
    def __init__(self, source: SourceConfig, storage_options: dict | None = None):
        self.source = source
        self.rows = ParquetRows(source.path, storage_options,
                                required={"images": source.column("images"), "texts": source.column("texts")},
                                optional={"id": source.column("id")}, layout_hint="parquet")

    def count(self) -> int:
        return self.rows.count()

    def place(self, index: int) -> Place:
        return self.rows.place(index)

    def read(self, index: int) -> RawRecord:
        where = self.rows.place(index)
        row = self.rows.row(index)
        rid = record_id(row.get("id"))
        data = []
        for im in row.get("images") or []:
            blob = im.get("bytes") if isinstance(im, dict) else im
            if not isinstance(blob, (bytes, bytearray)) or not blob:
                err = BadRecord("missing image: no bytes in the row")
                err.record_id = rid
                raise err
            data.append(bytes(blob))
        return RawRecord(source=self.source.name, index=index, location=where.location, position=where.position,
                         ref=where.ref, turns=texts_turns(row.get("texts")), record_id=rid, images=data)


def texts_turns(texts):
    """{user, assistant} pairs (FineVision, The Cauldron) or {role, content} messages, as (role, text)."""
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
