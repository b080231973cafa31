"""The data stage: source records → tokenized, packed Arrow shards and a manifest on fsspec storage.

    manifest = build_corpus(CorpusConfig(...), storage_options)

The stage reads as its steps: plan (count records, mix by weight, cut the mix into shard tasks), skip
the shards already committed, build the others in parallel (each: read, check, tokenize, pack, write
shard + quarantine file, then its marker), check the quarantine rate, write the manifest last.

Layout under `config.output`:
    shards/shard-00000.arrow             packed sequences (see pipeline.data.shards)
    shards/shard-00000.quarantine.jsonl  records set aside, with source, file, line/row, id and reason
    shards/shard-00000.done.json         the marker: a shard exists once this does
    manifest.json                        written after every marker; its presence means the build is done
A re-run with the same config finds the manifest and does nothing; a killed run resumes at the first
shard without a marker; shards depend only on the config and the input, so they are byte-identical
across runs, engines and worker counts.
"""

from __future__ import annotations

import hashlib
import logging
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass

from pipeline import storage

from . import SHARD_DIR, marker_url, quarantine_url, shard_name, shard_url
from .config import SCHEMA_VERSION, CorpusConfig
from .engines import chunks, run_tasks
from .mixing import mix
from .packing import pack
from .quarantine import BadRecord, QuarantineEntry, check_rate, reason_counts, to_jsonl
from .shards import encode_shard, pack_row
from .sources import count_records, locate, read_record
from .tokenize import install_processor, load_processor, processor_fingerprint, tokenize_record

log = logging.getLogger(__name__)


class BuildConflict(RuntimeError):
    """The output already holds a build of a different config."""


@dataclass(frozen=True)
class ShardTask:
    shard: int
    picks: tuple[tuple[int, int, int], ...]  # (source index, record index, epoch) in mix order


@dataclass(frozen=True)
class BuildPlan:
    config_hash: str
    source_sizes: dict[str, int]  # records each source holds
    tasks: tuple[ShardTask, ...]


def build_corpus(config: CorpusConfig, storage_options: dict | None = None, progress: bool = True) -> dict:
    """Runs (or resumes, or skips) the build and returns its manifest."""
    processor = load_processor(config.processor, config.chat_template, storage_options)
    config_hash = config.build_hash(processor_fingerprint(processor))
    manifest_url = storage.join(config.output, "manifest.json")
    if storage.exists(manifest_url, storage_options):
        manifest = storage.read_json(manifest_url, storage_options)
        if manifest.get("config_hash") != config_hash:
            raise BuildConflict(f"{config.output} holds build {manifest.get('config_hash')}, not {config_hash}; "
                                "write a changed config to a new output")
        log.info("%s is up to date (build %s): nothing to do", config.output, config_hash)
        return manifest

    plan = plan_build(config, config_hash, storage_options)
    markers = committed_markers(config, config_hash, storage_options)
    pending = [t for t in plan.tasks if t.shard not in markers]
    log.info("build %s of %s: %d shards, %d committed already, %d to build with %s×%d",
             config_hash, config.name, len(plan.tasks), len(markers), len(pending), config.engine, config.workers)
    if 0 < len(pending) < config.workers:
        # a shard is one worker's task: the distill corpus of configs/mechanisms.yaml built in 140 s on 2 of 8
        log.warning("%s: %d shards to build for %d workers, so %d stay idle; fewer samples a shard (now %d; the "
                    "stage's data.shard_tokens) spreads it over them", config.name, len(pending), config.workers,
                    config.workers - len(pending), config.samples_per_shard)
    started = time.monotonic()
    args = [(config, task, config_hash, storage_options) for task in pending]
    results = run_tasks(build_shard, args, config, install_processor, (config.processor, config.chat_template,
                                                                         processor))
    for marker in _with_progress(results, len(pending), config.name, progress):
        markers[marker["shard"]] = marker
    manifest = assemble_manifest(config, config_hash, plan, markers, processor_fingerprint(processor))
    check_rate(manifest["quarantined"], manifest["records"], config.max_quarantine_rate,
               manifest["quarantine_reasons"], storage.join(config.output, SHARD_DIR, "*.quarantine.jsonl"))
    storage.write_json(manifest_url, manifest, storage_options)
    log.info("wrote %s: %d samples in %d sequences, %d tokens, utilisation %.1f%%, %d quarantined, %.1f s",
             manifest_url, manifest["samples"], manifest["sequences"], manifest["tokens"],
             100 * manifest["token_utilization"], manifest["quarantined"], time.monotonic() - started)
    return manifest


def plan_build(config: CorpusConfig, config_hash: str, storage_options: dict | None = None) -> BuildPlan:
    """Counts every source, mixes them by weight and cuts the mix into shard tasks. A source with
    `max_samples` below its size takes part with a seeded choice of that many of its records."""
    sizes = [count_records(s, storage_options) for s in config.sources]
    chosen = [_chosen(s, n, config.seed) for s, n in zip(config.sources, sizes)]
    picks = mix([len(c) if c is not None else n for c, n in zip(chosen, sizes)], [s.weight for s in config.sources],
                config.num_samples, config.seed)
    tasks = tuple(ShardTask(i, tuple((p.source, p.index if chosen[p.source] is None else chosen[p.source][p.index],
                                      p.epoch) for p in chunk))
                  for i, chunk in enumerate(chunks(picks, config.samples_per_shard)))
    return BuildPlan(config_hash, {s.name: n for s, n in zip(config.sources, sizes)}, tasks)


def _chosen(source, size: int, seed: int) -> list[int] | None:
    if source.max_samples is None or source.max_samples >= size:
        return None
    return sorted(random.Random(f"{seed}:{source.name}:choice").sample(range(size), source.max_samples))


def committed_markers(config: CorpusConfig, config_hash: str, storage_options: dict | None) -> dict[int, dict]:
    """Markers of shards a previous run of this build finished."""
    found = {}
    for url in storage.list_files(storage.join(config.output, SHARD_DIR), storage_options, suffix=".done.json"):
        marker = storage.read_json(url, storage_options)
        if marker.get("config_hash") != config_hash:
            raise BuildConflict(f"{url} belongs to build {marker.get('config_hash')}, not {config_hash}; "
                                "write a changed config to a new output")
        found[marker["shard"]] = marker
    return found


def build_shard(config: CorpusConfig, task: ShardTask, config_hash: str, storage_options: dict | None) -> dict:
    """One shard, start to finish: its marker is written last and returned."""
    started, cpu = time.monotonic(), time.process_time()
    processor = load_processor(config.processor, config.chat_template, storage_options)
    done: dict[int, object] = {}
    bad = []
    picked = Counter()
    # records are read in file order (a Parquet row group, a ranged read, serves its neighbours), and the
    # samples kept in mix order
    for k in sorted(range(len(task.picks)), key=lambda k: task.picks[k]):
        s, index, epoch = task.picks[k]
        source = config.sources[s]
        picked[source.name] += 1
        record = None
        try:
            record = read_record(source, index, storage_options)
            sample_id = f"{source.name}:{record.name}" + (f"#{epoch}" if epoch else "")
            done[k] = tokenize_record(record, source, config, processor, sample_id, storage_options)
        except BadRecord as exc:
            place = locate(source, index, storage_options)
            record_id = record.record_id if record is not None else exc.record_id
            bad.append((k, QuarantineEntry(source.name, place.location, place.position,
                                           storage.redact(str(exc), storage_options), record_id)))
    samples = [done[k] for k in sorted(done)]
    bad = [entry for _, entry in sorted(bad, key=lambda kb: kb[0])]
    bins = pack([len(s) for s in samples], config.max_len)
    data = encode_shard([pack_row([samples[i] for i in b]) for b in bins])
    tokens = sum(len(s) for s in samples)
    marker = {
        "shard": task.shard,
        "file": shard_name(task.shard),
        "config_hash": config_hash,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "sequences": len(bins),
        "samples": len(samples),
        "records": len(task.picks),
        "tokens": tokens,
        "supervised_tokens": sum(sum(1 for x in s.labels if x != -100) for s in samples),
        "images": sum(len(s.images) for s in samples),
        "videos": sum(len(s.videos) for s in samples),
        "per_source": {name: {"records": n, "samples": sum(1 for x in samples if x.source == name),
                              "quarantined": sum(1 for x in bad if x.source == name)}
                       for name, n in sorted(picked.items())},
        "quarantined": len(bad),
        "quarantine_reasons": reason_counts(bad),
        # in its worker, from the first read to the encoded shard: elapsed, and on the worker's CPU
        "seconds": round(time.monotonic() - started, 3),
        "cpu_seconds": round(time.process_time() - cpu, 3),
        "host": socket.gethostname(),  # the manifest counts the nodes that built the corpus
    }
    storage.commit(marker_url(config.output, task.shard), marker, {
        shard_url(config.output, task.shard): data,
        quarantine_url(config.output, task.shard): to_jsonl(bad),
    }, storage_options)
    return marker


def assemble_manifest(config: CorpusConfig, config_hash: str, plan: BuildPlan, markers: dict[int, dict],
                      fingerprint: str) -> dict:
    shards = [markers[t.shard] for t in plan.tasks]
    per_source = {s.name: {"available": plan.source_sizes[s.name], "records": 0, "samples": 0, "quarantined": 0}
                  for s in config.sources}
    reasons = Counter()
    for m in shards:
        reasons.update(m["quarantine_reasons"])
        for name, counts in m["per_source"].items():
            for k, v in counts.items():
                per_source[name][k] += v

    def total(key: str) -> int:
        return sum(m[key] for m in shards)

    sequences = total("sequences")
    return {
        "schema_version": SCHEMA_VERSION,
        "name": config.name,
        "config_hash": config_hash,
        "processor_fingerprint": fingerprint,
        "config": config.model_dump(exclude={"engine", "workers", "engine_address"}),
        "max_len": config.max_len,
        "records": total("records"),
        "samples": total("samples"),
        "sequences": sequences,
        "tokens": total("tokens"),
        "supervised_tokens": total("supervised_tokens"),
        "token_utilization": total("tokens") / (sequences * config.max_len) if sequences else 0.0,
        "quarantined": total("quarantined"),
        "quarantine_reasons": dict(sorted(reasons.items())),
        "worker_seconds": round(sum(m.get("seconds", 0.0) for m in shards), 3),
        "worker_cpu_seconds": round(sum(m.get("cpu_seconds", 0.0) for m in shards), 3),
        "per_source": per_source,
        # how the build ran: its engine, worker count, and the hosts whose workers built shards (a cluster's
        # nodes; a resumed build counts those of earlier runs too)
        "ran_on": {"engine": config.engine, "workers": config.workers,
                   "nodes": len({m["host"] for m in shards if "host" in m}),
                   "hosts": sorted({m["host"] for m in shards if "host" in m})},
        "shards": [{k: m[k] for k in ("shard", "file", "sha256", "bytes", "sequences", "samples", "tokens",
                                      "quarantined")} for m in shards],
    }


def _with_progress(results, total: int, name: str, enabled: bool):
    if not enabled or total == 0:
        yield from results
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"[bold]{name}[/] shards"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn()) as bar:
        job = bar.add_task(name, total=total)
        for result in results:
            bar.advance(job)
            yield result

