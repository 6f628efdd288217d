"""Weighted target NLL through the LM head, with the vocabulary streamed in chunks.

An edit's optimisation loop reads the LM head at a few dozen positions per
step. Through autograd that is a (positions, vocab) logit matrix written,
soft-maxed, zero-filled for the NLL's gradient and read back, and the head's
weight (vocab x hidden: 28M floats on SmolLM2, more than the blocks an edit
reruns) read twice, once forward and once backward. Here the weight is read
once per step, in chunks small enough to stay in the CPU's cache between the
two products that use them: the chunk's logits, and their soft-maxed share of
the gradient, accumulated with a running maximum as in an online softmax. The
loss and its gradient are the same quantities (to float rounding); no logit
matrix is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

VOCAB_CHUNK = 1024  # 1024 x 576 float32 = 2.4 MB: stays in a 4 MB L2 between the chunk's two products


def weighted_nll(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights_i * NLL(targets_i) from full float logits (the reference the streamed form must equal)."""
    nll = F.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")
    return (nll * weights.to(nll.device, nll.dtype)).sum()


def streamable(head: Any) -> bool:
    """A plain bias-free linear head: logits are ``hidden @ weight.T`` and nothing else."""
    return isinstance(head, nn.Linear) and head.bias is None


def head_weighted_nll(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, weights: torch.Tensor, chunk: int = VOCAB_CHUNK
) -> torch.Tensor:
    """sum_i weights_i * NLL(targets_i | head(hidden_i)); differentiable in ``hidden`` only (the head is frozen).

    Streams the vocabulary when the head is a plain linear layer
    (:func:`streamable`); otherwise computes the full logits.
    """
    targets = targets.to(hidden.device)
    weights = weights.to(hidden.device)
    if hidden.shape[0] == 0:
        return hidden.new_zeros((), dtype=torch.float32)
    # no gradient wanted (a last pass for the record): the streamed form would compute one for nothing
    if not streamable(head) or head.weight.requires_grad or not (torch.is_grad_enabled() and hidden.requires_grad):
        return weighted_nll(head(hidden), targets, weights)
    return _StreamedHeadNLL.apply(hidden, head.weight, targets, weights, chunk)


class _StreamedHeadNLL(torch.autograd.Function):
    """Forward computes the loss and d loss / d hidden in one pass over the head's weight; backward scales it."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                chunk: int) -> torch.Tensor:
        rows = hidden.shape[0]
        running_max = torch.full((rows,), -torch.inf, device=hidden.device)
        total = torch.zeros(rows, device=hidden.device)  # sum of exp(logit - running_max)
        expected = torch.zeros(rows, weight.shape[1], device=hidden.device)  # sum of exp(logit - max) * weight row
        target_logit = torch.zeros(rows, device=hidden.device)
        with torch.no_grad():
            for start in range(0, weight.shape[0], chunk):
                part = weight[start : start + chunk]
                logits = (hidden @ part.T).float()
                new_max = torch.maximum(running_max, logits.max(dim=1).values)
                rescale = torch.exp(running_max - new_max)
                shifted = torch.exp(logits - new_max[:, None])
                total = total * rescale + shifted.sum(dim=1)
                expected = expected * rescale[:, None] + shifted @ part.float()
                running_max = new_max
                inside = (targets >= start) & (targets < start + part.shape[0])
                if bool(inside.any()):
                    local = (targets - start).clamp(0, part.shape[0] - 1)
                    target_logit = torch.where(inside, logits.gather(1, local[:, None])[:, 0], target_logit)
            nll = running_max + torch.log(total) - target_logit
            w = weights.float()
            grad_hidden = w[:, None] * (expected / total[:, None] - weight[targets].float())
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        return (nll * w).sum()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        (grad_hidden,) = ctx.saved_tensors
        return (grad_output * grad_hidden).to(ctx.hidden_dtype), None, None, None, None
