"""Evaluation: benchmark importers, metrics, the generation runner, long-video scoring, checkpoint entry point."""

__all__ = ["evaluate_checkpoint", "evaluate_model", "load_checkpoint"]


def __getattr__(name: str):
    # imported on first use: the plan reads pipeline.eval.suites without loading torch and transformers
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
