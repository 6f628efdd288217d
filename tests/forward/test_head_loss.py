"""The streamed LM-head NLL equals cross-entropy over full logits, in value and in gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmedit.forward.head_loss import head_weighted_nll, streamable, weighted_nll


def _head(vocab: int, width: int, dtype: torch.dtype = torch.float32, bias: bool = False) -> nn.Linear:
    generator = torch.Generator().manual_seed(0)
    head = nn.Linear(width, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=generator) * 0.3)
    head.weight.requires_grad_(False)
    return head.to(dtype)


def _both(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, chunk: int):
    results = []
    for streamed in (False, True):
        h = hidden.clone().requires_grad_(True)
        loss = (head_weighted_nll(h, head, targets, weights, chunk) if streamed
                else weighted_nll(head(h), targets, weights))
        loss.backward()
        results.append((loss.detach(), h.grad))
    return results


@pytest.mark.parametrize("chunk", [7, 64, 1000])  # one not dividing the vocabulary, one chunk for all
def test_loss_and_gradient_equal_full_cross_entropy(chunk):
    head = _head(vocab=211, width=16)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 16, generator=generator) * 4  # large logits: the running maximum matters
    targets = torch.tensor([0, 210, 63, 64, 63])  # both ends of the vocabulary, a chunk edge, a repeat
    weights = torch.tensor([0.5, 0.1, 0.2, 0.05, 0.15])
    (ref_loss, ref_grad), (loss, grad) = _both(head, hidden, targets, weights, chunk)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_a_hand_computed_case():
    head = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    head.weight.requires_grad_(False)
    hidden = torch.tensor([[2.0, 0.0]], requires_grad=True)  # logits 2, 0, 0
    loss = head_weighted_nll(hidden, head, torch.tensor([1]), torch.tensor([2.0]), chunk=2)
    z = torch.tensor(2.0).exp() + 2
    assert loss.item() == pytest.approx(2 * (float(z.log()) - 0.0), rel=1e-6)
    loss.backward()
    p = torch.tensor([torch.tensor(2.0).exp() / z, 1 / z, 1 / z])
    expected = 2 * (p @ head.weight - head.weight[1])  # softmax-weighted rows minus the target's row
    assert torch.allclose(hidden.grad[0], expected, atol=1e-6)


def test_bfloat16_matches_the_full_computation_to_its_rounding():
    head = _head(vocab=300, width=32, dtype=torch.bfloat16)
    hidden = torch.randn(4, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    targets, weights = torch.tensor([3, 150, 299, 0]), torch.full((4,), 0.25)
    (ref_loss, ref_grad), (loss, grad) = _both(head, hidden, targets, weights, chunk=128)
    assert grad.dtype == torch.bfloat16
    assert torch.allclose(loss, ref_loss, rtol=1e-2)
    assert torch.allclose(grad.float(), ref_grad.float(), rtol=5e-2, atol=5e-3)


def test_heads_it_cannot_stream_fall_back_to_full_logits():
    biased = _head(vocab=50, width=8, bias=True)
    assert not streamable(biased)
    hidden = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    targets, weights = torch.tensor([1, 2, 3]), torch.ones(3)
    assert torch.allclose(head_weighted_nll(hidden, biased, targets, weights), weighted_nll(biased(hidden), targets, weights))
    assert head_weighted_nll(hidden[:0], _head(50, 8), targets[:0], weights[:0]).item() == 0.0
