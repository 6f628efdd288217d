"""UltraEdit: lifelong normalisation by hand, the captured keys and gradients, state and restore, module choice."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import snapshot, state_equal
from lmedit.hparams import HyperParamsError
from lmedit.locate.core import session_state
from lmedit.methods.ultraedit import (
    RunningStats,
    UltraEditHyperParams,
    _keys_and_grads,
    apply_ultraedit,
    ultraedit_stats,
)
from lmedit.forward import tokenize_pair
from lmedit.requests import EditRequest
from lmedit.spec import get_module

EPS = torch.finfo(torch.float32).eps
REQUESTS = [EditRequest("the capital of france is", "rome berlin"), EditRequest("who wrote hamlet", "tolstoy"),
            EditRequest("the sky is", "green grass red")]


def test_running_statistics_follow_the_authors_update_by_hand():
    first = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    second = torch.tensor([[5.0, 4.0], [7.0, 6.0], [9.0, 8.0]])
    stats = RunningStats.empty(2)
    stats.update(first)
    assert stats.n == 2 and torch.allclose(stats.mean, torch.tensor([2.0, 1.0]))
    assert torch.allclose(stats.var, torch.tensor([2 * 2.0, 2 * 2.0]))  # B x unbiased variance (2 each)
    stats.update(second)
    # mean of all five rows; var += 3 x 4 (unbiased var of 5,7,9) + 2 x 3 x (7-2)^2 / 5
    assert torch.allclose(stats.mean, torch.tensor([5.0, 4.0]))
    expected_var = 4.0 + 3 * 4.0 + 2 * 3 * 25.0 / 5
    assert torch.allclose(stats.var, torch.full((2,), expected_var))
    assert torch.allclose(stats.std, torch.full((2,), math.sqrt(expected_var / (5 - 1 + EPS))))
    row = torch.tensor([[6.0, 4.0]])
    assert torch.allclose(stats.normalise(row), (row - stats.mean) / (stats.std + EPS))


def test_a_single_row_has_no_spread_instead_of_nan():
    stats = RunningStats.empty(3)
    stats.update(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.equal(stats.var, torch.zeros(3))
    assert torch.equal(stats.normalise(torch.tensor([[1.0, 2.0, 3.0]])), torch.zeros(1, 3))


@pytest.mark.parametrize("token", ["answer", "all"])
def test_keys_and_gradients_are_those_of_the_answer_loss(tiny_llama, word_tok, token):
    name = "model.layers.1.mlp.down_proj"
    module = get_module(tiny_llama, name)
    loss, rows = _keys_and_grads(tiny_llama, word_tok, {name: module}, REQUESTS, token)
    keys, grads = rows[name]
    pairs = [tokenize_pair(word_tok, r.prompt, r.target_new) for r in REQUESTS]
    answer_tokens = sum(len(p.target_ids) for p in pairs)
    assert keys.shape[0] == grads.shape[0] == (answer_tokens if token == "answer" else sum(len(p.ids) for p in pairs))
    # the same gradient from autograd, one request at a time (a zero shift on the module's output)
    expected_keys, expected_grads, nll_sum = [], [], 0.0
    for pair in pairs:
        ids = torch.tensor([pair.ids])
        shift = torch.zeros(1, ids.shape[1], module.out_features, requires_grad=True)
        seen = {}
        hook = module.register_forward_hook(lambda m, a, out: (seen.setdefault("k", a[0].detach()), out + shift)[1])
        try:
            with torch.enable_grad():
                logits = tiny_llama(input_ids=ids).logits[0]
                start = pair.prompt_len - 1
                nll = torch.nn.functional.cross_entropy(logits[start:-1], ids[0, pair.prompt_len:], reduction="sum")
                (grad,) = torch.autograd.grad(nll / answer_tokens, shift)
        finally:
            hook.remove()
        nll_sum += float(nll.detach())
        chosen = slice(start, len(pair.ids) - 1) if token == "answer" else slice(0, len(pair.ids))
        expected_keys.append(seen["k"][0, chosen])
        expected_grads.append(grad[0, chosen])
    assert loss == pytest.approx(nll_sum / answer_tokens, rel=1e-5)
    assert torch.allclose(keys, torch.cat(expected_keys), atol=1e-5)
    assert torch.allclose(grads, torch.cat(expected_grads), atol=1e-6)


def test_statistics_accumulate_over_edits_and_restore_newest_first(tiny_llama, word_tok):
    original = snapshot(tiny_llama)
    hp = UltraEditHyperParams(layers=[1, 2], module="mlp_out", lr=1.0, grad_batch_size=2)
    first = apply_ultraedit(tiny_llama, word_tok, REQUESTS[:2], hp)
    (shape, stats), = ultraedit_stats(tiny_llama).items()
    rows_first = first.info["rows"]
    assert stats.n == 2 * rows_first  # two modules of one shape share the statistics
    after_first = snapshot(tiny_llama)
    second = apply_ultraedit(tiny_llama, word_tok, REQUESTS[2:], hp)
    assert ultraedit_stats(tiny_llama)[shape].n == 2 * (rows_first + second.info["rows"])
    second.restore()
    assert state_equal(tiny_llama, after_first) and ultraedit_stats(tiny_llama)[shape].n == 2 * rows_first
    first.restore()
    assert state_equal(tiny_llama, original) and "ultraedit" not in session_state(tiny_llama)


def test_the_edit_lowers_the_answer_loss_of_its_batch(tiny_llama, word_tok):
    hp = UltraEditHyperParams(layers=[0, 1, 2], module="mlp_out", lr=1.0, grad_batch_size=3)
    handle = apply_ultraedit(tiny_llama, word_tok, REQUESTS, hp)
    name = "model.layers.2.mlp.down_proj"
    after, _ = _keys_and_grads(tiny_llama, word_tok, {name: get_module(tiny_llama, name)}, REQUESTS, "answer")
    assert after < handle.info["loss_before"] - 0.1
    handle.restore()


def test_modules_by_role_or_by_easyedit_names(tiny_llama, tiny_gpt2):
    assert UltraEditHyperParams(layers=[0, 2]).module_names(tiny_llama) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.up_proj"]
    assert UltraEditHyperParams(layers=[1], module="mlp_out").module_names(tiny_gpt2) == ["transformer.h.1.mlp.c_proj"]
    named = UltraEditHyperParams(inner_params=["model.layers[1].mlp.up_proj.weight", "model.layers.2.mlp.gate_proj"])
    assert named.module_names(tiny_llama) == ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.gate_proj"]
    with pytest.raises(HyperParamsError, match="3 layers"):
        UltraEditHyperParams(layers=[7]).module_names(tiny_llama)
    with pytest.raises(HyperParamsError, match="not a linear module"):
        UltraEditHyperParams(inner_params=["model.layers.1.mlp"]).module_names(tiny_llama)


def test_gpt2_conv1d_weights_are_updated_in_their_own_layout(tiny_gpt2, word_tok):
    hp = UltraEditHyperParams(layers=[1], module="mlp_in", lr=1.0, grad_batch_size=3)
    before = tiny_gpt2.transformer.h[1].mlp.c_fc.weight.clone()
    handle = apply_ultraedit(tiny_gpt2, word_tok, REQUESTS, hp)
    assert not torch.equal(tiny_gpt2.transformer.h[1].mlp.c_fc.weight, before)
    handle.restore()
    assert torch.equal(tiny_gpt2.transformer.h[1].mlp.c_fc.weight, before)


@pytest.mark.parametrize("change, message", [
    ({"module": "attn"}, "module"), ({"lr": 0.0}, "positive"), ({"grad_batch_size": 0}, "grad_batch_size"),
    ({"token": "mask"}, "token"), ({"layers": []}, "layers"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(HyperParamsError, match=message):
        UltraEditHyperParams(**change).validate()
