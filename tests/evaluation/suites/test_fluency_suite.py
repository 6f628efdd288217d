"""Fluency: ROME's weighted n-gram entropy, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest

from conftest import snapshot, state_equal
from lmedit.evaluation import EvalConfig, Evaluator
from lmedit.evaluation.suites.fluency import (
    clean_generation,
    generate_texts,
    mean_ngram_entropy,
    ngram_entropy,
    text_ngram_entropy,
    word_tokens,
)
from lmedit.requests import EditRequest


@pytest.mark.parametrize("text, tokens", [
    ("The cat sat.", ["The", "cat", "sat", "."]),
    ("I don't know, can't say!", ["I", "do", "n't", "know", ",", "ca", "n't", "say", "!"]),
    ("It's 3.14 and 1,000 well-known...", ["It", "'s", "3.14", "and", "1,000", "well-known", "..."]),
    ("  \n ", []),
])
def test_word_tokens_split_words_punctuation_and_clitics(text, tokens):
    assert word_tokens(text) == tokens


def test_ngram_entropy_by_hand():
    tokens = "a b a b".split()
    # bigrams (a,b) x2, (b,a) x1 -> H = -(2/3 log2 2/3 + 1/3 log2 1/3); trigrams (a,b,a), (b,a,b) -> 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(tokens, 2) == pytest.approx(h2)
    assert ngram_entropy(tokens, 3) == pytest.approx(1.0)
    assert text_ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert text_ngram_entropy("a b a b") == pytest.approx(0.972765, abs=1e-6)


def test_ngram_entropy_of_distinct_words_is_log2_of_the_count():
    text = "one two three four five"  # 4 distinct bigrams, 3 distinct trigrams
    assert text_ngram_entropy(text) == pytest.approx((2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2)


def test_repetition_lowers_the_entropy():
    assert text_ngram_entropy("the the the the the the") == 0.0
    assert text_ngram_entropy("go home now go home now") < text_ngram_entropy("go home now we eat soup")


def test_too_short_texts_contribute_zero_as_numpy_does():
    assert text_ngram_entropy("") == 0.0
    assert text_ngram_entropy("word") == 0.0
    assert text_ngram_entropy("two words") == pytest.approx(0.0)  # one bigram (H=0), no trigram


def test_mean_over_texts_is_arithmetic():
    assert mean_ngram_entropy(["a b a b", "x y"]) == pytest.approx(0.972765 / 2, abs=1e-6)
    with pytest.raises(ValueError):
        mean_ngram_entropy([])


def test_clean_generation_as_the_reference():
    assert clean_generation("ﬁne\n\nday") == "fine day"  # NFKD folds the ligature; blank line -> space


def test_generations_have_the_requested_length_without_stopping_at_eos(tiny_llama, word_tok):
    prompts = ["the capital of france is", "who wrote hamlet", "the capital of france is"]
    generations = generate_texts(tiny_llama, word_tok, prompts, 7, batch_size=2)
    assert [g.new_tokens for g in generations] == [7, 7, 7]
    assert generations[0] == generations[2]
    assert all(g.text.startswith(p) for g, p in zip(generations, prompts))


def test_fluency_suite_pre_and_post_agree_on_an_unchanged_model(tiny_llama, word_tok):
    requests = [EditRequest("the capital of france is", "rome", case_id="0"),
                EditRequest("who wrote hamlet", "tolstoy", case_id="1",
                            extra={"fluency_prompts": ["the sky is", "the sun is"]})]
    evaluator = Evaluator(word_tok, EvalConfig(suites=("fluency:max_new_tokens=12",)))
    before = snapshot(tiny_llama)
    pre = evaluator.capture(tiny_llama, requests)
    post = evaluator.score(tiny_llama, requests, pre)
    assert state_equal(tiny_llama, before)
    for p, q in zip(pre.metrics, post):
        assert p["fluency"] == pytest.approx(q["fluency"])
        assert q["fluency_new_tokens"] == 12
    texts = [g.text for g in generate_texts(tiny_llama, word_tok, ["the sky is", "the sun is"], 12, 4)]
    assert post[1]["fluency"] == pytest.approx(mean_ngram_entropy(texts))


def test_a_routed_model_is_continued_from_its_routed_prompt_and_scored_on_the_given_one(tiny_llama, word_tok):
    """IKE and SERAC route prompts; fluency must decode what the model is really fed, not refuse or bypass it."""
    from lmedit.routing import Route, attach_router, detach_router

    class Prefix:
        kind = "prefix"

        def route(self, model, tok, prompts):
            return [Route("who wrote hamlet " + p, name="prefix") for p in prompts]

    prompt = "the capital of france is"
    plain = generate_texts(tiny_llama, word_tok, [prompt], 9, batch_size=2)[0]
    prefixed = generate_texts(tiny_llama, word_tok, ["who wrote hamlet " + prompt], 9, batch_size=2)[0]
    assert plain.text[len(prompt):] != prefixed.text[len("who wrote hamlet " + prompt):]
    router = Prefix()
    attach_router(tiny_llama, router)
    try:
        routed = generate_texts(tiny_llama, word_tok, [prompt], 9, batch_size=2)[0]
        request = EditRequest(prompt, "rome", case_id="0")
        evaluator = Evaluator(word_tok, EvalConfig(suites=("fluency:max_new_tokens=9",)))
        post = evaluator.score(tiny_llama, [request], evaluator.capture(tiny_llama, [request]))
    finally:
        detach_router(tiny_llama, router)
    assert routed.text == prompt + prefixed.text[len("who wrote hamlet " + prompt):]
    assert routed.new_tokens == 9
    assert post[0]["fluency"] == pytest.approx(mean_ngram_entropy([routed.text]))
