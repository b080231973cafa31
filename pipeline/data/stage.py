"""Building the `data` stage's corpora (pipeline/recipes/data.py): the paper's three, from the run config's `data` section.

    distill   Stage I distillation mix           (data.distill)
    instruct  Stage II instruction mix           (data.instruct, images up to data.instruct.max_pixels)
    long      Stage III long video and documents (data.long, up to 32K tokens)

Each lands in `<stage output>/<corpus>/` with its manifest. A source is
- a URL: a .json/.jsonl LLaVA annotation file (format `llava`), or a Parquet file or folder (`parquet`);
- an entry with options, {path, format, name, media_root, columns, weight, max_samples, fps, max_frames, ...}
  (`pipeline.data.config.SourceConfig`; docs/datasets.md for the published datasets);
- `sample`, the built-in synthetic data, generated into `<stage output>/sample-data/` so the run is
  self-contained, or `sample-pictures`, single-turn questions on fresh sample pictures worded as the
  held-out `pictures` eval suite asks them (what a trained tiny teacher knows), under
  `<stage output>/sample-pictures/<corpus>/`.
A corpus's `mix` adds other corpora's sources as a share of it: `data.long.mix: {instruct: 0.2}` is
Stage III's 4:1 of long video to Stage II data (those sources keep Stage II's image size). The teacher's
chat template is the one its checkpoint carries, else `data.chat_template`. Credentials come from the
environment (AWS_* variables), as for every stage.
"""

from __future__ import annotations

import tempfile

from pipeline import storage

from . import CORPORA, SAMPLE, SAMPLE_PICTURES
from .build import build_corpus
from .config import CorpusConfig, SourceConfig
from pipeline.eval.mechanisms import frames_that_fit

from .synthetic import VIDEO_FPS, write_picture_questions, write_sample_corpora

PICTURE_QUESTIONS = 1024
# the shards of a build are cut by sample count before anything is tokenized; the run config gives a
# token budget per shard, turned into samples at this many tokens per sample
TOKENS_PER_SAMPLE_ESTIMATE = 256
SAMPLE_KINDS = {"distill": ("pictures", "cauldron"), "instruct": ("pictures", "cauldron"),
                "long": ("videos", "documents")}


def build_corpora(ctx) -> dict:
    data = ctx.config.data
    processor = _processor_folder(ctx.inputs["teacher"])
    own = _own_sources(ctx)
    metrics = {}
    for name in CORPORA:
        section = getattr(data, name)
        config = CorpusConfig(
            name=name, output=ctx.path(name), sources=own[name] + mixed_sources(name, data, own), processor=processor,
            chat_template=data.chat_template, max_len=section.seq_len, max_pixels=section.max_pixels,
            num_samples=section.max_samples, seed=ctx.config.run.seed + CORPORA.index(name),
            samples_per_shard=max(1, data.shard_tokens // TOKENS_PER_SAMPLE_ESTIMATE), workers=data.workers)
        manifest = build_corpus(config, progress=False)
        ctx.log.info("corpus %s: %d samples, %d tokens in %d sequences (utilisation %.1f%%), %d quarantined",
                     name, manifest["samples"], manifest["tokens"], manifest["sequences"],
                     100 * manifest["token_utilization"], manifest["quarantined"])
        metrics.update({f"{name}_samples": manifest["samples"], f"{name}_tokens": manifest["tokens"],
                        f"{name}_token_utilization": round(manifest["token_utilization"], 4),
                        f"{name}_quarantined": manifest["quarantined"]})
    return metrics


def _own_sources(ctx) -> dict[str, list[dict]]:
    """Each corpus's own sources as source configs (dicts), sample data written where it is used."""
    data = ctx.config.data
    samples = None
    out = {}
    for name in CORPORA:
        section = getattr(data, name)
        sources = []
        for ref in section.sources:
            if ref == SAMPLE:
                samples = samples or _sample_sources(ctx.path("sample-data"), ctx.config.run.seed)
                sources += [samples[kind] for kind in SAMPLE_KINDS[name]]
            elif ref == SAMPLE_PICTURES:
                train = ctx.config.teacher.train
                # recall streams as long as the teacher's, but no longer than the corpus's samples hold
                frames = min(train.max_frames if train else 64, frames_that_fit(section.seq_len))
                sources.append(_picture_source(ctx.path(f"sample-pictures/{name}"), section.max_samples,
                                               ctx.config.run.seed + 101 * (1 + CORPORA.index(name)),
                                               ctx.config.picture_kinds, frames))
            else:
                sources.append(source_for_entry(ref))
        out[name] = sources
    return out


def mixed_sources(name: str, data, own: dict[str, list[dict]]) -> list[dict]:
    """The sources `data.<name>.mix` brings in: each mixed corpus's own sources, renamed `<corpus>.<source>`,
    at that corpus's image size, weighted so that together they make its share of the mix."""
    mix = getattr(data, name).mix
    if not mix:
        return []
    own_weight = sum(s.get("weight", 1.0) for s in own[name])
    out = []
    for other, share in mix.items():
        sources = own[other]
        total = sum(s.get("weight", 1.0) for s in sources)
        scale = own_weight * share / (1 - sum(mix.values())) / total
        max_pixels = getattr(data, other).max_pixels
        out += [dict(s, name=f"{other}.{s['name']}", weight=s.get("weight", 1.0) * scale,
                     max_pixels=s.get("max_pixels") or max_pixels) for s in sources]
    return out


def source_for_entry(entry) -> dict:
    """A source config (dict) for a run-config source: a URL, or an entry with options."""
    if isinstance(entry, str):
        return source_for_url(entry)
    return entry.model_dump(exclude_defaults=True) | {"name": entry.name, "format": entry.format}


def source_for_url(url: str) -> dict:
    """A source config for a record URL: LLaVA annotations by suffix, Parquet otherwise."""
    return SourceConfig(path=url).model_dump(include={"name", "format", "path"})


def _picture_source(root: str, max_samples: int | None, seed: int, kinds=None, max_frames: int = 64) -> dict:
    """Single-turn questions on fresh sample pictures of `kinds` (the run's: those the teacher learned),
    worded as the held-out `pictures` eval suite asks them; one picture per two samples of the corpus
    (PICTURE_QUESTIONS questions when it sets no limit). Frame streams are read back frame for frame."""
    n_pictures = -(-(max_samples or PICTURE_QUESTIONS) // 2)
    video = {"fps": VIDEO_FPS, "max_frames": max(1, max_frames)}
    if storage.is_local(root):
        path = write_picture_questions(root, n_pictures, seed, kinds, max_frames)
        return {"name": "sample-pictures", "format": "llava", "path": str(path), **video}
    with tempfile.TemporaryDirectory() as tmp:
        write_picture_questions(tmp, n_pictures, seed, kinds, max_frames)
        fs, path = storage.filesystem(root)
        fs.put(tmp.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    return {"name": "sample-pictures", "format": "llava", "path": root.rstrip("/") + "/questions.jsonl", **video}


def _sample_sources(root: str, seed: int) -> dict[str, dict]:
    """The synthetic sample data, written once under `root` (a local folder or a bucket prefix)."""
    if storage.is_local(root):
        return write_sample_corpora(root, seed)
    with tempfile.TemporaryDirectory() as tmp:
        local = write_sample_corpora(tmp, seed)
        fs, path = storage.filesystem(root)
        fs.put(tmp.rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)
    return {k: dict(v, path=root.rstrip("/") + v["path"].removeprefix(tmp)) for k, v in local.items()}


def _processor_folder(teacher: str) -> str:
    """The teacher's saved processor as a local folder, checked against the teacher stage's file list
    (transformers loads from local paths only; the weights are not needed here)."""
    return storage.local_dir(teacher, only=lambda rel: not rel.endswith((".safetensors", ".bin")))
