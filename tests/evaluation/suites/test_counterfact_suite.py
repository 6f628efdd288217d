"""CounterFact: ROME's probability comparisons on whole multi-token targets."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import snapshot, state_equal
from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.evaluation.suites import SuiteError
from lmedit.evaluation.suites.counterfact import probability_scores
from lmedit.requests import EditRequest


def test_probability_scores_by_hand():
    # mean NLLs per token: new 0.5 / true 1.0 (new wins), new 2.0 / true 1.0 (true wins)
    success, magnitude = probability_scores([0.5, 2.0], [1.0, 1.0], true_should_win=False)
    assert success == 0.5
    assert magnitude == pytest.approx(((math.exp(-0.5) - math.exp(-1.0)) + (math.exp(-2.0) - math.exp(-1.0))) / 2)
    success, magnitude = probability_scores([0.5, 2.0], [1.0, 1.0], true_should_win=True)
    assert success == 0.5
    assert magnitude == pytest.approx(((math.exp(-1.0) - math.exp(-0.5)) + (math.exp(-1.0) - math.exp(-2.0))) / 2)
    assert probability_scores([1.0], [1.0], true_should_win=False)[0] == 0.0  # ties are failures (strict >)


def _request() -> EditRequest:
    return EditRequest(
        "the eiffel tower is located in", "rome city", subject="eiffel tower", ground_truth="paris", case_id="7",
        extra={"counterfact": {
            "target_true": "paris",
            "paraphrase_prompts": ["the eiffel tower is in", "where is the eiffel tower"],
            "neighborhood_prompts": ["the capital of france is", "the louvre is located in"],
            "generation_prompts": ["the eiffel tower is", "the eiffel tower is"],
            "attribute_prompts": [],
        }},
    )


def _mean_nll(model, tok, prompt: str, target: str) -> float:
    prefix = tok(prompt).input_ids
    full = tok(f"{prompt} {target}").input_ids
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prefix) - 1 : len(full) - 1], -1)
    return -float(logprobs.gather(1, torch.tensor(full[len(prefix):])[:, None]).mean())


def test_suite_matches_one_prompt_at_a_time_references(tiny_llama, word_tok):
    request = _request()
    data = request.extra["counterfact"]
    evaluator = Evaluator(word_tok, EvalConfig(batch_size=3, suites=("counterfact:max_new_tokens=5",)))
    before = snapshot(tiny_llama)
    pre = evaluator.capture(tiny_llama, [request]).metrics[0]
    assert state_equal(tiny_llama, before)

    def expected(prompts, true_should_win):
        new = [_mean_nll(tiny_llama, word_tok, p, "rome city") for p in prompts]
        true = [_mean_nll(tiny_llama, word_tok, p, "paris") for p in prompts]
        return probability_scores(new, true, true_should_win=true_should_win)

    for name, prompts, true_wins in [("cf_efficacy", [request.prompt], False),
                                     ("cf_paraphrase", data["paraphrase_prompts"], False),
                                     ("cf_neighborhood", data["neighborhood_prompts"], True)]:
        success, magnitude = expected(prompts, true_wins)
        assert pre[name] == success, name
        assert pre[f"{name}_magnitude"] == pytest.approx(magnitude, rel=1e-4, abs=1e-7), name
    assert "cf_generation_entropy" in pre


def test_suite_falls_back_to_the_request_fields(tiny_llama, word_tok):
    request = EditRequest("the eiffel tower is located in", "rome", ground_truth="paris", rephrase=["where is the eiffel tower"],
                          locality={"neighborhood": [("the capital of france is", "paris")]}, case_id="1")
    evaluator = Evaluator(word_tok, EvalConfig(suites=("counterfact:generation=false",)))
    metrics = evaluator.capture(tiny_llama, [request]).metrics[0]
    assert {"cf_efficacy", "cf_paraphrase", "cf_neighborhood"} <= set(metrics)
    assert "cf_generation_entropy" not in metrics


def test_requests_without_a_true_object_are_refused(tiny_llama, word_tok):
    evaluator = Evaluator(word_tok, EvalConfig(suites=("counterfact",)))
    with pytest.raises(SuiteError, match="true object"):
        evaluator.capture(tiny_llama, [EditRequest("the sky is", "green", case_id="3")])


def test_an_edit_towards_the_new_object_raises_efficacy(tiny_llama, word_tok):
    from lmedit.editor import Editor

    request = _request()
    editor = Editor(tiny_llama, word_tok, "FT-M", overrides={"layers": [1], "lr": 5e-2, "num_steps": 30},
                    eval_config=EvalConfig(suites=("counterfact:generation=false",)))
    pre = editor.capture([request])
    handle = editor.apply(request)
    post = editor.evaluate([request], pre)[0]
    handle.restore()
    assert post["cf_efficacy"] == 1.0
    assert post["cf_efficacy_magnitude"] > pre.metrics[0]["cf_efficacy_magnitude"]
