"""LLaVA conversations: annotation files with media beside them, and the same records in Parquet.

format `llava` covers LLaVA-1.5's instruction data (one JSON list, `llava_v1_5_mix665k.json`, with
`image` paths such as `coco/train2017/000000033471.jpg` under the image folder, and text-only records
without one) and LLaVA-Video-178K (one JSON list per duration bucket, source and kind, e.g.
`0_30_s_academic_v0_1/0_30_s_academic_oe_v0_1_qa_processed.json`, with `video` paths such as
`academic_source/Charades/RW587.mp4` relative to that folder, where the video archives unpack). In
LLaVA-Video's records the first question carries `<image>` for the video; it is read as `<video>`.

format `llava-parquet` covers LLaVA-OneVision-Data: one folder per subset (`CLEVR-Math(MathV360K)/
train-00000-of-00002.parquet`), rows of `id`, `image` ({bytes, path}, null for text-only rows),
`conversations` and `data_source`.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .config import SourceConfig
from .jsonfile import RecordFile, index_file
from .media import resolve
from .parquet import ParquetRows
from .quarantine import BadRecord
from .sources import Place, RawRecord, folder_of, record_id, relative, source_files


def llava_turns(turns):
    """[{from, value}] (or [{role, content}]) as (role, text) pairs; anything else is passed on as it is."""
    if not isinstance(turns, list):
        return turns
    return [(t.get("from", t.get("role")), t.get("value", t.get("content"))) if isinstance(t, dict) else t
            for t in turns]


class LlavaReader:
    def __init__(self, source: SourceConfig, storage_options: dict | None = None):
        self.source, self.storage_options = source, storage_options
        self.root, self.files = source_files(source.path, (".json", ".jsonl"), storage_options)
        self.indexes = [index_file(url, storage_options) for url in self.files]
        self.offsets = np.cumsum([0] + [len(ix) for ix in self.indexes])
        self._open: OrderedDict[int, RecordFile] = OrderedDict()

    def count(self) -> int:
        return int(self.offsets[-1])

    def _find(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.count():
            raise IndexError(f"{self.source.name} has no record {index}")
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return k, index - int(self.offsets[k])

    def place(self, index: int) -> Place:
        k, i = self._find(index)
        ix = self.indexes[k]
        return Place(ix.url, ix.position(i), f"{relative(ix.url, self.root)}:{ix.number(i)}")

    def _file(self, k: int) -> RecordFile:
        if k not in self._open:
            self._open[k] = RecordFile(self.indexes[k], self.storage_options)
            while len(self._open) > 4:
                self._open.popitem(last=False)
        self._open.move_to_end(k)
        return self._open[k]

    def read(self, index: int) -> RawRecord:
        k, i = self._find(index)
        where = self.place(index)
        item = self._file(k).record(i, self.source.column("id"))
        if not isinstance(item, dict):
            raise BadRecord(f"malformed record: a {type(item).__name__}, not an object")
        rid = record_id(item.get(self.source.column("id")))
        try:
            return self._record(item, index, where, rid, self.source.media_root or folder_of(where.location))
        except BadRecord as exc:
            exc.record_id = rid
            raise

    def _record(self, item: dict, index: int, where: Place, rid, root: str) -> RawRecord:
        col = self.source.column
        image = item.get(col("image"))
        if image is None and "image" not in self.source.columns:
            image = item.get("images")  # multi-image records name the list `images`
        images = [] if image is None else image if isinstance(image, list) else [image]
        for ref in images:
            if not isinstance(ref, str):
                raise BadRecord(f"malformed record: image reference {ref!r} is not a path")
        video, document = item.get(col("video")), item.get(col("document"))
        for what, ref in (("video", video), ("document", document)):
            if ref is not None and not isinstance(ref, str):
                raise BadRecord(f"malformed record: {what} reference {ref!r} is not a path")
        turns = llava_turns(item.get(col("conversations")))
        if video is not None and not images and isinstance(turns, list):
            # LLaVA-Video-178K marks the video with LLaVA's image placeholder
            turns = [(t[0], t[1].replace("<image>", "<video>")) if isinstance(t, tuple) and isinstance(t[1], str)
                     else t for t in turns]
        return RawRecord(
            source=self.source.name, index=index, location=where.location, position=where.position, ref=where.ref,
            turns=turns, record_id=rid, images=[resolve(ref, root) for ref in images],
            video=resolve(video, root) if video is not None else None,
            document=resolve(document, root) if document is not None else None,
        )


class LlavaParquetReader:
    def __init__(self, source: SourceConfig, storage_options: dict | None = None):
        self.source = source
        self.rows = ParquetRows(source.path, storage_options,
                                required={"image": source.column("image"),
                                          "conversations": source.column("conversations")},
                                optional={"id": source.column("id")}, layout_hint="llava-parquet")

    def count(self) -> int:
        return self.rows.count()

    def place(self, index: int) -> Place:
        return self.rows.place(index)

    def read(self, index: int) -> RawRecord:
        where = self.rows.place(index)
        row = self.rows.row(index)
        rid = record_id(row.get("id"))
        image = row.get("image")
        if image is None:
            images = []  # a text-only row
        else:
            blob = image.get("bytes") if isinstance(image, dict) else image
            if not isinstance(blob, (bytes, bytearray)) or not blob:
                path = image.get("path") if isinstance(image, dict) else None
                err = BadRecord("missing image: no bytes in the row" + (f" (only a path, {path})" if path else ""))
                err.record_id = rid
                raise err
            images = [bytes(blob)]
        return RawRecord(source=self.source.name, index=index, location=where.location, position=where.position,
                         ref=where.ref, turns=llava_turns(row.get("conversations")), record_id=rid, images=images)
