"""Losses, each normalised per supervised token (so a longer sequence does not weigh more per token)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.norm_mlp import use_fused  # fla's Triton kernels: CUDA tensors with fla installed

# logits of at most this many elements exist at once (1 GiB in fp32): at 32K answer tokens the whole 151,936-wide
# LM head output would be 10 GB in bf16, 20 GB more for its fp32 softmax and as much again for its gradient
HEAD_CHUNK_ELEMENTS = 1 << 28


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions of a packed row [1, T] whose logits predict a supervised token (position t predicts label t+1)."""
    return torch.nonzero(labels[0, 1:] != -100).squeeze(-1)


def answer_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                         max_elements: int = HEAD_CHUNK_ELEMENTS) -> tuple[torch.Tensor, int]:
    """Next-token CE per supervised token. `hidden` [P, d] are the final hidden states at
    `answer_positions(labels)` only, `targets` [P] the labels one position later, `head` the LM head (run in
    chunks: `chunked_head_loss`); returns (mean loss, tokens)."""
    n = int(targets.numel())
    if n == 0:
        return head(hidden).sum() * 0.0, 0

    def ce_sum(logits, c):
        return F.cross_entropy(logits.float(), targets[c], reduction="sum")

    fused = (lambda logits, c: fused_cross_entropy_sum(logits, targets[c])) if use_fused(hidden) else None
    return chunked_head_loss(hidden, head, ce_sum, max_elements, fused) / n, n


def fused_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ cross-entropy over the rows of `logits` [N, V] (CUDA) and its gradient, written over the logits
    themselves: fla's Triton kernels read the logits once for the log-partition and once more to write the
    gradient, fp32 inside. The torch path (upcast, log-softmax, its backward, downcast) reads and writes the
    chunk about six times, in fp32 mostly."""
    from fla.modules.fused_cross_entropy.ops import cross_entropy_bwd, cross_entropy_fwd

    loss, _, lse, _, _ = cross_entropy_fwd(logits, targets)
    ones = torch.ones((), dtype=torch.float32, device=logits.device).expand(logits.shape[0])
    return loss.sum(), cross_entropy_bwd(logits, targets, lse, ones, inplace_backward=True)


def chunked_head_loss(hidden: torch.Tensor, head: torch.nn.Module,
                      loss_sum: Callable[[torch.Tensor, slice], torch.Tensor],
                      max_elements: int = HEAD_CHUNK_ELEMENTS,
                      loss_and_grad: Callable[[torch.Tensor, slice], tuple] | None = None) -> torch.Tensor:
    """Σ over row chunks of `loss_sum(head(hidden[rows]), rows)`, where `hidden` [N, d] are the final hidden
    states at the positions the loss reads, without all N × vocab logits, their fp32 softmax and their
    gradients living at once.

    A plain bias-free `nn.Linear` head with its whole weight at hand takes the gradients of each chunk during
    the forward pass (_FusedHeadLoss: no more FLOPs than the unchunked loss). A head that must be called as a
    module (a LoRA-wrapped head, ZeRO-3 gathering its shards on call) runs each chunk under activation
    checkpointing instead, recomputing its logits in the backward pass (one more LM-head forward).
    `loss_and_grad(logits, rows)` -> (the same sum, its gradient over the logits) may replace autograd on
    `loss_sum` in the first case (a fused kernel; it may overwrite the logits)."""
    rows = max(1, max_elements // head.out_features)
    if type(head) is torch.nn.Linear and head.bias is None and not hasattr(head.weight, "ds_id"):
        return _FusedHeadLoss.apply(hidden, head.weight, loss_sum, rows, loss_and_grad)
    if hidden.shape[0] <= rows:
        return loss_sum(head(hidden), slice(0, hidden.shape[0]))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        chunk = slice(start, min(start + rows, hidden.shape[0]))
        total = total + checkpoint(lambda h, c=chunk: loss_sum(head(h), c), hidden[chunk], use_reentrant=False)
    return total


class _FusedHeadLoss(torch.autograd.Function):
    """The loss of `hidden @ weightᵀ` by chunks of rows, each chunk's gradients (hidden, and weight when it
    trains) taken as soon as its loss is known; only those gradients are kept for the backward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, loss_sum, rows, loss_and_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        for start in range(0, hidden.shape[0], rows):
            c = slice(start, min(start + rows, hidden.shape[0]))
            if loss_and_grad is not None:
                loss, grad_logits = loss_and_grad(F.linear(hidden[c], weight), c)
            else:
                with torch.enable_grad():
                    logits = F.linear(hidden[c].detach(), weight.detach()).requires_grad_()
                    loss = loss_sum(logits, c)
                    (grad_logits,) = torch.autograd.grad(loss, logits)
                del logits
            total += loss.detach().float()
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[c])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().float(), hidden[c].float())
            del grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype), None, None, None)


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
