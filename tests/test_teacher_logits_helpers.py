"""Shared setup for the teacher-logit tests: a small corpus of images and a video, the tiny teacher saved
as the teacher stage saves it."""

from __future__ import annotations

from pipeline.data import synthetic
from pipeline.data.build import build_corpus
from pipeline.data.config import CorpusConfig


def build_small_corpus(root, name: str = "distill") -> str:
    """4 shards of 2-3 packed rows with 2-3 documents each; images in all documents, a video in two."""
    synthetic.write_llava(root / "src" / "pictures", 20, seed=41)
    synthetic.write_videos(root / "src" / "videos", 2, seed=42, seconds=1.0, fps=4)
    config = CorpusConfig(
        name=name, output=str(root / name), max_len=200, max_pixels=28 * 28 * 8, samples_per_shard=6, workers=1,
        sources=[{"name": "pictures", "format": "llava", "path": str(root / "src/pictures/annotations.jsonl")},
                 {"name": "videos", "format": "llava", "path": str(root / "src/videos/videos.jsonl"), "weight": 0.1}])
    build_corpus(config, progress=False)
    return str(root / name / "manifest.json")


def save_teacher(model, processor, path) -> str:
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return str(path)
