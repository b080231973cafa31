"""The device loop: teacher forward → top-k → encode, one packed sequence behind the host.

Each step launches its work and only then collects the previous step's bytes (copied to pinned host
memory without blocking), so while the GPU runs step i the host prepares step i+1's inputs and
unpacks step i-1's result. On the CPU it is a plain loop.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from .encoding import SparseEncoding
from .teacher import sparse_logits


def encoded_stream(model, items: Iterable[tuple[Any, dict, torch.Tensor]], encoding: SparseEncoding,
                   chunk: int = 2048) -> Iterator[tuple[Any, torch.Tensor]]:
    """(meta, teacher inputs, [N] covered positions) → (meta, [N, bytes_per_position] uint8 on the host)."""
    pending = None
    for meta, inputs, positions in items:
        idx, log_probs, log_tail = sparse_logits(model, inputs, positions, encoding.k, chunk)
        current = (meta, *_to_host(encoding.encode(idx, log_probs, log_tail)))
        if pending is not None:
            yield _collect(pending)
        pending = current
    if pending is not None:
        yield _collect(pending)


def _to_host(data: torch.Tensor):
    if data.device.type != "cuda":
        return data, None
    host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
    host.copy_(data, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _collect(pending) -> tuple[Any, torch.Tensor]:
    meta, host, done = pending
    if done is not None:
        done.synchronize()
    return meta, host
