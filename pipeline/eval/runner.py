"""Batched greedy generation over eval samples, scoring, and the per-suite reports.

A sample is a dict in the eval format (dataset.py). A video sample either names its file in `video`, from
which `video_frames` frames are sampled evenly, or carries `frames` (PIL images) and `video_fps` itself,
as the generated long-video task does. For each suite the runner writes, under
`<out_dir>/<suite>/`:
  results.json   the summary (score in percent, per-category scores, config)
  results.md     the same as a markdown table
  samples.jsonl  one line per sample: prompt, answers, prediction, the answer that was scored, score
`rescore` recomputes results.json's numbers from samples.jsonl alone.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Iterator

import torch
from PIL import Image

from model.cuda_graphs import grouped_vision
from pipeline import storage

from .dataset import decode_image
from .metrics import LETTERS, aggregate, score_sample

log = logging.getLogger(__name__)

# The instructions Qwen2.5-VL was tuned with, so scores compare with its published ones.
DEFAULT_PROMPTS = {
    "vqa": "Answer the question using a single word or phrase.",
    "anls": "Answer the question using a single word or phrase.",
    "relaxed": "Answer the question using a single word or phrase.",
    "mc": "Answer with the option's letter from the given choices directly.",
    "ocrbench": "",
}


@dataclass
class EvalConfig:
    batch_size: int = 8
    max_new_tokens: int = 32
    min_pixels: int | None = None        # image limits; None keeps the processor's own
    max_pixels: int | None = None
    video_min_pixels: int | None = None  # per-frame limits for video samples
    video_max_pixels: int | None = None
    video_fps: float = 2.0               # the time step given for in-memory frames without their own fps
    video_frames: int = 32               # frames sampled evenly from each video file
    limit: int | None = None             # evaluate only the first N samples of a suite
    prompts: dict[str, str] = field(default_factory=dict)  # metric -> instruction, overriding DEFAULT_PROMPTS
    pictures: list[str] | None = None    # the kinds of picture the `pictures` suite asks about (None: all)

    @classmethod
    def from_dict(cls, values: dict | "EvalConfig" | None) -> "EvalConfig":
        if values is None:
            return cls()
        if isinstance(values, cls):
            return values
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown eval config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


# -- prompts -----------------------------------------------------------------------------------------------------

def build_prompt(sample: dict, prompts: dict[str, str] | None = None) -> str:
    instruction = {**DEFAULT_PROMPTS, **(prompts or {})}.get(sample["metric"], "")
    parts = []
    if sample.get("hint"):
        parts.append(f"Hint: {sample['hint']}")
    parts.append(sample["question"])
    if sample["metric"] == "mc":
        parts.append("Options:\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(sample["options"])))
    if instruction:
        parts.append(instruction)
    return "\n".join(parts)


def build_messages(sample: dict, prompt: str) -> list[dict]:
    content = []
    if sample.get("image") is not None:
        content.append({"type": "image"})
    if has_video(sample):
        content.append({"type": "video"})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


# -- generation ------------------------------------------------------------------------------------------------

@torch.inference_mode()
def generate_batch(model, processor, samples: list[dict], config: EvalConfig) -> list[str]:
    """Greedy answers for one batch, prompts padded on the left."""
    prompts = [build_prompt(s, config.prompts) for s in samples]
    texts = [processor.apply_chat_template(build_messages(s, p), add_generation_prompt=True)
             for s, p in zip(samples, prompts)]
    images = [_as_image(s["image"]) for s in samples if s.get("image") is not None]
    clips = [video_frames(s, config) for s in samples if has_video(s)]
    videos, fps = [c[0] for c in clips], [c[1] for c in clips]
    # The processor takes one pair of pixel limits; a batch with video uses the per-frame ones.
    min_pixels, max_pixels = ((config.video_min_pixels, config.video_max_pixels) if videos
                              else (config.min_pixels, config.max_pixels))
    inputs = processor(text=texts, images=images or None, videos=videos or None, video_fps=fps or config.video_fps,
                       min_pixels=min_pixels, max_pixels=max_pixels, padding_side="left")
    inputs = to_model_inputs(inputs, model)
    with grouped_vision(model):
        out = model.generate(**inputs, max_new_tokens=config.max_new_tokens, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def has_video(sample: dict) -> bool:
    return bool(sample.get("frames")) or bool(sample.get("video"))


def video_frames(sample: dict, config: EvalConfig) -> tuple[list[Image.Image], float]:
    """(frames, frames per second) of a video sample: its own frames, or an even sampling of its file."""
    if sample.get("frames"):
        return sample["frames"], sample.get("video_fps", config.video_fps)
    from pipeline.data.media import decode_video

    # An fps far above any video's makes decode_video spread exactly video_frames frames over the whole
    # video (fewer for a shorter one) and report the sampling rate that results.
    clip = decode_video(sample["video"], fps=1e6, max_frames=config.video_frames)
    return clip.frames, clip.fps


def _as_image(value) -> Image.Image:
    return value if isinstance(value, Image.Image) else decode_image(value)


def to_model_inputs(inputs, model) -> dict:
    device = getattr(model, "device", torch.device("cpu"))
    dtype = getattr(model, "dtype", torch.float32)
    moved = {}
    for key, value in dict(inputs).items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if key.startswith("pixel_values"):
                value = value.to(dtype)
        moved[key] = value
    return moved


# -- a suite -----------------------------------------------------------------------------------------------------

def run_suite(model, processor, samples: Iterable[dict], suite: str, out_dir: str,
              config: EvalConfig | dict | None = None, model_name: str = "") -> dict:
    """Generates, scores and reports one suite; returns the results written to results.json.

    Under torch.distributed (e.g. torchrun, one process per GPU) every rank answers every world-th
    sample; rank 0 merges the per-rank files in sample order and writes the reports, and every rank
    returns the same results.
    """
    config = EvalConfig.from_dict(config)
    rank, world = _rank_and_world()
    samples = itertools.islice(samples, config.limit) if config.limit is not None else iter(samples)
    mine = (sample for i, sample in enumerate(samples) if i % world == rank)
    suite_dir = f"{out_dir.rstrip('/')}/{suite}"
    part = f"{suite_dir}/samples.jsonl" if world == 1 else f"{suite_dir}/samples.rank{rank:03d}.jsonl"
    count = 0
    with storage.open_url(part, "w") as per_sample:  # streamed, so a long suite shows its progress
        for batch in _batches(mine, config.batch_size):
            predictions = generate_batch(model, processor, batch, config)
            for sample, prediction in zip(batch, predictions):
                per_sample.write(json.dumps(_score(sample, prediction, config)) + "\n")
            count += len(batch)
            log.info("%s: %d samples scored on rank %d", suite, count, rank)
    if world == 1:
        return _report(storage.read_jsonl(part, missing_ok=False), suite, suite_dir, config, model_name)
    import torch.distributed as dist

    dist.barrier()
    results = [None]
    if rank == 0:
        records = _merge_parts(suite_dir, world)
        results = [_report(records, suite, suite_dir, config, model_name)]
    dist.broadcast_object_list(results, src=0)
    return results[0]


def is_main_process() -> bool:
    """True except on the non-zero ranks of a distributed run, which leave shared reports to rank 0."""
    return _rank_and_world()[0] == 0


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _merge_parts(suite_dir: str, world: int) -> list[dict]:
    """Rank r answered samples r, r + world, …: interleaving the parts restores the sample order."""
    parts = [storage.read_jsonl(f"{suite_dir}/samples.rank{r:03d}.jsonl", missing_ok=False) for r in range(world)]
    records = [parts[i % world][i // world] for i in range(sum(len(p) for p in parts))]
    storage.write_text(f"{suite_dir}/samples.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    for r in range(world):
        storage.delete(f"{suite_dir}/samples.rank{r:03d}.jsonl")
    return records


def _report(records: list[dict], suite: str, suite_dir: str, config: EvalConfig, model_name: str) -> dict:
    results = {
        "suite": suite,
        "model": model_name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "metrics": sorted({r["metric"] for r in records}),
        **aggregate(records),
        "config": asdict(config),
    }
    _write_text(f"{suite_dir}/results.json", json.dumps(results, indent=2))
    _write_text(f"{suite_dir}/results.md", markdown_table([results]))
    return results


def _batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    while batch := list(itertools.islice(samples, size)):
        yield batch


def _score(sample: dict, prediction: str, config: EvalConfig) -> dict:
    score, scored_answer = score_sample(sample["metric"], prediction, sample["answers"], sample.get("options", []),
                                        sample.get("source", ""))
    return {
        "id": sample["id"], "suite": sample["suite"], "metric": sample["metric"],
        "category": sample.get("category", ""), "source": sample.get("source", ""), "group": sample.get("group", ""),
        "prompt": build_prompt(sample, config.prompts), "answers": list(sample["answers"]),
        "options": list(sample.get("options", [])), "prediction": prediction, "scored_answer": scored_answer,
        "score": score,
    }


def rescore(samples_url: str) -> dict:
    """The suite summary recomputed from a samples.jsonl: what results.json must agree with."""
    records = storage.read_jsonl(samples_url, missing_ok=False)
    for r in records:
        r["score"], _ = score_sample(r["metric"], r["prediction"], r["answers"], r["options"], r["source"])
    return aggregate(records)


# -- reports -------------------------------------------------------------------------------------------------------

def markdown_table(results: list[dict]) -> str:
    """One row per suite, then one per category where a suite has several."""
    lines = ["| suite | category | n | score |", "|---|---|---:|---:|"]
    for r in results:
        headline = f"{r['score']:.2f}"
        if "final_score" in r:
            headline += f" ({r['final_score']:g} correct)"
        if r.get("n_unscored"):
            headline += f" ({r['n_unscored']} without answers, not scored)"
        lines.append(f"| {r['suite']} | all | {r['n']} | {headline} |")
        if len(r["categories"]) > 1:
            for name, c in r["categories"].items():
                lines.append(f"| {r['suite']} | {name} | {c['n']} | {c['score']:.2f} |")
    return "\n".join(lines) + "\n"


def _write_text(url: str, text: str) -> None:
    storage.write_text(url, text)

