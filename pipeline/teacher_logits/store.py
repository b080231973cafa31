"""Teacher-logit shards next to the token shards: one per token shard, same name, same rows in order.

    <output>/shards/shard-00000.arrow      one record batch per packed row (see shards.py)
    <output>/shards/shard-00000.done.json  the shard's marker, written after it: a shard exists once this does
    <output>/manifest.json                 written last, once every shard has its marker

Work is split by shard: rank r of W takes the shards at r, r+W, ... and writes only those, so ranks
never share a file. A shard with a marker from the same settings is skipped, so a killed run redoes
only the shards it had not committed; a marker from other settings (another teacher, k, encoding or
positions policy) stops the run rather than mixing two teachers in one store.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import storage
from pipeline.data.loader import example_from_row, open_shard, read_manifest, shard_urls
from pipeline.data.shards import ShardReader

from .coverage import covered_mask
from .encoding import SparseEncoding
from .fidelity import fidelity_report
from .shards import encode_rows, logit_row
from .stream import encoded_stream
from .teacher import Teacher, check_vocabulary

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SHARD_DIR = "shards"
MANIFEST = "manifest.json"


class StoreConflict(RuntimeError):
    """The output already holds teacher logits made with other settings."""


@dataclass(frozen=True)
class StoreSettings:
    top_k: int = 64
    positions: str = "answer"
    values: str = "fp16"
    batch_size: int = 1           # packed rows concatenated into one teacher forward
    chunk: int = 2048             # positions per LM-head call (memory: chunk × vocab fp32)
    fidelity_positions: int = 256  # positions of the first batch checked against the dense teacher


def logit_shard_url(output: str, data_file: str) -> str:
    return storage.join(output, SHARD_DIR, data_file.rsplit("/", 1)[-1])


def marker_url(output: str, data_file: str) -> str:
    return logit_shard_url(output, data_file).removesuffix(".arrow") + ".done.json"


def store_teacher_logits_for(data_manifest_url: str, teacher: Teacher, output: str, settings: StoreSettings, *,
                             rank: int = 0, world_size: int = 1, nodes: int = 1,
                             storage_options: dict | None = None, progress: bool = True) -> dict:
    """Writes this rank's shards (skipping committed ones); rank 0 then writes the manifest once every
    shard is committed, with the `nodes` and ranks that ran. Returns {"computed": [shard ids], "skipped":
    [shard ids], "manifest": dict | None}."""
    data_manifest = read_manifest(data_manifest_url, storage_options)
    check_vocabulary(teacher, data_manifest)
    encoding = SparseEncoding(settings.top_k, teacher.vocab_size, settings.values)
    identity = teacher.identity()
    fingerprint = _settings_hash(identity, encoding, settings, data_manifest)
    shards = data_manifest["shards"]
    urls = dict(zip((s["shard"] for s in shards), shard_urls(data_manifest_url, data_manifest)))
    mine = [s for i, s in enumerate(shards) if i % world_size == rank]
    done = {s["shard"] for s in mine if _committed(output, s, fingerprint, storage_options)}
    todo = [s for s in mine if s["shard"] not in done]
    log.info("rank %d/%d: %d shards, %d committed already, %d to compute", rank, world_size, len(mine),
             len(done), len(todo))

    # One shard is written while the next is computed; waiting for it before handing over another
    # bounds memory to two shards and stops the run at the first failed write.
    with concurrent.futures.ThreadPoolExecutor(1) as writer, _Progress(todo, rank, progress) as bar:
        in_flight = None
        for shard in todo:
            started = time.monotonic()
            rows, covered, tokens, report = _compute_shard(
                teacher, urls[shard["shard"]], shard, encoding, settings, storage_options, bar,
                with_fidelity=shard["shard"] == shards[0]["shard"])
            marker = {"shard": shard["shard"], "file": f"{SHARD_DIR}/{shard['file'].rsplit('/', 1)[-1]}",
                      "settings_hash": fingerprint, "sequences": len(rows), "tokens": tokens, "covered": covered,
                      "seconds": round(time.monotonic() - started, 3), "fidelity": report,
                      "rank": rank, "host": socket.gethostname()}
            log.info("rank %d: shard %d, %d rows, %d of %d positions covered, %.1f s", rank, shard["shard"],
                     len(rows), covered, tokens, marker["seconds"])
            if in_flight is not None:
                in_flight.result()
            in_flight = writer.submit(_commit_shard, output, shard["file"], rows, marker, storage_options)
        if in_flight is not None:
            in_flight.result()

    _wait_for_other_ranks(world_size)
    manifest = None
    if rank == 0:
        manifest = _write_manifest(data_manifest_url, data_manifest, output, identity, encoding, settings,
                                   fingerprint, storage_options, {"nodes": nodes, "ranks": world_size})
    return {"computed": [s["shard"] for s in todo], "skipped": sorted(done), "manifest": manifest}


def _compute_shard(teacher: Teacher, url: str, entry: dict, encoding: SparseEncoding, settings: StoreSettings,
                   storage_options: dict | None, bar: "_Progress", with_fidelity: bool):
    """All rows of one token shard (checked against its manifest `entry` first) → (logit rows, covered
    positions, tokens, fidelity report or None)."""
    reader = open_shard(url, entry, storage_options)
    try:
        items = _prefetch(_batches(reader, teacher, settings), depth=2)
        report = None
        if with_fidelity:
            first = next(items, None)
            if first is not None:
                _, inputs, positions = first
                report = fidelity_report(teacher.model, inputs, positions[:settings.fidelity_positions], encoding,
                                         settings.chunk)
                items = itertools.chain([first], items)
        rows, covered, tokens = [], 0, 0
        for (row_ids, examples, masks), data in encoded_stream(teacher.model, items, encoding, settings.chunk):
            start = 0
            for i, example, mask in zip(row_ids, examples, masks):
                n = int(mask.sum())
                rows.append(logit_row(i, example["sample_ids"], mask, data[start:start + n]))
                start += n
                covered, tokens = covered + n, tokens + int(mask.numel())
            bar.advance(sum(int(m.numel()) for m in masks))
        if len(rows) != len(reader):
            raise RuntimeError(f"{url}: wrote {len(rows)} rows of {len(reader)}")
        return rows, covered, tokens, report
    finally:
        reader.close()


def _batches(reader: ShardReader, teacher: Teacher, settings: StoreSettings):
    """(row ids, loader examples, covered masks, teacher inputs, covered positions) per teacher forward."""
    processor = teacher.processor
    media = (processor.image_token_id, processor.video_token_id)
    for start in range(0, len(reader), settings.batch_size):
        row_ids = list(range(start, min(start + settings.batch_size, len(reader))))
        examples = [example_from_row(reader.row(i), processor) for i in row_ids]
        masks = [covered_mask(settings.positions, e["input_ids"][0], e["labels"][0], e["cu_seqlens"], media)
                 for e in examples]
        offsets = np.cumsum([0] + [m.numel() for m in masks])
        positions = torch.cat([m.nonzero()[:, 0] + int(o) for m, o in zip(masks, offsets)])
        yield (row_ids, examples, masks), teacher.inputs(examples), positions


def _commit_shard(output: str, data_file: str, rows: list[dict], marker: dict, storage_options: dict | None) -> None:
    data = encode_rows(rows)
    marker = {**marker, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    storage.commit(marker_url(output, data_file), marker, {logit_shard_url(output, data_file): data}, storage_options)


def _committed(output: str, shard: dict, fingerprint: str, storage_options: dict | None) -> bool:
    url = marker_url(output, shard["file"])
    if not storage.exists(url, storage_options):
        return False
    marker = storage.read_json(url, storage_options)
    if marker.get("settings_hash") != fingerprint:
        raise StoreConflict(f"{url} was written with settings {marker.get('settings_hash')}, this run has "
                            f"{fingerprint} (teacher, k, encoding, positions or corpus changed); write to a new "
                            "output or delete the old one")
    return True


def _settings_hash(identity: dict, encoding: SparseEncoding, settings: StoreSettings, data_manifest: dict) -> str:
    """Everything that decides the stored bytes; batching and chunking do not."""
    what = {"schema_version": SCHEMA_VERSION, "teacher": identity, "encoding": encoding.describe(),
            "positions": settings.positions, "data": data_manifest.get("config_hash")}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _wait_for_other_ranks(world_size: int) -> None:
    """Under torch.distributed, a barrier; without it (ranks run one by one) rank 0 finds out from the markers."""
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _write_manifest(data_manifest_url: str, data_manifest: dict, output: str, identity: dict,
                    encoding: SparseEncoding, settings: StoreSettings, fingerprint: str,
                    storage_options: dict | None, ran_on: dict) -> dict:
    """`ran_on`: the nodes and ranks of the run that finished the store; `hosts` adds every host that wrote a
    shard (a resumed store may have had other ones)."""
    markers = []
    for shard in data_manifest["shards"]:
        url = marker_url(output, shard["file"])
        if not storage.exists(url, storage_options):
            raise RuntimeError(f"shard {shard['shard']} has no marker at {url}: a rank did not finish")
        markers.append(storage.read_json(url, storage_options))
    covered = sum(m["covered"] for m in markers)
    size = sum(m["bytes"] for m in markers)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "settings_hash": fingerprint,
        "teacher": identity,
        "encoding": encoding.describe(),
        "positions": settings.positions,
        "data": {"manifest": data_manifest_url, "config_hash": data_manifest.get("config_hash"),
                 "processor_fingerprint": data_manifest.get("processor_fingerprint"),
                 "shards": [{k: s[k] for k in ("shard", "file", "sequences")} for s in data_manifest["shards"]]},
        "sequences": sum(m["sequences"] for m in markers),
        "tokens": sum(m["tokens"] for m in markers),
        "covered": covered,
        "bytes": size,
        "bytes_per_token": size / covered if covered else 0.0,
        "payload_bytes_per_token": encoding.bytes_per_position,
        "fidelity": next((m["fidelity"] for m in markers if m.get("fidelity")), None),
        "ran_on": {**ran_on, "hosts": sorted({m["host"] for m in markers if "host" in m})},
        "shards": [{k: m[k] for k in ("shard", "file", "sequences", "tokens", "covered", "bytes", "sha256")}
                   for m in markers],
    }
    storage.write_json(storage.join(output, MANIFEST), manifest, storage_options)
    log.info("wrote %s: %d covered positions of %d tokens, %.1f bytes/position, top-k mass %s",
             storage.join(output, MANIFEST), covered, manifest["tokens"], manifest["bytes_per_token"],
             manifest["fidelity"] and round(manifest["fidelity"]["topk_mass"], 4))
    return manifest


def _prefetch(iterable, depth: int):
    """Runs `iterable` in a thread, `depth` items ahead: row decoding overlaps the teacher's forward."""
    items: queue.Queue = queue.Queue(depth)
    end = object()
    stop = threading.Event()

    def fill():
        try:
            for item in iterable:
                if stop.is_set():
                    return
                items.put(item)
            items.put(end)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            items.put(exc)

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    try:
        while (item := items.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(0.05)


class _Progress:
    """A rich progress bar over this rank's tokens (quiet when disabled or nothing is left to do)."""

    def __init__(self, todo: list[dict], rank: int, enabled: bool):
        self.total = sum(s.get("tokens", 0) for s in todo)
        self.rank, self.enabled = rank, enabled and bool(todo)
        self.bar = self.task = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn)

            self.bar = Progress(TextColumn(f"[bold]teacher logits[/] rank {self.rank} tokens"), BarColumn(),
                                MofNCompleteColumn(), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("tokens", total=self.total)
        return self

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
