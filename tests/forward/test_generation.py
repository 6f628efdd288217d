"""Greedy generation: batched equals one at a time, with and without the key/value cache."""

from __future__ import annotations

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
