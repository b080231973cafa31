"""Evaluation: benchmark importers, metrics, the generation runner, long-video scoring, checkpoint entry point."""
