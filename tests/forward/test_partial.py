"""The upper-blocks shortcut reproduces the full forward pass, and its gradients."""

from __future__ import annotations

import torch

from lmedit.forward import UpperForward, block_of, forward_reading, forward_tail, last_columns_logits
from lmedit.spec import ModelSpec, get_module

SEQUENCES = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]


def test_last_columns_equal_the_full_forward_for_every_first_block(tiny_model):
    spec = ModelSpec.from_model(tiny_model)
    with torch.no_grad():
        full = forward_tail(tiny_model, SEQUENCES, 0, 3)
        for first in range(spec.num_layers):
            shortcut = last_columns_logits(tiny_model, spec, first, SEQUENCES, 0, 3)()
            assert torch.allclose(shortcut, full, atol=1e-5), first


def test_gradient_through_the_shortcut_equals_the_full_one(tiny_llama):
    spec = ModelSpec.from_model(tiny_llama)
    site = spec.mlp_out(1)
    delta = torch.zeros(tiny_llama.config.hidden_size, requires_grad=True)

    def add(_module, _args, output):
        return output + delta

    ids = torch.tensor([SEQUENCES[0]])
    read = torch.tensor([3, 5])
    handle = get_module(tiny_llama, site).register_forward_hook(add)
    try:
        upper = UpperForward.prepare(tiny_llama, spec, block_of(spec, site), read, input_ids=ids)
        assert upper is not None
        grads = []
        for logits_of in (upper, lambda: forward_reading(tiny_llama, read, input_ids=ids, use_cache=False)[0]):
            delta.grad = None
            logits_of().logsumexp(-1).sum().backward()
            grads.append(delta.grad.clone())
    finally:
        handle.remove()
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_block_of_finds_the_containing_block(tiny_llama):
    spec = ModelSpec.from_model(tiny_llama)
    assert block_of(spec, spec.mlp_out(2)) == 2
    assert block_of(spec, spec.block(1)) == 1
    assert block_of(spec, spec.lm_head_path) is None
