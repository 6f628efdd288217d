"""Greedy generation: batched equals one at a time, with and without the key/value cache and a shared prefix."""

from __future__ import annotations

import pytest

from conftest import LONG_DEMOS
from lmedit.forward import generate_greedy


def test_batched_generation_equals_one_at_a_time(tiny_model, word_tok):
    prompts = ["the capital of france is", "who", "the eiffel tower is located in"]
    batched = generate_greedy(tiny_model, word_tok, prompts, [3, 2, 4], batch_size=3)
    alone = [generate_greedy(tiny_model, word_tok, [p], [n])[0] for p, n in zip(prompts, [3, 2, 4])]
    assert batched == alone
    assert [len(g) for g in batched] == [3, 2, 4] or any(word_tok.eos_token_id in g for g in batched)


def test_generation_without_the_cache_gives_the_same_tokens_and_feeds_the_whole_sequence(tiny_model, word_tok):
    prompts = ["the capital of france is", "who", "the eiffel tower is located in"]
    lengths = []
    hook = tiny_model.register_forward_pre_hook(lambda _m, _a, kw: lengths.append(kw["input_ids"].shape[1]),
                                                with_kwargs=True)
    try:
        cached = generate_greedy(tiny_model, word_tok, prompts, [3, 3, 3], batch_size=3)
        fed_cached, lengths[:] = list(lengths), []
        uncached = generate_greedy(tiny_model, word_tok, prompts, [3, 3, 3], batch_size=3, use_cache=False)
    finally:
        hook.remove()
    assert uncached == cached
    width = len(word_tok(prompts[2]).input_ids)  # the longest prompt sets the padded width
    assert fed_cached == [width, 1, 1] and lengths == [width, width + 1, width + 2]


PROMPTS = [LONG_DEMOS + "who wrote hamlet", LONG_DEMOS + "the capital of france is", "the sun is",
           LONG_DEMOS + "the king plays"]
WANTED = [3, 4, 2, 3]


def _alone(model, tok, prompts, wanted):
    return [generate_greedy(model, tok, [p], [n])[0] for p, n in zip(prompts, wanted)]


def test_prompts_that_share_a_long_start_prefill_it_once_and_decode_as_alone(tiny_model, word_tok,
                                                                              generation_prefixes):
    together = generate_greedy(tiny_model, word_tok, PROMPTS, WANTED, batch_size=8, share_prefix=True)
    used = list(generation_prefixes)
    assert together == _alone(tiny_model, word_tok, PROMPTS, WANTED)
    # the three prompts behind the demonstrations decode behind one cached prefix; "the sun is" alone
    assert sorted(used, key=str) == [len(word_tok(LONG_DEMOS).input_ids), None]


@pytest.mark.parametrize("settings", [{"share_prefix": False, "batch_size": 8}, {"share_prefix": True, "batch_size": 1},
                                      {"share_prefix": True, "batch_size": 8, "use_cache": False}])
def test_no_prefix_is_shared_unless_asked_with_the_cache_and_a_batch(tiny_llama, word_tok, generation_prefixes,
                                                                      settings):
    generated = generate_greedy(tiny_llama, word_tok, PROMPTS, WANTED, **settings)
    assert generation_prefixes and set(generation_prefixes) == {None}
    assert generated == _alone(tiny_llama, word_tok, PROMPTS, WANTED)


def test_a_generation_prefix_that_fails_its_check_is_not_used(tiny_llama, word_tok, generation_prefixes, monkeypatch):
    import lmedit.forward.prefix as prefix_module

    real = prefix_module.logits_at
    monkeypatch.setattr(prefix_module, "logits_at", lambda model, inputs, read: real(model, inputs, read) + 1e-3)
    generated = generate_greedy(tiny_llama, word_tok, PROMPTS, WANTED, batch_size=8, share_prefix=True)
    assert set(generation_prefixes) == {None}
    assert generated == _alone(tiny_llama, word_tok, PROMPTS, WANTED)
