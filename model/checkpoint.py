"""Checkpoints in Hugging Face format: safetensors weights, config.json, and the processor beside them.
Loading goes through safetensors only, so nothing is ever unpickled."""

from __future__ import annotations

import os

from .modeling import InfiniteVLForConditionalGeneration
from .processing import InfiniteVLProcessor


def save_pretrained(model, processor: InfiniteVLProcessor | None, path) -> None:
    path = os.fspath(path)
    model.save_pretrained(path, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(path)


def load_pretrained(path, **kwargs) -> tuple[InfiniteVLForConditionalGeneration, InfiniteVLProcessor | None]:
    """(model, processor) from a local directory; the processor is None when none was saved."""
    path = os.fspath(path)
    model = InfiniteVLForConditionalGeneration.from_pretrained(path, use_safetensors=True, **kwargs)
    has_processor = os.path.exists(os.path.join(path, "tokenizer_config.json"))
    return model.eval(), (InfiniteVLProcessor.from_pretrained(path) if has_processor else None)
