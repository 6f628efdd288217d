"""Shared prefixes: grouping by hand, and the check that keeps a cached prefix only where it reproduces a full pass."""

from __future__ import annotations

import pytest
import torch

from conftest import LONG_DEMOS
from lmedit.compat import cache_tensors, output_cache
from lmedit.forward import checked_prefix, shared_prefix_groups


def test_groups_keep_long_common_starts_and_leave_the_rest_unshared():
    a = list(range(10)) + [50, 51]
    b = list(range(10)) + [60]
    c = list(range(10)) + [70, 71, 72]
    d = list(range(4)) + [80, 81]  # shares 4 tokens with the others: under the minimum
    e = [90, 91]
    groups = shared_prefix_groups([a, b, c, d, e], limits=[11, 10, 12, 5, 1], min_shared=6)
    assert groups == [(10, [0, 1, 2]), (0, [3, 4])]
    # a member's limit caps the group's prefix: the column predicting its first answer token stays out of it
    assert shared_prefix_groups([a, b, c], limits=[11, 7, 12], min_shared=6) == [(7, [0, 1, 2])]
    # one loosely similar sequence does not shrink a long shared prefix: it starts its own group
    f = list(range(4)) + [99]
    assert shared_prefix_groups([a, b, f], limits=[11, 10, 5], min_shared=3) == [(10, [0, 1]), (0, [2])]
    assert shared_prefix_groups([a], limits=[11], min_shared=1) == [(0, [0])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_checked_prefix_holds_the_keys_and_values_of_its_own_tokens(tiny_model, word_tok, dtype):
    model = tiny_model.to(dtype)
    sequence = word_tok(LONG_DEMOS + "who wrote hamlet").input_ids
    length = len(word_tok(LONG_DEMOS).input_ids)
    prefix = checked_prefix(model, sequence, length, [len(sequence) - 2, len(sequence) - 1], 0, torch.float32)
    assert prefix is not None and prefix.length == length
    alone = cache_tensors(output_cache(model(input_ids=torch.tensor([sequence[:length]]), use_cache=True)), 3, length)
    tolerance = 1e-6 if dtype == torch.float32 else 3e-2
    for (key, value), (own_key, own_value) in zip(prefix.kv, alone):
        assert torch.allclose(key.float(), own_key.float(), atol=tolerance)
        assert torch.allclose(value.float(), own_value.float(), atol=tolerance)


def test_a_prefix_whose_logits_differ_from_the_full_pass_is_refused(tiny_llama, word_tok, monkeypatch):
    import lmedit.forward.prefix as prefix_module

    real = prefix_module.logits_at
    monkeypatch.setattr(prefix_module, "logits_at", lambda model, inputs, read: real(model, inputs, read) + 1e-3)
    sequence = word_tok(LONG_DEMOS + "who wrote hamlet").input_ids
    assert checked_prefix(tiny_llama, sequence, len(word_tok(LONG_DEMOS).input_ids), [len(sequence) - 1], 0,
                          torch.float32) is None
