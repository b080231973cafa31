"""JSON Lines and JSON array files, record by record: found by byte offsets, each decoded on its own.

A file is indexed once per process, streamed in chunks and never held whole:
- JSON Lines split on the byte `\\n` only, so a U+2028 or U+0085 inside a string (which
  `json.dumps(ensure_ascii=False)` writes as it is) stays in its record; a byte-order mark before the
  first line and a `\\r` before each `\\n` are dropped; blank lines are not records;
- a JSON array is scanned for its top-level elements (strings skipped whole, brackets counted), so a
  file of a million records costs an index of offsets, not a million parsed objects.

Each record is then read by its offsets (a slice of a small file kept in memory, a ranged read of a
large one) and decoded strictly: a byte that is not UTF-8 sets that record aside, "not UTF-8 at byte N"
(N counted from the start of its line, or of its item in an array), and every other record is kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from pipeline import storage

from .quarantine import BadRecord

CHUNK = 4 << 20
BOM = b"\xef\xbb\xbf"
# files up to this size are kept in memory once read; larger ones are read record by record
WHOLE_FILE_LIMIT = 64 << 20
_SPACE = b" \t\r\n"
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(_SPACE)] = True


@dataclass(frozen=True)
class RecordIndex:
    """Where each record of one file lies: bytes [start, end), and its line (1-based) in the file."""
    url: str
    size: int
    starts: np.ndarray
    ends: np.ndarray
    lines: np.ndarray
    array: bool  # a JSON array (records are its items) rather than JSON Lines

    def __len__(self) -> int:
        return len(self.starts)

    def position(self, i: int) -> str:
        """How a quarantine entry names the record: "line 7", or "item 3 (line 12)" of an array."""
        return f"item {i} (line {self.lines[i]})" if self.array else f"line {self.lines[i]}"

    def number(self, i: int) -> int:
        """The record's number in its file, for an id: its line in JSON Lines, its item in an array."""
        return i if self.array else int(self.lines[i])


def index_file(url: str, storage_options: dict | None = None) -> RecordIndex:
    """Streams the file once and returns where its records are."""
    array = not url.lower().endswith(".jsonl")
    with storage.open_url(url, "rb", storage_options, block_size=CHUNK) as f:
        chunks = iter(lambda: f.read(CHUNK), b"")
        starts, ends, lines, size = (_scan_array if array else _scan_lines)(chunks, url)
    return RecordIndex(url, size, np.asarray(starts, np.int64), np.asarray(ends, np.int64),
                       np.asarray(lines, np.int64), array)


def decode(raw: bytes, index: RecordIndex, i: int, id_key: str | None = None):
    """One record's bytes → its JSON value; BadRecord says what is wrong and where (and the record's
    `id_key` field, when the record is JSON apart from its bad bytes)."""
    body = raw.strip(_SPACE)
    lead = len(raw) - len(raw.lstrip(_SPACE))
    if not body:
        raise BadRecord("empty record")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        err = BadRecord(f"not UTF-8 at byte {exc.start} (file offset {int(index.starts[i]) + lead + exc.start}): "
                        f"{exc.reason} {body[exc.start:exc.start + 4]!r}")
        err.record_id = _id_despite(body, id_key)
        raise err from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRecord(f"broken JSON: {exc.msg} at column {exc.colno}") from None


def _id_despite(body: bytes, id_key: str | None):
    """The id of a record whose other fields hold bad bytes, to name it in the quarantine."""
    if id_key is None:
        return None
    try:
        value = json.loads(body.decode("utf-8", errors="replace"))
    except json.JSONDecodeError:
        return None
    found = value.get(id_key) if isinstance(value, dict) else None
    return str(found) if isinstance(found, (str, int)) and not isinstance(found, bool) else None


class RecordFile:
    """Random access to the records of one indexed file."""

    def __init__(self, index: RecordIndex, storage_options: dict | None = None):
        self.index, self.storage_options = index, storage_options
        self._data: bytes | None = None
        self._fs = None

    def raw(self, i: int) -> bytes:
        start, end = int(self.index.starts[i]), int(self.index.ends[i])
        if self.index.size <= WHOLE_FILE_LIMIT:
            if self._data is None:
                self._data = storage.read_bytes(self.index.url, self.storage_options)
            return self._data[start:end]
        if self._fs is None:
            self._fs = storage.filesystem(self.index.url, self.storage_options)
        fs, path = self._fs
        try:
            return fs.cat_file(path, start=start, end=end)
        except OSError as exc:
            raise storage.StorageError(storage.redact(f"cannot read {self.index.url} bytes {start}-{end}: {exc}",
                                                      self.storage_options)) from None

    def record(self, i: int, id_key: str | None = None):
        return decode(self.raw(i), self.index, i, id_key)


# -- JSON Lines -------------------------------------------------------------------------------------------------
def _scan_lines(chunks, url: str):
    """(starts, ends, line numbers, size) of the non-blank lines; a line ends at b"\\n" and nowhere else."""
    starts, ends, lines = [], [], []
    base, line, carry = 0, 1, b""
    for n, chunk in enumerate(_bom_whole(chunks)):
        buf = carry + chunk
        if n == 0 and buf.startswith(BOM):
            buf, base = buf[len(BOM):], len(BOM)
        arr = np.frombuffer(buf, dtype=np.uint8)
        newlines = np.flatnonzero(arr == 10)
        if len(newlines):
            begin = np.concatenate(([0], newlines[:-1] + 1))
            # a line is blank when it holds nothing but whitespace: count its other bytes
            solid = np.concatenate(([0], np.cumsum(~_WHITESPACE[arr], dtype=np.int64)))
            keep = solid[newlines] - solid[begin] > 0
            starts.append(begin[keep] + base)
            ends.append(newlines[keep] + base)
            lines.append(np.arange(line, line + len(newlines), dtype=np.int64)[keep])
            cut = int(newlines[-1]) + 1
            line, base, carry = line + len(newlines), base + cut, buf[cut:]
        else:
            carry = buf
    if carry.strip(b" \t\r"):  # a last line without a newline
        starts.append(np.array([base]))
        ends.append(np.array([base + len(carry)]))
        lines.append(np.array([line]))
    return _cat(starts), _cat(ends), _cat(lines), base + len(carry)


def _bom_whole(chunks):
    """The chunks, the first one long enough to hold a byte-order mark whole."""
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= len(BOM):
            break
    if head:
        yield head
    yield from chunks


def _cat(parts: list) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


# -- JSON arrays ------------------------------------------------------------------------------------------------
_SPECIAL = np.zeros(256, dtype=bool)
_SPECIAL[[ord(c) for c in '"\\[]{},']] = True
_QUOTE, _BACKSLASH, _COMMA = ord('"'), ord("\\"), ord(",")
_OPENS, _CLOSES = (ord("["), ord("{")), (ord("]"), ord("}"))


def _first_solid(chunk: bytes, begin: int, end: int) -> int:
    """The first byte of chunk[begin:end] that is not whitespace (`end` if there is none)."""
    part = chunk[begin:end]
    return end - len(part.lstrip(_SPACE)) if part.strip(_SPACE) else end


def _scan_array(chunks, url: str):
    """(starts, ends, line numbers, size) of the items of a top-level JSON array.

    Vectorised over each chunk, on its structural bytes only (quotes, backslashes, brackets, commas):
    a quote after an odd run of backslashes is escaped; the other quotes toggle "inside a string";
    outside strings, brackets give the depth, and commas at depth 1 separate the items. Only the scan
    state (depth, inside a string, trailing backslashes, the open item) crosses chunk boundaries.
    """
    starts, ends, lines = [], [], []
    base, lines_before = 0, 0  # file offset of the chunk, newlines before it
    depth, in_string, run = 0, False, 0  # run: backslashes ending the previous chunk
    item = None  # file offset where the open item began (after "[" or ",")
    first = None  # line of the open item's first structural byte, once seen
    closed = False
    for chunk in _bom_whole(chunks):
        if closed:
            base += len(chunk)
            continue
        a = np.frombuffer(chunk, dtype=np.uint8)
        newline_at = np.flatnonzero(a == 10)
        skip = 0
        if depth == 0:  # before the array opens: a byte-order mark, whitespace, then "["
            skip = len(BOM) if base == 0 and chunk.startswith(BOM) else 0
            solid = np.flatnonzero(~_WHITESPACE[a[skip:]])
            if not len(solid):
                base, lines_before = base + len(chunk), lines_before + len(newline_at)
                continue
            j = skip + int(solid[0])
            if a[j] != _OPENS[0]:
                raise ValueError(f"{url} is not a JSON array of records (it starts with {chunk[j:j + 20]!r}); a "
                                 ".json annotation file holds a list of records, a .jsonl file one record per line")
            depth, skip, item = 1, j + 1, base + j + 1
        pos = skip + np.flatnonzero(_SPECIAL[a[skip:]])  # chunk positions of the structural bytes
        if len(pos):
            c = a[pos]
            slash = c == _BACKSLASH
            # is the byte right before each structural byte a backslash (for byte 0: the previous chunk's last)?
            after_slash = np.concatenate(([run > 0 and pos[0] == 0], slash[:-1] & (pos[1:] == pos[:-1] + 1)))
            # the length of the run of backslashes ending at each backslash
            count = np.cumsum(slash, dtype=np.int64)
            runs = np.where(slash, count - np.maximum.accumulate(np.where(slash & ~after_slash, count - 1, 0)), 0)
            if slash[0] and after_slash[0]:  # the first run goes on from the previous chunk
                carried = slash & after_slash
                runs[:int(np.argmin(carried)) if not carried.all() else len(carried)] += run
            # a quote is escaped by an odd run of backslashes right before it
            before = np.where(after_slash, np.concatenate(([run], runs[:-1])), 0)
            quote = (c == _QUOTE) & (before % 2 == 0)
            inside = (np.cumsum(quote, dtype=np.int64) + in_string) % 2 == 1
            opens = ~inside & ((c == _OPENS[0]) | (c == _OPENS[1]))
            closes = ~inside & ((c == _CLOSES[0]) | (c == _CLOSES[1]))
            level = depth + np.cumsum(opens.astype(np.int64) - closes.astype(np.int64))
            end = np.flatnonzero(level == 0)
            stop = int(end[0]) if len(end) else len(c)
            cut_at = np.flatnonzero(~inside[:stop] & (c[:stop] == _COMMA) & (level[:stop] == 1))
            if len(end):
                cut_at = np.append(cut_at, stop)
            if len(cut_at):
                # each item runs from after the previous cut (or from where the open item began) to its cut; its
                # line is that of its first structural byte (every record, an object, begins with one)
                cuts = pos[cut_at]
                begins = np.concatenate(([max(item - base, skip)], cuts[:-1] + 1))
                firsts = pos[np.minimum(np.searchsorted(pos, begins), len(pos) - 1)]
                item_lines = lines_before + 1 + np.searchsorted(newline_at, firsts)
                found = firsts < cuts
                for k in np.flatnonzero(~found):  # scalar or empty items: look at their bytes
                    solid = _first_solid(chunk, begins[k], cuts[k])
                    found[k] = solid < cuts[k]
                    item_lines[k] = lines_before + 1 + np.searchsorted(newline_at, solid)
                if first is not None:  # the open item began in an earlier chunk
                    found[0], begins[0], item_lines[0] = True, item - base, first
                starts.append(base + begins[found])
                ends.append(base + cuts[found])
                lines.append(item_lines[found])
                item, first = base + int(cuts[-1]) + 1, None
            closed = bool(len(end))
            depth, in_string = int(level[-1]), bool(inside[-1])
        if not closed and first is None:  # the open item's line, once its first byte is seen
            begin = max(item - base, skip)
            solid = _first_solid(chunk, begin, len(chunk))
            if solid < len(chunk):
                first = lines_before + 1 + int(np.searchsorted(newline_at, solid))
        trailing = len(chunk) - len(chunk.rstrip(b"\\"))
        run = run + trailing if trailing == len(chunk) else trailing
        base, lines_before = base + len(chunk), lines_before + len(newline_at)
    if item is None:
        raise ValueError(f"{url} holds no JSON array; a .json annotation file holds a list of records")
    if not closed and first is not None:  # an array cut short: its last item is kept, and fails as broken JSON
        starts.append(np.array([item]))
        ends.append(np.array([base]))
        lines.append(np.array([first]))
    return _cat(starts), _cat(ends), _cat(lines), base
