"""Evaluation: benchmark importers, metrics, the generation runner, long-video scoring, checkpoint entry point."""

from .api import evaluate_checkpoint, evaluate_model, load_checkpoint

__all__ = ["evaluate_checkpoint", "evaluate_model", "load_checkpoint"]
