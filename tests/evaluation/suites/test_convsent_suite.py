"""ConvSent: edit score and KL locality, checked by hand and against one-sequence-at-a-time references."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import snapshot, state_equal
from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.evaluation.suites import SuiteError
from lmedit.evaluation.suites._forward import kl_divergence
from lmedit.evaluation.suites.convsent import entailment
from lmedit.requests import EditRequest

SEP = "<eos>"


def _request(case_id: str = "0") -> EditRequest:
    inner = [["what of france", "the city is big", True], ["what of france", "red sky", True],
             ["what of france", "small blue", False]]
    outer = [["what of london", "big green city"], ["what of london", "the river flows"]]
    return EditRequest(
        "the capital of france is", "the city is big", subject="france", case_id=case_id,
        extra={"convsent": {"topic": "france", "sentiment": "pos", "inner": inner,
                            "outer_topic": "london", "outer": outer}},
    )


def _answer_logits(model, tok, question: str, answer: str) -> tuple[torch.Tensor, list[int]]:
    """Reference: one sequence alone; rows predict each answer token (position t-1 predicts token t)."""
    prefix = tok(f"{question} {SEP}").input_ids
    full = tok(f"{question} {SEP} {answer}").input_ids
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].float()
    return logits[len(prefix) - 1 : len(full) - 1], full[len(prefix):]


def _mean_logprob(model, tok, pairs) -> float:
    total, count = 0.0, 0
    for question, answer in pairs:
        logits, target = _answer_logits(model, tok, question, answer)
        logprobs = torch.log_softmax(logits, -1).gather(1, torch.tensor(target)[:, None])
        total += float(logprobs.sum())
        count += len(target)
    return total / count


def test_entailment_by_hand():
    es, z_sent, z_topic = entailment(pre_target=-2.0, post_target=-1.0, post_other=-3.0)
    assert z_sent == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert z_topic == 1.0  # exp(+1) is clipped to 1
    assert es == pytest.approx(z_sent)
    es, z_sent, z_topic = entailment(pre_target=-1.0, post_target=-1.5, post_other=-1.5)
    assert (z_sent, z_topic) == (pytest.approx(0.5), pytest.approx(math.exp(-0.5)))
    assert es == pytest.approx(0.5 * math.exp(-0.5))


def test_kl_divergence_by_hand():
    pre = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    post = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(pre, post).tolist() == pytest.approx([expected, 0.0], abs=1e-6)
    assert kl_divergence(pre + 3.0, post - 1.0).tolist() == pytest.approx([expected, 0.0], abs=1e-6)  # shift-free


def _evaluator(word_tok) -> Evaluator:
    return Evaluator(word_tok, EvalConfig(batch_size=4))  # ConvSent data switches the suite on by itself


def test_unchanged_model_has_zero_kl_and_the_pre_edit_score(tiny_llama, word_tok):
    evaluator = _evaluator(word_tok)
    requests = [_request("0"), _request("1")]
    before = snapshot(tiny_llama)
    pre = evaluator.capture(tiny_llama, requests)
    post = evaluator.score(tiny_llama, requests, pre)
    assert state_equal(tiny_llama, before)
    for p, q in zip(pre.metrics, post):
        assert q["convsent_kl"] == pytest.approx(0.0, abs=1e-6)
        assert q["convsent_z_topic"] == pytest.approx(1.0)
        assert q["convsent_es"] == pytest.approx(p["convsent_es"], rel=1e-5)
        assert "convsent_kl" not in p


def test_edit_score_matches_a_one_at_a_time_reference(tiny_llama, word_tok):
    request = _request()
    inner = request.extra["convsent"]["inner"]
    target = _mean_logprob(tiny_llama, word_tok, [(q, a) for q, a, t in inner if t])
    other = _mean_logprob(tiny_llama, word_tok, [(q, a) for q, a, t in inner if not t])
    pre = _evaluator(word_tok).capture(tiny_llama, [request])
    assert pre.metrics[0]["convsent_es"] == pytest.approx(1 / (1 + math.exp(-(target - other))), rel=1e-5)


def _expected_kl(original, edited, tok, outer) -> float:
    total, count = 0.0, 0
    for question, answer in outer:
        pre_logits, _ = _answer_logits(original, tok, question, answer)
        post_logits, _ = _answer_logits(edited, tok, question, answer)
        kl = kl_divergence(pre_logits, post_logits)
        total += float(kl.sum())
        count += kl.numel()
    return total / count


def test_in_place_edit_gives_nonzero_kl_measured_against_the_unedited_model(tiny_llama, word_tok):
    """EasyEdit scores pre and post on the same, already edited object, so its KL is 0; ours is not."""
    request = _request()
    evaluator = _evaluator(word_tok)
    original = copy.deepcopy(tiny_llama)
    pre = evaluator.capture(tiny_llama, [request])
    with torch.no_grad():  # an in-place edit of an MLP, as ROME/MEMIT/FT make, that moves every output
        weight = tiny_llama.model.layers[1].mlp.down_proj.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    post = evaluator.score(tiny_llama, [request], pre)[0]
    expected = _expected_kl(original, tiny_llama, word_tok, request.extra["convsent"]["outer"])
    assert expected > 1e-3
    assert post["convsent_kl"] == pytest.approx(expected, rel=1e-4)
    inner = request.extra["convsent"]["inner"]
    pre_target = _mean_logprob(original, word_tok, [(q, a) for q, a, t in inner if t])
    post_target = _mean_logprob(tiny_llama, word_tok, [(q, a) for q, a, t in inner if t])
    post_other = _mean_logprob(tiny_llama, word_tok, [(q, a) for q, a, t in inner if not t])
    es, z_sent, z_topic = entailment(pre_target, post_target, post_other)
    assert post["convsent_es"] == pytest.approx(es, rel=1e-4)
    assert post["convsent_z_topic"] == pytest.approx(z_topic, rel=1e-4)


def test_pre_distributions_survive_an_edit_of_the_output_layer(tiny_llama, word_tok):
    """The pre-edit logits are rebuilt from a copy of the head, not the (edited) head itself."""
    request = _request()
    evaluator = _evaluator(word_tok)
    original = copy.deepcopy(tiny_llama)
    pre = evaluator.capture(tiny_llama, [request])
    with torch.no_grad():
        tiny_llama.lm_head.weight.mul_(1.7)
    post = evaluator.score(tiny_llama, [request], pre)[0]
    expected = _expected_kl(original, tiny_llama, word_tok, request.extra["convsent"]["outer"])
    assert expected > 1e-3 and post["convsent_kl"] == pytest.approx(expected, rel=1e-4)


def test_gpt2_and_unpacked_scoring_agree(tiny_gpt2, word_tok):
    request = _request()
    packed = Evaluator(word_tok, EvalConfig(batch_size=8)).capture(tiny_gpt2, [request]).metrics[0]
    padded = Evaluator(word_tok, EvalConfig(batch_size=8, packing=False)).capture(tiny_gpt2, [request]).metrics[0]
    assert packed["convsent_es"] == pytest.approx(padded["convsent_es"], rel=1e-5)


def test_separator_is_the_tokenizers_eos_and_recorded(word_tok):
    settings = Evaluator(word_tok).suite_settings([_request()])
    assert settings == [{"suite": "convsent", "separator": "eos", "separator_text": "<eos>",
                         "kl": "KL(pre || post), nats, mean over outer answer tokens"}]


def test_requests_without_both_sentiments_are_refused(tiny_llama, word_tok):
    request = _request()
    data = request.extra["convsent"]
    broken = EditRequest(request.prompt, request.target_new, case_id="9",
                         extra={"convsent": {**data, "inner": [row for row in data["inner"] if row[2]]}})
    with pytest.raises(SuiteError, match="both sentiments"):
        _evaluator(word_tok).capture(tiny_llama, [broken])


def test_routed_models_are_scored_on_their_routes(tiny_llama, word_tok):
    """IKE and SERAC: each question is fed as its router says, to the network it names (SEP after the routed text)."""
    from lmedit.routing import Route, attach_router, detach_router

    counterfactual = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        weight = counterfactual.model.layers[1].mlp.down_proj.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)) * 0.5)

    class Split:
        kind = "split"

        def route(self, model, tok, prompts):  # the edited topic to another network, the other one rewritten
            return [Route(p, counterfactual, "cf") if "france" in p else Route("the city is " + p) for p in prompts]

    request = _request()
    evaluator = _evaluator(word_tok)
    pre = evaluator.capture(tiny_llama, [request])
    router = Split()
    attach_router(tiny_llama, router)
    try:
        post = evaluator.score(tiny_llama, [request], pre)[0]
    finally:
        detach_router(tiny_llama, router)
    inner = request.extra["convsent"]["inner"]
    pre_target = _mean_logprob(tiny_llama, word_tok, [(q, a) for q, a, t in inner if t])
    post_target = _mean_logprob(counterfactual, word_tok, [(q, a) for q, a, t in inner if t])
    post_other = _mean_logprob(counterfactual, word_tok, [(q, a) for q, a, t in inner if not t])
    assert post["convsent_es"] == pytest.approx(entailment(pre_target, post_target, post_other)[0], rel=1e-4)
    total, count = 0.0, 0
    for question, answer in request.extra["convsent"]["outer"]:
        pre_logits, _ = _answer_logits(tiny_llama, word_tok, question, answer)
        post_logits, _ = _answer_logits(tiny_llama, word_tok, "the city is " + question, answer)
        kl = kl_divergence(pre_logits, post_logits)
        total, count = total + float(kl.sum()), count + kl.numel()
    assert total / count > 1e-4
    assert post["convsent_kl"] == pytest.approx(total / count, rel=1e-3)  # small KL: float noise near 1e-4


@pytest.mark.embedded
def test_embedded_model_keeps_hidden_states_not_distributions(embedded):
    """On the real model (tied embeddings) the head copy reproduces the logits, so no full distributions are kept."""
    model, tok = embedded
    request = EditRequest(
        "From the sentiment dataset, answer What do you think of jazz? postively.", "I love it.", subject="jazz",
        case_id="0", extra={"convsent": {
            "topic": "jazz", "sentiment": "pos",
            "inner": [["What do you think of jazz?", "I love it.", True], ["How do you view jazz?", "It is noise.", False]],
            "outer_topic": "rain", "outer": [["What do you feel about rain?", "Rain makes the garden grow."]]}})
    evaluator = Evaluator(tok)
    pre = evaluator.capture(model, [request])
    _, capture = pre.suites["convsent"]
    assert capture.shared is not None and capture.states[0].outer_hidden[0] is not None
    assert capture.states[0].outer_logprobs == [None]
    post = evaluator.score(model, [request], pre)[0]
    assert post["convsent_kl"] == pytest.approx(0.0, abs=1e-5)


def test_full_distributions_are_kept_when_the_head_copy_cannot_rebuild_the_logits(tiny_llama, word_tok, monkeypatch):
    from lmedit.evaluation.suites import _forward

    monkeypatch.setattr(_forward.HeadSnapshot, "reproduces", lambda self, hidden, logits: False)
    request = _request()
    evaluator = _evaluator(word_tok)
    original = copy.deepcopy(tiny_llama)
    pre = evaluator.capture(tiny_llama, [request])
    _, capture = pre.suites["convsent"]
    assert capture.shared is None and all(lp is not None for lp in capture.states[0].outer_logprobs)
    with torch.no_grad():
        tiny_llama.lm_head.weight.mul_(1.7)
    post = evaluator.score(tiny_llama, [request], pre)[0]
    expected = _expected_kl(original, tiny_llama, word_tok, request.extra["convsent"]["outer"])
    assert post["convsent_kl"] == pytest.approx(expected, rel=1e-4)
