"""Checkpoints in Hugging Face format: safetensors weights, config.json, and the processor beside them.
Loading goes through safetensors only, so nothing is ever unpickled."""

from __future__ import annotations

import os

from .families import family_of_checkpoint
from .families.base import LOAD_KWARGS
from .processing import InfiniteVLProcessor


def save_pretrained(model, processor: InfiniteVLProcessor | None, path) -> None:
    path = os.fspath(path)
    model.save_pretrained(path, safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(path)


def load_pretrained(path, **kwargs):
    """(model, processor) from a local student directory of any family (its config.json's model_type says
    which); the processor is None when none was saved."""
    path = os.fspath(path)
    family = family_of_checkpoint(path)
    if family is None:
        raise FileNotFoundError(f"no config.json in {path}: not a checkpoint directory")
    model = family.model_class.from_pretrained(path, **{**LOAD_KWARGS, **kwargs})
    has_processor = os.path.exists(os.path.join(path, "tokenizer_config.json"))
    return model.eval(), (InfiniteVLProcessor.from_pretrained(path) if has_processor else None)
