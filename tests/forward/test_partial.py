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


def _tiny_gemma3_mixed_layers(window: int = 3) -> torch.nn.Module:
    """Gemma 3 with sliding-window and global layers interleaved: each kind gets its own mask and rotary embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(config).eval()


LONG = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [15, 16, 17, 18, 19, 20, 21]]  # longer than the sliding window


def test_the_shortcut_replays_each_blocks_own_arguments():
    """A block above the first must get its own mask and rotary embeddings, not the first block's (Gemma 2/3);
    with the first block's, the shortcut disagreed with the full pass and every loop fell back to full passes."""
    model = _tiny_gemma3_mixed_layers()
    spec = ModelSpec.from_model(model)
    ids = torch.tensor([LONG[0]])
    read = torch.tensor([4, 8, 9])
    with torch.no_grad():
        full, _ = forward_reading(model, read, input_ids=ids, use_cache=False)
        for first in range(spec.num_layers):
            upper = UpperForward.prepare(model, spec, first, read, input_ids=ids)
            assert upper is not None, first
            assert torch.allclose(upper(), full, atol=1e-5), first
            shortcut = last_columns_logits(model, spec, first, LONG, 0, 3)()
            assert torch.allclose(shortcut, forward_tail(model, LONG, 0, 3), atol=1e-5), first


def test_the_cached_suffix_skips_the_lower_blocks_on_mixed_layers():
    from lmedit.forward.partial import SuffixForward, _SuffixFromBlock

    model = _tiny_gemma3_mixed_layers(window=16)  # the cache keeps every column; the rotary embeddings still differ
    spec = ModelSpec.from_model(model)
    ids = torch.tensor(LONG[0]).unsqueeze(0)
    mask = torch.ones_like(ids)
    read = torch.tensor([6, 8, 9])
    with torch.no_grad():
        full, _ = forward_reading(model, read, input_ids=ids, use_cache=False)
        suffix = SuffixForward.prepare(model, spec, read, 5, ids, mask, first_block=2)
        assert isinstance(suffix, _SuffixFromBlock)
        assert torch.allclose(suffix(), full, atol=1e-5)
