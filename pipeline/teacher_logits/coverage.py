"""Which positions of a packed row get stored teacher logits.

The logits at position t predict token t+1, so a position is covered when the token it predicts is one
the student should learn, and that token is in the same document (the last position of a document
predicts the next document's first token, which nothing conditions on):
    "answer": the predicted token is supervised (its label is not -100): the assistant turns;
    "text":   the predicted token is text, not an image or video patch placeholder.
"""

from __future__ import annotations

import torch

POLICIES = ("answer", "text")
IGNORE_INDEX = -100


def covered_mask(policy: str, input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor,
                 media_token_ids: tuple[int, ...]) -> torch.Tensor:
    """[T] token ids and labels of one packed row, its document bounds → [T] bool."""
    if policy not in POLICIES:
        raise ValueError(f"positions policy must be one of {POLICIES}, got {policy!r}")
    next_ids, next_labels = input_ids[1:], labels[1:]
    if policy == "answer":
        predicts = next_labels != IGNORE_INDEX
    else:
        predicts = ~torch.isin(next_ids, torch.tensor(media_token_ids, dtype=next_ids.dtype, device=next_ids.device))
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    mask[:-1] = predicts
    ends = cu_seqlens[1:].long() - 1
    mask[ends[ends >= 0]] = False
    return mask
