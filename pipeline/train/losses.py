"""Losses, each normalised per supervised token (so a longer sequence does not weigh more per token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions of a packed row [1, T] whose logits predict a supervised token (position t predicts label t+1)."""
    return torch.nonzero(labels[0, 1:] != -100).squeeze(-1)


def answer_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token CE per supervised token. `logits` [P, V] are those at `answer_positions(labels)` only (the
    model's `logits_to_keep`: at 32K tokens all logits would be 10 GB in bf16 and more in fp32, for answers that
    are a few percent of the tokens), `targets` [P] the labels one position later; returns (mean loss, tokens)."""
    n = int(targets.numel())
    if n == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(logits.float(), targets, reduction="sum") / n, n


def topk_kl(student_logits: torch.Tensor, topk_index: torch.Tensor, topk_logit: torch.Tensor,
            teacher_lse: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) at temperature T, times T², averaged over the N positions.

    student_logits [N, V]; topk_index / topk_logit [N, k] the teacher's stored top-k logits; teacher_lse [N]
    its full log-partition at T = 1 when stored. At T = 1 with the log-partition the teacher's top-k
    probabilities are exact and the mass outside them is one bucket on both sides (exact when k = V);
    otherwise the teacher's top-k are renormalised at temperature T and compared with the student's full
    distribution (student mass outside the teacher's top-k still costs)."""
    T = temperature
    s_logp = torch.log_softmax(student_logits.float() / T, dim=-1)
    s_top = s_logp.gather(-1, topk_index.long())
    if teacher_lse is not None and T == 1.0:
        t_logp = topk_logit.float() - teacher_lse.float().unsqueeze(-1)
        t_p = t_logp.exp()
        rest_t = (1 - t_p.sum(-1)).clamp_min(0)
        rest_s = (1 - s_top.exp().sum(-1)).clamp_min(1e-20)
        tail = torch.where(rest_t > 0, rest_t * (rest_t.clamp_min(1e-20).log() - rest_s.log()), rest_t * 0)
        kl = (t_p * (t_logp - s_top)).sum(-1) + tail
    else:
        t_logp = torch.log_softmax(topk_logit.float() / T, dim=-1)
        kl = (t_logp.exp() * (t_logp - s_top)).sum(-1)
    return kl.mean() * T * T


def layer_mse(student_out: torch.Tensor, teacher_out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over real tokens and hidden units."""
    diff = (student_out.float() - teacher_out.float()).pow(2)
    if mask is None:
        return diff.mean()
    m = mask.to(diff.dtype).unsqueeze(-1)
    return (diff * m).sum() / (m.sum() * diff.shape[-1]).clamp_min(1)
