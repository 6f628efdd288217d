"""KN: integrated gradients against their completeness property, the neuron selection, and the value-vector edit."""

from __future__ import annotations

import pytest
import torch

from conftest import snapshot, state_equal
from lmedit.forward import generate_greedy, tokenize_pair
from lmedit.hparams import HyperParamsError
from lmedit.methods import kn
from lmedit.methods.kn import KNHyperParams, apply_kn, attribution_scores, knowledge_neurons, value_shift
from lmedit.requests import EditRequest
from lmedit.spec import ModelSpec, get_module


def _probability(model, ids, target, module=None, zero_last=False):
    handle = None
    if zero_last:
        def zero(mod, args):
            inputs = args[0].clone()
            inputs[:, -1] = 0
            return (inputs,)
        handle = module.register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    finally:
        if handle:
            handle.remove()
    return float(torch.softmax(logits.float(), -1)[target])


def test_integrated_gradients_sum_to_the_probability_they_explain(tiny_llama, word_tok):
    """Completeness: the scores of one layer add up to p(answer) − p(answer with the layer's neurons at 0)."""
    spec = ModelSpec.from_model(tiny_llama)
    pair = tokenize_pair(word_tok, "the capital of france is", "paris")
    scores = attribution_scores(tiny_llama, word_tok, spec, "the capital of france is", "paris", [1], steps=200,
                                batch_size=50)
    module = get_module(tiny_llama, spec.mlp_out(1))
    ids = list(pair.ids[: pair.prompt_len])
    full = _probability(tiny_llama, ids, pair.target_ids[0])
    zeroed = _probability(tiny_llama, ids, pair.target_ids[0], module, zero_last=True)
    assert scores.shape == (1, module.in_features)
    assert float(scores.sum()) == pytest.approx(full - zeroed, rel=0.05, abs=1e-4)


def test_selection_keeps_neurons_above_the_adaptive_threshold_shared_by_the_prompts(tiny_llama, word_tok, monkeypatch):
    spec = ModelSpec.from_model(tiny_llama)
    fixed = {"a": torch.tensor([[1.0, 0.5, 0.1], [0.0, 0.3, 0.9]]), "b": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.2]])}
    monkeypatch.setattr(kn, "attribution_scores", lambda model, tok, spec, prompt, *a: fixed[prompt])
    hp = KNHyperParams(adaptive_threshold=0.4, p=0.5)
    neurons, top = knowledge_neurons(tiny_llama, word_tok, spec, ["a", "b"], "x", [4, 7], hp)
    # prompt a keeps (4,0) (4,1) (7,2); prompt b keeps (4,0) only: shared by more than half -> (4,0)
    assert neurons == [(4, 0)] and top == 1.0
    loose, _ = knowledge_neurons(tiny_llama, word_tok, spec, ["a", "b"], "x", [4, 7], KNHyperParams(adaptive_threshold=0.4, refine=False))
    assert loose == [(4, 0), (4, 1), (7, 2)]
    capped, _ = knowledge_neurons(tiny_llama, word_tok, spec, ["a"], "x", [4, 7], KNHyperParams(adaptive_threshold=0.4, max_neurons=2))
    assert capped == [(4, 0), (7, 2)]  # the two highest scores


def test_the_edit_moves_exactly_the_chosen_value_vectors_and_restores(tiny_llama, word_tok):
    original = snapshot(tiny_llama)
    request = EditRequest("the capital of france is", "rome", ground_truth="paris")
    new_id = tokenize_pair(word_tok, request.prompt, "rome").target_ids[0]
    greedy = generate_greedy(tiny_llama, word_tok, [request.prompt], [1])[0]
    shift = value_shift(tiny_llama, [new_id], greedy)
    embeddings = tiny_llama.get_input_embeddings().weight
    assert not torch.allclose(shift, 2 * embeddings[new_id])  # the greedy answer's embedding is subtracted
    handle = apply_kn(tiny_llama, word_tok, [request], KNHyperParams(steps=4, batch_size=4))
    neurons = [tuple(n) for n in handle.info["neurons"]]
    assert neurons
    spec = ModelSpec.from_model(tiny_llama)
    for layer in range(spec.num_layers):
        name = f"{spec.mlp_out(layer)}.weight"
        change = tiny_llama.get_parameter(name) - original[name]
        columns = {i for l, i in neurons if l == layer}
        for index in range(change.shape[1]):
            expected = shift if index in columns else torch.zeros_like(shift)
            assert torch.allclose(change[:, index], expected, atol=1e-6)
    handle.restore()
    assert state_equal(tiny_llama, original)


def test_one_fact_at_a_time():
    with pytest.raises(ValueError, match="one fact at a time"):
        apply_kn(None, None, [EditRequest("a", "b"), EditRequest("c", "d")], KNHyperParams())


@pytest.mark.parametrize("change, message", [
    ({"steps": 0}, "at least 1"), ({"batch_size": 0}, "at least 1"), ({"adaptive_threshold": 0.0}, "adaptive_threshold"),
    ({"p": 1.0}, "p must"), ({"max_neurons": -1}, "max_neurons"), ({"edit_scale": 0.0}, "edit_scale"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(HyperParamsError, match=message):
        KNHyperParams(**change).validate()


def test_batching_layers_together_gives_the_same_scores(tiny_llama, word_tok):
    spec = ModelSpec.from_model(tiny_llama)
    args = (tiny_llama, word_tok, spec, "the capital of france is", "paris berlin", [0, 1, 2])
    together = attribution_scores(*args, steps=5, batch_size=15)
    apart = torch.cat([attribution_scores(tiny_llama, word_tok, spec, args[3], args[4], [layer], steps=5, batch_size=2)
                       for layer in (0, 1, 2)])
    assert torch.allclose(together, apart, atol=1e-6)
