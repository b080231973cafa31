"""How much of the teacher the stored top-k keeps: KL(teacher ‖ reconstructed) and the top-k mass.

The reconstruction is the distribution a reader can rebuild from what is stored: the top-k tokens at
their stored log-probs and the stored tail mass spread evenly over the other vocab - k tokens.
"""

from __future__ import annotations

import math

import torch

from .encoding import SparseEncoding
from .teacher import full_log_probs, sparse_logits


def reconstruct_log_probs(indices: torch.Tensor, log_probs: torch.Tensor, log_tail: torch.Tensor,
                          vocab_size: int) -> torch.Tensor:
    """[N, k] ids, [N, k] log-probs, [N] log tail → [N, vocab] log-probs."""
    n, k = indices.shape
    rest = vocab_size - k
    fill = (log_tail - math.log(rest)) if rest else torch.full_like(log_tail, float("-inf"))
    dense = fill[:, None].expand(n, vocab_size).clone()
    return dense.scatter_(1, indices, log_probs)


def kl_divergence(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """[N] KL(p ‖ q) from log-probs; terms where p = 0 count 0."""
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(-1)


def fidelity(reference_log_probs: torch.Tensor, indices: torch.Tensor, log_probs: torch.Tensor,
             log_tail: torch.Tensor) -> dict:
    """KL and mass of decoded top-k entries against the dense teacher log-probs at the same positions."""
    q = reconstruct_log_probs(indices, log_probs, log_tail, reference_log_probs.shape[-1])
    kl = kl_divergence(reference_log_probs.double(), q.double())
    mass = log_probs.double().exp().sum(-1)
    return {"positions": int(kl.numel()), "kl_mean": float(kl.mean()) if kl.numel() else 0.0,
            "kl_max": float(kl.max()) if kl.numel() else 0.0,
            "topk_mass": float(mass.mean()) if mass.numel() else 0.0,
            "topk_mass_min": float(mass.min()) if mass.numel() else 0.0}


def fidelity_report(model, inputs: dict, positions: torch.Tensor, encoding: SparseEncoding,
                    chunk: int = 2048) -> dict:
    """Runs the stored path (top-k → encode → decode) and the dense teacher on the same positions.

    `kl_mean` is what a reader gets; `kl_truncation` the same with the top-k kept at full precision, so
    their difference is what the value encoding costs."""
    idx, lp, tail = sparse_logits(model, inputs, positions, encoding.k, chunk)
    decoded = encoding.decode(encoding.encode(idx, lp, tail))
    reference = full_log_probs(model, inputs, positions).cpu()
    report = fidelity(reference, *(t.cpu() for t in decoded))
    report["kl_truncation"] = fidelity(reference, idx.cpu(), lp.cpu(), tail.cpu())["kl_mean"]
    return report
