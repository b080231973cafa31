"""Serving a checkpoint: chat with images and video (`chat`), as the `infinitevl generate` command uses it."""
